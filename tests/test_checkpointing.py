"""Crash-safe checkpoint writes, keeping the newest checkpoints, skipping non-finite steps."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from slit_lightning.training.checkpointing import (
    AtomicCheckpointIO,
    NonFiniteGuard,
    NonFiniteLossError,
    RecentCheckpoints,
)

# A child that saves one checkpoint, then starts a second whose bytes stop halfway (as a slow disk
# would), says so through a marker file and waits to be killed.
KILLED_WRITER = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    import torch
    from slit_lightning.training.checkpointing import AtomicCheckpointIO

    target, marker = Path(sys.argv[1]), Path(sys.argv[2])
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"tag": "first", "w": torch.ones(50_000)}, target)
    real_save = torch.save

    def slow_save(obj, handle):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        marker.write_text("writing")
        time.sleep(120)
        handle.write(data[len(data) // 2 :])

    torch.save = slow_save
    io_.save_checkpoint({"tag": "second", "w": torch.zeros(50_000)}, target)
    """
)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer never reached the second write")
        time.sleep(0.05)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    target, marker = tmp_path / "ckpt" / "last.ckpt", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), str(target), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (stray,) = [p for p in target.parent.iterdir() if p.name != "last.ckpt"]
    assert stray.name.startswith(".last.ckpt.tmp-") and stray.stat().st_size > 0
    kept = torch.load(target, weights_only=True)
    assert kept["tag"] == "first" and torch.equal(kept["w"], torch.ones(50_000))
    # the next write (any process) clears what the killed one left behind
    AtomicCheckpointIO().save_checkpoint({"tag": "third"}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["tag"] == "third"


def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path):
    target = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint({"tag": "old"}, target)
    with pytest.raises(Exception, match="pickle"):
        AtomicCheckpointIO().save_checkpoint({"bad": lambda: 0}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
    assert torch.load(target, weights_only=True)["tag"] == "old"


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, _):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, callbacks, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def test_recent_checkpoints_every_n_steps_and_epoch_end_keep_the_last_k(tmp_path):
    data = torch.utils.data.DataLoader(torch.randn(7, 3), batch_size=1)  # 7 steps per epoch
    ckpts = RecentCheckpoints(dirpath=str(tmp_path / "c"), every_n_train_steps=3, keep_last=2)
    _trainer(tmp_path, [ckpts], max_epochs=2).fit(_Linear(), data)
    # steps 3, 6, 7 (epoch end), 9, 12, 14 (epoch end): the newest two stay, and last.ckpt
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["epoch=1-step=12-recent.ckpt", "epoch=1-step=14-recent.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 14


def test_recent_checkpoints_refuse_keeping_none():
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        RecentCheckpoints(keep_last=0)


def test_slit_fit_writes_checkpoints_through_the_atomic_io(clip_dir, tmp_path):
    from slit_lightning.cli.train import lightning_cli

    args = ["--model", "tests.data.test_bad_input._Consumer",
            "--data.train", str(clip_dir / "train.jsonl"), "--data.num_workers", "0",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = lightning_cli(args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


class _Poisoned(_Linear):
    """Its loss is NaN (or inf) on the given global steps."""

    def __init__(self, bad_steps, value=float("nan")):
        super().__init__()
        self.bad_steps, self.value = set(bad_steps), value
        self.seen = {}

    def training_step(self, batch, _):
        loss = super().training_step(batch, _)
        if self.global_step in self.bad_steps:
            self.seen[self.global_step] = {k: v.clone() for k, v in self.state_dict().items()}
            loss = loss * self.value
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def configure_callbacks(self):
        return [NonFiniteGuard(max_consecutive=3)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_step_leaves_weights_and_optimizer_alone_and_is_counted(tmp_path, value):
    model = _Poisoned({2, 3}, value)
    data = torch.utils.data.DataLoader(torch.randn(6, 3), batch_size=1)
    trainer = _trainer(tmp_path, [], max_epochs=1, log_every_n_steps=1, enable_checkpointing=False)
    states = {}
    model.on_before_optimizer_step = lambda opt: states.setdefault(
        model.global_step,
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
    )
    trainer.fit(model, data)
    # weights when step 4 began equal those at step 2: steps 2 and 3 changed nothing
    after = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    for key, value_at_2 in model.seen[2].items():
        assert torch.equal(model.seen[3][key], value_at_2)
    # AdamW's moments and step counts as step 4 began are those of step 2
    assert len(states[2]) == 2 and states[2].keys() == states[4].keys()
    for p, state in states[2].items():
        assert all(
            torch.equal(state[k], states[4][p][k]) for k in ("exp_avg", "exp_avg_sq", "step")
        )
    assert not all(torch.equal(states[4][p]["exp_avg"], states[5][p]["exp_avg"]) for p in states[4])
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 2 and guard.consecutive == 0
    assert trainer.logged_metrics["train/skipped_nonfinite"] == 2


def test_too_many_non_finite_steps_in_a_row_stop_with_a_checkpoint_from_before(tmp_path):
    model = _Poisoned({4, 5, 6, 7})
    data = torch.utils.data.DataLoader(torch.randn(10, 3), batch_size=1)
    ckpts = RecentCheckpoints(dirpath=str(tmp_path / "c"), every_n_train_steps=100)
    trainer = _trainer(tmp_path, [ckpts], max_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"3 training steps in a row \(steps 4 to 6\)"):
        trainer.fit(model, data)
    saved = torch.load(tmp_path / "c" / "before-nonfinite.ckpt", weights_only=True)
    for key, good in model.seen[4].items():  # the weights as the first bad step found them
        assert torch.equal(saved["state_dict"][key], good)
    assert 7 not in model.seen  # it stopped at the third


def test_every_stage_trains_with_the_guard(tiny_encoder, tiny_bert):
    from slit_lightning.stages import Stage1

    stage = Stage1(str(tiny_encoder), str(tiny_bert), num_queries=2, embed_dim=8,
                   max_nonfinite_steps=7)  # fmt: skip
    (guard,) = [c for c in stage.configure_callbacks() if isinstance(c, NonFiniteGuard)]
    assert guard.max_consecutive == 7


class _Payload:
    """Anything that is not plain data: unpickling it would run code."""


def test_checkpoints_are_read_as_data_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(path)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["w"], torch.ones(2))
