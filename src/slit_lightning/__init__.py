"""slit-lightning: SLIT-style audio-text pre-training on PyTorch Lightning."""

__version__ = "0.1.0"
