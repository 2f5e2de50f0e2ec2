"""A few training steps of a tiny stage under Lightning, on one process or as one of several.

Run by ``test_multinode.py`` directly (one process) or under ``torchrun`` (one process per rank,
on as many "nodes" as torchrun is told). Every process builds the same model and the same global
batches from fixed seeds and trains on its rank's slice of each; it writes the loss of every step
and the trainable weights at the end to ``OUT/rank{R}.pt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader

CAPTIONS = [
    "one short beep then a hum",
    "two short beeps then a hum",
    "three knocks and a bell",
    "a rising sweep",
    "a falling sweep over noise",
    "white noise hisses loudly",
    "a low knock",
    "a siren wails twice",
]


def global_batches(steps: int, size: int) -> list[dict[str, Any]]:
    """``steps`` batches of ``size`` clips (random audio, fixed captions), the same everywhere."""
    gen = torch.Generator().manual_seed(7)
    batches = []
    for step in range(steps):
        audio = torch.randn(size, 4000, generator=gen) * 0.1
        keys = torch.arange(size) + step * size
        # two captions of one clip on either side of the middle: positives across two ranks
        keys[size // 2] = keys[size // 2 - 1]
        batches.append(
            {
                "audio": audio,
                "audio_mask": torch.ones_like(audio, dtype=torch.bool),
                "caption": [CAPTIONS[(i + step) % len(CAPTIONS)] for i in range(size)],
                "clip_key": keys,
            }
        )
    return batches


def rank_slice(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """The rank's contiguous share of a global batch."""
    size = len(batch["caption"]) // world
    rows = slice(rank * size, (rank + 1) * size)
    return {key: value[rows] for key, value in batch.items()}


def build(args: argparse.Namespace) -> L.LightningModule:
    from slit_lightning.stages import Stage1, Stage2

    torch.manual_seed(0)
    common = {"num_queries": 4, "cross_attention_freq": 1, "qformer_dropout": 0.0,
              "lr": 1e-3, "warmup_steps": 0}  # fmt: skip
    if args.stage == "stage1":
        return Stage1(args.encoder, args.bert, embed_dim=16, max_text_len=16, **common)
    return Stage2(args.encoder, args.bert, args.llm, max_target_len=16, **common)


class Record(L.Callback):
    """Keeps the loss of every training step and the (synchronised) gradients of the first."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not self.first_grads and not isinstance(trainer.strategy.model, FSDP):
            self.first_grads = {
                n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad
            }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def strategy(name: str) -> Any:
    if name == "fsdp":
        from slit_lightning.training.strategies import BlockFSDPStrategy

        return BlockFSDPStrategy(state_dict_type="full")
    return "ddp" if name == "ddp" else "auto"


def trainable_weights(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (gathered from the shards under FSDP)."""

    def copy() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    if isinstance(trainer.strategy.model, FSDP):
        with FSDP.summon_full_params(trainer.strategy.model):
            return copy()
    return copy()


def fsdp_facts(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """What FSDP made of the model: its units, and where gradients and optimiser state live."""
    model = trainer.strategy.model
    units = [type(m.module).__name__ for m in model.modules() if isinstance(m, FSDP)]
    optimizer = trainer.optimizers[0]
    with_state = [p for group in optimizer.param_groups for p in group["params"]]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return {
        "units": units,
        "optimizer_params_frozen": sum(1 for p in with_state if not p.requires_grad),
        "frozen_with_grad": sum(1 for p in frozen if p.grad is not None),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("stage", "encoder", "bert", "llm", "out", "strategy"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=8)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    module = build(args)
    batches = [rank_slice(b, rank, world) for b in global_batches(args.steps, args.global_batch)]
    record = Record()
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.nodes,
        precision=args.precision,
        strategy=strategy(args.strategy), max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[record], gradient_clip_val=None,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    result = {"losses": record.losses, "weights": trainable_weights(trainer, module),
              "first_grads": record.first_grads,
              "world": trainer.world_size, "rank": trainer.global_rank}  # fmt: skip
    if args.strategy == "fsdp":
        result |= fsdp_facts(trainer, module)
    torch.save(result, Path(args.out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
