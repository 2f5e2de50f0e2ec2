import csv
import json
from pathlib import Path

import pytest

from slit_lightning.data.shards import write_shards
from slit_lightning.data.sources import (
    AudioCapsSource,
    Clip,
    ClothoSource,
    DataConfigError,
    ManifestSource,
    ShardSource,
    Skip,
    SourceSpec,
    open_source,
)
from tests.conftest import write_manifest, write_tone


def all_records(source) -> list:
    return [rec for u in range(source.num_units) for rec in source.iter_unit(u)]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_jsonl_manifest_resolves_paths_relative_to_itself(clip_dir):
    source = open_source(str(clip_dir / "train.jsonl"))
    assert isinstance(source, ManifestSource)
    clips = all_records(source)
    assert len(clips) == 12 and all(isinstance(c, Clip) for c in clips)
    assert clips[0].audio == str(clip_dir / "clip00.wav")
    assert clips[0].captions == ("a tone number 0", "tone 0 plays") and clips[0].labels == ("tone",)


def test_csv_manifest_with_numbered_captions_and_semicolon_labels(tmp_path):
    write_tone(tmp_path / "a.wav")
    path = write_csv(
        tmp_path / "m.csv",
        ["audio", "caption_1", "caption_2", "labels"],
        [["a.wav", "a beep", "one beep", "beep;tone"]],
    )
    (clip,) = all_records(open_source(str(path)))
    assert clip.captions == ("a beep", "one beep") and clip.labels == ("beep", "tone")
    assert clip.clip_id == str(tmp_path / "a.wav")  # no id: the full path


def test_audiocaps_rows_of_one_video_become_one_clip_with_all_captions(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_tone(audio / "Yabc123.wav")
    write_tone(audio / "xyz_30.flac")
    path = write_csv(
        tmp_path / "test.csv",
        ["audiocap_id", "youtube_id", "start_time", "caption"],
        [
            ["1", "abc123", "0", "a dog barks"],
            ["2", "abc123", "0", "barking"],
            ["3", "xyz", "30", "rain falls"],
            ["4", "gone", "0", "no file for this one"],
        ],
    )
    source = open_source(SourceSpec(str(path), audio_dir=str(audio)))
    assert isinstance(source, AudioCapsSource)
    records = {r.name if isinstance(r, Skip) else r.clip_id: r for r in all_records(source)}
    assert records["abc123"].captions == ("a dog barks", "barking")
    assert records["xyz"].audio.endswith("xyz_30.flac")
    skipped = [r for r in records.values() if isinstance(r, Skip)]
    assert len(skipped) == 1 and skipped[0].reason == "missing file" and "gone" in skipped[0].name


def test_clotho_layout(tmp_path):
    write_tone(tmp_path / "rain 01.wav")
    path = write_csv(
        tmp_path / "clotho_captions_evaluation.csv",
        ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
        [["rain 01.wav", "rain", "heavy rain", "rain on a roof", "a storm", "water falls"]],
    )
    source = open_source(str(path))
    assert isinstance(source, ClothoSource)
    (clip,) = all_records(source)
    assert clip.clip_id == "rain 01.wav" and len(clip.captions) == 5


def test_shards_round_trip_through_write_shards_and_fsspec_urls(clip_dir, tmp_path):
    counts = write_shards(str(clip_dir / "train.jsonl"), tmp_path / "shards", per_shard=5)
    assert counts == {"written": 12, "skipped": 0, "shards": 3}
    expected = {c.clip_id: c for c in all_records(open_source(str(clip_dir / "train.jsonl")))}
    for spec in (
        str(tmp_path / "shards" / "shard-{000000..000002}.tar"),
        "file://" + str(tmp_path / "shards" / "shard-{000000..000002}.tar"),
    ):
        source = open_source(spec)
        assert isinstance(source, ShardSource) and source.num_units == 3
        got = all_records(source)
        assert sorted(c.clip_id for c in got) == sorted(expected)
        for clip in got:
            original = expected[clip.clip_id]
            assert clip.captions == original.captions and clip.labels == original.labels
            assert clip.audio == Path(original.audio).read_bytes()
            assert clip.key == original.key


def test_missing_manifest_and_missing_columns_give_one_line_errors(tmp_path):
    with pytest.raises(DataConfigError, match="nope.jsonl: manifest not found"):
        open_source(str(tmp_path / "nope.jsonl"))
    write_manifest(tmp_path / "cols.jsonl", [{"file": "a.wav", "text": "x"}])
    with pytest.raises(DataConfigError, match=r"cols.jsonl: manifest lacks columns.*'audio'"):
        open_source(str(tmp_path / "cols.jsonl"))
    path = write_csv(
        tmp_path / "ac.csv", ["audiocap_id", "youtube_id", "caption"], [["1", "a", "x"]]
    )
    with pytest.raises(DataConfigError, match="missing column.*start_time"):
        open_source(SourceSpec(str(path), format="audiocaps"))
    with pytest.raises(DataConfigError, match="shard file"):
        open_source(str(tmp_path / "none-{0..3}.tar"))


def test_paths_leaving_the_data_root_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    outside = write_tone(tmp_path / "outside.wav")
    rows = [{"audio": "../outside.wav", "caption": "x"}, {"audio": str(outside), "caption": "y"}]
    write_manifest(root / "m.jsonl", rows)
    refused = all_records(open_source(str(root / "m.jsonl")))
    assert [r.reason for r in refused] == ["path outside data root"] * 2
    allowed = all_records(open_source(SourceSpec(str(root / "m.jsonl"), allow_outside_root=True)))
    assert all(isinstance(r, Clip) and r.audio == str(outside) for r in allowed)


def test_bad_rows_become_counted_skips_not_errors(tmp_path):
    write_tone(tmp_path / "a.wav")
    lines = [
        json.dumps({"audio": "a.wav", "captions": ["fine"]}).encode(),
        json.dumps({"audio": "a.wav", "captions": ["", "   "]}).encode(),
        json.dumps({"audio": "a.wav", "caption": None}).encode(),
        json.dumps({"audio": 5, "caption": "x"}).encode(),
        b'{"audio": "a.wav", "caption": "\xff\xfe broken utf-8"}',
        b"not json at all",
        json.dumps({"audio": "a.wav", "caption": "q", "qa": [{"question": "no answer"}]}).encode(),
        json.dumps({"audio": "a.wav", "caption": "x" * 100_000}).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = all_records(open_source(str(tmp_path / "m.jsonl")))
    reasons = [r.reason if isinstance(r, Skip) else "ok" for r in records]
    assert reasons == [
        "ok",
        "empty caption",
        "empty caption",
        "missing audio path",
        "malformed row",
        "malformed row",
        "malformed row",
        "ok",
    ]
