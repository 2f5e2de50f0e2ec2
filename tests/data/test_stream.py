import itertools

import pytest
import torch

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.shards import write_shards
from slit_lightning.data.sources import open_source
from tests.conftest import write_manifest, write_tone


def ids_seen(spec: str, rank: int, world: int, workers: int, epoch: int = 0, train=True) -> list:
    dm = AudioTextDataModule(train=spec, val=spec, batch_size=4, num_workers=workers, seed=3)
    dm._rank_and_world = lambda: (rank, world)
    dm._epochs = {"train": epoch, "val": epoch}
    loader = dm.loader("train" if train else "val")
    return [clip for batch in loader for clip in batch["clip_id"]]


def assert_exactly_once(spec: str, world: int = 2, workers: int = 2) -> None:
    seen = list(itertools.chain(*(ids_seen(spec, r, world, workers) for r in range(world))))
    assert len(seen) == len(set(seen)) == 23, "a sample was lost or repeated"


def test_manifest_split_over_2_ranks_and_2_workers_exactly_once(many_clips):
    assert_exactly_once(str(many_clips))


@pytest.mark.parametrize("per_shard", [3, 8])  # 8 shards (>= 4 workers) and 3 shards (< 4 workers)
def test_shards_split_over_2_ranks_and_2_workers_exactly_once(many_clips, tmp_path, per_shard):
    counts = write_shards(str(many_clips), tmp_path / f"s{per_shard}", per_shard=per_shard)
    pattern = str(tmp_path / f"s{per_shard}" / f"shard-{{000000..{counts['shards'] - 1:06d}}}.tar")
    assert open_source(pattern).num_units == counts["shards"]
    assert_exactly_once(pattern)


def test_each_rank_gets_a_balanced_share(many_clips):
    sizes = [len(ids_seen(str(many_clips), r, 2, 2)) for r in range(2)]
    assert sorted(sizes) == [11, 12]


def test_training_order_changes_per_epoch_and_repeats_per_seed(many_clips):
    first = ids_seen(str(many_clips), 0, 1, 0, epoch=0)
    assert ids_seen(str(many_clips), 0, 1, 0, epoch=0) == first
    second = ids_seen(str(many_clips), 0, 1, 0, epoch=1)
    assert second != first and sorted(second) == sorted(first)


def test_evaluation_order_is_fixed(many_clips):
    a = ids_seen(str(many_clips), 0, 1, 0, epoch=0, train=False)
    assert a == sorted(a) and a == ids_seen(str(many_clips), 0, 1, 0, epoch=5, train=False)


def test_batches_carry_clip_keys_padding_masks_and_all_captions(clip_dir):
    dm = AudioTextDataModule(
        train=str(clip_dir / "train.jsonl"), batch_size=5, num_workers=0, max_seconds=0.5
    )
    batches = list(dm.train_dataloader())
    assert [len(b["clip_id"]) for b in batches] == [5, 5, 2]
    batch = batches[0]
    assert batch["audio"].shape == batch["audio_mask"].shape == (5, 8000)
    assert batch["clip_key"].dtype == torch.long and len(set(batch["clip_key"].tolist())) == 5
    for caption, captions in zip(batch["caption"], batch["captions"], strict=True):
        assert caption in captions and len(captions) == 2


def test_short_clips_are_padded_and_masked(tmp_path):
    write_tone(tmp_path / "short.wav", seconds=0.25)
    write_tone(tmp_path / "long.wav", seconds=1.0)
    write_manifest(
        tmp_path / "m.jsonl",
        [{"audio": "short.wav", "caption": "s"}, {"audio": "long.wav", "caption": "l"}],
    )
    dm = AudioTextDataModule(val=str(tmp_path / "m.jsonl"), batch_size=2, num_workers=0)
    (batch,) = list(dm.val_dataloader())
    assert batch["audio_mask"].sum(1).tolist() == [4000, 16000]


def test_shards_are_split_by_rank_first_so_ranks_stay_balanced(many_clips, tmp_path):
    write_shards(str(many_clips), tmp_path / "sh", per_shard=2)  # 12 shards
    dm = AudioTextDataModule(train=str(tmp_path / "sh" / "shard-{000000..000011}.tar"), seed=1)
    sizes = []
    for rank in range(2):
        stream = dm.stream("train")
        stream.set_distributed(rank, 2)
        # 2 ranks x 4 workers: 8 workers for 12 shards; each rank must get 6 shards
        sizes.append(sum(len(stream.assigned_units(0, w, 4)) for w in range(4)))
    assert sizes == [6, 6]


def test_length_estimate_matches_the_batches_delivered(many_clips):
    for workers in (0, 2):
        dm = AudioTextDataModule(train=str(many_clips), batch_size=4, num_workers=workers)
        loader = dm.train_dataloader()
        assert len(loader) == len(list(loader)) == 6  # 23 clips: 6 x 4, or 3 x 4 + 3 x 4 (12 + 11)


def test_rows_sharing_an_id_are_one_clip_with_all_captions(tmp_path):
    write_tone(tmp_path / "a.wav")
    write_manifest(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "audio": "a.wav", "caption": "one"},
            {"id": "b", "audio": "a.wav", "caption": "other"},
            {"id": "a", "audio": "a.wav", "caption": "two"},
        ],
    )
    (clip_a, clip_b) = [
        c for u in range(2) for c in open_source(str(tmp_path / "m.jsonl")).iter_unit(u)
    ]
    assert clip_a.captions == ("one", "two") and clip_b.captions == ("other",)


def test_training_interleaves_several_sources(tmp_path):
    tone = write_tone(tmp_path / "t.wav", seconds=0.1).read_bytes()
    for name in ("x", "y"):
        rows = []
        for i in range(20):
            (tmp_path / f"{name}{i}.wav").write_bytes(tone)
            rows.append({"id": f"{name}{i}", "audio": f"{name}{i}.wav", "caption": name})
        write_manifest(tmp_path / f"{name}.jsonl", rows)
    dm = AudioTextDataModule(
        train=[str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")],
        batch_size=8,
        num_workers=0,
        shuffle_buffer=1,
    )
    first = next(iter(dm.train_dataloader()))
    assert set(first["caption"]) == {"x", "y"}


def test_shard_members_with_folders_and_dots_group_by_their_own_name(tmp_path):
    import io
    import json
    import tarfile

    tone = write_tone(tmp_path / "t.flac", seconds=0.2).read_bytes()
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for i in range(3):
            for name, data in (
                (f"./v1.2/{i:04d}.flac", tone),
                (f"./v1.2/{i:04d}.json", json.dumps({"caption": f"c{i}"}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    clips = list(open_source(str(tmp_path / "odd.tar")).iter_unit(0))
    assert [c.captions for c in clips] == [("c0",), ("c1",), ("c2",)]
