"""A training checkpoint of any stage as plain modules, without Lightning or the stage classes.

A checkpoint holds the stage's hyper-parameters (the encoder, BERT and LLM it was built from, the
Q-Former's sizes, text and decoding settings) and the trained weights; the frozen encoder and LLM
are stored by reference with their identities. :func:`read_training_checkpoint` rebuilds the same
modules the stage built (``QFormer.from_bert`` with the stage's sizes, the projections), loads the
trained weights into them with every key and shape checked, and refuses frozen parts that are not
the ones the checkpoint was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from slit_lightning.model.encoders import HFAudioEncoder
from slit_lightning.model.heads import ContrastiveHeads, SLITParts, TextGenerator
from slit_lightning.model.llm import FrozenLLM, Generation
from slit_lightning.model.qformer import QFormer
from slit_lightning.model.state import (
    CheckpointError,
    check_state,
    frozen_references,
    read_checkpoint,
    stage_of,
)

STAGES = ("Stage1", "Stage2", "Instruct")
_REBUILD = "Build the model with the checkpoint's own settings; was the checkpoint edited?"


def read_training_checkpoint(
    ckpt: str | Path,
    device: str = "cpu",
    stage1: str | Path | None = None,
    encoder: str | None = None,
    llm: str | None = None,
) -> SLITParts:
    """A ``.ckpt`` of stage 1, stage 2 or instruction tuning as :class:`SLITParts`.

    Args:
        ckpt: the checkpoint (read with ``weights_only=True``).
        device: where the modules go.
        stage1: with a stage-2 / instruction-tuned checkpoint, the stage-1 checkpoint of the same
            run whose contrastive heads then serve embeddings and similarity too.
        encoder, llm: the frozen models' folders when they have moved since training.
    """
    contents = read_checkpoint(ckpt)
    stage = _stage(ckpt, contents)
    hp = contents.get("hyper_parameters") or {}
    encoder_name = encoder or beside(ckpt, hp.get("encoder")) or hp["encoder"]
    # checkpoints from before encoder_window existed ran the full window
    layer, window = hp.get("encoder_layer", -1), hp.get("encoder_window", "full")
    audio = HFAudioEncoder.from_pretrained(encoder_name, layer=layer, window=window)
    _same_frozen(ckpt, contents, "encoder", audio.identity)
    origin: dict[str, Any] = {
        "source": str(ckpt),
        "encoder": encoder_name,
        "encoder_layer": layer,
        "encoder_window": window,
    }
    heads = generator = None
    if stage == "Stage1":
        heads = _heads(contents, audio.width)
    else:
        llm_name = llm or beside(ckpt, hp.get("llm")) or hp["llm"]
        generator = _generator(ckpt, contents, stage, audio.width, llm_name)
        origin |= {"llm": llm_name, "llm_dtype": hp.get("llm_dtype")}
        origin["trust_remote_code"] = bool(hp.get("trust_remote_code", False))
    if stage1 is not None:
        if heads is not None:
            raise CheckpointError(f"{ckpt} is a stage-1 checkpoint already; leave out stage1")
        first = read_checkpoint(stage1)
        if stage_of(first) != "Stage1":
            raise CheckpointError(f"stage1={stage1} is not a stage-1 checkpoint")
        trained_on = frozen_references(first).get("encoder")
        if trained_on is not None and trained_on != audio.identity:
            raise CheckpointError(
                f"{stage1} was trained on encoder {trained_on!r} but {ckpt} on"
                f" {audio.identity!r}: give the stage-1 checkpoint of the same run"
            )
        heads, origin["stage1"] = _heads(first, audio.width), str(stage1)
    data = contents.get("datamodule_hyper_parameters") or {}
    parts = SLITParts(audio, heads, generator, data.get("max_seconds"), origin)
    return parts.to(device)


def beside(ckpt: str | Path, stored: Any) -> str | None:
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


def _stage(ckpt: str | Path, contents: dict[str, Any]) -> str:
    stage = stage_of(contents)
    if stage not in STAGES:
        raise CheckpointError(f"{ckpt} is not a checkpoint of a slit-lightning stage")
    return str(stage)


def _same_frozen(ckpt: str | Path, contents: dict[str, Any], part: str, identity: str) -> None:
    saved = frozen_references(contents).get(part)
    if saved is not None and saved != identity:
        raise CheckpointError(
            f"{ckpt} was trained on {part} {saved!r} but the {part} loaded is {identity!r}:"
            f" point --{part} at the {part} the checkpoint was trained with"
        )


def _qformer(hp: dict[str, Any], audio_width: int) -> QFormer:
    """The Q-Former the stage built (its weights are then replaced by the checkpoint's)."""
    return QFormer.from_bert(
        hp["bert"],
        hp["num_queries"],
        hp["cross_attention_freq"],
        encoder_width=audio_width,
        num_layers=hp.get("qformer_layers"),
        dropout=hp.get("qformer_dropout"),
    )


def _trained(contents: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in contents["state_dict"].items() if k.startswith(prefixes)}


def _heads(contents: dict[str, Any], audio_width: int) -> ContrastiveHeads:
    hp = contents["hyper_parameters"]
    qformer = _qformer(hp, audio_width)
    width, dim = qformer.config.hidden_size, hp["embed_dim"]
    state = _trained(contents, ("qformer.", "audio_proj.", "text_proj."))
    temperature = contents["state_dict"]["temperature"]
    heads = ContrastiveHeads(
        qformer,
        nn.Linear(width, dim),
        nn.Linear(width, dim),
        float(temperature.float().clamp(0.001, 0.5)),
        AutoTokenizer.from_pretrained(hp["bert"]),
        hp["text_pooling"],
        hp["max_text_len"],
    )
    state["temperature"] = heads.temperature
    check_state(heads.state_dict(), state, "the stage-1 checkpoint's heads", _REBUILD)
    heads.load_state_dict(state)
    return heads


def _generator(
    ckpt: str | Path, contents: dict[str, Any], stage: str, audio_width: int, llm_name: str
) -> TextGenerator:
    hp = contents["hyper_parameters"]
    llm = FrozenLLM.from_pretrained(
        llm_name, hp.get("llm_dtype"), bool(hp.get("trust_remote_code", False))
    )
    _same_frozen(ckpt, contents, "llm", llm.identity)
    qformer = _qformer(hp, audio_width)
    instructed = stage == "Instruct"
    generator = TextGenerator(
        qformer,
        nn.Linear(qformer.config.hidden_size, llm.width),
        llm,
        instructed,
        tokenizer=AutoTokenizer.from_pretrained(hp["bert"]) if instructed else None,
        prompt=hp.get("prompt", ""),
        max_instruction_len=hp.get("max_instruction_len") if instructed else None,
        generation=Generation(**(hp.get("generation") or {})),
        windows=int(hp.get("windows", 1)),
    )
    state = _trained(contents, ("qformer.", "llm_proj."))
    what = f"the {stage} checkpoint's Q-Former and projection"
    check_state(generator.state_dict(), state, what, _REBUILD, optional=("llm.",))
    generator.load_state_dict(state, strict=False)
    return generator
