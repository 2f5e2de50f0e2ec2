"""Bad input is skipped, counted and logged with the file name; too much of it stops the run."""

import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.skips import TooManySkipsError
from tests.conftest import write_manifest, write_tone, write_tone_shards
from tests.data.test_audio import bad_files


def corpus_with_bad_files(tmp_path, good: int):
    rows = []
    tone = write_tone(tmp_path / "tone.flac", 500.0, 0.2).read_bytes()
    for i in range(good):
        (tmp_path / f"g{i:03d}.flac").write_bytes(tone)
        rows.append({"id": f"g{i:03d}", "audio": f"g{i:03d}.flac", "caption": f"good {i}"})
    bad = bad_files(tmp_path)
    rows += [{"id": name, "audio": name, "caption": "bad"} for name in bad]
    rows.append({"id": "nocap", "audio": "g000.flac", "caption": " "})
    return write_manifest(tmp_path / "m.jsonl", rows), bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_logged_by_name(tmp_path, caplog, workers):
    manifest, bad = corpus_with_bad_files(tmp_path, good=200)
    dm = AudioTextDataModule(train=str(manifest), batch_size=16, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        ids = [i for batch in dm.train_dataloader() for i in batch["clip_id"]]
    assert sorted(ids) == [f"g{i:03d}" for i in range(200)]
    ledger = dm.ledgers["train"]
    assert ledger.used == 200 and ledger.skipped == len(bad) + 1
    expected = {reason for _, reason in bad.values()} | {"empty caption"}
    assert set(ledger.reasons) == expected
    if workers == 0:  # worker processes log to their own stderr, not to caplog
        for name in bad:
            assert any(name in rec.getMessage() for rec in caplog.records), name


def test_too_many_bad_files_stop_with_a_clear_message(tmp_path):
    manifest, _ = corpus_with_bad_files(tmp_path, good=40)
    dm = AudioTextDataModule(train=str(manifest), batch_size=8, num_workers=0)
    with pytest.raises(
        TooManySkipsError, match=r"train: 9 of 49 records \(18.4%\).*ceiling of 5.0%"
    ):
        list(dm.train_dataloader())


def test_truncated_shard_ends_that_shard_only(tmp_path, caplog):
    write_tone_shards(tmp_path, 12, 0.3)
    first = tmp_path / "sh" / "shard-000000.tar"
    data = first.read_bytes()
    first.write_bytes(data[: len(data) * 2 // 3])  # cut inside the third member pair
    dm = AudioTextDataModule(
        train=str(tmp_path / "sh" / "shard-{000000..000002}.tar"),
        batch_size=4,
        num_workers=0,
        max_skip_fraction=0.5,
        seed=1,
    )
    with caplog.at_level(logging.WARNING):
        ids = sorted(i for batch in dm.train_dataloader() for i in batch["clip_id"])
    assert {f"c{i}" for i in range(4, 12)} <= set(ids)  # the two intact shards are all there
    assert 8 < len(ids) < 12  # some of the truncated shard's samples arrived before the cut
    assert dm.ledgers["train"].reasons["truncated shard"] == 1
    assert any("shard-000000.tar is truncated" in r.getMessage() for r in caplog.records)


class _Consumer(pl.LightningModule):
    """Records what each epoch delivered."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epochs: dict[int, list[str]] = {}

    def training_step(self, batch, _):
        self.epochs.setdefault(self.current_epoch, []).extend(batch["clip_id"])
        return (self.weight * batch["audio"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_reshuffles_each_epoch_and_sees_every_clip(clip_dir):
    dm = AudioTextDataModule(train=str(clip_dir / "train.jsonl"), batch_size=4, num_workers=2)
    model = _Consumer()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.epochs[0]) == sorted(model.epochs[1]) == [f"clip{i:02d}" for i in range(12)]
    assert model.epochs[0] != model.epochs[1]


def test_nan_written_as_float_wav_never_reaches_a_batch(tmp_path):
    wave = np.full(4000, 0.2, dtype=np.float32)
    wave[7] = np.inf
    sf.write(str(tmp_path / "inf.wav"), wave, 16000, subtype="FLOAT")
    write_tone(tmp_path / "ok.wav")
    write_manifest(
        tmp_path / "m.jsonl",
        [{"audio": "inf.wav", "caption": "x"}, {"audio": "ok.wav", "caption": "y"}],
    )
    dm = AudioTextDataModule(val=str(tmp_path / "m.jsonl"), num_workers=0, max_skip_fraction=0.5)
    (batch,) = list(dm.val_dataloader())
    assert batch["name"] == [str(tmp_path / "ok.wav")] and torch.isfinite(batch["audio"]).all()
