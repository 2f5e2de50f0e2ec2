"""The count readout: targets, the frames it adds to, what it learns, and its bootstrap phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slit_lightning.builtin.encoder_bootstrap import bootstrap_encoder
from slit_lightning.builtin.encoder_counts import (
    CountReadout,
    _CountData,
    _evaluate,
    _train,
    count_targets,
)
from slit_lightning.model.encoders import HFAudioEncoder
from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

TYPES = ["beeps", "clicks", "knocks"]
COUNTING = {  # a tiny encoder with a tiny count readout
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "count_types": TYPES,
    "count_width": 8,
    "count_kernel": 9,
}


def test_targets_mark_the_frames_inside_each_counted_event():
    events = [
        {"type": "hum", "onset": 0.0, "duration": 1.0, "count": None},
        {"type": "knocks", "onset": 0.1, "duration": 0.2, "count": 3},
        {"type": "beeps", "onset": 0.5, "duration": 0.12, "count": 2},
    ]
    # frames centred at 0.0125 + 0.04 t: 0.1 <= centre < 0.3 for t = 3..7, 0.5 <= c < 0.62 for 13..15
    targets = count_targets(events, 25, TYPES, 6, 0.04, 0.0125)
    assert targets.shape == (25, 3)
    assert targets[:, 2].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert set(targets[3:8, 2].tolist()) == {3}
    assert targets[:, 0].nonzero().flatten().tolist() == [13, 14, 15]
    assert set(targets[13:16, 0].tolist()) == {2} and not targets[:, 1].any()
    with pytest.raises(ValueError, match="count_classes=3 covers 1 to 2"):
        count_targets(events, 25, TYPES, 3, 0.04, 0.0125)


def test_readout_adds_scaled_probabilities_through_orthonormal_rows():
    torch.manual_seed(0)
    readout = CountReadout(32, 3, 6, 8, 9, scale=8.0)
    readout.reset_buffers()
    p = readout.projection
    torch.testing.assert_close(p @ p.T, torch.eye(18), atol=1e-5, rtol=0)
    frames, mask = torch.randn(2, 20, 32), torch.ones(2, 20, dtype=torch.bool)
    probs = readout.logits(frames, mask).softmax(-1)
    torch.testing.assert_close(
        readout(frames, mask), frames + 8.0 * probs.flatten(-2) @ p, atol=1e-5, rtol=1e-5
    )
    # each frame's three distributions sum to one: the added vector's coordinates recover them
    added = (readout(frames, mask) - frames) @ p.T / 8.0
    torch.testing.assert_close(added.unflatten(-1, (3, 6)).sum(-1), torch.ones(2, 20, 3))
    with pytest.raises(ValueError, match="do not fit in 16 dims"):
        CountReadout(16, 3, 6, 8, 9, scale=1.0)


def test_padding_never_changes_the_counts_of_real_frames():
    torch.manual_seed(0)
    readout = CountReadout(16, 2, 4, 4, 5, scale=1.0)
    short = torch.randn(1, 7, 16)
    padded = torch.cat([short, torch.randn(1, 5, 16)], dim=1)  # garbage where the mask is False
    mask = torch.arange(12) < 7
    alone = readout.logits(short, torch.ones(1, 7, dtype=torch.bool))
    batched = readout.logits(padded, mask.unsqueeze(0))
    torch.testing.assert_close(batched[:, :7], alone)


def _burst_data(n: int, generator: torch.Generator) -> _CountData:
    """Frames that mark bursts with a spike on channel 0 inside an event marked on channel 1;
    the count is only in how many spikes the span holds, never in a single frame."""
    frames = torch.randn(n, 24, 8, generator=generator) * 0.1
    targets = torch.zeros(n, 24, 1, dtype=torch.long)
    for i in range(n):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        start = int(torch.randint(0, 10, (1,), generator=generator))
        span = range(start, start + 2 * count)
        frames[i, list(span), 1] += 1.0
        frames[i, list(span)[::2], 0] += 1.0
        targets[i, list(span), 0] = count
    return _CountData(frames.half(), torch.ones(n, 24, dtype=torch.bool), targets)


def test_readout_learns_to_count_what_no_single_frame_holds():
    generator = torch.Generator().manual_seed(0)
    train, val = _burst_data(256, generator), _burst_data(64, generator)
    torch.manual_seed(0)
    readout = CountReadout(8, 1, 4, 8, 9, scale=1.0)
    before = _evaluate(readout, val)["count_event_accuracy"]
    loss = _train(readout, train, steps=300, batch_size=32, lr=1e-2, seed=0)
    after = _evaluate(readout, val)
    assert after["count_val_events"] == 64 and loss < 0.5
    assert after["count_event_accuracy"] > 0.9 > before  # chance is 1/3


def test_bootstrap_trains_the_readout_and_the_saved_encoder_carries_it(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    config = SmallAudioConfig(**COUNTING)
    ticks: list[tuple[int, int]] = []
    metrics = bootstrap_encoder(
        tiny_corpus, tmp_path / "enc", epochs=1, config=config, extra_scenes=2,
        count_scenes=12, count_steps=5, progress=lambda d, t: ticks.append((d, t)),
    )  # fmt: skip
    assert metrics["count_train_clips"] == 12 and metrics["count_steps"] == 5
    assert 0.0 <= metrics["count_event_accuracy"] <= 1.0 and metrics["count_val_events"] > 0
    tagger_steps = 2  # 28 train clips and 2 scenes, batches of 16
    assert ticks[0] == (1, tagger_steps + 5) and ticks[-1] == (tagger_steps + 5, tagger_steps + 5)
    assert 0.0 <= metrics["count_seconds"] <= metrics["seconds"]  # a part of the whole run
    saved = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert saved["count_types"] == TYPES and saved["count_kernel"] == 9
    encoder = HFAudioEncoder.from_pretrained(str(tmp_path / "enc"))
    model = encoder.model
    assert isinstance(model, SmallAudioModel) and model.counts is not None
    wave, mask = torch.randn(2, 8000) * 0.1, torch.ones(2, 8000, dtype=torch.bool)
    frames, frame_mask = encoder(wave, mask)
    trunk, _ = model.trunk(wave, mask)
    torch.testing.assert_close(frames, model.counts(trunk, frame_mask))
    # the penultimate layer is the trunk's alone
    torch.testing.assert_close(model(wave, mask, layer=-2)[0], model.trunk(wave, mask, -2)[0])


def test_a_config_without_count_types_builds_no_readout():
    model = SmallAudioModel(SmallAudioConfig(**{**COUNTING, "count_types": None}))
    assert model.counts is None
    assert not any("counts" in name for name in model.state_dict())


def test_the_readout_needs_the_builtin_generator(tiny_corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (other / name).write_text((tiny_corpus / name).read_text())
    (other / "audio").symlink_to(tiny_corpus / "audio")
    with pytest.raises(ValueError, match="config without count_types"):
        bootstrap_encoder(other, tmp_path / "enc", epochs=1, config=SmallAudioConfig(**COUNTING))


def test_count_types_must_be_counted_by_the_generator(tiny_corpus: Path, tmp_path: Path) -> None:
    config = SmallAudioConfig(**{**COUNTING, "count_types": ["beeps", "bell"]})
    with pytest.raises(ValueError, match="must be among"):
        bootstrap_encoder(tiny_corpus, tmp_path / "enc", epochs=1, config=config, extra_scenes=0)
