"""Parquet rows -> TorchRec batches."""
