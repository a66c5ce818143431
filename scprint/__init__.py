"""scPRINT pre-training pipeline: data stages, gene embeddings and the scPRINT model."""

__version__ = "0.1.0"
