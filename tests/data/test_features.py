"""The frozen-feature cache: same features as the encoder, never stale, crash-safe, crops work."""

import json
import os

import lightning.pytorch as pl
import pytest
import torch

from slit_lightning.data.cache_features import write_feature_cache
from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.features import STALE, cache_folder
from slit_lightning.model.encoders import HFAudioEncoder
from tests.conftest import write_manifest, write_tone


def _dm(clip_dir, cache, **kwargs):
    manifest = str(clip_dir / "train.jsonl")
    settings = {"batch_size": 4, "num_workers": 0, "max_seconds": 2.0, "feature_cache": str(cache)}
    return AudioTextDataModule(train=manifest, val=manifest, **{**settings, **kwargs})


@pytest.fixture
def encoder(tiny_encoder):
    return HFAudioEncoder.from_pretrained(str(tiny_encoder))


def _cache(encoder, clip_dir, cache, splits=("val",), **kwargs):
    return write_feature_cache(encoder, _dm(clip_dir, cache, **kwargs), list(splits), cache)


def test_cached_features_equal_the_encoders_output(encoder, clip_dir, tmp_path):
    counts = _cache(encoder, clip_dir, tmp_path / "cache", splits=("train", "val"))
    assert counts["val"]["clips"] == 12 and counts["val"]["skipped"] == 0
    cached = _dm(clip_dir, tmp_path / "cache")
    assert cached.use_feature_cache(encoder.identity) == ["train", "val"]
    plain = _dm(clip_dir, tmp_path / "cache")
    pairs = zip(cached.loader("val"), plain.loader("val"), strict=True)
    for from_cache, from_audio in pairs:
        assert "audio" not in from_cache and from_cache["clip_id"] == from_audio["clip_id"]
        frames, mask = encoder(from_audio["audio"], from_audio["audio_mask"])
        assert torch.equal(from_cache["feature_mask"], mask)
        got = from_cache["features"].float()
        assert got.shape == frames.shape
        # float16 storage: relative error of a few 1e-4
        assert torch.allclose(got[mask], frames[mask], rtol=2e-3, atol=2e-3)


def test_another_encoder_or_layer_never_reads_the_cache(encoder, clip_dir, tmp_path, tiny_encoder):
    _cache(encoder, clip_dir, tmp_path / "cache")
    other_layer = HFAudioEncoder.from_pretrained(str(tiny_encoder), layer=0)
    assert other_layer.identity != encoder.identity
    assert cache_folder(tmp_path, other_layer.identity) != cache_folder(tmp_path, encoder.identity)
    dm = _dm(clip_dir, tmp_path / "cache")
    assert dm.use_feature_cache(other_layer.identity) == []
    assert "audio" in next(iter(dm.loader("val")))


def test_a_batch_of_another_encoders_features_is_refused(
    encoder, clip_dir, tmp_path, tiny_encoder, tiny_bert
):
    from slit_lightning.stages import Stage1

    _cache(encoder, clip_dir, tmp_path / "cache")
    dm = _dm(clip_dir, tmp_path / "cache")
    dm.use_feature_cache(encoder.identity)
    batch = next(iter(dm.loader("val")))
    stage = Stage1(str(tiny_encoder), str(tiny_bert), num_queries=2, embed_dim=8)
    assert stage.encode_audio(batch)[0].dtype == torch.float32
    batch["feature_identity"] = "another:encoder"
    with pytest.raises(ValueError, match="another:encoder"):
        stage.encode_audio(batch)


def test_audio_changed_after_caching_is_a_counted_skip(encoder, clip_dir, tmp_path):
    _cache(encoder, clip_dir, tmp_path / "cache")
    write_tone(clip_dir / "clip03.mp3", 999.0, 1.5)  # new content, new size
    dm = _dm(clip_dir, tmp_path / "cache", max_skip_fraction=0.5)
    dm.use_feature_cache(encoder.identity)
    used = sum(len(b["clip_id"]) for b in dm.loader("val"))
    assert used == 11
    assert dict(dm.ledgers["val"].reasons) == {STALE: 1}


def test_a_moved_corpus_is_stale_and_says_so(encoder, clip_dir, tmp_path, caplog):
    """The fingerprint holds the file's path: features cached for one folder are not read for a
    copy elsewhere (same bytes, same times), and the skip says why."""
    import shutil

    _cache(encoder, clip_dir, tmp_path / "cache")
    moved = clip_dir.parent / f"{clip_dir.name}-moved"  # audio paths are manifest-relative
    shutil.copytree(clip_dir, moved, ignore=shutil.ignore_patterns("cache"))  # keeps the times
    dm = _dm(moved, tmp_path / "cache", max_skip_fraction=1.0)
    dm.use_feature_cache(encoder.identity)
    with caplog.at_level("WARNING"):
        assert sum(len(b["clip_id"]) for b in dm.loader("val")) == 0
    assert dict(dm.ledgers["val"].reasons) == {STALE: 12}
    assert "changed or moved after caching" in caplog.text


def test_clips_skipped_while_caching_keep_their_reason(encoder, clip_dir, tmp_path):
    (clip_dir / "clip05.flac").write_bytes(b"not audio at all")
    counts = _cache(encoder, clip_dir, tmp_path / "cache", max_skip_fraction=0.5)
    assert counts["val"] == {"clips": 11, "skipped": 1, "frames": counts["val"]["frames"]}
    dm = _dm(clip_dir, tmp_path / "cache", max_skip_fraction=0.5)
    assert dm.use_feature_cache(encoder.identity) == ["val"]
    assert sum(len(b["clip_id"]) for b in dm.loader("val")) == 11
    reasons = dict(dm.ledgers["val"].reasons)
    assert list(reasons.values()) == [1] and STALE not in reasons  # the decoder's own reason


def test_a_split_with_clips_the_cache_lacks_reads_audio_and_loses_none(
    encoder, clip_dir, tmp_path, caplog
):
    _cache(encoder, clip_dir, tmp_path / "cache")
    rows = [json.loads(line) for line in (clip_dir / "train.jsonl").read_text().splitlines()]
    write_tone(clip_dir / "late.wav", 300.0)
    rows.append({"id": "late", "audio": "late.wav", "captions": ["a late tone"]})
    write_manifest(clip_dir / "train.jsonl", rows)
    dm = _dm(clip_dir, tmp_path / "cache")
    assert dm.use_feature_cache(encoder.identity) == []
    assert "1 clips are not in the feature cache (e.g. late)" in caplog.text
    batches = list(dm.loader("val"))
    assert all("audio" in b for b in batches)
    assert sum(len(b["clip_id"]) for b in batches) == 13


def test_training_crops_are_random_windows_of_the_cached_frames(encoder, clip_dir, tmp_path):
    _cache(encoder, clip_dir, tmp_path / "cache")
    full = _dm(clip_dir, tmp_path / "cache")
    full.use_feature_cache(encoder.identity)
    whole = {}
    for batch in full.loader("val"):
        for b, clip_id in enumerate(batch["clip_id"]):
            whole[clip_id] = batch["features"][b][batch["feature_mask"][b]]
    dm = _dm(clip_dir, tmp_path / "cache", max_seconds=0.5)
    dm.use_feature_cache(encoder.identity)
    dm.features["train"] = dm.features["val"]  # the same clips: read the val cache for training
    starts = {}
    for _ in range(2):  # each pass is the next epoch
        for batch in dm.loader("train"):
            for b, clip_id in enumerate(batch["clip_id"]):
                window, source = batch["features"][b][batch["feature_mask"][b]], whole[clip_id]
                assert window.shape[0] == source.shape[0] // 2  # half a 1 s clip, rounded down
                matches = [
                    s for s in range(source.shape[0] - window.shape[0] + 1)
                    if torch.equal(source[s : s + window.shape[0]], window)
                ]  # fmt: skip
                assert matches, "the window must be a contiguous run of the clip's frames"
                starts.setdefault(clip_id, set()).add(matches[0])
    assert any(len(s) > 1 for s in starts.values()), "crops should move between epochs"


def test_an_interrupted_rewrite_leaves_the_previous_cache_readable(encoder, clip_dir, tmp_path):
    _cache(encoder, clip_dir, tmp_path / "cache")
    folder = cache_folder(tmp_path / "cache", encoder.identity)
    before = sorted(p.name for p in folder.iterdir())

    calls = {"n": 0}
    original = encoder.forward

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return original(*args)

    encoder.forward = failing
    with pytest.raises(RuntimeError, match="power cut"):
        _cache(encoder, clip_dir, tmp_path / "cache")
    encoder.forward = original
    dm = _dm(clip_dir, tmp_path / "cache")
    assert dm.use_feature_cache(encoder.identity) == ["val"]
    assert sum(len(b["clip_id"]) for b in dm.loader("val")) == 12
    # a rerun completes; it keeps the previous frames file (a running job may still read it)
    # and removes the abandoned one and anything older
    (first,) = [p.name for p in folder.glob("val.*.f16") if p.name in before]
    _cache(encoder, clip_dir, tmp_path / "cache")
    frames = sorted(p.name for p in folder.glob("val.*.f16"))
    assert len(frames) == 2 and first in frames
    _cache(encoder, clip_dir, tmp_path / "cache")
    assert first not in {p.name for p in folder.glob("val.*.f16")}
    assert len(list(folder.glob("val.*.f16"))) == 2
    assert not any(name.endswith(".tmp") for name in os.listdir(folder))


def test_stage_reads_the_cache_and_never_runs_the_encoder(
    encoder, clip_dir, tmp_path, tiny_encoder, tiny_bert
):
    from slit_lightning.stages import Stage1

    _cache(encoder, clip_dir, tmp_path / "cache", splits=("train", "val"))
    torch.manual_seed(0)
    stage = Stage1(str(tiny_encoder), str(tiny_bert), num_queries=2, embed_dim=8,
                   max_text_len=16, warmup_steps=1, rerank_k=2)  # fmt: skip

    def no_encoding(*_):
        raise AssertionError("the encoder ran although its features were cached")

    stage.encoder.forward = no_encoding
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(stage, datamodule=_dm(clip_dir, tmp_path / "cache"))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
