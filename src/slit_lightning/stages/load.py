"""A training checkpoint as its stage module (LightningModule), in eval mode: what ``slit eval``
runs. Inference without Lightning loads checkpoints as plain modules instead
(:func:`slit_lightning.model.load.read_training_checkpoint`, behind ``SLIT.from_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slit_lightning.model.load import beside
from slit_lightning.model.state import CheckpointError, read_checkpoint, stage_of
from slit_lightning.stages import Instruct, SLITStage, Stage1, Stage2


def load_stage(
    ckpt: str | Path, device: str = "cpu", encoder: str | None = None, llm: str | None = None
) -> SLITStage:
    """A checkpoint of any stage, loaded with ``weights_only=True``, in eval mode; the stage is
    read from its hyper-parameters.

    ``encoder`` / ``llm`` point at the frozen models when they have moved since training (the
    checkpoint stores them by reference and checks that they are the same weights). Without them,
    a reference stored as a relative path that does not resolve from the working directory is
    looked up from the checkpoint's parent folders (:func:`~slit_lightning.model.load.beside`), so a run's checkpoints load from
    anywhere as long as the run's folder is intact."""
    contents = read_checkpoint(ckpt)
    stage = stage_of(contents)
    stored = contents.get("hyper_parameters", {})
    encoder = encoder or beside(ckpt, stored.get("encoder"))
    classes: dict[str | None, type[SLITStage]] = {
        "Instruct": Instruct,
        "Stage2": Stage2,
        "Stage1": Stage1,
    }
    if stage not in classes:
        raise CheckpointError(f"{ckpt} is not a checkpoint of a slit-lightning stage")
    cls = classes[stage]
    overrides: dict[str, Any] = {"encoder": encoder} if encoder else {}
    if cls is not Stage1:
        overrides["init_from"] = None  # the weights come from this checkpoint
        llm = llm or beside(ckpt, stored.get("llm"))
        if llm:
            overrides["llm"] = llm
    model = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=True, **overrides)
    return model.eval()
