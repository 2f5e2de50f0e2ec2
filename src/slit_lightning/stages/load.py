"""Running a trained model on audio files: decode, batch, caption or answer.

``slit caption FILE... --ckpt PATH`` is a thin layer over :func:`caption_files`, ``slit ask FILE
QUESTION --ckpt PATH`` over :func:`ask`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slit_lightning.data.audio import AudioError, crop, load_audio, pad_batch, seconds_to_samples
from slit_lightning.model.llm import Generation
from slit_lightning.model.state import read_checkpoint
from slit_lightning.stages import Instruct, SLITStage, Stage1, Stage2
from slit_lightning.stages.base import CheckpointError, stage_of

if TYPE_CHECKING:
    from slit_lightning.model.heads import ContrastiveHeads, TextGenerator
    from slit_lightning.model.slit import SLIT


def load_stage(
    ckpt: str | Path, device: str = "cpu", encoder: str | None = None, llm: str | None = None
) -> SLITStage:
    """A checkpoint of any stage, loaded with ``weights_only=True``, in eval mode; the stage is
    read from its hyper-parameters.

    ``encoder`` / ``llm`` point at the frozen models when they have moved since training (the
    checkpoint stores them by reference and checks that they are the same weights). Without them,
    a reference stored as a relative path that does not resolve from the working directory is
    looked up from the checkpoint's parent folders (`_beside`), so a run's checkpoints load from
    anywhere as long as the run's folder is intact."""
    contents = read_checkpoint(ckpt)
    stage = stage_of(contents)
    stored = contents.get("hyper_parameters", {})
    encoder = encoder or _beside(ckpt, stored.get("encoder"))
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
        llm = llm or _beside(ckpt, stored.get("llm"))
        if llm:
            overrides["llm"] = llm
    model = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=True, **overrides)
    return model.eval()


def _beside(ckpt: str | Path, stored: Any) -> str | None:
    """``stored``, a frozen model's relative path that does not exist from the working directory,
    found from one of the checkpoint's parent folders instead (runs keep their checkpoints under
    the folder they were started in: ``runs/demo/stage2/checkpoints/last.ckpt`` next to
    ``runs/demo/encoder``). None where it resolves as stored, is a hub id, or is not found: the
    stored reference then stands (and the checkpoint still checks the weights are the same)."""
    if not isinstance(stored, str) or not stored or Path(stored).is_absolute():
        return None
    if Path(stored).exists():
        return None
    for parent in Path(ckpt).resolve().parents:
        if (parent / stored).is_dir():
            return str(parent / stored)
    return None


def load_stage2(
    ckpt: str | Path, device: str = "cpu", encoder: str | None = None, llm: str | None = None
) -> Stage2:
    """A stage-2 or instruction-tuned checkpoint (what can caption and answer), in eval mode."""
    stage = stage_of(read_checkpoint(ckpt))
    if stage not in ("Stage2", "Instruct"):
        raise CheckpointError(
            f"{ckpt} is not a stage-2 checkpoint (it is {stage or 'of no known stage'}, with no"
            " LLM): captions and answers need a stage-2 or instruction-tuned checkpoint"
        )
    model = load_stage(ckpt, device, encoder, llm)
    assert isinstance(model, Stage2)
    return model


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


def load_slit(
    ckpt: str | Path,
    device: str = "cpu",
    stage1: str | Path | None = None,
    encoder: str | None = None,
    llm: str | None = None,
) -> SLIT:
    """A training checkpoint as a :class:`~slit_lightning.model.slit.SLIT` (plain modules, no
    LightningModule kept); ``stage1`` adds a stage-1 checkpoint's contrastive heads to a
    stage-2 / instruction-tuned one. Use ``SLIT.from_pretrained``, which calls this."""
    from slit_lightning.model.slit import SLIT

    stage = load_stage(ckpt, device, encoder, llm)
    hp = stage.hparams
    origin: dict[str, Any] = {
        "source": str(ckpt),
        "encoder": encoder or hp.encoder,
        "encoder_layer": hp.encoder_layer,
    }
    heads = generator = None
    if isinstance(stage, Stage1):
        heads = _heads(stage)
    else:
        assert isinstance(stage, Stage2)
        generator = _generator(stage)
        origin |= {"llm": llm or hp.llm, "llm_dtype": hp.llm_dtype}
        origin["trust_remote_code"] = hp.trust_remote_code
    if stage1 is not None:
        if heads is not None:
            raise CheckpointError(f"{ckpt} is a stage-1 checkpoint already; leave out stage1")
        first = load_stage(stage1, device, encoder or hp.encoder)
        if not isinstance(first, Stage1):
            raise CheckpointError(f"stage1={stage1} is not a stage-1 checkpoint")
        if first.encoder.identity != stage.encoder.identity:
            raise CheckpointError(
                f"{stage1} was trained on encoder {first.encoder.identity!r} but {ckpt} on"
                f" {stage.encoder.identity!r}: give the stage-1 checkpoint of the same run"
            )
        heads, origin["stage1"] = _heads(first), str(stage1)
    return SLIT(stage.encoder, heads, generator, training_crop_seconds(ckpt), origin)


def _heads(stage: Stage1) -> ContrastiveHeads:
    from slit_lightning.model.heads import ContrastiveHeads

    hp = stage.hparams
    return ContrastiveHeads(
        stage.qformer,
        stage.audio_proj,
        stage.text_proj,
        float(stage.temperature.detach().clamp(0.001, 0.5)),
        stage.tokenizer,
        hp.text_pooling,
        hp.max_text_len,
    )


def _generator(stage: Stage2) -> TextGenerator:
    from slit_lightning.model.heads import TextGenerator

    instructed = isinstance(stage, Instruct)
    return TextGenerator(
        stage.qformer,
        stage.llm_proj,
        stage.llm,
        instructed,
        tokenizer=stage.tokenizer if instructed else None,
        prompt=stage.hparams.prompt,
        max_instruction_len=stage.hparams.max_instruction_len if instructed else None,
        generation=stage.generation,
        windows=stage.hparams.windows,
    )
