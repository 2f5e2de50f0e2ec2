"""Writing the frozen-feature cache (``slit cache-features``): every clip of the chosen splits
through the frozen encoder once; :mod:`slit_lightning.data.features` describes the layout and
reads it back."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slit_lightning.atomic import write_json_atomic
from slit_lightning.data.datamodule import AudioTextDataModule, Split
from slit_lightning.data.features import FORMAT, cache_folder

log = logging.getLogger(__name__)


def write_feature_cache(
    encoder: nn.Module,
    datamodule: AudioTextDataModule,
    splits: list[Split],
    root: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Encode every clip of ``splits`` once and store the frames under ``root``.

    ``encoder`` is a frozen :class:`~slit_lightning.model.encoders.AudioEncoder` (any module with
    its ``identity``, ``max_seconds`` and ``(wave, mask) -> (frames, mask)`` call).

    Clips are read whole (up to the encoder's own window), in evaluation order, through the data
    module's loaders, so bad input is skipped and counted as in training and recorded in the
    index with its reason. Each split's frames go to a new file that its index, replaced
    atomically, then names; an interrupted run leaves the previous cache intact.

    Returns per split the number of clips cached, skipped and frames stored.
    """
    folder = cache_folder(root, encoder.identity)
    folder.mkdir(parents=True, exist_ok=True)
    window = getattr(encoder, "max_seconds", None)
    rate = datamodule.hparams.sample_rate
    limit = None if window is None else round(window * rate)
    device = next(encoder.parameters()).device
    counts: dict[str, dict[str, int]] = {}
    total = sum(
        datamodule.stream(s, limit or sys.maxsize).estimated_batches(0) or 0 for s in splits
    )
    step = 0
    for split in splits:
        loader = datamodule.loader(split, limit or sys.maxsize)
        data_name = f"{split}.{uuid.uuid4().hex[:8]}.f16"
        clips: dict[str, list[Any]] = {}
        offset, width = 0, 0
        with open(folder / data_name, "wb") as out, torch.no_grad():
            for batch in loader:
                frames, mask = encoder(batch["audio"].to(device), batch["audio_mask"].to(device))
                width = frames.shape[-1]
                lengths = mask.sum(-1).tolist()
                samples = batch["audio_mask"].sum(-1).tolist()
                for b, clip_id in enumerate(batch["clip_id"]):
                    out.write(frames[b, : lengths[b]].to(torch.float16).cpu().numpy().tobytes())
                    clips[clip_id] = [
                        offset,
                        lengths[b],
                        samples[b] / rate,
                        batch["fingerprint"][b],
                    ]
                    offset += lengths[b]
                step += 1
                if progress is not None:
                    progress(step, max(total, step))
            out.flush()
            os.fsync(out.fileno())
        skipped = {skip.name: [skip.reason, skip.detail] for skip in loader.skips}
        index = {"data": data_name, "width": width, "frames": offset, "clips": clips,
                 "skipped": skipped}  # fmt: skip
        index_path = folder / f"{split}.json"
        previous = (
            json.loads(index_path.read_text("utf-8"))["data"] if index_path.is_file() else None
        )
        write_json_atomic(index_path, index)  # the switch to the new data file
        # a job that opened the previous index may still read its file: keep that one, drop older
        for old in folder.glob(f"{split}.*.f16"):
            if old.name not in (data_name, previous):
                old.unlink()
        meta_path = folder / "cache.json"
        done = json.loads(meta_path.read_text("utf-8"))["splits"] if meta_path.is_file() else []
        meta = {"format": FORMAT, "identity": encoder.identity, "width": width,
                "splits": sorted({*done, split})}  # fmt: skip
        write_json_atomic(meta_path, meta)
        counts[split] = {"clips": len(clips), "skipped": len(skipped), "frames": offset}
        log.info("%s: cached %d clips (%d frames), %d skipped", split, len(clips), offset,
                 len(skipped))  # fmt: skip
    return counts
