"""The streaming dataset: partition sources over ranks and workers, shuffle, decode, batch.

Each sample is read by exactly one worker of one rank per epoch. Units (manifest rows, tar shards)
are put in one seeded per-epoch order that every process computes alike; rank ``r`` of ``R`` takes
units ``r, r + R, ...`` and its worker ``w`` of ``W`` every ``W``-th of those, so ranks differ by at
most one unit. When a source has fewer shards than there are workers in the world, every worker
reads all shards and keeps every ``R * W``-th record instead, so no sample is lost or repeated
either way.

Batching happens here (the DataLoader runs with ``batch_size=None``) so that records skipped for bad
input never shrink a batch: they travel with the next batch as ``batch["skipped"]`` and are counted in
the main process (see :class:`slit_lightning.data.skips.SkipLedger`).

Resuming mid-epoch: every batch carries its worker and how many records that worker had drawn
(``batch["position"]``); each worker ends with an empty batch that says so (``batch["end"]``).
Handed such positions (:meth:`AudioTextStream.resume_from`), the workers of the same epoch skip the
records already used without decoding them, and continue with the same order and the same random
choices: a record's crop and caption pick depend only on the seed, epoch, rank, worker and its
place in the worker's stream, not on what was decoded before it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from slit_lightning.data.audio import AudioError, crop, load_audio, pad_batch
from slit_lightning.data.features import FeatureSplit, crop_frames, fingerprint, pad_frames
from slit_lightning.data.sources import Clip, Skip, Source

log = logging.getLogger(__name__)

CaptionMode = Literal["random", "first"]


class AudioTextStream(IterableDataset):
    """Batches of decoded audio and captions from one or more sources.

    Args:
        sources: readers built by :func:`slit_lightning.data.sources.open_source`.
        sample_rate: rate the encoder expects; every clip is resampled to it.
        max_samples: clips are cropped to this many samples (random window when ``train``).
        batch_size: clips per batch (the last batch of a worker may be smaller).
        train: shuffle units and records, crop at random, pick a random caption.
        seed: base seed; the epoch and the worker index are mixed in.
        shuffle_buffer: records held for shuffling streams (1 disables it).
        caption_mode: which caption is ``batch["caption"]``: ``random`` (train) or ``first``.
        silence_peak: clips whose peak amplitude stays below this are skipped as silent.
        features: this split's cached encoder features (see :mod:`slit_lightning.data.features`);
            batches then carry ``features``/``feature_mask`` instead of ``audio``/``audio_mask``.
        require_captions: skip clips without captions (labelled or QA-only clips) as
            ``empty caption``; the stages that train on captions need this.
    """

    def __init__(
        self,
        sources: list[Source],
        sample_rate: int,
        max_samples: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        caption_mode: CaptionMode = "random",
        silence_peak: float = 1e-4,
        features: FeatureSplit | None = None,
        require_captions: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sources, self.sample_rate, self.max_samples = sources, sample_rate, max_samples
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer, self.caption_mode, self.silence_peak = (
            shuffle_buffer,
            caption_mode,
            silence_peak,
        )
        self.features, self.require_captions = features, require_captions
        self.epoch, self.rank, self.world_size = 0, 0, 1
        #: loader workers per rank; only used to estimate the length
        self.loader_workers = 0
        #: records each worker skips at the next ``iter`` (set by :meth:`resume_from`)
        self.skip_records: dict[int, int] = {}

    def resume_from(self, drawn: dict[int, int]) -> None:
        """At the next ``iter``, worker ``w`` skips its first ``drawn[w]`` records (without
        decoding them): the position of a checkpoint taken within this epoch."""
        self.skip_records = dict(drawn)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (read when workers start, i.e. at the next ``iter``)."""
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        """This process's global rank and the number of ranks sharing the data."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = rank, world_size

    def worker_slot(self) -> tuple[int, int]:
        """``(worker, workers)``: this loader worker's index and the number per rank."""
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def unit_order(self, s: int) -> np.ndarray:
        """Source ``s``'s units in this epoch's order (the same in every process)."""
        order = np.arange(self.sources[s].num_units)
        if self.train:
            order = np.random.default_rng([self.seed, self.epoch, s]).permutation(order)
        return order

    def assigned_units(self, s: int, worker: int, workers: int) -> np.ndarray | None:
        """Units of source ``s`` for this rank's ``worker``: split by rank first, then by worker,
        so ranks differ by at most one unit. None when a stream source has fewer units than
        there are workers in the world: then records, not units, are split."""
        source = self.sources[s]
        if source.streams and source.num_units < self.world_size * workers:
            return None
        return self.unit_order(s)[self.rank :: self.world_size][worker::workers]

    def source_records(self, s: int, worker: int, workers: int) -> Iterator[Clip | Skip]:
        """The records of source ``s`` that belong to this rank's ``worker``."""
        units = self.assigned_units(s, worker, workers)
        source = self.sources[s]
        if units is None:
            g, total = self.rank * workers + worker, self.world_size * workers
            stream = (rec for u in self.unit_order(s) for rec in source.iter_unit(int(u)))
            yield from (rec for k, rec in enumerate(stream) if k % total == g)
        else:
            for u in units:
                yield from source.iter_unit(int(u))

    def records(self, worker: int, workers: int, rng: random.Random) -> Iterator[Clip | Skip]:
        """All of this worker's records; in training several sources are interleaved at random
        (in proportion to their sizes) so that batches mix them from the start."""
        streams = [self.source_records(s, worker, workers) for s in range(len(self.sources))]
        if not self.train or len(streams) == 1:
            for stream in streams:
                yield from stream
            return
        weights = [float(self.sources[s].num_units) for s in range(len(streams))]
        while streams:
            pick = rng.choices(range(len(streams)), weights=weights)[0]
            record = next(streams[pick], None)
            if record is None:
                del streams[pick], weights[pick]
            else:
                yield record

    def __len__(self) -> int:
        """Estimated batches per epoch on this rank (an upper bound: skips make it smaller).

        Raises TypeError for streamed shards, whose record count is unknown until read; Lightning
        then treats the epoch length as unknown."""
        estimate = self.estimated_batches(self.loader_workers)
        if estimate is None:
            raise TypeError("the number of records in streamed shards is unknown")
        return estimate

    def estimated_batches(self, workers: int) -> int | None:
        """Batches this rank will yield (before skips), when every source knows its records."""
        if any(source.streams for source in self.sources):
            return None
        total = 0
        for worker in range(max(1, workers)):
            count = sum(len(self.assigned_units(s, worker, max(1, workers)))
                        for s in range(len(self.sources)))  # fmt: skip
            total += math.ceil(count / self.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self.worker_slot()
        where = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        rng = random.Random(where)  # unit interleaving and the shuffle buffer only
        records: Iterable[Clip | Skip] = self.records(worker, workers, rng)
        if self.train and self.shuffle_buffer > 1:
            records = shuffled(records, self.shuffle_buffer, rng)
        skip = self.skip_records.get(worker, 0)
        batch: list[dict[str, Any]] = []
        skipped: list[Skip] = []
        drawn = 0
        for drawn, record in enumerate(records, start=1):
            if drawn <= skip:
                continue  # used before the checkpoint this run resumed from
            sample = self.prepare(record, *self.record_randomness(where, drawn))
            if isinstance(sample, Skip):
                log.warning("skipped %s: %s %s", sample.name, sample.reason, sample.detail)
                skipped.append(sample)
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._tagged(collate(batch, skipped, self.feature_identity), worker, drawn)
                batch, skipped = [], []
        if batch or skipped:
            yield self._tagged(collate(batch, skipped, self.feature_identity), worker, drawn)
        end = self._tagged(collate([], [], self.feature_identity), worker, max(drawn, skip))
        yield {**end, "end": True}

    def record_randomness(
        self, where: str, index: int
    ) -> tuple[random.Random, torch.Generator | None]:
        """The caption pick's and the crop's random sources for the ``index``-th record."""
        if not self.train:
            return random.Random(0), None
        rng = random.Random(f"{where}/{index}")
        return rng, torch.Generator().manual_seed(rng.getrandbits(62))

    @staticmethod
    def _tagged(batch: dict[str, Any], worker: int, drawn: int) -> dict[str, Any]:
        batch["position"] = (worker, drawn)
        return batch

    @property
    def feature_identity(self) -> str | None:
        return self.features.identity if self.features is not None else None

    def prepare(
        self, record: Clip | Skip, rng: random.Random, crop_gen: torch.Generator | None
    ) -> dict[str, Any] | Skip:
        """Decode and crop one clip (or read its cached features); a :class:`Skip` if it cannot
        be used."""
        if isinstance(record, Skip):
            return record
        if self.require_captions and not record.captions:
            return Skip(
                record.name, "empty caption", "labels or QA only; this stage needs captions"
            )
        signals: dict[str, Any]
        audio_fingerprint = fingerprint(record.audio)
        if self.features is not None:
            frames = self.features.lookup(record, audio_fingerprint)
            if isinstance(frames, Skip):
                return frames
            seconds = self.features.seconds(record.clip_id)
            limit = self.max_samples / self.sample_rate
            signals = {"features": crop_frames(frames, seconds, limit, crop_gen)}
        else:
            try:
                wave = load_audio(record.audio, self.sample_rate, record.name, self.silence_peak)
            except AudioError as err:
                return Skip(err.name, err.reason, err.detail)
            signals = {"audio": crop(wave, self.max_samples, crop_gen)}
        use_random = self.train and self.caption_mode == "random"
        caption = ""
        if record.captions:
            caption = rng.choice(record.captions) if use_random else record.captions[0]
        return {
            **signals,
            "fingerprint": audio_fingerprint,
            "clip_id": record.clip_id,
            "clip_key": record.key,
            "caption": caption,
            "captions": list(record.captions),
            "labels": list(record.labels),
            "qa": [list(pair) for pair in record.qa],
            "name": record.name,
        }


def shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle of a stream with a buffer of ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


def collate(
    samples: list[dict[str, Any]], skipped: list[Skip], feature_identity: str | None = None
) -> dict[str, Any]:
    """Stack samples into a batch.

    Returns a dict with ``audio (B, S)`` float, ``audio_mask (B, S)`` bool (True = real samples),
    ``clip_key (B,)`` int64 (same value for captions of the same clip), and per-sample lists
    ``clip_id``, ``caption``, ``captions``, ``labels``, ``qa``, ``name``, ``fingerprint``; plus
    ``skipped``, the records dropped since the previous batch. ``B`` may be 0 when only skips are
    left. The stream adds ``position`` (see the module's docstring). Samples read from a feature cache give ``features (B, T, D)`` float16 and
    ``feature_mask (B, T)`` instead of the audio, and ``feature_identity``, the encoder's identity.
    """
    batch: dict[str, Any] = {}
    if feature_identity is not None:
        batch["feature_identity"] = feature_identity
        if samples:
            batch["features"], batch["feature_mask"] = pad_frames([s["features"] for s in samples])
        else:
            batch["features"], batch["feature_mask"] = torch.zeros(0, 0, 0), torch.zeros(0, 0)
    elif samples:
        batch["audio"], batch["audio_mask"] = pad_batch([s["audio"] for s in samples])
    else:
        batch["audio"], batch["audio_mask"] = torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)
    batch["clip_key"] = torch.tensor([s["clip_key"] for s in samples], dtype=torch.long)
    for key in ("clip_id", "caption", "captions", "labels", "qa", "name", "fingerprint"):
        batch[key] = [s[key] for s in samples]
    batch["skipped"] = skipped
    return batch
