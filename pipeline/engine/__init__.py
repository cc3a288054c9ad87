"""Training, evaluation, prediction and checkpoints: the loops that drive models and metrics."""
