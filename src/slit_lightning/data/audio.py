"""Audio I/O: decode any supported file into mono float at the encoder's rate, crop or pad.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis, mp3 and more, from a path or
from bytes), resampling through torchaudio. Every problem a file can have is raised as
:class:`AudioError` with the file's name and the reason, so the data pipeline can count and skip it.
"""

from __future__ import annotations

import io
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from slit_lightning.errors import SLITError

#: File suffixes the sources treat as audio.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class AudioError(SLITError):
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
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    try:
        with sf.SoundFile(handle) as audio:
            implausible = _implausible_length(audio.frames, audio.channels, size)
            if implausible:
                raise AudioError(name, "undecodable", implausible)
            data = audio.read(dtype="float32", always_2d=True)
            rate, declared, log = audio.samplerate, audio.frames, audio.extra_info
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise AudioError(name, "undecodable", str(err).splitlines()[0][:200]) from err
    except MemoryError as err:  # a header that passed the check above and still asks too much
        raise AudioError(name, "undecodable", "too large to decode in memory") from err
    cut = truncation(log, declared, data.shape[0])
    if cut:
        raise AudioError(name, "truncated file", cut)
    return data, int(rate)


# Decoded float32 bytes per file byte that no real codec reaches (Opus at 6 kbit/s, 48 kHz stereo
# decodes to about 500 times its size); a header claiming more is corrupt, and reading it would
# try to allocate what it claims.
_MAX_EXPANSION = 4000
_MAX_SMALL_FILE_BYTES = 256 * 2**20  # small files may still hold a short clip


def _implausible_length(frames: int, channels: int, file_bytes: int) -> str:
    """Why a header's frame count cannot be true for a file of ``file_bytes`` ("" if it can)."""
    decoded = frames * max(channels, 1) * 4
    if decoded > max(_MAX_EXPANSION * file_bytes, _MAX_SMALL_FILE_BYTES):
        return f"header claims {frames} frames x {channels} channels for a {file_bytes}-byte file"
    return ""


# libsndfile's parser log: "data : 32000 (should be 28795)" when a WAV / AIFF ends early
_SHORT_CHUNK = re.compile(r"\b(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")
# sizes that streaming writers put in a header they cannot go back to fill in
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def truncation(log: str, declared: int, decoded: int) -> str:
    """Why a decoded file looks cut short ("" if it does not): its header promises more audio
    than the file holds. A partial clip would train against a caption of the whole clip."""
    if declared > 0 and decoded < declared * 0.99:  # e.g. an MP3 whose Xing header counts frames
        return f"{decoded} of {declared} frames decoded"
    if "ended unexpectedly" in log:  # an Ogg stream without its end-of-stream page
        return "stream ends without its end-of-stream marker"
    for promised, found in _SHORT_CHUNK.findall(log):
        if int(promised) not in _UNKNOWN_SIZES and int(found) < int(promised):
            return f"audio chunk holds {found} of {promised} bytes"
    return ""


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
