"""Packing a manifest into WebDataset tar shards (``key.<ext>`` + ``key.json``).

Large audio-text corpora (LAION-Audio-630K, WavCaps) ship this way, and sequential tar reads are
what keeps a data loader fed from network or spinning storage. Writing goes through webdataset's
``ShardWriter`` so the files are exactly what the wider ecosystem reads and writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import webdataset as wds

from slit_lightning.data.sources import Clip, Skip, SourceSpec, open_source

log = logging.getLogger(__name__)


def write_shards(
    source: str | SourceSpec,
    out_dir: str | Path,
    prefix: str = "shard",
    per_shard: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Copy every clip of ``source`` (audio bytes untouched) into ``out_dir/{prefix}-NNNNNN.tar``.

    Returns counts: ``written``, ``skipped`` (records the source itself rejected) and ``shards``.
    Decoding problems are not judged here; the training pipeline counts those when it reads.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be at least 1, got {per_shard}")
    reader = open_source(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0, "shards": 0}
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for unit in range(reader.num_units):
            for record in reader.iter_unit(unit):
                sample = record if isinstance(record, Skip) else _sample(record, counts["written"])
                if isinstance(sample, Skip):
                    log.warning("not packed %s: %s %s", sample.name, sample.reason, sample.detail)
                    counts["skipped"] += 1
                    continue
                sink.write(sample)
                counts["written"] += 1
            if progress:
                progress(unit + 1, reader.num_units)
        counts["shards"] = sink.shard if counts["written"] else 0
    return counts


def _sample(clip: Clip, index: int) -> dict[str, bytes | str] | Skip:
    try:
        audio = clip.audio if isinstance(clip.audio, bytes) else Path(clip.audio).read_bytes()
    except OSError as err:
        return Skip(clip.name, "unreadable file", err.strerror or str(err))
    suffix = Path(clip.name).suffix.lower().lstrip(".") or "flac"
    meta = {
        "id": clip.clip_id,
        "captions": list(clip.captions),
        "labels": list(clip.labels),
        "qa": [{"question": q, "answer": a} for q, a in clip.qa],
    }
    # Keys must not contain dots (webdataset splits key and extension at the first one).
    key = f"{index:09d}_{os.path.basename(clip.clip_id).replace('.', '_')}"
    return {"__key__": key, suffix: audio, "json": json.dumps(meta).encode("utf-8")}
