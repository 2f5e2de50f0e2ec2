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
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


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
        tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(target.parent)


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


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
