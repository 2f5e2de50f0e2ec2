from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from slit_lightning.data.audio import AudioError, crop, load_audio, pad_batch, seconds_to_samples
from tests.conftest import write_tone


def dominant_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.argmax(spectrum) * rate / len(wave))


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (44100, 2), (22050, 2)])
def test_any_format_rate_and_channels_become_mono_at_target_rate(tmp_path, suffix, rate, channels):
    path = write_tone(tmp_path / f"t{suffix}", 440.0, 1.0, rate, channels)
    wave = load_audio(path, 16000)
    assert wave.dim() == 1 and wave.dtype == torch.float32
    # mp3 encoders add a little padding at both ends; everything else is exact to a sample or so
    assert abs(wave.shape[0] - 16000) <= (2000 if suffix == ".mp3" else 2)
    assert dominant_hz(wave, 16000) == pytest.approx(440.0, abs=3.0)


def test_decode_from_bytes_equals_decode_from_path(tmp_path):
    path = write_tone(tmp_path / "t.flac", 300.0, 0.5, 22050)
    torch.testing.assert_close(load_audio(path.read_bytes(), 16000), load_audio(path, 16000))


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = write_tone(tmp_path / "good.flac", 300.0, 1.0).read_bytes()
    cases = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (tmp_path / name).write_bytes(data)
        cases[name] = (tmp_path / name, reason)

    put("empty.wav", b"", "empty file")
    put("random.flac", np.random.default_rng(0).bytes(5000), "undecodable")
    put("header.wav", b"RIFX" + good[4:], "undecodable")
    put("truncated.flac", good[:60], "undecodable")
    sf.write(str(tmp_path / "zero.wav"), np.zeros((0, 1)), 16000)
    cases["zero.wav"] = (tmp_path / "zero.wav", "zero-length audio")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(16000), 16000)
    cases["silent.wav"] = (tmp_path / "silent.wav", "all-silent audio")
    nan = np.full(1600, 0.1, dtype=np.float32)
    nan[100] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    cases["nan.wav"] = (tmp_path / "nan.wav", "non-finite samples (NaN or inf)")
    cases["missing.wav"] = (tmp_path / "missing.wav", "missing file")
    return cases


def test_every_kind_of_bad_file_raises_audio_error_naming_file_and_reason(tmp_path):
    for name, (path, reason) in bad_files(tmp_path).items():
        with pytest.raises(AudioError) as info:
            load_audio(path, 16000)
        assert info.value.reason == reason, name
        assert name in str(info.value)


def test_crop_random_in_training_and_from_start_in_evaluation():
    wave = torch.arange(100, dtype=torch.float32)
    assert torch.equal(crop(wave, 30, None), wave[:30])
    starts = {crop(wave, 30, torch.Generator().manual_seed(s))[0].item() for s in range(20)}
    assert len(starts) > 5 and max(starts) <= 70
    assert torch.equal(crop(wave, 200, None), wave)


def test_pad_batch_marks_real_samples():
    audio, mask = pad_batch([torch.ones(3), torch.ones(5)])
    assert audio.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert audio[0, 3:].abs().sum() == 0


def test_seconds_to_samples_rejects_nonsense():
    assert seconds_to_samples(1.5, 16000) == 24000
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="max_seconds"):
            seconds_to_samples(bad, 16000)
