"""``slit export``: a trained model as a folder that loads without Lightning or the training code.

Layout of an exported folder::

    slit_config.json     what the folder holds: Q-Former sizes, text settings, decoding, crop,
                         the frozen parts' identities (written last: its presence marks a complete
                         folder)
    model.safetensors    the trained weights: ``heads.*`` (stage-1 Q-Former, projections,
                         temperature) and/or ``generator.*`` (Q-Former, LLM projection)
    tokenizer/           the Q-Former's (BERT) tokenizer
    encoder/             the frozen audio encoder's files (config, weights, preprocessor)
    llm/                 the frozen LLM's files with its tokenizer (generating models only)

The frozen encoder and LLM are copied in when they were loaded from a local folder, so the folder
is self-contained. A model loaded by hub id, or any model with ``copy_frozen=False`` (say, a
13B LLM already on disk), is recorded by name instead. Either way the config keeps each frozen
part's identity (a digest of its weights) and loading refuses a part that does not match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from slit_lightning.atomic import save_folder_atomic
from slit_lightning.errors import SLITError
from slit_lightning.model.encoders import HFAudioEncoder
from slit_lightning.model.heads import ContrastiveHeads, SLITParts, TextGenerator
from slit_lightning.model.llm import FrozenLLM, Generation
from slit_lightning.model.qformer import QFormer, QFormerConfig
from slit_lightning.model.state import check_state

log = logging.getLogger(__name__)

FORMAT = "slit-lightning-export"
VERSION = 2  # 2 added the generator's "windows" (older readers would ignore them)
CONFIG = "slit_config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"


class ExportError(SLITError, ValueError):
    """An export folder that cannot be written or read; the message says what to do."""


@dataclasses.dataclass
class ExportSummary:
    """What :func:`export_model` wrote."""

    out: Path
    parts: list[str]
    copied: list[str]
    referenced: dict[str, str]
    megabytes: float

    def line(self) -> str:
        refs = "".join(f", {k} referenced as {v}" for k, v in self.referenced.items())
        copied = f", copied in: {', '.join(self.copied)}" if self.copied else ""
        return (
            f"exported to {self.out}: {' + '.join(self.parts)}, {self.megabytes:.1f} MB"
            f"{copied}{refs}"
        )


def export_model(
    model: SLITParts,
    out: str | Path,
    copy_frozen: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write ``model`` to the folder ``out`` (see the module's docstring), atomically.

    Args:
        model: the parts of a loaded model (``SLIT.save_pretrained`` passes its own).
        out: folder to create; an existing non-empty one is refused unless ``overwrite`` and it
            holds an earlier export.
        copy_frozen: copy the frozen encoder / LLM folders in (else record them by name).
        overwrite: replace an earlier export at ``out``.
        progress: ``tick(done, total)`` over the files written.
    """
    out = Path(out)
    _check_target(out, overwrite)
    summary = ExportSummary(out, [], [], {}, 0.0)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        frozen = _frozen_sources(model, tmp, copy_frozen, summary)
        total = len(frozen) + 2
        tick = progress or (lambda done, total: None)
        for done, (source, dest) in enumerate(frozen, start=1):
            shutil.copy2(source, dest)
            tick(done, total)
        config, state = _config_and_state(model, summary)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        tokenizer = model.heads.tokenizer if model.heads else model.generator.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER)
        tick(total - 1, total)
        config["encoder"] |= _ref(summary, "encoder")
        if "generator" in config:
            config["generator"]["llm"] |= _ref(summary, "llm")
        (tmp / CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
        tick(total, total)
        summary.megabytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6

    if overwrite and (out / CONFIG).is_file():
        shutil.rmtree(out)
    save_folder_atomic(out, write, is_complete=lambda p: (p / CONFIG).is_file())
    return summary


def _ref(summary: ExportSummary, part: str) -> dict[str, str]:
    """Where the config says a frozen part is: a folder inside the export, or its name."""
    if part in summary.copied:
        return {"folder": part}
    return {"name": summary.referenced[part]}


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty: choose another --out or --overwrite")
        if not (out / CONFIG).is_file():
            raise ExportError(f"{out} holds something other than an export; it is left alone")


def _frozen_sources(
    model: SLITParts, tmp: Path, copy: bool, summary: ExportSummary
) -> list[tuple[Path, Path]]:
    """(source, destination) of every file to copy; fills ``summary.copied / referenced``."""
    names = {"encoder": model.origin.get("encoder")}
    if model.generator is not None:
        names["llm"] = model.origin.get("llm")
    files = []
    for part, name in names.items():
        if not name:
            raise ExportError(f"the model does not record where its {part} came from")
        folder = Path(name)
        if copy and folder.is_dir():
            (tmp / part).mkdir()
            files += [(f, tmp / part / f.name) for f in sorted(folder.iterdir()) if f.is_file()]
            summary.copied.append(part)
        else:
            summary.referenced[part] = str(folder.resolve()) if folder.is_dir() else name
            if copy:
                log.info("%s %s is not a local folder: the export refers to it by name", part, name)
    return files


def _config_and_state(
    model: SLITParts, summary: ExportSummary
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON config and the trained weights (frozen parts left out)."""
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "source": model.origin.get("source"),
        "max_seconds": model.max_seconds,
        "encoder": {
            "identity": model.encoder.identity,
            "layer": model.origin.get("encoder_layer", -1),
            "window": model.origin.get("encoder_window", "full"),
        },
    }
    state: dict[str, torch.Tensor] = {}
    if model.heads is not None:
        heads = model.heads
        config["heads"] = {
            "qformer": dataclasses.asdict(heads.qformer.config),
            "embed_dim": heads.audio_proj.out_features,
            "text_pooling": heads.text_pooling,
            "max_text_len": heads.max_text_len,
            "stage1": model.origin.get("stage1", model.origin.get("source")),
        }
        state |= _prefixed("heads.", heads)
        summary.parts.append("contrastive heads")
    if model.generator is not None:
        gen = model.generator
        config["generator"] = {
            "qformer": dataclasses.asdict(gen.qformer.config),
            "instructed": gen.instructed,
            "prompt": gen.prompt,
            "max_instruction_len": gen.max_instruction_len,
            "windows": gen.windows,
            "generation": dataclasses.asdict(gen.generation),
            "llm": {
                "identity": gen.llm.identity,
                "dtype": model.origin.get("llm_dtype"),
                "trust_remote_code": bool(model.origin.get("trust_remote_code", False)),
            },
        }
        state |= {k: v for k, v in _prefixed("generator.", gen).items() if ".llm." not in k}
        summary.parts.append("instruction-tuned generator" if gen.instructed else "generator")
    return config, state


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------- loading


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``slit_config.json``, checked for format and version."""
    path = folder / CONFIG
    if not path.is_file():
        raise ExportError(
            f"{folder} is not an exported model (no {CONFIG}); write one with"
            " `slit export --ckpt PATH --out DIR`, or give a training checkpoint (.ckpt)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}); export the model again") from err
    if not isinstance(config, dict):
        config = {"format": type(config).__name__}
    if config.get("format") != FORMAT or config.get("version", 0) > VERSION:
        raise ExportError(
            f"{path}: format {config.get('format')!r} version {config.get('version')!r} is not"
            f" one this slit-lightning reads ({FORMAT} <= {VERSION}); upgrade slit-lightning"
        )
    return config


def load_exported(folder: str | Path, device: str = "cpu") -> SLITParts:
    """An exported folder's parts (Lightning is never imported); ``SLIT.from_pretrained`` wraps
    them."""
    folder = Path(folder)
    config = read_config(folder)
    enc = config["encoder"]
    # exports from before the window setting ran the full window
    window = enc.get("window", "full")
    encoder = HFAudioEncoder.from_pretrained(_where(folder, enc), layer=enc["layer"], window=window)
    _same("encoder", encoder.identity, enc["identity"], folder)
    state = _read_weights(folder / WEIGHTS)
    tokenizer = None
    if (folder / TOKENIZER).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER))
    heads = generator = None
    if "heads" in config:
        heads = _load_heads(config["heads"], _part(state, "heads."), tokenizer)
    if "generator" in config:
        generator = _load_generator(
            folder, config["generator"], _part(state, "generator."), tokenizer
        )
    origin = {
        "source": str(folder),
        "encoder": _where(folder, enc),
        "encoder_layer": enc["layer"],
        "encoder_window": window,
    }
    if generator is not None:
        llm = config["generator"]["llm"]
        origin |= {"llm": _where(folder, llm), "llm_dtype": llm["dtype"]}
        origin["trust_remote_code"] = llm["trust_remote_code"]
    return SLITParts(encoder, heads, generator, config["max_seconds"], origin).to(device)


def _load_heads(
    config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Any
) -> ContrastiveHeads:
    qformer = QFormer(QFormerConfig(**config["qformer"]))
    width, dim = qformer.config.hidden_size, config["embed_dim"]
    heads = ContrastiveHeads(
        qformer,
        nn.Linear(width, dim),
        nn.Linear(width, dim),
        0.07,  # overwritten by the saved temperature just below
        tokenizer,
        config["text_pooling"],
        config["max_text_len"],
    )
    check_state(heads.state_dict(), state, f"the heads.* weights of {WEIGHTS}", _REEXPORT)
    heads.load_state_dict(state, strict=True)
    return heads


def _load_generator(
    folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Any
) -> TextGenerator:
    spec = config["llm"]
    llm = FrozenLLM.from_pretrained(_where(folder, spec), spec["dtype"], spec["trust_remote_code"])
    _same("llm", llm.identity, spec["identity"], folder)
    qformer = QFormer(QFormerConfig(**config["qformer"]))
    generator = TextGenerator(
        qformer,
        nn.Linear(qformer.config.hidden_size, llm.width),
        llm,
        instructed=bool(config["instructed"]),
        tokenizer=tokenizer if config["instructed"] else None,
        prompt=config["prompt"],
        max_instruction_len=config["max_instruction_len"],
        generation=Generation(**config["generation"]),
        windows=int(config.get("windows", 1)),  # version-1 exports read clips whole
    )
    what = f"the generator.* weights of {folder / WEIGHTS}"
    check_state(generator.state_dict(), state, what, _REEXPORT, optional=("llm.",))
    generator.load_state_dict(state, strict=False)
    return generator


_REEXPORT = f"The folder's {CONFIG} and weights disagree: export the model again"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The folder's safetensors file (never a pickle); an ExportError if it is missing or broken."""
    if not path.is_file():
        raise ExportError(f"{path} is missing: export the model again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(
            f"{path} is not a readable safetensors file ({err}); export again"
        ) from err


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _where(folder: Path, spec: dict[str, Any]) -> str:
    """A frozen part's folder inside the export, or the name it was recorded by."""
    return str(folder / spec["folder"]) if "folder" in spec else spec["name"]


def _same(part: str, loaded: str, recorded: str, folder: Path) -> None:
    if loaded != recorded:
        raise ExportError(
            f"{folder}: the {part} loaded is {loaded!r} but the model was exported with"
            f" {recorded!r}; the referenced {part} has changed: point the export at the right one"
            f" (edit {CONFIG}) or export again"
        )
