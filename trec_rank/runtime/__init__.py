"""Run machinery every job kind shares: run dir, checkpoints, safe loading, optimizers, sharded models."""
