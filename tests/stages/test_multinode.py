"""Multi-node data parallel on one machine (2 "nodes" x 1 process, gloo on loopback), and FSDP.

The runs go through ``torchrun``, the launcher a real multi-node job uses (experiments/launch/),
and through Lightning's own DDP with ``num_nodes=2``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slit_lightning.model.state import CheckpointError
from slit_lightning.stages import Stage2
from slit_lightning.training.strategies import (
    BlockFSDPStrategy,
    llm_block_classes,
    load_sharded_model_state,
    wrap_classes,
)
from tests.data.test_distributed import _free_port

WORKER = Path(__file__).with_name("distributed_fit.py")
TIMEOUT = 240  # seconds; a hung rendezvous fails the test instead of blocking the suite


def _worker(models: list[str], out: Path, strategy: str, *extra: str) -> list[str]:
    return [str(WORKER), *models, "--out", str(out), "--strategy", strategy, *extra]


def _torchrun(node_rank: int, nodes: int, per_node: int, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--nproc_per_node={per_node}", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *args]  # fmt: skip


def _run_all(commands: list[list[str]], logs: Path) -> None:
    """Start every command at once; wait for all (bounded); fail with the logs of any failure."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    procs = []
    for i, command in enumerate(commands):
        log = open(logs / f"log{i}.txt", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for i, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (logs / f"log{i}.txt").read_text()[-3000:]


def test_two_nodes_on_loopback_train_like_one_process_on_the_global_batch(
    tiny_encoder, tiny_bert, tmp_path
):
    models = ["--stage", "stage1", "--encoder", str(tiny_encoder), "--bert", str(tiny_bert)]
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    single.mkdir(), nodes.mkdir()
    port = _free_port()
    two = _worker(models, nodes, "ddp", "--nodes", "2")
    _run_all(
        [
            [sys.executable, *_worker(models, single, "single")],
            _torchrun(0, 2, 1, port, two),
            _torchrun(1, 2, 1, port, two),
        ],
        tmp_path,
    )
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(nodes / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    # every step's loss: the mean over ranks is the single-process loss of the global batch, at
    # steps 2 and 3 too, so the updated weights agree as well
    mean = torch.tensor([r["losses"] for r in ranks]).mean(dim=0)
    torch.testing.assert_close(mean, torch.tensor(one["losses"]), atol=1e-5, rtol=1e-6)
    assert abs(ranks[0]["losses"][0] - ranks[1]["losses"][0]) > 1e-4  # each saw its own half
    # the synchronised gradients of the first step equal the single-process ones (float32 noise
    # of a loss near 13 is ~1e-6; AdamW's first steps then move each weight by about +-lr, so the
    # weights themselves differ by up to 2 lr where a gradient is as small as that noise)
    for name, grad in one["first_grads"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["first_grads"][name], grad, atol=5e-6, rtol=1e-3)
    for name in one["weights"]:  # the two ranks hold identical replicas
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name])


def test_fsdp_units_are_the_frozen_blocks_and_models_never_the_qformer(
    tiny_encoder, tiny_bert, tiny_llm_factory
):
    model = Stage2(str(tiny_encoder), str(tiny_bert), str(tiny_llm_factory("opt")),
                   num_queries=4, cross_attention_freq=1)  # fmt: skip
    names = {cls.__name__ for cls in wrap_classes(model)}
    assert names == {"OPTDecoderLayer", "OPTForCausalLM", "TransformerEncoderLayer",
                     "SmallAudioModel"}  # fmt: skip
    assert {cls.__name__ for cls in llm_block_classes(model)} == {"OPTDecoderLayer"}
    # every unit holds frozen weights only: the trainable ones all stay in the root
    units = [m for m in model.modules() if type(m) in wrap_classes(model)]
    assert all(not p.requires_grad for unit in units for p in unit.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and not trainable & {id(p) for u in units for p in u.parameters()}
    with pytest.raises(ValueError, match="from the model"):
        BlockFSDPStrategy(auto_wrap_policy={torch.nn.Linear})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_without_the_frozen_parts_loads_its_trainable_weights(tmp_path):
    """What a sharded checkpoint of a stage holds (the frozen parts left out, as
    ``on_save_checkpoint`` does), read back by ``BlockFSDPStrategy.load_checkpoint``'s loader
    (here on an unwrapped module: the distributed checkpoint format needs no process group)."""
    from torch.distributed.checkpoint import save

    def build() -> torch.nn.Module:  # [0] frozen like the encoder and LLM, [1] trainable
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        model[0].requires_grad_(False)
        return model

    torch.manual_seed(0)
    trained = build()
    stored = {k: v for k, v in trained.state_dict().items() if k.startswith("1.")}
    save({"model": stored}, checkpoint_id=tmp_path / "ckpt")
    fresh = build()  # other random weights
    frozen = fresh[0].weight.detach().clone()
    loaded = load_sharded_model_state(fresh, tmp_path / "ckpt")
    assert set(loaded) == {"1.weight", "1.bias"}
    assert torch.equal(fresh[1].weight, trained[1].weight)
    assert torch.equal(fresh[1].bias, trained[1].bias)
    assert torch.equal(fresh[0].weight, frozen)  # the frozen part keeps what it was built with
    save({"model": {"1.weight": stored["1.weight"]}}, checkpoint_id=tmp_path / "partial")
    with pytest.raises(CheckpointError, match=r"lacks trainable weights: 1\.bias"):
        load_sharded_model_state(build(), tmp_path / "partial")


@pytest.mark.gpu
def test_fsdp_on_gpus_trains_like_one_process(tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path):
    """FSDP1 refuses CPU devices, so this runs where CUDA is (make test-all on a GPU machine)."""
    gpus = torch.cuda.device_count()
    models = ["--stage", "stage2", "--encoder", str(tiny_encoder), "--bert", str(tiny_bert),
              "--llm", str(tiny_llm_factory("opt"))]  # fmt: skip
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    gpu = ["--accelerator", "gpu"]
    _run_all([[sys.executable, *_worker(models, single, "single", *gpu)]], tmp_path)
    fsdp = _worker(models, sharded, "fsdp", *gpu, "--devices", str(gpus))
    _run_all([_torchrun(0, 1, gpus, _free_port(), fsdp)], tmp_path)
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(sharded / f"rank{r}.pt") for r in range(gpus)]
    mean = torch.tensor([r["losses"] for r in ranks]).mean(dim=0)
    torch.testing.assert_close(mean, torch.tensor(one["losses"]), atol=1e-4, rtol=1e-4)
    for rank in ranks:
        assert "OPTDecoderLayer" in rank["units"] and "SmallAudioModel" in rank["units"]
        assert rank["optimizer_params_frozen"] == 0 and rank["frozen_with_grad"] == 0
