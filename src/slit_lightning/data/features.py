"""Frozen-feature cache: each clip's encoder output computed once and read back instead of audio.

The audio encoder never trains, so its output for a clip never changes. ``slit cache-features``
(:func:`slit_lightning.data.cache_features.write_feature_cache`) runs it once over the configured splits and stores every clip's
frames; a stage whose data module names the cache folder (``data.feature_cache``) then reads them
and skips decoding, resampling and the encoder altogether.

Layout, under ``{feature_cache}/{key}/`` where ``key`` is a digest of the encoder's identity (its
weights, feature settings, layer and sample rate, see :attr:`AudioEncoder.identity`)::

    cache.json          identity, format, width, the splits written
    {split}.json        clip_id -> [offset, frames, seconds, fingerprint]; skipped clips + reason
    {split}.{id}.f16    every kept frame of the split, float16, shape (frames, width), raw

A cache built with any other encoder, layer or rate lives under another key and is never read.
Each clip's entry records a fingerprint of its audio (path, size and modification time of the file,
or a digest of the bytes for clips read from shards); a clip whose audio changed after caching is
skipped as ``stale_feature_cache`` (counted and logged like any bad input), never silently given
old features.

Crops: the cache holds whole clips (up to the encoder's own window, e.g. 30 s for Whisper); the
training crop is taken on the frames, a random window of ``max_seconds`` worth of them, so random
crops still vary each epoch. For clips no longer than ``max_seconds`` (the built-in corpus) this is
exactly what encoding the audio gives; for longer clips the frames of a window also saw the audio
around it (the encoder's context), which differs slightly from encoding the window alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slit_lightning.data.sources import Clip, Skip

log = logging.getLogger(__name__)

FORMAT = "slit-features-1"
STALE = "stale_feature_cache"
NOT_CACHED = "not_in_feature_cache"


def cache_folder(root: str | Path, identity: str) -> Path:
    """Where the features of the encoder named ``identity`` live under ``root``."""
    digest = hashlib.blake2b(f"{FORMAT}|{identity}".encode(), digest_size=8).hexdigest()
    return Path(root) / digest


def fingerprint(audio: str | bytes) -> str:
    """What must not change for a cached clip to stay valid: the file's path, size and
    modification time, or a digest of the bytes when the clip came from a shard. A location that
    cannot be stat-ed (a remote URL) is identified by its address only."""
    if isinstance(audio, bytes):
        return "blake2b:" + hashlib.blake2b(audio, digest_size=12).hexdigest()
    try:
        stat = os.stat(audio)
    except OSError:
        return f"url:{audio}"
    return f"file:{audio}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class Entry:
    """Where one clip's frames are in its split's array."""

    offset: int
    frames: int
    seconds: float
    fingerprint: str


class FeatureSplit:
    """One split's cached features. The array is memory-mapped on first use in each process, so
    the object is cheap to hand to loader workers."""

    def __init__(self, folder: Path, split: str, identity: str) -> None:
        self.folder, self.split, self.identity = folder, split, identity
        index = json.loads((folder / f"{split}.json").read_text(encoding="utf-8"))
        self.data: str = index["data"]
        self.width: int = index["width"]
        self.total: int = index["frames"]
        self.entries = {k: Entry(*v) for k, v in index["clips"].items()}
        self.skipped: dict[str, list[str]] = index["skipped"]
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            path = self.folder / self.data
            self._array = np.memmap(path, np.float16, "r", shape=(self.total, self.width))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # workers map the file themselves

    def lookup(self, clip: Clip, audio_fingerprint: str) -> np.ndarray | Skip:
        """The clip's frames ``(T, D)`` float16, or why there are none; ``audio_fingerprint`` is
        :func:`fingerprint` of the clip's audio now."""
        entry = self.entries.get(clip.clip_id)
        if entry is None:
            if clip.name in self.skipped:
                reason, detail = self.skipped[clip.name]
                return Skip(clip.name, reason, f"{detail} (when the features were cached)")
            return Skip(
                clip.name, NOT_CACHED, f"not in the {self.split} cache; rerun slit cache-features"
            )
        if audio_fingerprint != entry.fingerprint:
            return Skip(
                clip.name,
                STALE,
                "audio changed or moved after caching (path, size or modification time differ);"
                " rerun slit cache-features",
            )
        return self.array[entry.offset : entry.offset + entry.frames]

    def seconds(self, clip_id: str) -> float:
        return self.entries[clip_id].seconds


def crop_frames(
    frames: np.ndarray, seconds: float, max_seconds: float, generator: torch.Generator | None
) -> Tensor:
    """The frames of at most ``max_seconds`` of a clip of ``seconds``: a random window when
    ``generator`` is given (training), the start otherwise; as a float16 tensor."""
    count = frames.shape[0]
    keep = count
    if seconds > max_seconds:
        # frames of the window, rounded down as an encoder's frame count for that audio is
        keep = max(1, min(count, math.floor(count * max_seconds / seconds + 1e-6)))
    start = 0
    if generator is not None and keep < count:
        start = int(torch.randint(0, count - keep + 1, (1,), generator=generator).item())
    return torch.from_numpy(np.array(frames[start : start + keep]))


def pad_frames(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(T_i, D)`` tensors -> ``(B, T, D)`` right-padded with zeros and ``(B, T)`` True on frames."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = True
    return out, mask


def open_feature_cache(root: str | Path, identity: str) -> dict[str, FeatureSplit]:
    """The cached splits for the encoder named ``identity`` (empty when none were written)."""
    folder = cache_folder(root, identity)
    meta_path = folder / "cache.json"
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("identity") != identity or meta.get("format") != FORMAT:
        return {}  # a digest collision or an older format: never read features of another encoder
    return {split: FeatureSplit(folder, split, identity) for split in meta["splits"]}
