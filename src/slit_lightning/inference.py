"""Running a trained model on audio files: decode, batch, caption or answer.

``slit caption FILE... --ckpt PATH`` is a thin layer over :func:`caption_files`, ``slit ask FILE
QUESTION --ckpt PATH`` over :func:`ask`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slit_lightning.data.audio import AudioError, crop, load_audio, pad_batch, seconds_to_samples
from slit_lightning.llm import Generation
from slit_lightning.stages import Instruct, SLITStage, Stage1, Stage2
from slit_lightning.stages.base import CheckpointError


def load_stage(
    ckpt: str | Path, device: str = "cpu", encoder: str | None = None, llm: str | None = None
) -> SLITStage:
    """A checkpoint of any stage, loaded with ``weights_only=True``, in eval mode; the stage is
    read from its hyper-parameters.

    ``encoder`` / ``llm`` point at the frozen models when they have moved since training (the
    checkpoint stores them by reference and checks that they are the same weights)."""
    hparams = read_checkpoint(ckpt).get("hyper_parameters", {})
    if "held_out_tasks" in hparams:
        cls: type[SLITStage] = Instruct
    elif "llm" in hparams:
        cls = Stage2
    elif "embed_dim" in hparams:
        cls = Stage1
    else:
        raise CheckpointError(f"{ckpt} is not a checkpoint of a slit-lightning stage")
    overrides: dict[str, Any] = {"encoder": encoder} if encoder else {}
    if cls is not Stage1:
        overrides["init_from"] = None  # the weights come from this checkpoint
        if llm:
            overrides["llm"] = llm
    model = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=True, **overrides)
    return model.eval()


def load_stage2(
    ckpt: str | Path, device: str = "cpu", encoder: str | None = None, llm: str | None = None
) -> Stage2:
    """A stage-2 or instruction-tuned checkpoint (what can caption and answer), in eval mode."""
    hparams = read_checkpoint(ckpt).get("hyper_parameters", {})
    if "llm" not in hparams:
        raise CheckpointError(f"{ckpt} is not a stage-2 checkpoint (it names no LLM)")
    model = load_stage(ckpt, device, encoder, llm)
    assert isinstance(model, Stage2)
    return model


def read_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (``weights_only=True``); a clear error for a missing or bad file."""
    if not Path(ckpt).is_file():
        raise CheckpointError(f"no checkpoint at {ckpt}")
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{ckpt} is not a readable checkpoint: {err}") from err


def training_crop_seconds(ckpt: str | Path) -> float | None:
    """The ``data.max_seconds`` a checkpoint was trained with (None when it did not record it)."""
    data = read_checkpoint(ckpt).get("datamodule_hyper_parameters", {})
    return data.get("max_seconds")


def caption_files(
    model: Stage2,
    paths: Sequence[str | Path],
    batch_size: int = 8,
    max_seconds: float | None = None,
    settings: Generation | None = None,
) -> Iterator[tuple[str, str | AudioError]]:
    """``(path, caption)`` per file in order; ``(path, AudioError)`` for a file that cannot be read.

    Any format, rate and channel count the data pipeline reads; clips are mixed to mono and
    resampled to the encoder's rate, and cut to ``max_seconds`` (None: the encoder's own window
    if it has one, else the whole clip)."""
    rate = model.encoder.sample_rate
    limit = max_seconds or getattr(model.encoder, "max_seconds", None)
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        waves: dict[str, torch.Tensor] = {}
        failed: dict[str, AudioError] = {}
        for path in chunk:
            try:
                wave = load_audio(path, rate)
            except AudioError as err:
                failed[path] = err
                continue
            waves[path] = crop(wave, seconds_to_samples(limit, rate), None) if limit else wave
        captions = dict(zip(waves, _caption(model, list(waves.values()), settings), strict=True))
        for path in chunk:
            yield path, captions[path] if path in captions else failed[path]


@torch.no_grad()
def ask(
    model: Stage2,
    path: str | Path,
    question: str,
    max_seconds: float | None = None,
    settings: Generation | None = None,
) -> str:
    """The model's answer to ``question`` about one audio file (raises ``AudioError`` if it
    cannot be read). An instruction-tuned model's queries read the question; a stage-2 model
    gets it as the LLM's prompt only."""
    rate = model.encoder.sample_rate
    limit = max_seconds or getattr(model.encoder, "max_seconds", None)
    wave = load_audio(str(path), rate)
    if limit:
        wave = crop(wave, seconds_to_samples(limit, rate), None)
    audio, mask = pad_batch([wave])
    batch = {"audio": audio.to(model.device), "audio_mask": mask.to(model.device)}
    return model.answer(batch, [question], settings=settings)[0]


@torch.no_grad()
def _caption(model: Stage2, waves: list[torch.Tensor], settings: Generation | None) -> list[str]:
    if not waves:
        return []
    audio, mask = pad_batch(waves)
    batch = {"audio": audio.to(model.device), "audio_mask": mask.to(model.device)}
    return model.caption(batch, settings)
