"""A run's TensorBoard dashboards, written by one callback that the stage configs enable.

What the stages log themselves (each loss and ``train/loss``, validation retrieval and captioning
metrics) and what Lightning's ``LearningRateMonitor`` logs (the learning rate) are not repeated.
:class:`Dashboard` adds:

- scalars: ``train/grad_norm`` (2-norm of all gradients, before clipping),
  ``train/samples_per_sec`` (clips per second over the last ``throughput_window`` steps, all
  ranks, validation time left out), ``memory/rss_gb`` (this process) and, on a GPU,
  ``memory/cuda_max_allocated_gb``; every ``trainer.log_every_n_steps`` steps;
- for the first ``num_clips`` clips of the validation (and test) split: the audio (once), the
  generated caption next to the references (text), and the queries' cross-attention over time
  (an image: one band per cross-attention layer, top to bottom, one row per query, time left to
  right, each band coloured from its lowest to its highest weight);
- the projector: the contrastive audio and text embeddings of up to ``projector_clips``
  validation clips with their captions (stage 1);
- the HPARAMS tab: the run's hyper-parameters, once it ends, next to the last value of each of
  its scalars (its final metrics).

Lightning's ``ThroughputMonitor`` was not taken: it needs a batch-size function (awkward in
YAML), warns when the model declares no FLOPs, logs about ten series and shows no rate until its
window is full; samples/s here is the same arithmetic over the last steps.

The stage is asked for what it needs through small public methods (``attention_maps``,
``caption``, ``collected_embeddings``); ``training_step`` stays as it is. The clips' work is done
once per evaluation epoch on a handful of clips, so it costs little.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm, rank_zero_warn
from torch import Tensor

log = logging.getLogger(__name__)

GB = 2**30
# viridis at five stops: dark blue (no attention) to yellow (the query's peak)
COLORMAP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


class Dashboard(Callback):
    """TensorBoard dashboards of a training or evaluation run (see the module docstring).

    Args:
        num_clips: validation (and test) clips shown as audio, captions and attention maps
            (the first ones of the split, the same every epoch); 0 shows none.
        projector_clips: validation clips whose embeddings go to the projector (with all their
            captions); 0 writes none.
        throughput_window: training steps the samples/s average runs over (at least 2; the
            rate is shown from the second step on, over the steps there are until then).
    """

    def __init__(
        self, num_clips: int = 4, projector_clips: int = 100, throughput_window: int = 10
    ) -> None:
        super().__init__()
        if num_clips < 0 or projector_clips < 0:
            raise ValueError(
                f"Dashboard: num_clips ({num_clips}) and projector_clips ({projector_clips})"
                " must be >= 0 (0 turns that part off)"
            )
        if throughput_window < 2:
            raise ValueError(
                f"Dashboard: throughput_window={throughput_window}; a rate needs at least 2 steps"
            )
        self.num_clips, self.projector_clips = num_clips, projector_clips
        self.throughput_window = throughput_window
        self._tensorboard: TensorBoardLogger | None = None
        self._recent: deque[tuple[float, int]] = deque(maxlen=throughput_window)
        self._clock: dict[str, float] = {}
        self._samples = 0
        self._grad_norm: float | None = None
        self._last_logged_step = -1
        self._audio_written: set[str] = set()
        self._clips_shown = False

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        self._tensorboard = loggers[0] if loggers else None
        if self._tensorboard is None:
            rank_zero_warn(
                "Dashboard: no TensorBoardLogger: only its scalars are logged (to the loggers"
                " there are); set trainer.logger to a TensorBoardLogger for clips, attention"
                " maps, the projector and the hyper-parameter table"
            )
        elif getattr(self._tensorboard, "_default_hp_metric", False):
            rank_zero_warn(
                "Dashboard: the TensorBoardLogger writes a placeholder hp_metric at the start,"
                " and TensorBoard keeps a run's first hyper-parameter record: set its"
                " default_hp_metric: false to see the final metrics in the HPARAMS tab"
            )
        self._clips_shown = False

    # ------------------------------------------------------------------ training scalars

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._recent.clear()
        self._samples = 0
        self._clock = {"start": time.perf_counter(), "paused": 0.0}
        self._last_logged_step = -1

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # only on the steps that log: the per-parameter norms cost a pass over all gradients
        if _logs_at(trainer, trainer.global_step + 1):  # the step about to be taken
            norms = grad_norm(pl_module, norm_type=2)
            total = norms.get("grad_2.0_norm_total")
            self._grad_norm = None if total is None else float(total)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "start" not in self._clock:
            return
        self._samples += batch_size(batch)
        elapsed = time.perf_counter() - self._clock["start"] - self._clock["paused"]
        self._recent.append((elapsed, self._samples))
        step = trainer.global_step  # optimizer steps done, this one included
        if step == self._last_logged_step or not _logs_at(trainer, step):
            return
        self._last_logged_step = step
        metrics = memory_metrics(pl_module.device)
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        if t1 > t0:  # every rank reads as many clips a step as this one
            metrics["train/samples_per_sec"] = (n1 - n0) / (t1 - t0) * trainer.world_size
        if self._grad_norm is not None:
            metrics["train/grad_norm"], self._grad_norm = self._grad_norm, None
        for logger in trainer.loggers:  # at the step Lightning logs this batch's loss
            logger.log_metrics(metrics, step=step - 1)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "start" in self._clock:  # validation time is not training throughput
            self._clock["validation"] = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validation" in self._clock:
            self._clock["paused"] += time.perf_counter() - self._clock.pop("validation")
        if trainer.state.fn == "validate":
            self._record_hparams(trainer, pl_module)

    # ------------------------------------------------------------------ clips and projector

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._show_clips(trainer, pl_module, batch, "val")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._show_clips(trainer, pl_module, batch, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # callbacks run before the stage's own hook: its collected embeddings are still there
        if not trainer.sanity_checking:
            self._write_projector(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_projector(trainer, pl_module, "test")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run that never validated (``limit_val_batches: 0``) still shows its clips once."""
        if self._clips_shown or not self.num_clips or self._writer(trainer) is None:
            return
        batch = first_batch(trainer.datamodule, "val")
        if batch is None:
            return
        training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                batch = move_data_to_device(batch, pl_module.device)
                self._show_clips(trainer, pl_module, batch, "val")
        finally:
            pl_module.train(training)

    def _writer(self, trainer: Trainer) -> Any:
        """The SummaryWriter, on global rank 0 only; None elsewhere or without TensorBoard."""
        if self._tensorboard is None or not trainer.is_global_zero:
            return None
        return self._tensorboard.experiment

    def _show_clips(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict[str, Any], split: str
    ) -> None:
        writer = self._writer(trainer)
        if writer is None or not self.num_clips:
            return
        rows = take_rows(batch, self.num_clips)
        attention, caption = _method(pl_module, "attention_maps"), _method(pl_module, "caption")
        maps, frames = attention(rows) if attention else ({}, None)
        generated = caption(rows) if caption else None
        step = trainer.global_step
        for i in range(len(rows["clip_id"])):
            tag = f"{split}/clip_{i}"
            writer.add_text(f"{tag}/captions", clip_markdown(rows, i, generated), step)
            if maps:
                real = frames[i].bool().cpu()
                layers = [maps[k][i][..., real].cpu() for k in sorted(maps)]
                image = attention_image(layers)
                writer.add_image(f"{tag}/cross_attention", image, step, dataformats="HWC")
            if split not in self._audio_written:
                wave, rate = clip_audio(trainer, pl_module, rows, i)
                if wave is not None:
                    writer.add_audio(f"{tag}/audio", wave[None], step, sample_rate=rate)
        self._audio_written.add(split)
        self._clips_shown = True

    def _write_projector(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        writer = self._writer(trainer)
        collect = _method(pl_module, "collected_embeddings")
        if writer is None or not self.projector_clips or collect is None:
            return
        found = collect()
        clips = min(self.projector_clips, len(found["clip_id"]))
        if clips == 0:
            return
        ids = found["clip_id"][:clips]
        text_clip = found["text_clip"].tolist()
        kept = [j for j, c in enumerate(text_clip) if c < clips]
        first = {}
        for j in kept:
            first.setdefault(text_clip[j], found["captions"][j])
        metadata = [["audio", ids[c], _one_line(first.get(c, ""))] for c in range(clips)]
        metadata += [["text", ids[text_clip[j]], _one_line(found["captions"][j])] for j in kept]
        vectors = torch.cat([found["audio"][:clips], found["text"][kept]]).float()
        writer.add_embedding(
            vectors,
            metadata=metadata,
            metadata_header=["kind", "clip", "text"],
            global_step=trainer.global_step,
            tag=f"{split}_embeddings",
        )

    # ------------------------------------------------------------------ hyper-parameters

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_hparams(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_hparams(trainer, pl_module)

    def _record_hparams(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The hyper-parameters, for the HPARAMS tab, which shows them with the last value of
        every scalar of the run (its final metrics).

        Only the session records are written, not an experiment record: TensorBoard reads one
        experiment record per log folder (the first it finds), so with one the other runs there
        (stage 1, stage 2, a test run) would show no metrics. ``TensorBoardLogger.log_hyperparams``
        is not used because with metrics it also writes each value again as a scalar, bending
        every curve back to one step."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._writer(trainer)
        if writer is None or not final_metrics(trainer.callback_metrics):
            return
        params = {"stage": type(pl_module).__name__} | flat_params(pl_module.hparams_initial)
        datamodule = trainer.datamodule
        if datamodule is not None:
            params |= flat_params(datamodule.hparams_initial, "data/")
        count = _method(pl_module, "trainable_parameters")
        if count:
            params["trainable_parameters"] = count()
        _, session_start, session_end = hparams(params, {})
        file_writer = writer._get_file_writer()  # as TensorBoardLogger writes them
        file_writer.add_summary(session_start)
        file_writer.add_summary(session_end)
        writer.flush()


# ---------------------------------------------------------------------- helpers


def _method(module: LightningModule, name: str) -> Any:
    """The stage's method ``name``, or None for a module without it (the part is left out)."""
    method = getattr(module, name, None)
    return method if callable(method) else None


def _logs_at(trainer: Trainer, step: int) -> bool:
    every = trainer.log_every_n_steps
    return every > 0 and step % every == 0


def batch_size(batch: Any) -> int:
    """Clips in a batch: the data module's ``clip_id`` list, else the first tensor's rows."""
    if isinstance(batch, Mapping):
        if "clip_id" in batch:
            return len(batch["clip_id"])
        batch = list(batch.values())
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, list | tuple):
        return next((batch_size(b) for b in batch if isinstance(b, Tensor)), len(batch))
    return 1


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This process's resident memory and, on a GPU, the peak CUDA allocation (GB)."""
    metrics = {}
    rss = process_rss_bytes()
    if rss is not None:
        metrics["memory/rss_gb"] = rss / GB
    if device.type == "cuda":
        metrics["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
    return metrics


def process_rss_bytes() -> int | None:
    """Resident set size now (Linux), else the peak so far (other Unix), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as stat:
            return int(stat.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes
    except (ImportError, OSError):
        return None


def take_rows(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The first ``count`` clips of a batch (tensors and lists cut along the clip axis)."""
    size = len(batch["clip_id"])
    rows: dict[str, Any] = {}
    for key, value in batch.items():
        per_clip = isinstance(value, list) or (isinstance(value, Tensor) and value.ndim > 0)
        rows[key] = value[:count] if per_clip and len(value) == size else value
    return rows


def first_batch(datamodule: Any, split: str) -> dict[str, Any] | None:
    """The first evaluation batch of ``split`` read in this process, or None if it has none."""
    if datamodule is None or not hasattr(datamodule, "stream"):
        return None
    datamodule.setup()
    if not datamodule.sources.get(split):
        return None
    for batch in datamodule.stream(split):
        batch.pop("skipped", None)
        if batch["clip_id"]:
            return batch
    return None


def clip_audio(
    trainer: Trainer, pl_module: LightningModule, rows: dict[str, Any], i: int
) -> tuple[Tensor | None, int]:
    """Clip ``i``'s waveform ``(S,)`` as the model heard it (cut to the data's crop) and its rate;
    read from its file when the batch carries cached features instead of audio."""
    from slit_lightning.data.audio import AudioError, crop, load_audio

    datamodule = trainer.datamodule
    hp = getattr(datamodule, "hparams", {})
    rate = int(hp.get("sample_rate") or pl_module.encoder.sample_rate)
    if "audio" in rows:
        return rows["audio"][i][rows["audio_mask"][i].bool()].float().cpu(), rate
    try:
        wave = load_audio(rows["name"][i], rate)
    except (AudioError, OSError) as err:  # e.g. a clip that lives inside a shard
        log.info("dashboard: no audio for %s (%s)", rows["clip_id"][i], err)
        return None, rate
    limit = getattr(datamodule, "max_samples", None)
    return (crop(wave, limit, None) if limit else wave), rate


def clip_markdown(rows: dict[str, Any], i: int, generated: list[str] | None) -> str:
    """A small markdown table: the clip, its generated caption (if the stage makes one) and its
    references."""
    lines = [f"**{rows['clip_id'][i]}**", "", "| | |", "|---|---|"]
    if generated is not None:
        lines.append(f"| **generated** | {_cell(generated[i])} |")
    for n, reference in enumerate(rows["captions"][i], start=1):
        lines.append(f"| reference {n} | {_cell(reference)} |")
    if generated is None:
        lines += ["", "_this stage does not generate captions_"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|") or "_(empty)_"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def attention_image(layers: list[Tensor], cell: int = 6, min_width: int = 480) -> np.ndarray:
    """Cross-attention maps ``(heads, N, T)`` per layer -> an ``(H, W, 3)`` uint8 image.

    One band per layer (top to bottom) with one row per query (averaged over heads) and time left
    to right, coloured from the band's lowest weight (dark blue) to its highest (yellow): head-
    averaged attention stays within a few times uniform, so a fixed scale would show little.
    Bands are separated by a white line; frames are widened to at least ``min_width`` pixels."""
    if not layers:
        raise ValueError("attention_image needs at least one layer's attention map")
    frames = layers[0].shape[-1]
    widen = max(1, math.ceil(min_width / max(frames, 1)))
    bands = []
    for weights in layers:
        rows = weights.float().mean(dim=0).numpy()  # (N, T)
        rows = (rows - rows.min()) / max(float(rows.max() - rows.min()), 1e-12)
        band = np.repeat(np.repeat(colorize(rows), cell, axis=0), widen, axis=1)
        bands += [band, np.full((2, band.shape[1], 3), 255, np.uint8)]
    return np.concatenate(bands[:-1], axis=0)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``(...)`` -> viridis colours ``(..., 3)`` uint8."""
    stops = np.linspace(0.0, 1.0, len(COLORMAP))
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, stops, COLORMAP[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The run's last value of each logged scalar (``trainer.callback_metrics``)."""
    out = {}
    for name, value in metrics.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number or (isinstance(value, Tensor) and value.numel() == 1):
            out[name] = float(value)
    return out


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hyper-parameters as ``a/b: value`` with the types TensorBoard's table takes."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if str(key).startswith("_"):  # the CLI's bookkeeping (_class_path, _instantiator)
            continue
        if isinstance(value, Mapping):
            out |= flat_params(value, f"{name}/")
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out
