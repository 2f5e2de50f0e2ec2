"""Event agreement: which events, counts and order captions of the built-in corpus name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slit_lightning.builtin import corpus as synth
from slit_lightning.builtin import corpus_text as synth_text
from slit_lightning.builtin.events import (
    breakdown_captions_file,
    event_agreement,
    event_breakdown,
    named_event_types,
    named_events,
    score_captions_file,
)


def event(kind: str, onset: float, count: int | None = None, role: str = "foreground") -> dict:
    return {"type": kind, "onset": onset, "count": count, "role": role}


CLIP = [
    event("rumble", 0.0, role="background"),
    event("knocks", 0.5, count=2),
    event("hum", 1.5),
    event("beeps", 3.0, count=3),
]
# captions of CLIP, from all right to naming nothing
CAPTIONS = [
    "Two knocks, then a hum, then three beeps, over a rumble.",  # all right
    "Three knocks, then three beeps and a hum.",  # count, order and the bed wrong
    "A siren.",  # nothing right
    "",  # nothing named
]


def test_named_events_read_every_wording_in_order_with_its_number() -> None:
    text = "A soft drone, then two thuds, a high-pitched bell strike and white noise in the background."
    assert named_event_types(text) == ["hum", "knocks", "bell", "white noise"]
    assert named_events("Four loud clicks over a deep rumble, then one bleep.") == [
        ("clicks", 4),
        ("rumble", None),
        ("beeps", 1),
    ]
    # a number word belongs to the phrase it starts, not to the next event's
    assert named_events("Two beeps, then a hum") == [("beeps", 2), ("hum", None)]
    assert named_events("Background noise only, no events.") == []


def test_every_generated_caption_agrees_with_its_own_scene() -> None:
    """Planned scenes (train and held-out wordings): every caption names exactly its events, in
    order, with the right numbers, so any miss on a model's caption is the model's."""
    captions, clips = [], []
    pairs = synth.heldout_pairs(0)
    for index in range(150):
        plan, text = (np.random.default_rng([7, index, k]) for k in range(2))
        events, background = synth._plan_scene(plan, "train", pairs, 5.0)
        for caption in synth_text.captions(events, background["level"], text, zeroshot=index % 2):
            captions.append(caption)
            clips.append(events)
    scores = event_agreement(captions, clips)
    assert scores["counted"] > 100 and scores["pairs"] > 300
    for name in ("precision", "recall", "first_event", "pair_order", "exact_types", "in_order"):
        assert scores[name] == 1.0, name
    assert scores["counts"] == scores["all_right"] == 1.0


def test_scores_count_what_is_wrong() -> None:
    scores = event_agreement(CAPTIONS, [CLIP] * 4)
    assert scores["precision"] == pytest.approx(7 / 8)
    assert scores["recall"] == pytest.approx(7 / 16)
    assert scores["first_event"] == pytest.approx(2 / 4)
    assert (scores["pairs"], scores["pair_order"]) == (6, pytest.approx(5 / 6))
    assert scores["exact_types"] == scores["in_order"] == scores["all_right"] == 0.25
    assert (scores["counted"], scores["counts"]) == (4, pytest.approx(3 / 4))
    with pytest.raises(ValueError, match="2 captions for 1 clips"):
        event_agreement(["a", "b"], [CLIP])


def test_breakdown_says_what_keeps_each_clip_from_all_right() -> None:
    out = event_breakdown(CAPTIONS, [CLIP] * 4)
    assert out["failures"] == {
        "ok": 1,
        "missing+order+count": 1,
        "extra+missing+count": 1,
        "missing+count": 1,
    }
    assert out["types"]["knocks"] == {"clips": 4, "named": 2, "recall": 0.5, "false": 0}
    assert out["types"]["rumble"] == {"clips": 4, "named": 1, "recall": 0.25, "false": 0}
    assert out["types"]["siren"] == {"clips": 0, "named": 0, "recall": None, "false": 1}
    # per true count, the number words said for it
    assert out["counts"] == {
        "two": {"two": 1, "three": 1, "unnamed": 2},
        "three": {"three": 2, "unnamed": 2},
    }
    named_bare = event_breakdown(["Knocks, then a hum, then three beeps over a rumble."], [CLIP])
    assert named_bare["counts"]["two"] == {"none": 1}
    assert named_bare["failures"] == {"count": 1}


def test_score_captions_file_reads_the_clips_from_the_corpus(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "c1", "events": CLIP}) + "\n")
    report = tmp_path / "test_captions.json"
    rows = [{"clip_id": "c1", "prediction": "Two thuds, a hum, three beeps over a rumble."}]
    report.write_text(json.dumps({"captions": rows}))
    assert score_captions_file(report, tmp_path)["all_right"] == 1.0
    assert breakdown_captions_file(report, tmp_path)["failures"] == {"ok": 1}
    rows.append({"clip_id": "c9", "prediction": "A hum."})
    report.write_text(json.dumps({"captions": rows}))
    with pytest.raises(ValueError, match="'c9'"):
        score_captions_file(report, tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        score_captions_file(report, tmp_path / "empty")
