"""The built-in corpus generator: files, determinism, truth of captions/QA, zero-shot hold-outs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st

from slit_lightning.builtin import corpus as synth
from slit_lightning.builtin import corpus_text as synth_text
from slit_lightning.builtin.corpus import SPLITS, split_sizes, synthesize_corpus

SMALL = {"clips": 40, "clip_seconds": 2.0}
ROW_KEYS = {"id", "audio", "captions", "labels", "qa", "events", "background", "duration"}
ROW_KEYS |= {"sample_rate"}
COUNT_WORDS = {w: i for i, w in enumerate(synth_text.COUNT_WORDS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def wide_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More clips, so that enough clean (no overlap, no noise floor) events exist to measure."""
    out = tmp_path_factory.mktemp("wide")
    synthesize_corpus(out, seed=3, clips=120, clip_seconds=2.0)
    return out


def read_rows(root: Path, splits: tuple[str, ...] = SPLITS) -> list[dict[str, Any]]:
    return [
        json.loads(line) for s in splits for line in (root / f"{s}.jsonl").read_text().splitlines()
    ]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def mention_regex() -> tuple[re.Pattern[str], dict[str, str]]:
    """Every surface form of every event type, longest first so "pulsing tone" beats "tone"."""
    table = synth_text.wording_table()
    form_to_type = {f: label for part in table.values() for label, fs in part.items() for f in fs}
    forms = sorted(form_to_type, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b", re.IGNORECASE)
    return pattern, form_to_type


def mentions(caption: str) -> list[tuple[str, int, int]]:
    """(event type, start, end) of each event named in a caption, in text order."""
    pattern, form_to_type = mention_regex()
    found = pattern.finditer(caption)
    return [(form_to_type[m.group(1).lower()], m.start(), m.end()) for m in found]


def bursts(x: np.ndarray, sr: int, hop_s: float = 0.002, min_gap_s: float = 0.015) -> int:
    """Count separate energy bursts: runs of 2 ms frames above -20 dB of the loudest frame."""
    hop = int(hop_s * sr)
    frames = np.abs(x[: len(x) // hop * hop]).reshape(-1, hop).max(axis=1)
    active = np.flatnonzero(frames > 0.1 * frames.max())
    gaps = np.diff(active) * hop_s
    return int(1 + np.sum(gaps >= min_gap_s))


def test_writes_the_splits_and_metadata(corpus: Path) -> None:
    meta = json.loads((corpus / "corpus.json").read_text())
    assert meta["splits"] == {"train": 28, "val": 4, "test": 4, "zeroshot": 4}
    assert meta["seed"] == 0 and meta["sample_rate"] == 16000 and meta["clip_seconds"] == 2.0
    assert meta["version"] == synth.GENERATOR_VERSION
    assert len(meta["event_labels"]) >= 15
    for split, size in meta["splits"].items():
        rows = read_rows(corpus, (split,))
        assert len(rows) == size
        assert [r["id"] for r in rows] == [f"{split}-{i:06d}" for i in range(size)]
    assert not [p for p in corpus.rglob(".*")], "temporary files were left behind"


def test_returns_counts_and_reports_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    counts = synthesize_corpus(
        tmp_path, clips=5, clip_seconds=1.0, progress=lambda d, t: calls.append((d, t))
    )
    assert counts == {"train": 2, "val": 1, "test": 1, "zeroshot": 1}
    assert calls == [(i, 5) for i in range(1, 6)]


def test_a_larger_train_split_starts_with_the_smaller_ones_clips(tmp_path: Path) -> None:
    args = {"clips": 8, "clip_seconds": 1.0}
    synthesize_corpus(tmp_path / "a", seed=2, **args)
    counts = synthesize_corpus(tmp_path / "b", seed=2, train_clips=9, **args)
    assert counts == {"train": 9, "val": 1, "test": 1, "zeroshot": 1}
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    small = a["train.jsonl"].decode().splitlines()
    assert len(small) == 5 and b["train.jsonl"].decode().splitlines()[:5] == small
    for name in a:  # the same clips, the same other splits; only the metadata's sizes differ
        if name != "corpus.json" and name != "train.jsonl":
            assert a[name] == b[name], name
    assert len([n for n in b if n.startswith("audio/train/")]) == 9
    with pytest.raises(ValueError, match="train_clips must be a positive integer"):
        synthesize_corpus(tmp_path / "c", train_clips=0, **args)


@given(st.integers(min_value=4, max_value=10**6))
def test_split_sizes_cover_every_clip(clips: int) -> None:
    sizes = split_sizes(clips)
    assert sum(sizes.values()) == clips
    assert sizes["val"] == sizes["test"] == sizes["zeroshot"] >= 1
    assert sizes["val"] == 1 or abs(sizes["val"] - clips / 10) <= 0.5
    assert sizes["train"] >= 1
    if clips >= 20:
        assert sizes["train"] >= 0.6 * clips


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    args = {"clips": 8, "clip_seconds": 1.5}
    synthesize_corpus(tmp_path / "a", seed=5, **args)
    synthesize_corpus(tmp_path / "b", seed=5, **args)
    synthesize_corpus(tmp_path / "c", seed=6, **args)
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert len(a) == 8 + 4 + 1
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.jsonl"] != c["train.jsonl"]
    assert all(a[k] != c[k] for k in a if k.startswith("audio/"))


def test_audio_decodes_at_the_declared_rate_and_length(corpus: Path) -> None:
    for row in read_rows(corpus):
        x, sr = sf.read(corpus / row["audio"], dtype="float64")
        assert row["audio"] == f"audio/{row['id'].split('-')[0]}/{row['id']}.flac"
        assert sf.info(str(corpus / row["audio"])).subtype == "PCM_16"
        assert sr == row["sample_rate"] == 16000 and x.ndim == 1
        assert len(x) == round(row["duration"] * sr) == 32000
        assert np.isfinite(x).all() and np.abs(x).max() < 1.0
        assert np.sqrt(np.mean(x**2)) > 1e-3, f"{row['id']} is silent"


def test_wav_at_another_sample_rate(tmp_path: Path) -> None:
    synthesize_corpus(tmp_path, clips=4, sample_rate=8000, clip_seconds=1.0, audio_format="wav")
    for row in read_rows(tmp_path):
        x, sr = sf.read(tmp_path / row["audio"])
        assert row["audio"].endswith(".wav") and sr == 8000 and len(x) == 8000
        assert np.isfinite(x).all() and np.abs(x).max() > 1e-3


def test_rows_follow_the_manifest_schema(corpus: Path) -> None:
    for row in read_rows(corpus):
        assert set(row) == ROW_KEYS
        types = [e["type"] for e in row["events"]]
        assert row["labels"] == sorted(set(types)) and len(types) == len(set(types))
        assert 1 <= len(types) <= 4
        assert set(types) <= set(synth_text.EVENT_LABELS)
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        assert [e["onset"] for e in row["events"]] == sorted(e["onset"] for e in row["events"])
        assert row["background"]["level"] in synth.BACKGROUND_DB
        for e in row["events"]:
            assert e["onset"] >= 0 and e["onset"] + e["duration"] <= row["duration"]
            assert (e["count"] is not None) == (e["type"] in synth.COUNTED)
            assert (e["register"] is not None) == (e["type"] in synth.REGISTERED)
            assert e["peak_db"] < 0


def test_vocabulary_has_a_sound_and_wordings_for_every_label() -> None:
    assert set(synth._RENDERERS) == set(synth_text.EVENT_LABELS)
    assert set(synth_text.HELDOUT_WORDINGS) == set(synth_text.EVENT_LABELS)
    table = synth_text.wording_table()
    for label in synth_text.EVENT_LABELS:
        assert label in table["train"][label], "the canonical label is a train wording"
        assert not set(table["train"][label]) & {f for fs in table["heldout"].values() for f in fs}


def test_captions_name_every_event_in_onset_order(corpus: Path) -> None:
    for row in read_rows(corpus):
        foreground = [e["type"] for e in row["events"] if e["role"] == "foreground"]
        beds = [e["type"] for e in row["events"] if e["role"] == "background"]
        for caption in row["captions"]:
            named = [t for t, _, _ in mentions(caption)]
            assert named == foreground + beds, (caption, row["events"])


def test_caption_counts_match_the_events(corpus: Path) -> None:
    checked = 0
    for row in read_rows(corpus):
        counts = {e["type"]: e["count"] for e in row["events"] if e["count"] is not None}
        for caption in row["captions"]:
            previous_end = 0
            for kind, start, end in mentions(caption):
                before = re.findall(r"[\w'-]+", caption[previous_end:start])
                previous_end = end
                if kind in counts:
                    said = [COUNT_WORDS[w.lower()] for w in before if w.lower() in COUNT_WORDS]
                    assert said and said[-1] == counts[kind], (caption, counts)
                    checked += 1
    assert checked >= 20


def test_adjectives_fit_the_events(corpus: Path) -> None:
    registers = {"low": {"low", "low-pitched", "deep"}, "mid": {"mid-pitched", "medium-pitched"}}
    registers["high"] = {"high", "high-pitched"}
    loudness = {"quiet": {"quiet", "soft"}, "moderate": {"moderately"}, "loud": {"loud"}}
    for row in read_rows(corpus):
        facts = {e["type"]: e for e in row["events"]}
        for caption in row["captions"]:
            previous_end = 0
            for kind, start, end in mentions(caption):
                words = set(re.findall(r"[\w'-]+", caption[previous_end:start].lower())[-4:])
                previous_end = end
                if "moderately" in words:
                    words.discard("loud")
                for level, adjectives in registers.items():
                    if words & adjectives:
                        assert facts[kind]["register"] == level, caption
                for level, adjectives in loudness.items():
                    if words & adjectives:
                        assert facts[kind]["loudness"] == level, caption


def test_qa_answers_agree_with_the_events(corpus: Path) -> None:
    kinds = set()
    for row in read_rows(corpus):
        by_type = {e["type"]: e for e in row["events"]}
        answers = {"yes": 0, "no": 0}
        for qa in row["qa"]:
            q, a = qa["question"], qa["answer"]
            kinds.add(qa["kind"])
            named = [label for label in synth_text.EVENT_LABELS if re.search(rf"\b{label}\b", q)]
            if qa["kind"] == "count":
                assert a == str(by_type[named[0]]["count"]) and a.isdigit()
            elif qa["kind"] == "first":
                assert a == min(row["events"], key=lambda e: e["onset"])["type"]
            elif qa["kind"] == "register":
                assert a == by_type[named[0]]["register"]
            else:
                assert len(named) == 1
                assert a == ("yes" if named[0] in row["labels"] else "no")
                answers[a] += 1
        assert answers == {"yes": 1, "no": 1}
    assert kinds == {"count", "first", "register", "presence"}


def test_zeroshot_pairs_never_meet_in_train_val_test(corpus: Path) -> None:
    pairs = [set(p) for p in json.loads((corpus / "corpus.json").read_text())["heldout_pairs"]]
    assert len(pairs) == synth.N_HELDOUT_PAIRS
    assert pairs == [set(p) for p in synth.heldout_pairs(0)]
    assert pairs != [set(p) for p in synth.heldout_pairs(1)]
    for row in read_rows(corpus, ("train", "val", "test")):
        assert not any(p <= set(row["labels"]) for p in pairs), row["labels"]
    for row in read_rows(corpus, ("zeroshot",)):
        assert any(p <= set(row["labels"]) for p in pairs), row["labels"]


def test_heldout_wordings_only_in_zeroshot_captions(corpus: Path) -> None:
    heldout = json.loads((corpus / "corpus.json").read_text())["wordings"]["heldout"]
    forms = [f for fs in heldout.values() for f in fs]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b", re.IGNORECASE)
    for row in read_rows(corpus, ("train", "val", "test")):
        for caption in row["captions"]:
            assert not pattern.search(caption), caption
    for row in read_rows(corpus, ("zeroshot",)):
        assert any(pattern.search(c) for c in row["captions"]), row["captions"]


def clean_events(root: Path, types: tuple[str, ...]) -> list[tuple[dict, np.ndarray, int]]:
    """Events of ``types`` that sound alone (no overlap, no noise floor), with their audio."""
    found = []
    for row in read_rows(root):
        if row["background"]["level"] != "none":
            continue
        x, sr = sf.read(root / row["audio"], dtype="float64")
        for e in row["events"]:
            if e["type"] in types and not e["overlaps"]:
                a = round(e["onset"] * sr)
                found.append((e, x[a : a + round(e["duration"] * sr)], sr))
    return found


def test_counted_events_have_that_many_bursts(wide_corpus: Path) -> None:
    found = clean_events(wide_corpus, synth.COUNTED)
    assert len(found) >= 8
    assert {e["type"] for e, _, _ in found} == set(synth.COUNTED)
    for e, x, sr in found:
        assert bursts(x, sr) == e["count"], e


def test_tones_sound_in_their_register(wide_corpus: Path) -> None:
    found = clean_events(wide_corpus, ("pure tone", "beeps", "vibrato tone", "tremolo tone"))
    assert len(found) >= 5
    for e, x, sr in found:
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        peak_hz = np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()]
        lo, hi = synth.REGISTER_HZ[e["register"]]
        assert 0.9 * lo <= peak_hz <= 1.1 * hi, (e, peak_hz)


def test_sweeps_go_the_stated_way(wide_corpus: Path) -> None:
    found = clean_events(wide_corpus, ("rising sweep", "falling sweep"))
    assert found
    for e, x, _ in found:
        half = len(x) // 2
        crossings = [np.sum(np.diff(np.sign(part)) != 0) for part in (x[:half], x[half:])]
        assert (crossings[1] > crossings[0]) == (e["type"] == "rising sweep"), e


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clips": 3}, "clips must be an integer >= 4"),
        ({"clips": 10.5}, "clips must be an integer"),
        ({"sample_rate": 100}, "sample_rate must be"),
        ({"clip_seconds": 0.5}, "clip_seconds must be"),
        ({"clip_seconds": "5"}, "clip_seconds must be"),
        ({"audio_format": "mp3"}, "audio_format must be one of"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_raise_a_clear_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize_corpus(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_corpus_captions_name_exactly_their_clips_events(corpus: Path) -> None:
    from slit_lightning.builtin.events import event_agreement

    rows = read_rows(corpus, ("train", "val", "test", "zeroshot"))
    captions = [c for row in rows for c in row["captions"]]
    events = [row["events"] for row in rows for _ in row["captions"]]
    scores = event_agreement(captions, events)
    assert scores["all_right"] == scores["precision"] == scores["recall"] == 1.0


def test_render_scenes_are_seeded_new_and_keep_the_heldout_pairs_apart(corpus: Path) -> None:
    pairs = synth.heldout_pairs(0)
    scenes = list(synth.render_scenes(40, 0, pairs, sample_rate=8000, clip_seconds=1.5))
    again = list(synth.render_scenes(3, 0, pairs, sample_rate=8000, clip_seconds=1.5))
    for (a, events_a), (b, events_b) in zip(scenes, again, strict=False):
        assert np.array_equal(a, b) and events_a == events_b
    counted = synth.render_scenes(
        5, 0, pairs, sample_rate=8000, clip_seconds=1.5, having=synth.COUNTED
    )
    kept = [(a, e) for a, e in scenes if any(x["type"] in synth.COUNTED for x in e)][:5]
    assert (
        len(kept) == 5
    )  # the stream's first five scenes with a counted event, rendered as without the filter
    for (a, events_a), (b, events_b) in zip(kept, counted, strict=True):
        assert np.array_equal(a, b) and events_a == events_b
    with pytest.raises(ValueError, match="names no event type"):
        next(synth.render_scenes(1, 0, pairs, sample_rate=8000, having=("dog bark",)))
    later = list(synth.render_scenes(2, 0, pairs, sample_rate=8000, clip_seconds=1.5, first=5))
    for (a, events_a), (b, events_b) in zip(scenes[5:7], later, strict=True):
        assert np.array_equal(a, b) and events_a == events_b  # scene i is scene i, from any first
    other_seed = next(synth.render_scenes(1, 1, pairs, sample_rate=8000, clip_seconds=1.5))
    assert not np.array_equal(scenes[0][0], other_seed[0])
    for wave, events in scenes:
        assert wave.dtype == np.float32 and wave.shape == (12000,) and np.abs(wave).max() <= 1.0
        assert np.array_equal(np.round(wave * 32768), wave * 32768)  # 16-bit steps, as the files
        labels = {e["type"] for e in events}
        assert labels <= set(synth_text.EVENT_LABELS) and len(labels) == len(events)
        assert not any({a, b} <= labels for a, b in pairs)
        for e in events:  # the manifest's facts, made exact by rendering
            assert e["onset"] >= 0.0 and e["onset"] + e["duration"] <= 1.5 + 1e-9
            assert (e["count"] is not None) == (e["type"] in synth.COUNTED)
    # no scene is a clip of a corpus split (same seed, other random stream)
    corpus_rows = read_rows(corpus)
    first = synth.render_scenes(1, 0, pairs, sample_rate=corpus_rows[0]["sample_rate"],
                                clip_seconds=corpus_rows[0]["duration"])  # fmt: skip
    wave, _ = next(first)
    for row in corpus_rows:
        audio, _ = sf.read(corpus / row["audio"], dtype="float32")
        assert not np.array_equal(audio, wave)
