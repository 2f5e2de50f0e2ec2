"""Spoken phrases for the built-in corpus (``synthesize_corpus(speech=True)``).

A phrase is a short everyday sentence in English, French, German or Spanish, spoken by eSpeak NG
(:mod:`slit_lightning.weights.espeak`) in a male or female voice at one of a few speeds. Every
choice is drawn from the clip's own speech random stream, and each utterance is synthesized in a
fresh process with a fixed seed, so the same corpus arguments give the same samples.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from slit_lightning.builtin.corpus_text import SPEECH_LABEL

# Short everyday phrases; none holds a word that names a sound of the corpus, a number word or
# a loudness or pitch adjective, so captions stay unambiguous about the other events.
PHRASES: dict[str, tuple[str, ...]] = {
    "English": (
        "see you tomorrow", "good morning", "where is the station", "thank you very much",
        "the coffee is ready", "please close the door", "it is raining again",
        "have a nice day", "I will call you later", "lunch is on the table",
    ),
    "French": (
        "à demain", "bonjour", "merci beaucoup", "où est la gare", "bonne nuit",
        "le café est prêt", "fermez la porte s'il vous plaît", "il pleut encore",
        "bonne journée", "je t'appelle plus tard",
    ),
    "German": (
        "bis morgen", "guten Morgen", "vielen Dank", "wo ist der Bahnhof", "gute Nacht",
        "der Kaffee ist fertig", "bitte schließ die Tür", "es regnet schon wieder",
        "schönen Tag noch", "ich rufe dich später an",
    ),
    "Spanish": (
        "hasta mañana", "buenos días", "muchas gracias", "dónde está la estación",
        "buenas noches", "el café está listo", "cierra la puerta por favor",
        "está lloviendo otra vez", "que tengas un buen día", "te llamo más tarde",
    ),
}  # fmt: skip
# eSpeak NG voices per language, with the accent a voice name says.
ACCENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "English": (("en-us", "US English"), ("en", "British English")),
    "French": (("fr", "French"),),
    "German": (("de", "German"),),
    "Spanish": (("es", "Spanish"),),
}
# eSpeak NG voice variants (files of espeak-ng-data/voices/!v) and the speaker they sound like.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("m1", "male"), ("m3", "male"), ("f2", "female"), ("f3", "female"),
)  # fmt: skip
WORDS_PER_MINUTE = (130, 160, 190)
MIN_SLOT_S = 0.25  # time each other foreground event keeps at least, with a phrase in the clip
SLOT_FILL = 0.8  # share of its slot a phrase fills, as the other foreground events at most
_TRIES = 3  # phrases tried, in drawn order, before a clip too short for them gets none
_LOUDNESS = ("quiet", "moderate", "loud")


def description(share: float) -> dict[str, Any]:
    """What a corpus's ``corpus.json`` says about its spoken phrases."""
    return {
        "share": share,
        "phrases": {language: list(p) for language, p in PHRASES.items()},
        "voices": {language: [v for v, _ in a] for language, a in ACCENTS.items()},
        "variants": [v for v, _ in VARIANTS],
        "words_per_minute": list(WORDS_PER_MINUTE),
        "engine": "eSpeak NG (espeakng-loader)",
    }


def plan(
    rng: np.random.Generator, longest: float, sample_rate: int, share: float
) -> dict[str, Any] | None:
    """A spoken-phrase event (onset still 0), or None: the clip gets none (a share ``1 - share``
    of clips, or no phrase of the drawn language is at most ``longest`` seconds long)."""
    if rng.random() >= share:
        return None
    language = list(PHRASES)[int(rng.integers(len(PHRASES)))]
    voice, accent = ACCENTS[language][int(rng.integers(len(ACCENTS[language])))]
    variant, gender = VARIANTS[int(rng.integers(len(VARIANTS)))]
    wpm = int(WORDS_PER_MINUTE[int(rng.integers(len(WORDS_PER_MINUTE)))])
    loudness = _LOUDNESS[int(rng.integers(len(_LOUDNESS)))]
    for j in rng.permutation(len(PHRASES[language]))[:_TRIES]:
        text = PHRASES[language][int(j)]
        seconds = len(waveform(text, f"{voice}+{variant}", wpm, sample_rate)) / sample_rate
        if seconds <= longest:
            return {
                "type": SPEECH_LABEL, "onset": 0.0, "duration": seconds, "count": None,
                "register": None, "loudness": loudness, "level_db": 0.0, "peak_db": 0.0,
                "role": "foreground", "overlaps": [], "params": {}, "text": text,
                "language": language, "voice": f"{gender} {accent}",
                "voice_id": f"{voice}+{variant}", "speaker": gender, "words_per_minute": wpm,
            }  # fmt: skip
    return None


def render(event: dict[str, Any], n: int, sample_rate: int) -> np.ndarray:
    """The event's phrase as ``n`` samples (cut or padded with silence), before its level is set."""
    wave = waveform(event["text"], event["voice_id"], event["words_per_minute"], sample_rate)
    out = np.zeros(n)
    out[: min(n, len(wave))] = wave[:n]
    return out


@functools.cache
def waveform(text: str, voice: str, words_per_minute: int, sample_rate: int) -> np.ndarray:
    """``text`` spoken by eSpeak NG at ``sample_rate``, silence trimmed, faded in and out."""
    from slit_lightning.weights.espeak import speak_isolated

    wave, rate = speak_isolated(text, voice, words_per_minute, seed=0)
    wave = _resample(_trim(wave.astype(np.float64), rate), rate, sample_rate)
    k = min(len(wave) // 2, sample_rate // 100)  # 10 ms fades
    ramp = np.linspace(0.0, 1.0, k, endpoint=False)
    wave[:k] *= ramp
    wave[len(wave) - k :] *= ramp[::-1]
    wave.setflags(write=False)
    return wave


def _trim(x: np.ndarray, sr: int, margin_s: float = 0.02) -> np.ndarray:
    """Cut the silence before and after the speech (5 ms frames under -40 dB of the peak)."""
    hop = max(1, sr // 200)
    frames = np.abs(x[: len(x) // hop * hop]).reshape(-1, hop).max(axis=1)
    active = np.flatnonzero(frames > 0.01 * max(float(frames.max()), 1e-12))
    if len(active) == 0:
        return x
    margin = round(margin_s * sr)
    return x[max(0, active[0] * hop - margin) : (active[-1] + 1) * hop + margin]


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (cut or zero-padded above the new Nyquist)."""
    if rate == target:
        return x.copy()
    n = max(1, round(len(x) * target / rate))
    spectrum = np.fft.rfft(x)
    kept = np.zeros(n // 2 + 1, dtype=complex)
    m = min(len(kept), len(spectrum))
    kept[:m] = spectrum[:m]
    return np.fft.irfft(kept, n) * (n / len(x))
