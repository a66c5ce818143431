"""Training: the TrainingMode callback, the data module, `scprint fit` and `scprint train-run`."""
