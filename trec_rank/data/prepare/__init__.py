"""Dataset preparation: public sources -> split Parquet directories with a manifest each."""
