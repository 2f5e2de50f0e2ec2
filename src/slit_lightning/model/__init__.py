"""The plain-PyTorch SLIT model: Q-Former, frozen audio encoders, frozen LLM, the heads that join
them, and :class:`~slit_lightning.model.slit.SLIT`, which loads, saves and runs a trained model.
Nothing here imports Lightning."""
