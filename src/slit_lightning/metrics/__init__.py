"""Evaluation metrics: retrieval and captioning (classification and QA follow)."""
