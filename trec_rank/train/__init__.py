"""The training system shared by every model: loop, evaluation, metrics, checkpoints."""
