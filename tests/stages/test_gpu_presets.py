"""The shipped GPU presets end to end, where a CUDA device is (marker ``gpu``: ``make test-gpu``).

A tiny stage 2 (random encoder, BERT and OPT with the LLM loaded in bf16; tone clips) trains
through ``slit fit`` with ``conf/trainer/gpu.yaml`` (one GPU, bf16 autocast) and with
``conf/trainer/fsdp.yaml`` (``BlockFSDPStrategy``, bf16, sharded checkpoints), with and without
activation checkpointing of the LLM blocks. The FSDP run's sharded checkpoint then resumes
training, is consolidated into one file with Lightning's tool, and captions audio through
``slit caption``. The default test run skips this module: FSDP refuses CPU devices.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import write_tone, write_tone_clips
from tests.stages.distributed_fit import fsdp_facts

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
STEPS = 8


class LossLog(pl.Callback):
    """Writes every step's loss, the precision, the strategy and (under FSDP) its units and
    where the frozen weights' gradients and optimiser state are, to ``path`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        record = {
            "losses": self.losses,
            "precision": trainer.precision,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
        }
        if isinstance(trainer.strategy.model, FSDP):
            record |= fsdp_facts(trainer, pl_module)
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(record))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Sixteen half-second tones with captions, and their manifest."""
    return write_tone_clips(
        tmp_path_factory.mktemp("clips"), 16, 0.5,
        lambda i: {"caption": f"a tone number {i % 4}"}, hz=(300.0, 40.0),
    )  # fmt: skip


def _config(folder: Path, models: dict[str, Path], manifest: Path) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        "seed_everything: 0\n"
        "model:\n"
        "  class_path: slit_lightning.stages.Stage2\n"
        "  init_args:\n"
        f"    encoder: {models['encoder']}\n    bert: {models['bert']}\n    llm: {models['llm']}\n"
        "    llm_dtype: bfloat16\n    num_queries: 4\n    windows: 2\n    cross_attention_freq: 1\n"
        "    qformer_dropout: 0.0\n    max_target_len: 16\n    lr: 1.0e-3\n    warmup_steps: 0\n"
        "data:\n"
        f"  train: {manifest}\n  batch_size: 4\n  num_workers: 0\n  max_seconds: 0.5\n"
        "trainer:\n"
        f"  max_steps: {STEPS}\n  logger: false\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n  limit_val_batches: 0\n  gradient_clip_val: 1.0\n"
        f"  default_root_dir: {folder}\n"
        "  callbacks:\n"
        "    - class_path: slit_lightning.training.checkpointing.RecentCheckpoints\n"
        f"      init_args: {{dirpath: {folder / 'ckpt'}, every_n_train_steps: 4, keep_last: 1}}\n"
        "    - class_path: tests.stages.test_gpu_presets.LossLog\n"
        f"      init_args: {{path: {folder / 'record.json'}}}\n"
    )
    return path


def _slit(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "slit_lightning.cli.main", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _fit(folder: Path, models: dict[str, Path], manifest: Path, *extra: str) -> dict:
    folder.mkdir()
    _slit("fit", "--config", str(_config(folder, models, manifest)), *extra)
    return json.loads((folder / "record.json").read_text())


@pytest.fixture(scope="module")
def models(tiny_encoder, tiny_bert, tiny_llm_factory) -> dict[str, Path]:
    return {"encoder": tiny_encoder, "bert": tiny_bert, "llm": tiny_llm_factory("opt")}


def test_bf16_fsdp_trains_like_one_gpu_and_its_sharded_checkpoints_resume_and_consolidate(
    models, clips, tmp_path
):
    assert torch.cuda.is_available()
    one = _fit(tmp_path / "gpu", models, clips, "--config", "conf/trainer/gpu.yaml")
    fsdp_conf = ["--config", "conf/trainer/fsdp.yaml"]
    fsdp = _fit(tmp_path / "fsdp", models, clips, *fsdp_conf)
    recompute = _fit(
        tmp_path / "recompute", models, clips, *fsdp_conf,
        "--trainer.strategy.init_args.checkpoint_llm_blocks", "true",
    )  # fmt: skip
    print(json.dumps({"gpu": one, "fsdp": fsdp, "recompute": recompute}))
    assert one["precision"] == fsdp["precision"] == "bf16-mixed"
    assert fsdp["strategy"] == "BlockFSDPStrategy" and one["strategy"] != fsdp["strategy"]
    for run in (one, fsdp, recompute):
        assert len(run["losses"]) == STEPS and all(map(math.isfinite, run["losses"]))
        assert sum(run["losses"][-2:]) < sum(run["losses"][:2])  # it learns
    # FSDP's bf16 casts the parameters, autocast the products: close, not equal, in bf16
    torch.testing.assert_close(
        torch.tensor(fsdp["losses"]), torch.tensor(one["losses"]), rtol=0.05, atol=0.05
    )
    # recomputing the LLM blocks' activations changes the memory, not the arithmetic
    torch.testing.assert_close(
        torch.tensor(recompute["losses"]), torch.tensor(fsdp["losses"]), rtol=1e-2, atol=1e-2
    )
    for run in (fsdp, recompute):
        assert "OPTDecoderLayer" in run["units"] and "SmallAudioModel" in run["units"]
        assert run["optimizer_params_frozen"] == 0 and run["frozen_with_grad"] == 0

    last = tmp_path / "fsdp" / "ckpt" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()  # sharded: a folder per checkpoint
    # resume the sharded run for 4 more steps (frozen parts are not in the files)
    more = _slit(
        "fit", "--config", str(tmp_path / "fsdp" / "run.yaml"), *fsdp_conf,
        "--trainer.max_steps", str(STEPS + 4), "--ckpt_path", str(last),
    )  # fmt: skip
    resumed = json.loads((tmp_path / "fsdp" / "record.json").read_text())
    assert resumed["global_step"] == STEPS + 4 and len(resumed["losses"]) == 4, more.stderr[-2000:]
    # it went on from the trained weights (a fresh start is back near the first loss, ~7.0)
    assert resumed["losses"][0] < fsdp["losses"][0] - 0.5, (resumed["losses"], fsdp["losses"])

    subprocess.run(
        [sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(last)],
        check=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    consolidated = last.with_name("last.ckpt.consolidated")
    checkpoint = torch.load(consolidated, weights_only=False, map_location="cpu")
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("qformer.") for k in keys) and "llm_proj.weight" in keys
    assert not any(k.startswith(("llm.", "encoder.")) for k in keys)  # saved by reference
    assert checkpoint["global_step"] == STEPS + 4
    assert checkpoint["state_dict"]["llm_proj.weight"].dtype == torch.float32  # master weights
    audio = write_tone(tmp_path / "unseen.wav", 523.0, 0.5)
    captions = _slit("caption", str(audio), "--ckpt", str(consolidated)).stdout
    assert "unseen.wav" in captions, captions
