"""slit-lightning: SLIT-style audio-text pre-training on PyTorch Lightning.

``from slit_lightning import SLIT`` is the inference API (:mod:`slit_lightning.model.slit`); it is
imported on first use, so ``import slit_lightning`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["SLIT"]


def __getattr__(name: str) -> Any:
    if name == "SLIT":
        from slit_lightning.model.slit import SLIT

        return SLIT
    raise AttributeError(f"module 'slit_lightning' has no attribute {name!r}")
