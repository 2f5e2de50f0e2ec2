"""Audio I/O: decode any supported file into mono float at the encoder's rate, crop or pad.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis, mp3 and more, from a path or
from bytes), resampling through torchaudio. Every problem a file can have is raised as
:class:`AudioError` with the file's name and the reason, so the data pipeline can count and skip it.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

#: File suffixes the sources treat as audio.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class AudioError(Exception):
    """A clip that cannot be used; ``reason`` is a short category used for skip counting."""

    def __init__(self, name: str, reason: str, detail: str = "") -> None:
        self.name, self.reason, self.detail = name, reason, detail
        super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))


def decode(source: str | Path | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode a file path or in-memory file into ``(samples (N, C) float32, sample_rate)``."""
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise AudioError(name, "empty file")
        handle: str | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(name, "missing file")
        if path.stat().st_size == 0:
            raise AudioError(name, "empty file")
        handle = str(path)
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise AudioError(name, "undecodable", str(err).splitlines()[0][:200]) from err
    return data, int(rate)


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # The sinc kernel for a rate pair is built once and reused for every clip.
    return torchaudio.transforms.Resample(orig, new)


def to_mono(samples: np.ndarray, rate: int, target_rate: int) -> torch.Tensor:
    """Average channels and resample: ``(N, C)`` at ``rate`` -> ``(S,)`` float32 at ``target_rate``."""
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)))
    if rate != target_rate:
        mono = _resampler(rate, target_rate)(mono)
    return mono


def check(wave: torch.Tensor, name: str, silence_peak: float = 1e-4) -> torch.Tensor:
    """Reject clips no model should learn from: zero length, NaN/inf, all silent."""
    if wave.numel() == 0:
        raise AudioError(name, "zero-length audio")
    if not torch.isfinite(wave).all():
        raise AudioError(name, "non-finite samples (NaN or inf)")
    if wave.abs().max().item() < silence_peak:
        raise AudioError(name, "all-silent audio", f"peak below {silence_peak:g}")
    return wave


def load_audio(
    source: str | Path | bytes,
    sample_rate: int,
    name: str | None = None,
    silence_peak: float = 1e-4,
) -> torch.Tensor:
    """Decode, check and convert one clip to a mono waveform ``(S,)`` at ``sample_rate``.

    Raises :class:`AudioError` naming the file and the problem for anything unusable.

    Example::

        wave = load_audio("dog.mp3", sample_rate=16000)   # (S,) float32 in [-1, 1]
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    samples, rate = decode(source, name)
    if samples.shape[0] == 0:
        raise AudioError(name, "zero-length audio")
    return check(to_mono(samples, rate, sample_rate), name, silence_peak)


def crop(wave: torch.Tensor, max_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """Cut ``wave (S,)`` to at most ``max_samples``: a random window when ``generator`` is given
    (training), the start of the clip otherwise (evaluation, deterministic)."""
    excess = wave.shape[0] - max_samples
    if excess <= 0:
        return wave
    start = 0
    if generator is not None:
        start = int(torch.randint(0, excess + 1, (1,), generator=generator).item())
    return wave[start : start + max_samples]


def pad_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad clips to the longest: ``(B, S)`` waveforms and ``(B, S)`` bool mask (True = real)."""
    length = max(w.shape[0] for w in waves)
    out = torch.zeros(len(waves), length)
    mask = torch.zeros(len(waves), length, dtype=torch.bool)
    for i, w in enumerate(waves):
        out[i, : w.shape[0]] = w
        mask[i, : w.shape[0]] = True
    return out, mask


def seconds_to_samples(seconds: float, sample_rate: int) -> int:
    """Number of samples in ``seconds`` at ``sample_rate`` (at least one)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"max_seconds must be a positive number of seconds, got {seconds!r}")
    return max(1, round(seconds * sample_rate))
