"""Bad input tried systematically: every audio format x {truncated, wrong header, zero bytes,
random bytes}, broken shards, manifests of the wrong shape, paths leaving the data root,
invalid UTF-8, huge captions, garbage configs. Each is a clear error or a counted skip."""

import contextlib
import io
import json
import tarfile
from functools import lru_cache

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slit_lightning.cli.main import main
from slit_lightning.data.audio import AUDIO_SUFFIXES, AudioError, load_audio
from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.sources import SourceSpec
from tests.conftest import write_manifest, write_tone, write_tone_shards

# every suffix data.audio reads -> how to write a good clip of it
WRITERS = {
    ".wav": {"format": "WAV", "subtype": "PCM_16"},
    ".flac": {"format": "FLAC"},
    ".ogg": {"format": "OGG", "subtype": "VORBIS"},
    ".mp3": {"format": "MP3"},
    ".opus": {"format": "OGG", "subtype": "OPUS"},
    ".aiff": {"format": "AIFF"},
    ".aif": {"format": "AIFF"},
}
# soundfile's in-memory reader reports libsndfile's negative seeks on broken AIFF as unraisable
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
FUZZ = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BAD_REASONS = {"undecodable", "truncated file", "empty file"}


def test_every_audio_suffix_has_a_writer():
    assert set(WRITERS) == set(AUDIO_SUFFIXES)


@lru_cache
def good_bytes(suffix: str) -> bytes:
    rate = 48000 if suffix == ".opus" else 16000
    t = np.arange(rate // 2) / rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 440 * t), rate, **WRITERS[suffix])
    return buffer.getvalue()


def corruptions(suffix: str) -> dict[str, bytes]:
    good = good_bytes(suffix)
    rng = np.random.default_rng(len(good))
    cases = {f"trunc{f}": good[: int(len(good) * f)] for f in (0.002, 0.05, 0.5, 0.9, 0.99)}
    cases["header"] = rng.bytes(16) + good[16:]
    cases["zeros"] = bytes(len(good))
    cases["random"] = rng.bytes(len(good))
    return cases


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_good_clip_of_every_format_decodes(suffix):
    assert load_audio(good_bytes(suffix), 16000).shape[0] > 7000


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_fixed_corruptions_of_every_format_raise_audio_error(suffix):
    for case, data in corruptions(suffix).items():
        with pytest.raises(AudioError) as info:
            load_audio(data, 16000, name=f"x{suffix}")
        assert info.value.reason in BAD_REASONS | {"zero-length audio"}, (suffix, case)


@pytest.mark.parametrize("suffix", sorted(WRITERS))
@FUZZ
@given(data=st.data())
def test_truncated_anywhere_raises_audio_error(suffix, data):
    good = good_bytes(suffix)
    cut = data.draw(st.integers(0, len(good) - len(good) // 100 - 1), label="cut")
    with pytest.raises(AudioError):
        load_audio(good[:cut], 16000, name=f"cut{suffix}")


@pytest.mark.parametrize("suffix", sorted(WRITERS))
@FUZZ
@given(noise=st.binary(min_size=0, max_size=2048), start=st.integers(0, 64))
@example(noise=b"", start=21)  # an MP3 header that then claimed 1.6e12 frames (a 5.8 TiB read)
def test_random_bytes_and_overwritten_headers_raise_audio_error(suffix, noise, start):
    with pytest.raises(AudioError):
        load_audio(noise, 16000, name="noise")
    good = good_bytes(suffix)
    broken = good[:start] + bytes(b ^ 0xA5 for b in good[start : start + 8]) + good[start + 8 :]
    with contextlib.suppress(AudioError):  # flipped sample bytes can still decode
        load_audio(broken, 16000, name="broken")  # but nothing else may be raised


def test_corrupt_files_of_every_format_are_counted_skips_and_the_epoch_finishes(tmp_path):
    tone = write_tone(tmp_path / "tone.flac", 500.0, 0.2).read_bytes()
    rows = []
    for i in range(60):
        (tmp_path / f"g{i:02d}.flac").write_bytes(tone)
        rows.append({"id": f"g{i:02d}", "audio": f"g{i:02d}.flac", "caption": f"good {i}"})
    bad = 0
    for suffix in WRITERS:
        for case, data in corruptions(suffix).items():
            name = f"{case}{suffix}"
            (tmp_path / name).write_bytes(data)
            rows.append({"id": name, "audio": name, "caption": "bad"})
            bad += 1
    dm = AudioTextDataModule(
        train=str(write_manifest(tmp_path / "m.jsonl", rows)),
        batch_size=16,
        num_workers=0,
        max_skip_fraction=0.9,
    )
    ids = sorted(i for batch in dm.train_dataloader() for i in batch["clip_id"])
    assert ids == [f"g{i:02d}" for i in range(60)]
    ledger = dm.ledgers["train"]
    assert (ledger.used, ledger.skipped) == (60, bad)
    assert set(ledger.reasons) <= BAD_REASONS | {"zero-length audio"}
    assert ledger.reasons["truncated file"] >= 10  # the clips that still half-decoded


def _stream(tmp_path, source, **kwargs):
    dm = AudioTextDataModule(train=source, batch_size=4, num_workers=0, **kwargs)
    ids = sorted(i for batch in dm.train_dataloader() for i in batch["clip_id"])
    return ids, dm.ledgers["train"]


def test_manifest_rows_of_the_wrong_shape_are_counted_skips(tmp_path):
    write_tone(tmp_path / "a.wav", 300.0, 0.2)
    (tmp_path / "sub").mkdir()
    write_tone(tmp_path / "sub" / "b.wav", 400.0, 0.2)
    outside = write_tone(tmp_path.parent / f"{tmp_path.name}-outside.wav", 350.0, 0.2)
    good = [{"id": f"ok{i}", "audio": "a.wav", "caption": f"tone {i}"} for i in range(20)]
    bad = {
        "number caption": {"audio": "a.wav", "caption": 7},
        "null caption": {"audio": "a.wav", "caption": None},
        "list of non-strings": {"audio": "a.wav", "captions": [1, None, {"x": 1}]},
        "audio is a list": {"audio": ["a.wav"], "caption": "x"},
        "audio is a number": {"audio": 3, "caption": "x"},
        "id is a dict": {"id": {"a": 1}, "audio": "sub/../missing.wav", "caption": "x"},
        "labels a number": {"audio": "a.wav", "caption": "x", "labels": 5},
        "qa not json": {"audio": "a.wav", "caption": "x", "qa": "[{broken"},
        "qa of strings": {"audio": "a.wav", "caption": "x", "qa": ["q"]},
        "dotdot": {"audio": f"../{outside.name}", "caption": "x"},
        "absolute": {"audio": str(outside), "caption": "x"},
    }
    manifest = write_manifest(tmp_path / "m.jsonl", good + list(bad.values()))
    with manifest.open("ab") as handle:
        handle.write(b'{"audio": "a.wav", "caption": "caf\xe9 \xff"}\n')  # not UTF-8
        handle.write(b"[1, 2]\n" + b"\x00\x01 garbage\n")
    ids, ledger = _stream(tmp_path, str(manifest), max_skip_fraction=0.9)
    assert ids == sorted(f"ok{i}" for i in range(20))
    assert ledger.skipped == len(bad) + 3
    assert ledger.reasons["path outside data root"] == 2
    assert ledger.reasons["missing file"] == 1  # `sub/..` stays inside and is simply absent
    # the data config's switch lets the two outside paths in
    spec = SourceSpec(path=str(manifest), allow_outside_root=True)
    ids, ledger = _stream(tmp_path, [spec], max_skip_fraction=0.9)
    assert len(ids) == 22 and "path outside data root" not in ledger.reasons


def test_csv_caption_that_is_not_utf8_is_a_counted_skip_not_mojibake(tmp_path):
    write_tone(tmp_path / "a.wav", 300.0, 0.2)
    lines = [b"id,audio,caption"] + [b"ok%d,a.wav,tone %d" % (i, i) for i in range(10)]
    lines.append(b"bad,a.wav,caf\xe9 noise")
    (tmp_path / "m.csv").write_bytes(b"\n".join(lines) + b"\n")
    ids, ledger = _stream(tmp_path, str(tmp_path / "m.csv"), max_skip_fraction=0.5)
    assert ids == sorted(f"ok{i}" for i in range(10))
    assert ledger.reasons == {"undecodable caption": 1}


def test_huge_caption_streams_and_is_cut_by_the_tokenizer(tmp_path, tiny_encoder, tiny_bert):
    from slit_lightning.stages import Stage1

    write_tone(tmp_path / "a.wav", 300.0, 0.2)
    huge = "a dog barks " * 90_000  # about 1 MB
    rows = [{"id": "huge", "audio": "a.wav", "caption": huge}]
    ids, _ = _stream(tmp_path, str(write_manifest(tmp_path / "m.jsonl", rows)))
    assert ids == ["huge"]
    stage = Stage1(str(tiny_encoder), str(tiny_bert), embed_dim=16, num_queries=4,
                   qformer_layers=2, max_text_len=12)  # fmt: skip
    ids, mask = stage.tokenize(stage.tokenizer, [huge, "short"], 12, pad_to_max=False)
    assert ids.shape == (2, 12) and mask[0].all()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_malformed_shards_are_counted_and_the_good_shards_all_arrive(tmp_path):
    write_tone_shards(tmp_path, 8, 0.2)
    tone = (tmp_path / "c0.flac").read_bytes()
    sh = tmp_path / "sh"
    (sh / "shard-000002.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    (sh / "shard-000003.tar").write_bytes(b"")
    _tar(sh / "shard-000004.tar", {
        "a.flac": tone, "a.json": b"{not json",
        "b.flac": tone, "b.json": b'{"caption": "caf\xe9"}',
        "c.flac": tone, "c.json": b"[1, 2]",
        "d.txt": b"no audio here",
        "e.flac": good_bytes(".wav")[:300], "e.txt": b"a truncated clip",
        "f.flac": tone, "f.json": json.dumps({"caption": 12, "qa": "x"}).encode(),
    })  # fmt: skip
    ids, ledger = _stream(
        tmp_path, str(sh / "shard-{000000..000004}.tar"), max_skip_fraction=0.9, seed=2
    )
    assert ids == [f"c{i}" for i in range(8)]
    assert ledger.skipped >= 8
    assert ledger.reasons["truncated shard"] == 2  # random bytes and an empty file
    assert {"malformed metadata", "no audio member", "truncated file"} <= set(ledger.reasons)


GARBAGE = [
    b"data: [unclosed\n  foo: : :\n\t- x",
    b"\xff\xfe\x00 not text",
    b"data:\n  nosuchkey: 1\n",
    b"- just\n- a list\n",
    b"data: 5\n",
]


@pytest.mark.parametrize(
    ("command", "text"),
    [(["fit"], t) for t in [*GARBAGE, b"model:\n  nosuchkey: 3\n", b"trainer: 5\n"]]
    + [(["data", "check"], t) for t in GARBAGE],
)
def test_garbage_configs_exit_with_a_message_and_no_traceback(tmp_path, capsys, command, text):
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    with pytest.raises(SystemExit) as info:
        main([*command, "--config", str(config)])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err + str(info.value.code)
    assert "Traceback" not in err
