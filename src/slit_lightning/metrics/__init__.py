"""Evaluation metrics: retrieval (captioning, classification and QA follow)."""
