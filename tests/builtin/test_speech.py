"""Spoken phrases in the built-in corpus (``synthesize_corpus(speech=True)``)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from slit_lightning.builtin import corpus_text, speech
from slit_lightning.builtin.corpus import SPLITS, synthesize_corpus
from slit_lightning.builtin.events import event_agreement, named_event_types

ARGS = {"seed": 0, "clips": 8, "clip_seconds": 3.0}
LANGUAGES = set(speech.PHRASES)


def read_rows(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for s in SPLITS for line in (root / f"{s}.jsonl").read_text().splitlines()
    ]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speech")
    for name, on in (("a", True), ("b", True), ("plain", False)):
        synthesize_corpus(root / name, speech=on, **ARGS)
    return {name: root / name for name in ("a", "b", "plain")}


def speech_of(row: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in row["events"] if e["type"] == corpus_text.SPEECH_LABEL), None)


def test_speech_corpus_is_byte_identical_for_the_same_seed(corpora: dict[str, Path]) -> None:
    assert all_files(corpora["a"]) == all_files(corpora["b"])


def test_speech_events_hold_what_is_said_and_by_whom(corpora: dict[str, Path]) -> None:
    rows = read_rows(corpora["a"])
    spoken = [(row, speech_of(row)) for row in rows if speech_of(row) is not None]
    assert 2 <= len(spoken) <= len(rows) - 2  # a share of the clips, not all, not none
    for row, e in spoken:
        assert e["text"] in speech.PHRASES[e["language"]] and e["language"] in LANGUAGES
        assert e["voice_id"].split("+")[1] in dict(speech.VARIANTS)
        assert e["voice"].startswith(e["speaker"]) and e["speaker"] in ("male", "female")
        assert e["words_per_minute"] in speech.WORDS_PER_MINUTE
        assert e["role"] == "foreground" and not e["overlaps"] and e["count"] is None
        assert "speech" in row["labels"]
        assert e["onset"] >= 0 and e["onset"] + e["duration"] <= row["duration"]
    meta = json.loads((corpora["a"] / "corpus.json").read_text())
    assert "speech" in meta["wordings"]["train"] and meta["speech"]["share"] == 0.5


def test_foreground_events_never_overlap(corpora: dict[str, Path]) -> None:
    for row in read_rows(corpora["a"]):
        fg = sorted(
            (e for e in row["events"] if e["role"] == "foreground"), key=lambda e: e["onset"]
        )
        for a, b in itertools.pairwise(fg):
            assert a["onset"] + a["duration"] <= b["onset"] + 1e-4, row["events"]
        assert [e["onset"] for e in row["events"]] == sorted(e["onset"] for e in row["events"])


def test_captions_and_qa_say_the_phrase_language_and_speaker(corpora: dict[str, Path]) -> None:
    for row in read_rows(corpora["a"]):
        e = speech_of(row)
        if e is None:
            continue
        for caption in row["captions"]:
            assert f'"{e["text"]}"' in caption and e["language"] in caption, caption
            assert re.search(
                r"\b(woman|female)\b" if e["speaker"] == "female" else r"\b(man|male)\b", caption
            )
        qa = {q["kind"]: q["answer"] for q in row["qa"]}
        assert qa["speech_text"] == e["text"] and qa["speech_language"] == e["language"]
        assert qa["speaker"] == ("a woman" if e["speaker"] == "female" else "a man")
        fg = [x for x in row["events"] if x["role"] == "foreground"]
        at = fg.index(e)
        assert qa.get("after_speech") == (fg[at + 1]["type"] if at + 1 < len(fg) else None)
        assert qa.get("before_speech") == (fg[at - 1]["type"] if at > 0 else None)
        assert f'"{e["text"]}"' in corpus_text.fact_sheet(row["events"])


def test_heldout_speech_wordings_only_in_zeroshot(corpora: dict[str, Path]) -> None:
    heldout = re.compile(r"\b(uttering|utterance)\b")
    for row in read_rows(corpora["a"]):
        if not row["id"].startswith("zeroshot"):
            assert not any(heldout.search(c) for c in row["captions"])
        elif speech_of(row) is not None:
            assert heldout.search(row["captions"][0])


def test_audio_has_the_speech_where_the_event_is(corpora: dict[str, Path]) -> None:
    checked = 0
    for row in read_rows(corpora["a"]):
        e = speech_of(row)
        if e is None:
            continue
        x, sr = sf.read(corpora["a"] / row["audio"], dtype="float64")
        a, b = round(e["onset"] * sr), round((e["onset"] + e["duration"]) * sr)
        rms = float(np.sqrt(np.mean(x[a:b] ** 2)))
        assert 20 * np.log10(rms) > e["level_db"] - 6, (rms, e)
        checked += 1
    assert checked


def test_clips_without_a_phrase_are_unchanged_and_others_keep_their_events(
    corpora: dict[str, Path],
) -> None:
    with_speech, plain = read_rows(corpora["a"]), read_rows(corpora["plain"])
    kept = ("type", "count", "register", "loudness", "role")
    for row, base in zip(with_speech, plain, strict=True):
        assert not any(e["type"] == "speech" for e in base["events"])
        if speech_of(row) is None:
            assert row == base
            assert (corpora["a"] / row["audio"]).read_bytes() == (
                corpora["plain"] / base["audio"]
            ).read_bytes()
        else:
            others = [e for e in row["events"] if e["type"] != "speech"]
            assert [{k: e[k] for k in kept} for e in others] == [
                {k: e[k] for k in kept} for e in base["events"]
            ]
            assert row["background"]["level"] == base["background"]["level"]
    assert "speech" not in json.loads((corpora["plain"] / "corpus.json").read_text())


def test_event_agreement_reads_speech_captions(corpora: dict[str, Path]) -> None:
    rows = read_rows(corpora["a"])
    captions = [c for row in rows for c in row["captions"]]
    events = [row["events"] for row in rows for _ in row["captions"]]
    scores = event_agreement(captions, events)
    assert scores["all_right"] == scores["precision"] == scores["recall"] == 1.0
    assert named_event_types('A man saying "bonjour" in French, then two beeps.') == [
        "speech",
        "beeps",
    ]


def test_phrases_name_no_sound_and_no_number() -> None:
    forms = {
        f
        for part in corpus_text.wording_table(speech=True).values()
        for fs in part.values()
        for f in fs
    }
    words = set(corpus_text.COUNT_WORDS) | forms | {"low", "high", "deep", "soft", "quiet", "loud"}
    for language, phrases in speech.PHRASES.items():
        assert 8 <= len(phrases) <= 12, language
        for phrase in phrases:
            assert not named_event_types(phrase), phrase
            assert not set(re.findall(r"[\w'-]+", phrase.lower())) & words, phrase


def test_espeak_is_deterministic_in_a_fresh_process() -> None:
    from slit_lightning.weights.espeak import speak_isolated

    a, rate = speak_isolated("bonne nuit", "fr+f3", 160, seed=0)
    b, _ = speak_isolated("bonne nuit", "fr+f3", 160, seed=0)
    assert rate == 22050 and len(a) > rate // 4 and np.array_equal(a, b)


def test_cli_flag_writes_a_speech_corpus(tmp_path: Path) -> None:
    from slit_lightning.cli.main import main

    args = ["data", "synth", "--clips", "8", "--clip_seconds", "3.0", "--quiet"]
    main([*args, "--out", str(tmp_path / "on"), "--speech"])
    main([*args, "--out", str(tmp_path / "off")])
    assert any(speech_of(row) for row in read_rows(tmp_path / "on"))
    assert not any(speech_of(row) for row in read_rows(tmp_path / "off"))


def test_speech_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="speech must be True or False"):
        synthesize_corpus(tmp_path / "out", clips=4, speech="yes")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
