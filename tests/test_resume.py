"""A run killed mid-epoch and resumed with ``--ckpt_path last`` ends where an uninterrupted one does.

Each run is a real ``slit fit`` process; the killed one gets SIGKILL right after optimiser step 6,
before any checkpoint of that step, so it resumes from the step-5 checkpoint in the middle of
epoch 1 and redoes step 6. Dropout is on, so the random state matters too.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KILL_STEP = 6


class KillAtStep(pl.Callback):
    """SIGKILLs its own process at the end of optimiser step ``step`` (a crash, not an exit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _config(folder: Path, encoder, bert, manifest, workers: int, kill: bool) -> Path:
    kill_callback = (
        f"    - class_path: tests.test_resume.KillAtStep\n      init_args: {{step: {KILL_STEP}}}\n"
        if kill
        else ""
    )
    path = folder / "run.yaml"
    path.write_text(
        "seed_everything: 3\n"
        "model:\n"
        "  class_path: slit_lightning.stages.Stage1\n"
        "  init_args:\n"
        f"    encoder: {encoder}\n    bert: {bert}\n"
        "    num_queries: 4\n    embed_dim: 16\n    max_text_len: 16\n    warmup_steps: 2\n"
        "    qformer_dropout: 0.2\n    rerank_k: 3\n"
        "data:\n"
        f"  train: {manifest}\n  batch_size: 4\n  num_workers: {workers}\n  max_seconds: 0.5\n"
        "  shuffle_buffer: 4\n  seed: 5\n"
        "trainer:\n"
        "  accelerator: cpu\n  max_epochs: 3\n  logger: false\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n  limit_val_batches: 0\n"
        f"  default_root_dir: {folder}\n"
        "  callbacks:\n"
        "    - class_path: slit_lightning.training.checkpointing.RecentCheckpoints\n"
        f"      init_args: {{dirpath: {folder / 'ckpt'}, every_n_train_steps: 5, keep_last: 2}}\n"
        + kill_callback
    )
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slit_lightning.cli.main", "fit", "--config", str(config), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key  # bit for bit
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow  # three `slit fit` processes: about two minutes on two busy cores
@pytest.mark.parametrize("workers", [2, 0])
def test_killed_and_resumed_run_ends_with_the_same_weights(
    tiny_encoder, tiny_bert, clip_dir, tmp_path, workers
):
    manifest = clip_dir / "train.jsonl"
    runs = {name: tmp_path / name for name in ("straight", "killed")}
    for name, folder in runs.items():
        folder.mkdir()
        _config(folder, tiny_encoder, tiny_bert, manifest, workers, kill=name == "killed")
    straight = _fit(runs["straight"] / "run.yaml")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _fit(runs["killed"] / "run.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = torch.load(runs["killed"] / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5  # the step-6 checkpoint was never written
    # resume without the kill, as a user would after a crash
    _config(runs["killed"], tiny_encoder, tiny_bert, manifest, workers, kill=False)
    resumed = _fit(runs["killed"] / "run.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumes after batch" in resumed.stderr
    final = [torch.load(runs[n] / "ckpt" / "last.ckpt", weights_only=True) for n in runs]
    assert final[0]["global_step"] == (12 if workers else 9)
    _assert_same_training_state(*final)


def _batches(loader, stop: int | None = None):
    out = []
    for batch in loader:
        out.append((batch["clip_id"], batch["caption"], batch["audio"].clone()))
        if stop is not None and len(out) == stop:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_a_loader_resumes_mid_epoch_with_the_same_order_crops_and_captions(
    clip_dir, tmp_path, workers, kind
):
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.data.shards import write_shards

    train = str(clip_dir / "train.jsonl")
    if kind == "shards":
        write_shards(train, tmp_path / "sh", per_shard=3)  # 4 shards, streamed
        train = str(tmp_path / "sh" / "shard-{000000..000003}.tar")

    def loader():
        dm = AudioTextDataModule(train=train, batch_size=2, num_workers=workers, max_seconds=0.3,
                                 shuffle_buffer=3, seed=4)  # fmt: skip
        dm._epochs["train"] = 1  # not the first epoch: the position must name its epoch
        return dm.loader("train")

    whole = _batches(loader())
    first = loader()
    head = _batches(first, stop=3)
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    tail = _batches(again)
    assert len(whole) == 6 and len(head) + len(tail) == 6
    for (ids, captions, audio), (ids2, captions2, audio2) in zip(whole, head + tail, strict=True):
        assert ids == ids2 and captions == captions2 and torch.equal(audio, audio2)
    # a position from another epoch is ignored: that epoch starts from its beginning
    other = loader()
    other.load_state_dict(state)
    other.epoch = lambda: 2
    assert len(_batches(other)) == 6
