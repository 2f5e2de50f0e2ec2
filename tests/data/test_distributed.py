"""Two real processes (gloo on loopback), each with two loader workers."""

import json
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from slit_lightning.data.datamodule import AudioTextDataModule


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = AudioTextDataModule(train=manifest, val=manifest, batch_size=5, num_workers=2, seed=7)
        train = dm.loader("train")
        train_batches = [batch["clip_id"] for batch in train]
        val = [clip for batch in dm.loader("val") for clip in batch["clip_id"]]
        result = {"train": train_batches, "val": val, "dropped": train.dropped_in_lockstep}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_each_sample_once_and_ranks_stay_in_step(many_clips, tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(many_clips), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # evaluation: every clip exactly once over the world
    val = ranks[0]["val"] + ranks[1]["val"]
    assert len(val) == len(set(val)) == 23
    # training: same number of steps on both ranks, nothing repeated, leftovers counted
    assert len(ranks[0]["train"]) == len(ranks[1]["train"])
    train = [c for r in ranks for batch in r["train"] for c in batch]
    assert len(train) == len(set(train))
    dropped = ranks[0]["dropped"] + ranks[1]["dropped"]
    assert len(train) + dropped == 23
    # 23 clips over 4 workers in batches of 5: rank 0 holds 4 batches, rank 1 only 3
    assert dropped == 1
