"""`AudioTextDataModule`: audio-caption batches for every stage, from any mix of sources."""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from slit_lightning.data.audio import seconds_to_samples
from slit_lightning.data.features import FeatureSplit, open_feature_cache
from slit_lightning.data.skips import SkipLedger, TooManySkipsError
from slit_lightning.data.sources import DataConfigError, Skip, Source, SourceSpec, open_source
from slit_lightning.data.stream import AudioTextStream, CaptionMode

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test", "zeroshot"]
SPLITS: tuple[Split, ...] = ("train", "val", "test", "zeroshot")
SourceList = str | list[str | SourceSpec] | None


class StreamLoader(DataLoader):
    """DataLoader over an :class:`AudioTextStream` that reshuffles per epoch and counts skips.

    Lightning calls ``set_epoch`` on samplers only, and a streaming dataset has none, so the epoch
    is handed to the dataset here, just before the workers start (workers are not persistent, so
    each epoch's workers get the new value).

    Under DDP, ranks may hold a batch more or less than each other at the end of an epoch (the
    partition is exact, not padded). With ``lockstep`` the ranks agree before every batch and stop
    together when any of them runs out, since a rank waiting alone in a gradient all-reduce would
    hang the job; the few clips left over are counted as ``dropped_in_lockstep`` and logged.
    """

    def __init__(
        self,
        dataset: AudioTextStream,
        split: str,
        ledger: SkipLedger,
        epoch: Callable[[], int],
        lockstep: bool = False,
        consumed: Callable[[], int | None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        # the workers' base seed comes from the loader's own generator, not the global one, so
        # starting an epoch draws nothing from the random numbers training uses
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        # each worker ends its stream with an end marker (consumed in _WorkerCycle, never
        # delivered), which torch counts against the dataset's length and warns about
        warnings.filterwarnings(
            "ignore", r"Length of IterableDataset <slit_lightning\.data\.stream", UserWarning
        )
        self.split, self.ledger, self.epoch, self.lockstep = split, ledger, epoch, lockstep
        self.consumed = consumed
        self.dropped_in_lockstep = 0
        #: this epoch's skipped records so far (what the feature cache writer records)
        self.skips: list[Skip] = []
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=16)
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        cycle = self._start_epoch()
        batches = self._counted(cycle.run(super().__iter__()))
        delivered = self._snapshots[-1]["batches"]
        while True:
            batch, state, error = _next(batches)
            if self.lockstep:
                state = _agree(state)
            self._stop_if_failed(state, error)
            if state == EXHAUSTED:
                if batch is not None:  # this rank had more: count what the others did not have
                    rest = [batch, *batches]
                    self.dropped_in_lockstep = sum(len(b["clip_id"]) for b in rest)
                    self.ledger.used -= self.dropped_in_lockstep
                break
            delivered += 1
            self._snapshot(delivered, cycle)
            yield batch
        self._finish()

    # ------------------------------------------------------------------ resuming mid-epoch

    def _start_epoch(self) -> _WorkerCycle:
        """Set the dataset up for this epoch, from the position being resumed if it is in it."""
        epoch = self.epoch()
        self.dataset.set_epoch(epoch)
        self.ledger.reset()
        self.dropped_in_lockstep = 0
        self.skips = []
        workers = max(1, self.num_workers)
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch and resume["workers"] != workers:
            log.warning(
                "%s: the checkpoint was taken with %d loader workers, this run has %d: epoch %d"
                " starts over (set data.num_workers back to resume it exactly)",
                self.split, resume["workers"], workers, epoch,
            )  # fmt: skip
            resume = None
        self._snapshots.clear()
        if resume is None or resume["epoch"] != epoch:
            self.dataset.resume_from({})
            cycle = _WorkerCycle(list(range(workers)))
            self._snapshot(0, cycle, epoch)
            return cycle
        self.dataset.resume_from({int(w): n for w, n in resume["drawn"].items()})
        self.ledger.load_state_dict(resume["ledger"])
        cycle = _WorkerCycle(resume["order"], {int(w): n for w, n in resume["drawn"].items()})
        self._snapshot(resume["batches"], cycle, epoch)
        log.info("%s: epoch %d resumes after batch %d", self.split, epoch, resume["batches"])
        return cycle

    def _snapshot(self, batches: int, cycle: _WorkerCycle, epoch: int | None = None) -> None:
        self._snapshots.append(
            {
                "epoch": self._snapshots[-1]["epoch"] if epoch is None else epoch,
                "batches": batches,
                "workers": max(1, self.num_workers),
                "order": cycle.order(),
                "drawn": dict(cycle.drawn),
                "ledger": self.ledger.state_dict(),
            }
        )

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands: after the batches the trainer has consumed (it fetches one
        ahead), per rank. Lightning stores it in checkpoints and hands it back on resume."""
        wanted = self.consumed()
        own = next((s for s in reversed(self._snapshots) if s["batches"] == wanted), None)
        if own is None and self._snapshots and wanted is None:
            own = self._snapshots[-1]
        if own is None and self._snapshots:
            log.warning("%s: no data position for batch %s; a resume restarts the epoch",
                        self.split, wanted)  # fmt: skip
        ranks = [own]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks") or [None]
        rank, world = self.dataset.rank, self.dataset.world_size
        if len(ranks) != world:
            log.warning(
                "%s: the checkpoint was taken on %d ranks, this run has %d: the interrupted"
                " epoch starts over", self.split, len(ranks), world,
            )  # fmt: skip
            return
        self._resume = ranks[rank]

    def _stop_if_failed(self, state: int, error: TooManySkipsError | None) -> None:
        """Raise this rank's own error, or say that another rank failed (state agreed by all)."""
        if state == FAILED:
            raise error or TooManySkipsError(
                f"{self.split}: another rank passed the skip ceiling (see its log); stopping"
            )

    def _counted(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            batch.pop("position", None)
            skipped = batch.pop("skipped")
            self.skips.extend(skipped)
            self.ledger.add(len(batch["clip_id"]), skipped)
            self.ledger.check(self.split)
            if batch["clip_id"]:
                yield batch

    def _finish(self) -> None:
        """End of epoch: judge the skip ceiling (on every rank together) and summarise."""
        try:
            self.ledger.check(self.split, final=True)
            state, error = HAVE, None
        except TooManySkipsError as err:
            state, error = FAILED, err
        if self.lockstep:
            state = _agree(state)
        self._stop_if_failed(state, error)
        log.info(
            "%s: %d clips used, %d skipped (%s)%s",
            self.split,
            self.ledger.used,
            self.ledger.skipped,
            self.ledger.summary(),
            f", {self.dropped_in_lockstep} not used this epoch to keep ranks in step"
            if self.dropped_in_lockstep
            else "",
        )


class _WorkerCycle:
    """Batches in a fixed rotation over the loader's workers (skipping those that are done),
    whatever order the DataLoader hands them over in: the order a resumed epoch must repeat.

    ``drawn`` holds how many records each worker had drawn by its latest batch taken from here."""

    def __init__(self, order: list[int], drawn: dict[int, int] | None = None) -> None:
        self.active, self.next = list(order), 0
        self.drawn = dict(drawn or {})

    def order(self) -> list[int]:
        """The workers still going, the one whose batch comes next first."""
        return self.active[self.next :] + self.active[: self.next]

    def run(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: dict[int, deque[dict[str, Any]]] = defaultdict(deque)
        while self.active:
            worker = self.active[self.next]
            while not pending[worker]:
                batch = next(batches, None)
                if batch is None:
                    return
                pending[batch["position"][0]].append(batch)
            batch = pending[worker].popleft()
            self.drawn[worker] = batch["position"][1]
            if batch.get("end"):
                del self.active[self.next]
                self.next = self.next % len(self.active) if self.active else 0
                continue
            self.next = (self.next + 1) % len(self.active)
            yield batch


# What a rank reports before each batch; the minimum over ranks decides for all.
FAILED, EXHAUSTED, HAVE = -1, 0, 1


def _next(
    batches: Iterator[dict[str, Any]],
) -> tuple[dict[str, Any] | None, int, TooManySkipsError | None]:
    try:
        return next(batches), HAVE, None
    except StopIteration:
        return None, EXHAUSTED, None
    except TooManySkipsError as err:
        return None, FAILED, err


def _agree(state: int) -> int:
    """The minimum of every rank's state (one tiny all-reduce): all go on, stop or fail together."""
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    flag = torch.tensor([state], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag.item())


class AudioTextDataModule(LightningDataModule):
    """Streams audio-caption batches for training and evaluation.

    Each split takes one or more sources (manifest JSONL/CSV, AudioCaps or Clotho CSV, tar shards;
    see :mod:`slit_lightning.data.sources`). With ``root`` set, splits left empty default to
    ``{root}/{split}.jsonl`` where that file exists (the built-in corpus layout).

    Batches are dicts: ``audio (B, S)``, ``audio_mask (B, S)``, ``clip_key (B,)`` and lists
    ``clip_id``, ``caption``, ``captions``, ``labels``, ``qa``, ``name``
    (see :func:`slit_lightning.data.stream.collate`).

    Args:
        root: folder holding ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``zeroshot.jsonl``.
        train: training sources (a path, or a list of paths / :class:`SourceSpec`).
        val: validation sources.
        test: test sources.
        zeroshot: sources for the zero-shot split (also what ``predict`` reads).
        sample_rate: the audio encoder's sample rate; clips are resampled to it.
        max_seconds: longer clips are cropped (randomly in training, from the start otherwise).
        batch_size: training batch size per process.
        eval_batch_size: batch size for val/test/zeroshot (default: ``batch_size``).
        num_workers: decoding processes per rank (0 decodes in the main process).
        shuffle_buffer: records held to shuffle streamed shards (1 turns it off).
        caption_mode: training caption per clip: ``random`` (a new pick each epoch) or ``first``.
        max_skip_fraction: stop with a clear error when more than this fraction of a split's
            records in an epoch is unusable (missing, corrupt, silent, empty caption...).
        silence_peak: clips whose peak amplitude stays below this count as silent and are skipped.
        seed: seed for the epoch order, shuffle buffer, crops and caption picks.
        feature_cache: folder written by ``slit cache-features``. A stage looks there for its
            encoder's features (:meth:`use_feature_cache`) and, for the splits it finds, reads
            them instead of decoding audio and running the encoder.
    """

    def __init__(
        self,
        root: str | None = None,
        train: SourceList = None,
        val: SourceList = None,
        test: SourceList = None,
        zeroshot: SourceList = None,
        sample_rate: int = 16000,
        max_seconds: float = 10.0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        caption_mode: CaptionMode = "random",
        max_skip_fraction: float = 0.05,
        silence_peak: float = 1e-4,
        seed: int = 0,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        if sample_rate <= 0:
            raise ValueError(f"data.sample_rate must be positive, got {sample_rate}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must lie in [0, 1], got {max_skip_fraction}")
        self.save_hyperparameters()
        self.max_samples = seconds_to_samples(max_seconds, sample_rate)
        given = {"train": train, "val": val, "test": test, "zeroshot": zeroshot}
        self.specs = {split: self._specs(split, given[split]) for split in SPLITS}
        self.sources: dict[str, list[Source]] = {}
        self._labels: dict[str, list[str]] = {}  # per split, read once (a pass over its records)
        self.ledgers = {split: SkipLedger(max_skip_fraction) for split in SPLITS}
        self._epochs = dict.fromkeys(SPLITS, 0)
        self.features: dict[str, FeatureSplit] = {}
        #: skip clips without captions; stages that need none (instruction tuning) turn it off
        self.require_captions = True

    def _specs(self, split: str, value: SourceList) -> list[SourceSpec]:
        if value is None:
            default = Path(self.hparams.root or "") / f"{split}.jsonl"
            return [SourceSpec(str(default))] if self.hparams.root and default.is_file() else []
        items = [value] if isinstance(value, str) else value
        return [SourceSpec(v) if isinstance(v, str) else v for v in items]

    def setup(self, stage: str | None = None) -> None:
        """Open (and thereby validate) every configured source once."""
        for split in SPLITS:
            if split not in self.sources and self.specs[split]:
                self.sources[split] = [open_source(spec) for spec in self.specs[split]]

    def use_feature_cache(self, identity: str) -> list[str]:
        """Read the features of the encoder named ``identity`` from ``feature_cache`` wherever
        they were cached; returns the splits that will. Features of any other encoder, layer or
        rate are never used (they live under another key)."""
        root = self.hparams.feature_cache
        if not root:
            return []
        self.features = open_feature_cache(root, identity)
        wanted = [s for s in SPLITS if self.specs[s]]
        for split in [s for s in wanted if s in self.features]:
            uncached = self._uncached(split)
            if uncached:
                log.warning(
                    "%s: %d clips are not in the feature cache (e.g. %s): reading audio for this"
                    " split; rerun slit cache-features to cache them",
                    split, len(uncached), ", ".join(uncached[:3]),
                )  # fmt: skip
                del self.features[split]
        found = [s for s in wanted if s in self.features]
        missing = [s for s in wanted if s not in self.features]
        if found:
            log.info("reading cached encoder features from %s for: %s", root, ", ".join(found))
        if missing:
            log.warning(
                "no cached features of this encoder in %s for %s: encoding audio on the fly"
                " (slit cache-features writes them)",
                root,
                ", ".join(missing),
            )
        return found

    def _uncached(self, split: str) -> list[str]:
        """Clips of ``split`` its cache does not know (neither cached nor skipped when caching).
        Streamed shards are not listed up front: their clips are checked one by one."""
        self.setup()
        cache, out = self.features[split], []
        for source in self.sources.get(split, []):
            if source.streams:
                continue
            for unit in range(source.num_units):
                for record in source.iter_unit(unit):
                    if isinstance(record, Skip):
                        continue
                    if record.clip_id not in cache.entries and record.name not in cache.skipped:
                        out.append(record.clip_id)
        return out

    def stream(self, split: Split, audio_samples: int | None = None) -> AudioTextStream:
        """The dataset of one split, set up for this process's rank.

        ``audio_samples`` reads the audio itself, cropped to that many samples, even where
        features are cached (what the cache writer needs)."""
        self.setup()
        if not self.sources.get(split):
            raise DataConfigError(
                f"no {split} data configured: set data.{split} (a manifest, CSV or shards)"
                " or data.root (a folder with train.jsonl, val.jsonl, ...)"
            )
        train = split == "train" and not audio_samples  # the cache writer reads in eval order
        hp = self.hparams
        dataset = AudioTextStream(
            self.sources[split],
            sample_rate=hp.sample_rate,
            max_samples=audio_samples or self.max_samples,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            train=train,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer,
            caption_mode=hp.caption_mode if train else "first",
            silence_peak=hp.silence_peak,
            features=None if audio_samples else self.features.get(split),
            require_captions=self.require_captions and not audio_samples,
        )
        dataset.set_distributed(*self._rank_and_world())
        dataset.loader_workers = self.hparams.num_workers
        return dataset

    def labels(self, split: str) -> list[str]:
        """Every class label of ``split``'s records, sorted (read from the sources; no audio is
        decoded): the label set classification and ``choose`` are scored against. Read once per
        split: every validation of instruction tuning asks for it, and a pass over shards is long."""
        if split not in self._labels:
            self.setup()
            found: set[str] = set()
            for source in self.sources.get(split, []):
                for unit in range(source.num_units):
                    for record in source.iter_unit(unit):
                        found.update(getattr(record, "labels", ()))
            self._labels[split] = sorted(found)
        return list(self._labels[split])

    def loader(self, split: Split, audio_samples: int | None = None) -> StreamLoader:
        """A DataLoader for ``split`` (what the ``*_dataloader`` hooks return)."""
        dataset = self.stream(split, audio_samples)
        return StreamLoader(
            dataset,
            split,
            self.ledgers[split],
            epoch=lambda: self._next_epoch(split),
            # Training steps all-reduce gradients, so ranks must run the same number of them;
            # evaluation keeps every clip (metrics are gathered, not stepped).
            lockstep=split == "train" and dataset.world_size > 1 and dist.is_initialized(),
            consumed=lambda: self._consumed(split),
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def _next_epoch(self, split: str) -> int:
        # Inside a fit, the trainer's epoch decides (so a resumed run continues the same order).
        if self.trainer is not None and split == "train":
            return self.trainer.current_epoch
        epoch = self._epochs[split]
        self._epochs[split] += 1
        return epoch

    def _consumed(self, split: str) -> int | None:
        """Training batches the trainer has processed in this epoch (None outside a fit)."""
        if self.trainer is None or split != "train":
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_dataloader(self) -> StreamLoader:
        return self.loader("train")

    def val_dataloader(self) -> StreamLoader:
        return self.loader("val")

    def test_dataloader(self) -> StreamLoader:
        return self.loader("test")

    def predict_dataloader(self) -> StreamLoader:
        return self.loader("zeroshot")
