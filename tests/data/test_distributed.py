"""Two real processes (gloo on loopback), each with two loader workers."""

import json
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.skips import TooManySkipsError
from tests.conftest import write_manifest, write_tone


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


def _rank_with_ceiling(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # only rank 1 is strict, so only rank 1 passes the ceiling on its own
        ceiling = 0.0 if rank == 1 else 1.0
        dm = AudioTextDataModule(train=manifest, batch_size=2, num_workers=0,
                                 max_skip_fraction=ceiling)  # fmt: skip
        dm.ledgers["train"].min_records = 1
        try:
            for _ in dm.loader("train"):
                pass
            outcome = "finished"
        except TooManySkipsError as err:
            outcome = str(err)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as handle:
            handle.write(outcome)
    finally:
        dist.destroy_process_group()


def test_a_rank_passing_the_skip_ceiling_stops_every_rank(tmp_path):
    tone = write_tone(tmp_path / "tone.wav", seconds=0.1).read_bytes()
    rows = []
    for i in range(20):
        name = f"c{i:02d}.wav"
        (tmp_path / name).write_bytes(tone if i % 4 else b"not audio")
        rows.append({"id": name, "audio": name, "caption": "x"})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    mp.spawn(_rank_with_ceiling, args=(2, _free_port(), str(manifest), str(tmp_path)), nprocs=2)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "above the ceiling" in outcomes[1]
    assert "another rank passed the skip ceiling" in outcomes[0]
