"""Evaluating trained models: the task loop of ``slit eval`` / ``make eval-zeroshot`` and the
audio search index of ``slit index``."""
