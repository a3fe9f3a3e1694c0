"""Models: sparse arch (TorchRec EBC/EC, sharded by DMP outside) + a dense over-arch per model."""
