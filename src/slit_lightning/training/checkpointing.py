"""Checkpoints that survive crashes, and training that survives bad steps.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the target in one step: a process killed mid-write leaves the
  previous checkpoint intact (and a stray temporary file, removed by the next write).
- :class:`RecentCheckpoints` saves every ``every_n_train_steps`` steps and at the end of every
  training epoch, keeps the newest ``keep_last`` of those and ``last.ckpt`` (what
  ``--ckpt_path last`` resumes from).
- :class:`NonFiniteGuard` skips optimiser steps whose loss is NaN or infinite, counts them, and
  stops the run after too many in a row.
- :class:`RNGState` stores every process's random-number generators in checkpoints and puts them
  back before the first step after resuming, so a resumed run draws what an uninterrupted one would.

Every stage adds ``NonFiniteGuard`` and ``RNGState`` itself (``SLITStage.configure_callbacks``);
``slit fit`` plugs in ``AtomicCheckpointIO`` unless the trainer already has a checkpoint IO.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from slit_lightning.atomic import TEMP_MARK, write_file_atomic
from slit_lightning.errors import SLITError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.NAME.tmp-PID`` beside the target, fsync, then ``os.replace``.

    Remote paths (``s3://...``) go through Lightning's own writer, which uses a transaction."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)
        write_file_atomic(target, lambda tmp: _torch_save(checkpoint, tmp))

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read with ``weights_only=True`` unless the caller asks otherwise: a checkpoint is data,
        and unpickling arbitrary objects from a file runs code."""
        return super().load_checkpoint(
            path,
            map_location=map_location,
            weights_only=True if weights_only is None else weights_only,
        )


def _torch_save(checkpoint: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(checkpoint, handle)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary checkpoint files left by processes that no longer run."""
    removed = []
    for tmp in folder.glob(f".*{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.info("removed %s, left by an interrupted checkpoint write", tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RecentCheckpoints(ModelCheckpoint):
    """Checkpoints every ``every_n_train_steps`` steps and at each training epoch's end; the
    newest ``keep_last`` stay on disk, plus ``last.ckpt``.

    Args:
        dirpath: folder of the checkpoints.
        every_n_train_steps: optimiser steps between two checkpoints (0: epoch ends only).
        keep_last: how many of these checkpoints to keep (``last.ckpt`` comes on top).
        filename: Lightning's file-name template.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 100,
        keep_last: int = 2,
        filename: str = "{epoch}-{step}-recent",
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"RecentCheckpoints.keep_last must be at least 1, got {keep_last}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",  # the newest steps are the "best": keeps the last K
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_train_steps,
            save_last=True,
            save_on_train_epoch_end=True,
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class NonFiniteLossError(SLITError, RuntimeError):
    """Too many training steps in a row had a NaN or infinite loss."""


class NonFiniteGuard(Callback):
    """Skip the optimiser step of a batch whose loss is NaN or infinite; stop after too many.

    A skipped step leaves the weights and the optimiser's state as they were (the gradients are
    dropped before the optimiser sees them); the learning-rate schedule and the step counter move
    on. Skips are counted and logged as ``train/skipped_nonfinite``. ``max_consecutive`` skips in
    a row stop the run with :class:`NonFiniteLossError`; the weights, still those from before the
    first bad step, are written to ``before-nonfinite.ckpt`` in the checkpoint folder first.

    Under DDP the ranks agree (one tiny all-reduce per step), so they all skip or all step. With
    fp16 mixed precision, overflowing *gradients* of a finite loss are the gradient scaler's job
    (it skips that step and lowers the scale) and are not counted here.

    Args:
        max_consecutive: non-finite steps in a row that stop the run.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped, self.consecutive = 0, 0
        self._bad = False
        self._first_bad_step: int | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            self._bad = True

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._bad:
            self.consecutive, self._first_bad_step = 0, None
            return
        self._bad = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # the optimiser passes over parameters without gradients
        self.skipped += 1
        self.consecutive += 1
        if self._first_bad_step is None:
            self._first_bad_step = trainer.global_step
        log.warning(
            "non-finite loss at step %d: step skipped (%d in a row, %d in all)",
            trainer.global_step, self.consecutive, self.skipped,
        )  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        folder = _checkpoint_folder(trainer)
        path = folder / "before-nonfinite.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
        raise NonFiniteLossError(
            f"the loss was NaN or infinite in {self.consecutive} training steps in a row (steps"
            f" {self._first_bad_step} to {trainer.global_step}), so training stopped. Those steps"
            f" were skipped: {path} holds the weights from before them. Lower model.lr, check the"
            " data of those steps, keep gradient_clip_val set, prefer bf16 to fp16, or raise"
            " NonFiniteGuard's max_consecutive (model.max_nonfinite_steps)"
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.skipped:
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive,
                "first_bad_step": self._first_bad_step}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]
        self._first_bad_step = state_dict.get("first_bad_step")


class RNGState(Callback):
    """Every rank's Python, NumPy, torch (and CUDA) random state in checkpoints; put back just
    before the first training step after resuming, so dropout, hard-negative sampling and the
    like draw what the uninterrupted run drew (Lightning itself does not store them)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        own = {
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        ranks = [own]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if len(ranks) > rank:
            self._pending = ranks[rank]

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate(_as_python_state(state["python"]))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list[Any]:
    """NumPy's global state as tensors and numbers (what ``weights_only`` loading accepts)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _as_python_state(state: Any) -> tuple[Any, ...]:
    """``random.getstate()`` comes back from a checkpoint with lists where it had tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _checkpoint_folder(trainer: Trainer) -> Path:
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
