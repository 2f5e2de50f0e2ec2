"""``bootstrap_encoder``: pre-train the built-in small audio encoder once, on the built-in corpus.

Two phases on two CPU cores: :class:`~slit_lightning.model.small_encoder.SmallAudioModel` is fitted as a
multi-label event tagger (the train split plus scenes the corpus generator renders in memory), then,
with its trunk frozen, its count readout learns how many beeps, clicks and knocks an event has
(:mod:`slit_lightning.builtin.encoder_counts`). The model is saved with ``save_pretrained``, the tagger's
head is dropped, and the metrics of both phases go to ``bootstrap.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slit_lightning.atomic import save_folder_atomic
from slit_lightning.builtin.encoder_counts import fit_count_readout
from slit_lightning.data.audio import pad_batch
from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel
from slit_lightning.training.precision import cpu_autocast, native_bf16
from slit_lightning.training.schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

_BUILTIN_CROP_SECONDS = 2.5  # the tagger's windows on a built-in corpus (see bootstrap_encoder)
_MIN_OVERLAP_SECONDS = 0.05  # an event labels a window when it sounds this long inside it

__all__ = ["InMemoryClips", "average_precision", "bootstrap_encoder", "is_complete", "sounding"]


# What `slit bootstrap encoder` trains by default; docs/builtin.md has the measurements behind
# each choice. The count readout counts the corpus's beeps, clicks and knocks.
BUILTIN_SIZES: dict[str, Any] = {
    "conv_kernel_size": 7,
    "delta_scale": 4.0,
    "dropout": 0.0,
    "count_types": ["beeps", "clicks", "knocks"],
}


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a saved model (config.json and model.safetensors)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def bootstrap_encoder(
    corpus_dir: str | Path,
    out_dir: str | Path,
    epochs: int = 7,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    config: SmallAudioConfig | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    bf16: bool | None = None,
    extra_scenes: int | None = None,
    crop_seconds: float | None = None,
    count_scenes: int | None = None,
    count_steps: int = 800,
) -> dict[str, Any]:
    """Pre-train :class:`SmallAudioModel` on ``corpus_dir`` as a multi-label tagger, then train its
    count readout (when the config has ``count_types``) with the trunk frozen; save the model.

    Runs once: when ``out_dir`` already holds a saved model, its metrics are returned and nothing
    trains. The model is written to a temporary folder and renamed into place, so an interrupted
    run never leaves a folder that looks complete. Call it from a single process (e.g. a
    ``prepare_data`` hook): inside a running process group the data would be split over ranks.
    What it takes and reaches on the default corpus is in docs/results.md.

    Args:
        corpus_dir: a corpus with ``train.jsonl`` and ``val.jsonl`` whose rows have ``labels``
            (what :func:`slit_lightning.builtin.corpus.synthesize_corpus` writes).
        out_dir: where the encoder goes: ``config.json``, ``model.safetensors``, ``bootstrap.json``.
        epochs: passes over the training clips (the train split and ``extra_scenes``).
        seed: seeds the initialisation, dropout and data order.
        progress: called as ``progress(step, total_steps)`` after every optimizer step.
        config: model sizes (default: ``SmallAudioConfig(**BUILTIN_SIZES)``).
        batch_size: clips per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        bf16: train under bf16 autocast (float32 weights and loss); None: where the CPU
            multiplies bf16 natively (:func:`slit_lightning.training.precision.native_bf16`).
        extra_scenes: new scenes that the built-in corpus's generator renders in memory and adds
            to the training clips, as a real encoder is pre-trained on more audio than one
            caption corpus holds (see :func:`slit_lightning.builtin.corpus.render_scenes`). None: three
            times the train split for a built-in corpus, none for any other corpus.
        crop_seconds: the tagger sees a random window of this length from each clip, labelled
            with the event types that sound in it, which needs every clip's events (a built-in
            corpus's manifests and scenes hold them). None: 2.5 s for a built-in corpus, whole
            clips for any other; 0: whole clips. Windows teach the tagger more per unit of
            training time than whole clips, with or without the built-in sizes' deltas
            (docs/builtin.md).
        count_scenes: when the config has ``count_types``, how many new scenes (past the
            tagger's, each with an event of a counted type) the count readout trains on after the
            tagger, with the trunk frozen (see :mod:`slit_lightning.builtin.encoder_counts`). None: six
            times the train split.
        count_steps: optimizer steps of the count readout (batches of 64 clips).

    Returns:
        The metrics also written to ``bootstrap.json``: ``val_map`` (macro mAP over the labels
        present in val), ``val_f1`` (micro F1 at 0.5), ``train_loss``, ``labels``, ``seed``, ...
    """
    out = Path(out_dir)
    if is_complete(out):
        log.info("audio encoder already bootstrapped in %s; not training again", out)
        return _read_metrics(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists but holds no complete saved encoder (config.json + model.safetensors):"
            " remove it or choose another out_dir"
        )
    start = time.monotonic()
    config = config or SmallAudioConfig(**BUILTIN_SIZES)
    _check_count_types(config.count_types)
    bf16 = native_bf16() if bf16 is None else bf16
    crop = _crop_seconds(Path(corpus_dir), crop_seconds)
    count, extra = _extra_scenes(Path(corpus_dir), extra_scenes, config.sample_rate)
    phases = _Phases(progress, count_steps if config.count_types else 0)
    model, metrics = _train_tagger(
        Path(corpus_dir), config, epochs, seed, batch_size, lr, phases.tagger, bf16, extra, crop
    )
    metrics["extra_scenes"], metrics["crop_seconds"] = count, crop
    if model.counts is not None:
        started = time.monotonic()
        counting = _count_scenes(
            Path(corpus_dir), count_scenes, count, config.sample_rate, tuple(config.count_types)
        )
        val = _val_clips(Path(corpus_dir), config.sample_rate)
        metrics.update(
            fit_count_readout(
                model, counting, val, count_steps, seed=seed, bf16=bf16, progress=phases.counts
            )
        )
        metrics["count_seconds"] = round(time.monotonic() - started, 1)
    metrics["seconds"] = round(time.monotonic() - start, 1)
    _save_atomic(model, metrics, out)
    return metrics


class _Phases:
    """One ``progress(step, total)`` over the tagger's steps and then the count readout's."""

    def __init__(self, progress: Callable[[int, int], None] | None, later_steps: int) -> None:
        self.progress, self.later_steps, self.first_steps = progress, later_steps, 0

    def tagger(self, step: int, total: int) -> None:
        self.first_steps = total
        if self.progress is not None:
            self.progress(step, total + self.later_steps)

    def counts(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.first_steps + step, self.first_steps + total)


def _read_metrics(out: Path) -> dict[str, Any]:
    path = out / "bootstrap.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _save_atomic(model: SmallAudioModel, metrics: dict[str, Any], out: Path) -> None:
    """Model, then ``bootstrap.json`` (the completion marker), written atomically."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        text = json.dumps(metrics, indent=2) + "\n"
        (folder / "bootstrap.json").write_text(text, encoding="utf-8")

    save_folder_atomic(out, write, is_complete)


def _train_tagger(
    corpus: Path,
    config: SmallAudioConfig,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    progress: Callable[[int, int], None] | None,
    bf16: bool = False,
    extra: Iterable[tuple[Tensor, list[dict[str, Any]]]] = (),
    crop_seconds: float = 0.0,
) -> tuple[SmallAudioModel, dict[str, Any]]:
    """Fit trunk + linear head with BCE (on windows of ``crop_seconds``, if above 0); return the
    trunk and its validation metrics (on whole clips)."""
    from slit_lightning.data.datamodule import AudioTextDataModule  # Lightning only when training

    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    data = AudioTextDataModule(
        root=str(corpus),
        sample_rate=config.sample_rate,
        batch_size=batch_size,
        num_workers=0,
        seed=seed,
    )
    labels = _label_vocabulary(corpus)
    data.setup()
    events = _manifest_events(corpus / "train.jsonl") if crop_seconds > 0 else None
    clips = InMemoryClips(data.loader("train"), extra, events, config.sample_rate)
    n_train = len(clips.labels)
    with torch.random.fork_rng(devices=[]):  # seed our run without moving the caller's RNG
        torch.manual_seed(seed)
        model = SmallAudioModel(config)
        head = nn.Linear(2 * config.hidden_size, len(labels))
        steps = epochs * math.ceil(n_train / batch_size)
        batches = clips.epochs(
            epochs, batch_size, torch.Generator().manual_seed(seed), crop_seconds
        )
        loss = _fit(model, head, batches, labels, steps, lr, progress, bf16)
    scores, targets = _predict(model, head, data.loader("val"), labels)
    metrics = {
        "val_map": round(average_precision(scores, targets), 4),
        "val_f1": round(_micro_f1(scores, targets), 4),
        "train_loss": round(loss, 4),
        "chance_map": round(float(targets.mean()), 4),
        "labels": labels,
        "epochs": epochs,
        "seed": seed,
        "bf16": bf16,
        "train_clips": n_train,  # the corpus's train split and the extra scenes
        "val_clips": int(targets.shape[0]),
        "corpus": str(corpus),
    }
    log.info("bootstrap: val mAP %.3f, F1 %.3f", metrics["val_map"], metrics["val_f1"])
    return model, metrics


def _crop_seconds(corpus: Path, seconds: float | None) -> float:
    """The tagger's window length: 0 for whole clips (see ``bootstrap_encoder``)."""
    builtin = _builtin_metadata(corpus) is not None
    if seconds is None:
        return _BUILTIN_CROP_SECONDS if builtin else 0.0
    if seconds < 0:
        raise ValueError(f"crop_seconds must be >= 0 (0: whole clips), got {seconds}")
    if seconds > 0 and not builtin:
        raise ValueError(
            f"crop_seconds={seconds} labels each window with the events sounding in it, and only"
            f" a built-in corpus (`slit data synth`) has them: {corpus} has no corpus.json from"
            " that generator (crop_seconds=0 trains on whole clips)"
        )
    return float(seconds)


def _manifest_events(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{clip id: events}`` of a manifest whose rows have ``events``."""
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {row["id"]: row.get("events") or [] for row in rows}


def _extra_scenes(
    corpus: Path, count: int | None, sample_rate: int
) -> tuple[int, Iterator[tuple[Tensor, list[dict[str, Any]]]]]:
    """How many scenes of the built-in generator ``corpus`` gets, and the scenes (rendered lazily)."""
    meta = _builtin_metadata(corpus)
    if meta is None:
        if count:
            raise ValueError(
                f"extra_scenes={count} needs a built-in corpus (`slit data synth`): {corpus} has"
                " no corpus.json from that generator"
            )
        return 0, iter(())
    if count is None:
        count = 3 * int(meta["splits"]["train"])
    if count < 0:
        raise ValueError(f"extra_scenes must be >= 0, got {count}")
    return count, _scenes(meta, count, 0, sample_rate)


def _count_scenes(
    corpus: Path, count: int | None, first: int, sample_rate: int, having: tuple[str, ...]
) -> Iterator[tuple[Tensor, list[dict[str, Any]]]]:
    """The count readout's training scenes: the first ``count`` from scene ``first`` on that hold
    an event of a type in ``having``."""
    meta = _builtin_metadata(corpus)
    if meta is None:
        raise ValueError(
            f"the count readout trains on scenes of the built-in generator, and {corpus} has no"
            " corpus.json from it: bootstrap with a config without count_types"
        )
    count = 6 * int(meta["splits"]["train"]) if count is None else count
    if count < 1:
        raise ValueError(f"count_scenes must be >= 1, got {count}")
    return _scenes(meta, count, first, sample_rate, having)


def _check_count_types(types: list[str]) -> None:
    """Before any training: the count readout learns only what the built-in generator counts."""
    from slit_lightning.builtin.corpus import COUNTED

    if not set(types) <= set(COUNTED):
        raise ValueError(
            f"count_types {types} must be among {list(COUNTED)}: the event types the built-in"
            " generator counts"
        )


def _builtin_metadata(corpus: Path) -> dict[str, Any] | None:
    """``corpus.json`` of a corpus that :func:`slit_lightning.builtin.corpus.synthesize_corpus` wrote."""
    path = corpus / "corpus.json"
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return meta if meta.get("generator") == "slit_lightning.builtin.corpus" else None


def _scenes(
    meta: dict[str, Any], count: int, first: int, sample_rate: int, having: tuple[str, ...] = ()
) -> Iterator[tuple[Tensor, list[dict[str, Any]]]]:
    from slit_lightning.builtin import corpus as synth

    pairs = [(str(a), str(b)) for a, b in meta["heldout_pairs"]]
    scenes = synth.render_scenes(
        count, int(meta["seed"]), pairs, sample_rate, float(meta["clip_seconds"]), first, having
    )
    return ((torch.from_numpy(wave), events) for wave, events in scenes)


def _val_clips(corpus: Path, sample_rate: int) -> list[tuple[Tensor, list[dict[str, Any]]]]:
    """The val split's clips and their manifest events."""
    from slit_lightning.data.datamodule import AudioTextDataModule

    events = _manifest_events(corpus / "val.jsonl")
    data = AudioTextDataModule(root=str(corpus), sample_rate=sample_rate, num_workers=0)
    data.setup()
    return [
        (wave[mask], events.get(clip, []))
        for batch in data.loader("val")
        for wave, mask, clip in zip(
            batch["audio"], batch["audio_mask"], batch["clip_id"], strict=True
        )
    ]


def _label_vocabulary(corpus: Path) -> list[str]:
    """Sorted labels of the train and val manifests."""
    names: set[str] = set()
    for split in ("train", "val"):
        path = corpus / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: bootstrap_encoder needs a corpus with train.jsonl and"
                " val.jsonl (make one with `slit data synth --out DIR`)"
            )
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                names.update(json.loads(line).get("labels") or [])
    if not names:
        raise ValueError(f"no `labels` in {corpus}/train.jsonl or val.jsonl: nothing to tag")
    return sorted(names)


def _multi_hot(rows: list[list[str]], labels: list[str]) -> Tensor:
    """``(B, C)`` float targets; labels outside the vocabulary are ignored."""
    index = {name: i for i, name in enumerate(labels)}
    out = torch.zeros(len(rows), len(labels))
    for b, row in enumerate(rows):
        for name in row:
            if name in index:
                out[b, index[name]] = 1.0
    return out


def _pooled_logits(model: SmallAudioModel, head: nn.Linear, batch: dict[str, Any]) -> Tensor:
    """Mean and max over real frames -> linear head: ``(B, S)`` audio -> ``(B, C)`` logits.

    The max lets a short event (a click) count as much as a long one; with the mean alone the
    tagger did markedly worse on the built-in corpus (docs/builtin.md).
    """
    frames, mask = model.trunk(batch["audio"], batch["audio_mask"])
    weights = mask.unsqueeze(-1).to(frames.dtype)
    mean = (frames * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    peak = frames.masked_fill(~mask.unsqueeze(-1), torch.finfo(frames.dtype).min).amax(1)
    return head(torch.cat([mean, peak], dim=-1))


class InMemoryClips:
    """The training split decoded once and kept as tensors, with any ``extra`` clips (for the
    built-in corpus, 700 clips and 2100 scenes of 5 s at 16 kHz in float32: 896 MB), so that every
    later epoch reshuffles clips instead of decoding and resampling every file again, which had
    been a large share of the bootstrap's time (docs/builtin.md).

    ``extra`` yields ``(waveform, events)``; ``events`` maps the split's clip ids to their
    manifest events. Clips with events can be served as random windows (:meth:`epochs`).
    """

    def __init__(
        self,
        batches: Iterable[dict[str, Any]],
        extra: Iterable[tuple[Tensor, list[dict[str, Any]]]] = (),
        events: Mapping[str, list[dict[str, Any]]] | None = None,
        sample_rate: int = 16000,
    ) -> None:
        waves: list[Tensor] = []
        self.labels: list[list[str]] = []
        self.events: list[list[dict[str, Any]] | None] = []
        self.sample_rate = sample_rate
        for batch in batches:
            for wave, mask, row, clip in zip(
                batch["audio"], batch["audio_mask"], batch["labels"], batch["clip_id"], strict=True
            ):
                waves.append(wave[mask])
                self.labels.append(row)
                self.events.append(None if events is None else events.get(clip))
        for wave, clip_events in extra:
            waves.append(wave)
            self.labels.append(sorted({e["type"] for e in clip_events}))
            self.events.append(clip_events)
        if not waves:
            raise ValueError("the training split holds no usable clip")
        self.audio, self.mask = pad_batch(waves)
        self.lengths = [w.shape[0] for w in waves]

    def epochs(
        self,
        count: int,
        batch_size: int,
        generator: torch.Generator,
        crop_seconds: float = 0.0,
    ) -> Iterator[list[dict[str, Any]]]:
        """``count`` epochs, each a list of batches of a fresh permutation of the clips. With
        ``crop_seconds`` above 0, every clip is cut to a random window of that length (shorter
        clips stay whole), labelled with the event types that sound in it."""
        if crop_seconds > 0 and any(e is None for e in self.events):
            missing = sum(e is None for e in self.events)
            raise ValueError(
                f"{missing} clips have no events: windows cannot be labelled (crop_seconds=0"
                " trains on whole clips)"
            )
        for _ in range(count):
            order = torch.randperm(len(self.labels), generator=generator)
            yield [
                self._batch(order[i : i + batch_size], crop_seconds, generator)
                for i in range(0, len(order), batch_size)
            ]

    def _batch(
        self, index: Tensor, crop_seconds: float, generator: torch.Generator
    ) -> dict[str, Any]:
        if crop_seconds <= 0:
            mask = self.mask[index]
            length = int(mask.sum(1).max())  # cut the batch to its longest clip
            return {
                "audio": self.audio[index, :length],
                "audio_mask": mask[:, :length],
                "labels": [self.labels[i] for i in index.tolist()],
            }
        size, rate = round(crop_seconds * self.sample_rate), self.sample_rate
        waves, labels = [], []
        for i in index.tolist():
            length = self.lengths[i]
            start = int(torch.randint(0, max(1, length - size + 1), (1,), generator=generator))
            end = min(length, start + size)
            waves.append(self.audio[i, start:end])
            labels.append(sounding(self.events[i] or [], start / rate, end / rate))
        audio, mask = pad_batch(waves)
        return {"audio": audio, "audio_mask": mask, "labels": labels}


def sounding(events: Iterable[dict[str, Any]], start: float, end: float) -> list[str]:
    """Sorted types of the ``events`` (``type``, ``onset``, ``duration``) that overlap the window
    ``[start, end)`` seconds by at least 50 ms, or by half the event where it is shorter."""
    types = set()
    for event in events:
        onset, duration = float(event["onset"]), float(event["duration"])
        overlap = min(end, onset + duration) - max(start, onset)
        if overlap > 0 and overlap >= min(_MIN_OVERLAP_SECONDS, 0.5 * duration):
            types.add(event["type"])
    return sorted(types)


def _fit(
    model: SmallAudioModel,
    head: nn.Linear,
    epochs: Iterable[list[dict[str, Any]]],
    labels: list[str],
    total: int,
    lr: float,
    progress: Callable[[int, int], None] | None,
    bf16: bool = False,
) -> float:
    """AdamW with warm-up and cosine decay over ``total`` steps; the last epoch's mean loss."""
    counts = set() if model.counts is None else set(model.counts.parameters())
    params = [p for p in model.parameters() if p not in counts] + [*head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = max(1, total)
    schedule = warmup_cosine_lr(optimizer, total)
    model.train()
    head.train()
    step, mean = 0, 0.0
    for batches in epochs:
        losses = []
        for batch in batches:
            with cpu_autocast(bf16):
                logits = _pooled_logits(model, head, batch).float()
            loss = F.binary_cross_entropy_with_logits(logits, _multi_hot(batch["labels"], labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if progress is not None:
                progress(min(step, total), total)
        mean = sum(losses) / max(1, len(losses))
        log.info("bootstrap epoch: train loss %.4f", mean)
    model.eval()
    return mean


@torch.no_grad()
def _predict(
    model: SmallAudioModel, head: nn.Linear, batches: Iterable[dict[str, Any]], labels: list[str]
) -> tuple[Tensor, Tensor]:
    """``(N, C)`` sigmoid scores and targets over a split."""
    model.eval()
    scores, targets = [], []
    for batch in batches:
        scores.append(_pooled_logits(model, head, batch).sigmoid())
        targets.append(_multi_hot(batch["labels"], labels))
    return torch.cat(scores), torch.cat(targets)


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mean of per-class average precision ``(N, C)``; classes without positives are left out."""
    values = []
    for c in range(scores.shape[1]):
        positives = targets[:, c] > 0.5
        if not positives.any():
            continue
        order = scores[:, c].argsort(descending=True)
        hits = positives[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        values.append(float((precision * hits).sum() / hits.sum()))
    return sum(values) / len(values) if values else float("nan")


def _micro_f1(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> float:
    predicted = scores >= threshold
    truth = targets > 0.5
    tp = (predicted & truth).sum().item()
    denominator = predicted.sum().item() + truth.sum().item()
    return 2 * tp / denominator if denominator else 0.0
