"""Published Q-Former weights as they come: a transformers BLIP-2 / InstructBLIP folder or hub id,
or a LAVIS / SALMONN checkpoint file.

A transformers folder carries its sizes (``config.json``: the Q-Former's config and the number of
query tokens), so everything is read from it, and only the Q-Former's tensors are read from the
weight files (never the vision tower or the LLM). A checkpoint file carries tensors only; its
sizes are read from their shapes, except the number of attention heads, which no shape records:
it must be given, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slit_lightning.model.qformer_convert import Layout, hf_config_values

#: transformers model types whose folders hold a Q-Former, and the layout of their weights
FOLDER_LAYOUTS: dict[str, Layout] = {"blip-2": "hf_blip2", "instructblip": "hf_instructblip"}
#: the prefixes of the Q-Former's tensors in those folders
_QFORMER_KEYS = ("qformer.", "query_tokens")


class PublishedWeights:
    """What a published checkpoint holds for the Q-Former.

    Args:
        state_dict: the Q-Former's tensors, in the checkpoint's own names.
        layout: their naming (see :mod:`slit_lightning.model.qformer_convert`).
        config: ``QFormerConfig`` fields the checkpoint states (empty for a bare file).
    """

    def __init__(self, state_dict: dict[str, Tensor], layout: Layout, config: dict[str, Any]):
        self.state_dict, self.layout, self.config = state_dict, layout, config


def read_published(name_or_path: str | Path) -> PublishedWeights:
    """The Q-Former part of a checkpoint file, a transformers folder or a hub id."""
    path = Path(name_or_path)
    if path.is_file():
        return _read_file(path)
    return _read_folder(str(name_or_path))


def _read_file(path: Path) -> PublishedWeights:
    """A LAVIS / SALMONN ``.pth`` (``{"model": {...}, ...}`` as published, or a bare state dict)
    or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        contents: Any = load_file(str(path))
    else:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(contents, Mapping) and isinstance(contents.get(key), Mapping):
            contents = contents[key]  # the training wrapper LAVIS and SALMONN save around it
    if not isinstance(contents, Mapping):
        raise ValueError(f"{path} holds no state dict (a {type(contents).__name__})")
    weights = {k: v for k, v in contents.items() if isinstance(v, Tensor)}
    if any(k.startswith("Qformer.") for k in weights):
        return PublishedWeights(weights, "lavis", {})
    if any(k.startswith(_QFORMER_KEYS) for k in weights):
        return PublishedWeights(weights, "hf_instructblip", {})
    raise ValueError(
        f"{path} holds no Q-Former weights (no Qformer.* as LAVIS and SALMONN save them, no"
        " qformer.* as transformers does)"
    )


def _read_folder(name: str) -> PublishedWeights:
    """A transformers BLIP-2 / InstructBLIP folder or hub id: sizes from ``config.json``, the
    Q-Former's tensors from the (possibly sharded) weight files."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{name}: neither a checkpoint file nor a transformers folder or hub id ({err})"
        ) from err
    layout = FOLDER_LAYOUTS.get(config.model_type)
    if layout is None:
        raise ValueError(
            f"{name} is a {config.model_type!r} model; a Q-Former comes from a BLIP-2 or"
            " InstructBLIP folder (or a LAVIS / SALMONN checkpoint file)"
        )
    values = hf_config_values(config.qformer_config) | {"num_queries": config.num_query_tokens}
    weights: dict[str, Tensor] = {}
    for file in _weight_files(name):
        weights |= _qformer_tensors(file)
    return PublishedWeights(weights, layout, values)


def _weight_files(name: str) -> list[Path]:
    """The weight files of a folder or hub id that hold Q-Former tensors (only those shards)."""
    index = _fetch(name, "model.safetensors.index.json")
    if index is not None:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        needed = sorted({f for k, f in shards.items() if k.startswith(_QFORMER_KEYS)})
        return [_must_fetch(name, f) for f in needed]
    for single in ("model.safetensors", "pytorch_model.bin"):
        found = _fetch(name, single)
        if found is not None:
            return [found]
    raise ValueError(
        f"{name} has no model.safetensors(.index.json) or pytorch_model.bin (for a hub id: none"
        " in the local cache either, when offline)"
    )


def _qformer_tensors(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            keys = [k for k in handle.keys() if k.startswith(_QFORMER_KEYS)]  # noqa: SIM118
            return {k: handle.get_tensor(k) for k in keys}
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith(_QFORMER_KEYS)}


def _fetch(name: str, filename: str) -> Path | None:
    """``filename`` of a local folder, or of a hub id through the local cache / the hub."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename))
    except EntryNotFoundError:  # not in the repository, or (offline) not in the cache
        return None


def _must_fetch(name: str, filename: str) -> Path:
    path = _fetch(name, filename)
    if path is None:
        raise ValueError(f"{name}: the weight index names {filename}, which is missing")
    return path
