"""Speech from text, offline, with the eSpeak NG library that the PyPI package
``espeakng-loader`` ships (the shared library and its voice data, no program to install).

Used to check imported speech models on a known sentence: the synthetic voice is robotic but
clear, and the same on every machine, so a transcript can be compared with the text spoken.
The library is driven through its C API with ctypes, in synchronous mode: samples arrive through
a callback and are collected in memory.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from slit_lightning.weights import WeightsImportError

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesize without playing
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags: the text is UTF-8
_RATE = 1  # espeak_PARAMETER: words per minute
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@functools.cache
def _library() -> tuple[Any, int]:
    """The eSpeak NG library, initialised once per process, and its sample rate."""
    try:
        import espeakng_loader
    except ModuleNotFoundError as err:
        raise WeightsImportError(
            "speaking a test sentence needs eSpeak NG: pip install espeakng-loader"
        ) from err
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]  # fmt: skip
    data = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
    if rate <= 0:
        raise WeightsImportError(f"eSpeak NG did not start (data {data.decode()}): code {rate}")
    return lib, rate


def speak(text: str, voice: str = "en-us", words_per_minute: int = 150) -> tuple[np.ndarray, int]:
    """``text`` spoken by eSpeak NG: a float32 waveform in [-1, 1] and its sample rate."""
    lib, rate = _library()
    chunks: list[np.ndarray] = []

    def collect(wave: Any, count: int, events: Any) -> int:
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wave, shape=(count,)).copy())
        return 0  # 0: go on

    callback = _CALLBACK(collect)  # kept alive until synthesis ends
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise WeightsImportError(f"eSpeak NG has no voice {voice!r}")
    lib.espeak_SetParameter(_RATE, words_per_minute, 0)
    raw = ctypes.create_string_buffer(text.encode("utf-8"))
    code = lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    lib.espeak_Synchronize()
    if code != 0 or not chunks:
        raise WeightsImportError(f"eSpeak NG synthesis failed (code {code}) for {text!r}")
    return np.concatenate(chunks).astype(np.float32) / 32768.0, rate


_CHILD = """
import sys
import numpy as np
from slit_lightning.weights.espeak import _library, speak
_library()[0].espeak_ng_SetRandSeed(int(sys.argv[4]))  # breathy voices draw random numbers
wave, rate = speak(sys.argv[1], sys.argv[2], int(sys.argv[3]))
sys.stdout.buffer.write(np.int32(rate).tobytes() + wave.astype(np.float32).tobytes())
"""


def speak_isolated(
    text: str, voice: str = "en-us", words_per_minute: int = 150, seed: int = 0
) -> tuple[np.ndarray, int]:
    """:func:`speak` in a fresh Python process, its random numbers seeded with ``seed``: the same
    arguments give the same samples.

    eSpeak NG keeps synthesis state (pitch flutter, the random numbers of breathy voices) from one
    utterance to the next inside a process, and restarting the library does not reset it, so the
    same call in one process gives slightly different samples each time; breathy voices (the
    female variants) also draw from a random generator seeded from the clock. The first utterance
    of a fresh process with a fixed seed is always the same, which is what a seeded corpus needs.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    import slit_lightning

    root = str(Path(slit_lightning.__file__).resolve().parents[1])
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, text, voice, str(int(words_per_minute)), str(int(seed))],
        capture_output=True,
        env=env,
        check=False,
    )
    if done.returncode != 0 or len(done.stdout) < 8:
        raise WeightsImportError(
            f"eSpeak NG synthesis of {text!r} ({voice}) failed: {done.stderr.decode()[-500:]}"
        )
    rate = int(np.frombuffer(done.stdout[:4], dtype=np.int32)[0])
    return np.frombuffer(done.stdout[4:], dtype=np.float32).copy(), rate
