"""The built-in encoder's bootstrap: clips held in memory, and the tagger's labelled windows."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from slit_lightning.builtin.encoder_bootstrap import InMemoryClips, bootstrap_encoder, sounding
from slit_lightning.model.small_encoder import SmallAudioConfig

RATE = 100  # samples per second: windows of a few seconds stay tiny


def _batches(waves: list[torch.Tensor], rows: list[list[str]]) -> list[dict[str, Any]]:
    """Two batches as the data module gives them: right-padded audio, masks, labels, clip ids."""
    size = max(w.shape[0] for w in waves)
    padded = [torch.nn.functional.pad(w, (0, size - w.shape[0])) for w in waves]
    masks = [torch.arange(size) < w.shape[0] for w in waves]
    cut = (len(waves) + 1) // 2
    return [
        {
            "audio": torch.stack(padded[part]),
            "audio_mask": torch.stack(masks[part]),
            "labels": rows[part],
            "clip_id": [f"c{i}" for i in range(len(waves))][part],
        }
        for part in (slice(0, cut), slice(cut, None))
    ]


def test_in_memory_clips_serve_every_clip_once_per_epoch_in_a_new_order() -> None:
    waves = [torch.full((n,), float(i)) for i, n in enumerate([5, 7, 3, 7, 6])]
    rows = [[f"label{i}"] for i in range(5)]
    batches = _batches(waves, rows)
    clips = InMemoryClips(batches)
    epochs = list(clips.epochs(3, 2, torch.Generator().manual_seed(0)))
    orders = []
    for epoch in epochs:
        seen = [label[0] for batch in epoch for label in batch["labels"]]
        assert sorted(seen) == [f"label{i}" for i in range(5)]
        orders.append(seen)
        for batch in epoch:  # each clip's samples and mask travel with its label
            for wave, mask, label in zip(
                batch["audio"], batch["audio_mask"], batch["labels"], strict=True
            ):
                i = int(label[0][-1])
                assert int(mask.sum()) == waves[i].shape[0] and (wave[mask] == i).all()
            assert batch["audio"].shape[1] == int(batch["audio_mask"].sum(1).max())
    assert len({tuple(o) for o in orders}) > 1


def _event(kind: str, onset: float, duration: float) -> dict[str, Any]:
    return {"type": kind, "onset": onset, "duration": duration}


def test_a_window_is_labelled_with_the_events_that_sound_in_it() -> None:
    events = [_event("hum", 0.0, 5.0), _event("clicks", 1.0, 0.5), _event("bell", 3.0, 0.02)]
    assert sounding(events, 0.0, 0.9) == ["hum"]
    assert sounding(events, 0.0, 1.2) == ["clicks", "hum"]
    assert sounding(events, 1.46, 2.0) == ["hum"]  # 40 ms of the clicks: too little
    assert sounding(events, 2.95, 3.011) == ["bell", "hum"]  # half of a 20-ms bell is enough
    assert sounding(events, 3.012, 3.1) == ["hum"]  # 8 ms of it is not
    assert sounding(events, 5.0, 6.0) == []


def test_windows_are_cut_at_random_and_labelled_from_the_clip_events() -> None:
    # clip 0: 4 s, a beep from 0.5 s to 1 s; clip 1: 2 s, shorter than the window, stays whole
    waves = [torch.arange(400.0), 1000 + torch.arange(200.0)]
    events = {"c0": [_event("beeps", 0.5, 0.5)], "c1": [_event("hum", 0.0, 2.0)]}
    clips = InMemoryClips(_batches(waves, [["beeps"], ["hum"]]), events=events, sample_rate=RATE)
    starts: set[int] = set()
    for epoch in clips.epochs(20, 2, torch.Generator().manual_seed(0), crop_seconds=2.5):
        (batch,) = epoch
        for wave, mask, labels in zip(
            batch["audio"], batch["audio_mask"], batch["labels"], strict=True
        ):
            real = wave[mask]
            if real[0] >= 1000:  # the short clip, whole
                assert labels == ["hum"] and torch.equal(real, waves[1])
                continue
            start = int(real[0])
            assert torch.equal(real, torch.arange(start, start + 250.0))
            assert labels == (["beeps"] if start <= 95 else [])  # >= 50 ms of the beep inside
            starts.add(start)
    assert len(starts) > 5 and min(starts) < 95 < max(starts)


def test_windows_need_events() -> None:
    clips = InMemoryClips(_batches([torch.zeros(300), torch.zeros(300)], [["a"], ["b"]]))
    with pytest.raises(ValueError, match="no events"):
        next(clips.epochs(1, 2, torch.Generator(), crop_seconds=1.0))
    assert len(next(clips.epochs(1, 2, torch.Generator()))) == 1  # whole clips need none


TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "n_mels": 16,
}


def test_bootstrap_windows_only_a_builtin_corpus(tiny_corpus: Path, tmp_path: Path) -> None:
    config = SmallAudioConfig(**TINY)
    metrics = bootstrap_encoder(
        tiny_corpus, tmp_path / "a", epochs=1, config=config, extra_scenes=2
    )
    assert metrics["crop_seconds"] == 2.5  # the default for a built-in corpus
    other = tmp_path / "other"  # the same clips without corpus.json: no events to label windows
    shutil.copytree(tiny_corpus, other, ignore=shutil.ignore_patterns("corpus.json"))
    with pytest.raises(ValueError, match="only a built-in corpus"):
        bootstrap_encoder(other, tmp_path / "b", epochs=1, config=config, crop_seconds=2.0)
    assert not (tmp_path / "b").exists()  # refused before any training
    assert bootstrap_encoder(other, tmp_path / "c", epochs=1, config=config)["crop_seconds"] == 0
    with pytest.raises(ValueError, match="crop_seconds must be >= 0"):
        bootstrap_encoder(tiny_corpus, tmp_path / "d", epochs=1, config=config, crop_seconds=-1)
