"""The built-in audio-caption corpus: real audio files with true captions, made offline.

``synthesize_corpus`` writes a small corpus for the demo, the tests and diagnostics. Each clip is a
scene of one to four sound events (tones, beeps, sweeps, noises, knocks, a vowel, ...) on an
optional noise floor; its manifest row keeps the ground-truth facts next to five captions and
question/answer pairs built from them (``synth_text.py``), so evaluation can check text against fact.

Layout of ``out_dir`` (every path in a manifest is relative to it)::

    audio/<split>/<split>-000123.flac   mono PCM_16
    <split>.jsonl                       one row per clip (train, val, test, zeroshot)
    corpus.json                         settings, vocabulary, wordings, held-out pairs; written last

A manifest row is ``{"id", "audio", "captions" (5), "labels", "qa", "events", "background",
"duration", "sample_rate"}``. Each event: ``type`` (canonical label), ``onset`` and ``duration`` (s),
``count`` (beeps/clicks/knocks, else null), ``register`` (low/mid/high or null), ``loudness``
(quiet/moderate/loud), ``level_db`` (RMS over its active frames) and ``peak_db`` (dBFS, as written),
``role`` ("foreground": never overlaps another; "background": sounds throughout), ``overlaps``
(types it overlaps) and ``params`` (frequencies, vowel, ...). ``background`` is the noise floor:
``{"level": "none"|"faint"|"noticeable", "level_db"}``.

The ``zeroshot`` split holds event pairs that never occur together in train/val/test, and its
captions use wordings that no other caption uses. Same arguments, byte-identical files.

With ``speech=True`` some clips also hold a spoken phrase (:mod:`slit_lightning.builtin.speech`):
an event of type ``"speech"`` with ``text``, ``language``, ``voice`` (e.g. "female US English"),
``voice_id`` (the eSpeak NG voice), ``speaker`` ("female"/"male") and ``words_per_minute``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from slit_lightning.atomic import write_file_atomic
from slit_lightning.builtin import corpus_text as synth_text
from slit_lightning.builtin.corpus_text import EVENT_LABELS, SPEECH_LABEL
from slit_lightning.data.sources import DataConfigError

GENERATOR_VERSION = "slit-synth-1"
SPLITS = ("train", "val", "test", "zeroshot")
AUDIO_FORMATS = ("flac", "wav")
LOUDNESS_DB = {"quiet": -30.0, "moderate": -20.0, "loud": -10.0}  # RMS over the active part
BACKGROUND_DB = {"none": None, "faint": -50.0, "noticeable": -38.0}
REGISTER_HZ = {"low": (110.0, 220.0), "mid": (330.0, 660.0), "high": (990.0, 1980.0)}
COUNTED = ("beeps", "clicks", "knocks")
IMPULSIVE = ("clicks", "knocks")
IMPULSE_PEAK_OFFSET_DB = 8.0
REGISTERED = ("bell", "beeps", "chord", "pure tone", "tremolo tone", "vibrato tone")
BED_TYPES = ("hum", "pink noise", "pure tone", "rumble")  # may sound throughout, under the others
N_HELDOUT_PAIRS = 6
_SCENE_STREAM = len(SPLITS)  # random stream of render_scenes: past the splits', never a corpus clip
_PEAK = 10 ** (-1 / 20)  # mixes louder than -1 dBFS are scaled down to it
_VOWELS = {"ah": (730, 1090, 2440), "ee": (270, 2290, 3010), "oo": (300, 870, 2240)}  # formants, Hz
SPEECH_SHARE = 0.5  # of the clips, with speech=True, that get a spoken phrase (if it fits)
_SPEECH_STREAM = 1_000_003  # last entropy word of a clip's speech stream (never a clip index)


@dataclass(frozen=True)
class _Settings:
    seed: int
    sample_rate: int
    clip_seconds: float
    audio_format: str
    speech: bool = False


def split_sizes(clips: int, train_clips: int | None = None) -> dict[str, int]:
    """Clips per split: 10 % (at least one) each for val, test and zeroshot, the rest train;
    ``train_clips``, when given, replaces the train split's share (the others keep theirs)."""
    small = max(1, (clips + 5) // 10)  # 10 %, rounded half up
    train = clips - 3 * small if train_clips is None else train_clips
    return {"train": train, "val": small, "test": small, "zeroshot": small}


def heldout_pairs(seed: int) -> list[tuple[str, str]]:
    """The event-type pairs reserved for the zeroshot split, disjoint and fixed by ``seed``."""
    order = np.random.default_rng([seed, 7]).permutation(len(EVENT_LABELS))
    pairs = [
        sorted((EVENT_LABELS[order[2 * i]], EVENT_LABELS[order[2 * i + 1]]))
        for i in range(N_HELDOUT_PAIRS)
    ]
    return sorted((a, b) for a, b in pairs)


def _check_args(
    seed: Any, clips: Any, sample_rate: Any, clip_seconds: Any, audio_format: Any
) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(seed) or seed < 0:
        raise DataConfigError(f"seed must be a non-negative integer; got {seed!r}")
    if not is_int(clips) or clips < len(SPLITS):
        raise DataConfigError(
            f"clips must be an integer >= 4 (at least one clip per split: {', '.join(SPLITS)}); "
            f"got {clips!r}"
        )
    if not is_int(sample_rate) or not 8000 <= sample_rate <= 96000:
        raise DataConfigError(
            f"sample_rate must be an integer from 8000 to 96000 Hz; got {sample_rate!r}"
        )
    if (
        isinstance(clip_seconds, bool)
        or not isinstance(clip_seconds, (int, float))
        or not (1.0 <= clip_seconds <= 60.0)
    ):
        raise DataConfigError(
            f"clip_seconds must be a number from 1.0 to 60.0; got {clip_seconds!r}"
        )
    if audio_format not in AUDIO_FORMATS:
        raise DataConfigError(f"audio_format must be one of {AUDIO_FORMATS}; got {audio_format!r}")


def synthesize_corpus(
    out_dir: str | Path,
    seed: int = 0,
    clips: int = 1000,
    sample_rate: int = 16000,
    clip_seconds: float = 5.0,
    audio_format: str = "flac",
    progress: Callable[[int, int], None] | None = None,
    train_clips: int | None = None,
    speech: bool = False,
) -> dict[str, int]:
    """Write the built-in audio-caption corpus into ``out_dir``.

    Args:
        out_dir: folder to write into (created if missing; files of an earlier run are replaced).
        seed: everything (audio, captions, held-out pairs) is a function of it.
        clips: total number of clips over the four splits (train 70 %, val/test/zeroshot 10 %).
        sample_rate: sample rate of the mono audio files, in Hz.
        clip_seconds: length of every clip, in seconds.
        audio_format: "flac" or "wav" (both PCM_16).
        progress: called as ``progress(done, total)`` after each clip.
        train_clips: clips in the train split instead of its 70 % of ``clips`` (val, test and
            zeroshot keep their 10 % of ``clips``). Every clip is a function of the seed, its
            split and its index, so a larger train split holds the smaller one's clips first, and
            the other splits are the same clips whatever the train split's size.
        speech: add a spoken phrase (eSpeak NG) to about half of the clips, as one more
            foreground event of type "speech" between the others: a short everyday phrase in
            English, French, German or Spanish, by a male or female voice, at one of a few
            speeds (see :mod:`slit_lightning.builtin.speech`). The choices come from a random
            stream of their own, so a clip that gets no phrase is byte-identical to the clip
            without ``speech``, and one that does keeps its other events' types, counts,
            registers and loudness (their timing, and so their samples, make room for the
            phrase). A clip too short for the phrases drawn for it gets none.

    Returns:
        ``{split: number of clips written}``.
    """
    _check_args(seed, clips, sample_rate, clip_seconds, audio_format)
    if train_clips is not None and (
        isinstance(train_clips, bool)
        or not isinstance(train_clips, (int, np.integer))
        or train_clips < 1
    ):
        raise DataConfigError(
            f"train_clips must be a positive integer or None; got {train_clips!r}"
        )
    if not isinstance(speech, (bool, np.bool_)):
        raise DataConfigError(f"speech must be True or False; got {speech!r}")
    settings = _Settings(
        int(seed), int(sample_rate), float(clip_seconds), audio_format, speech=bool(speech)
    )
    out, pairs = Path(out_dir), heldout_pairs(int(seed))
    sizes = split_sizes(int(clips), None if train_clips is None else int(train_clips))
    total = sum(sizes.values())
    done = 0
    for split, size in sizes.items():
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(size):
            rows.append(_make_clip(out, split, index, settings, pairs))
            done += 1
            if progress is not None:
                progress(done, total)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_file_atomic(
            out / f"{split}.jsonl", lambda tmp, t=text: tmp.write_text(t, encoding="utf-8")
        )
    meta = json.dumps(_metadata(settings, sizes, pairs), indent=2) + "\n"
    write_file_atomic(out / "corpus.json", lambda tmp: tmp.write_text(meta, encoding="utf-8"))
    return sizes


def _metadata(
    settings: _Settings, sizes: dict[str, int], pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    meta = {
        "generator": "slit_lightning.builtin.corpus",
        "version": GENERATOR_VERSION,
        "seed": settings.seed,
        "sample_rate": settings.sample_rate,
        "clip_seconds": settings.clip_seconds,
        "audio_format": settings.audio_format,
        "splits": sizes,
        "event_labels": list(EVENT_LABELS),
        "wordings": synth_text.wording_table(speech=settings.speech),
        "heldout_pairs": [list(p) for p in pairs],
        "loudness_db": LOUDNESS_DB,
        "impulse_peak_offset_db": IMPULSE_PEAK_OFFSET_DB,
        "background_db": BACKGROUND_DB,
    }
    if settings.speech:
        from slit_lightning.builtin import speech

        meta["speech"] = speech.description(SPEECH_SHARE)
    return meta


def render_scenes(
    count: int,
    seed: int,
    pairs: list[tuple[str, str]],
    sample_rate: int = 16000,
    clip_seconds: float = 5.0,
    first: int = 0,
    having: tuple[str, ...] = (),
) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """``count`` new scenes rendered in memory: ``(waveform, events)`` each, no files.

    For training on more audio than a corpus holds (the built-in encoder's bootstrap). The scenes
    come from the corpus generator's planner and renderers, like a train clip's, never hold one of
    ``pairs`` (pass the corpus's held-out pairs) and are fixed by ``seed`` and their index in the
    stream (from ``first``); no corpus split holds them. Waveforms are float32 in [-1, 1],
    quantised to 16 bits as the corpus files are; events are a manifest row's ``events``.
    ``having``: yield only scenes with an event of one of these types (the others are planned,
    never rendered), e.g. :data:`COUNTED` for a count readout, which learns from those events.
    """
    if having and not set(having) & set(EVENT_LABELS):
        raise ValueError(f"having={having!r} names no event type of the generator: {EVENT_LABELS}")
    settings = _Settings(int(seed), int(sample_rate), float(clip_seconds), "flac")
    index, made = first, 0
    while made < count:
        seeds = np.random.SeedSequence([settings.seed, _SCENE_STREAM, index]).spawn(2)
        index += 1
        plan_rng, audio_rng = (np.random.default_rng(s) for s in seeds)
        events, background = _plan_scene(plan_rng, "train", pairs, settings.clip_seconds)
        if having and not any(e["type"] in having for e in events):
            continue
        audio = _render_scene(events, background, audio_rng, settings)
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0) / 32768.0  # what a PCM_16 file reads
        made += 1
        yield pcm.astype(np.float32), events


def _make_clip(
    out: Path, split: str, index: int, settings: _Settings, pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """Plan, render and write one clip; return its manifest row."""
    # Separate streams per concern, so a change in caption wording never changes the audio.
    seeds = np.random.SeedSequence([settings.seed, SPLITS.index(split), index]).spawn(3)
    plan_rng, audio_rng, text_rng = (np.random.default_rng(s) for s in seeds)
    events, background = _plan_scene(plan_rng, split, pairs, settings.clip_seconds)
    if settings.speech:
        speech_seed = [settings.seed, SPLITS.index(split), index, _SPEECH_STREAM]
        speech_rng = np.random.default_rng(speech_seed)

        def replan(reserve: tuple[int, float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            rng = np.random.default_rng(seeds[0])  # the plan stream again, from its start
            return _plan_scene(rng, split, pairs, settings.clip_seconds, reserve)

        events, background = _add_speech(events, background, speech_rng, replan, settings)
    audio = _render_scene(events, background, audio_rng, settings)
    clip_id = f"{split}-{index:06d}"
    rel = f"audio/{split}/{clip_id}.{settings.audio_format}"
    fmt = settings.audio_format.upper()
    write_file_atomic(
        out / rel,
        lambda tmp: sf.write(tmp, audio, settings.sample_rate, format=fmt, subtype="PCM_16"),
    )
    return {
        "id": clip_id,
        "audio": rel,
        "captions": synth_text.captions(events, background["level"], text_rng, split == "zeroshot"),
        "labels": sorted({e["type"] for e in events}),
        "qa": synth_text.questions(events, text_rng),
        "events": events,
        "background": background,
        "duration": round(len(audio) / settings.sample_rate, 4),
        "sample_rate": settings.sample_rate,
    }


def _choose_types(
    rng: np.random.Generator, split: str, pairs: list[tuple[str, str]], most: int
) -> list[str]:
    """Distinct event types of one clip: zeroshot clips hold a held-out pair, others never do."""
    k = int(rng.integers(1, most + 1))
    if split == "zeroshot":
        chosen = list(pairs[int(rng.integers(len(pairs)))])
        rest = [t for t in EVENT_LABELS if t not in chosen]
        chosen += [rest[i] for i in rng.permutation(len(rest))[: max(0, k - 2)]]
    else:
        held = {frozenset(p) for p in pairs}
        chosen = []
        for i in rng.permutation(len(EVENT_LABELS)):
            t = EVENT_LABELS[i]
            if len(chosen) < k and not any(frozenset((t, c)) in held for c in chosen):
                chosen.append(t)
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _event_facts(rng: np.random.Generator, kind: str, longest: float, bed: bool) -> dict[str, Any]:
    """Type-level facts of one event; ``longest`` bounds its duration in seconds."""
    count = int(rng.integers(1, 6)) if kind in COUNTED else None
    register = str(rng.choice(list(REGISTER_HZ))) if kind in REGISTERED else None
    loudness = str(rng.choice(["quiet", "moderate"] if bed else list(LOUDNESS_DB)))
    params: dict[str, Any] = {}
    if count is not None:
        lo, hi = {"beeps": (0.12, 0.3), "clicks": (0.08, 0.25), "knocks": (0.15, 0.35)}[kind]
        params["period"] = round(min(float(rng.uniform(lo, hi)), longest / count), 4)
        duration = count * params["period"]
    else:
        duration = min(float(rng.uniform(0.4, 2.0)), longest)
    if kind == "vowel sound":
        params["vowel"] = str(rng.choice(list(_VOWELS)))
    role = "background" if bed else "foreground"
    return {
        "type": kind, "onset": 0.0, "duration": duration, "count": count, "register": register,
        "loudness": loudness, "level_db": 0.0, "peak_db": 0.0, "role": role, "overlaps": [],
        "params": params,
    }  # fmt: skip


def _span(seconds: float, bed: bool) -> tuple[float, float]:
    """Where foreground events may sound, in seconds: later in with a bed that fades in first."""
    return (0.08 * seconds, 0.95 * seconds) if bed else (0.04 * seconds, 0.96 * seconds)


def _plan_scene(
    rng: np.random.Generator,
    split: str,
    pairs: list[tuple[str, str]],
    seconds: float,
    reserve: tuple[int, float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events (sorted by onset) and background of one clip, before rendering.

    ``reserve``: ``(position, seconds)`` keeps a gap of that length free before the foreground
    event at ``position`` (after the last if it equals their number), for a spoken phrase. The
    random draws are the same with or without it, so the types, counts, registers and loudness
    are too; durations and onsets fit the smaller slots.
    """
    types = _choose_types(rng, split, pairs, most=min(4, int(seconds / 0.5)))
    beds = [t for t in types if t in BED_TYPES]
    bed = (
        beds[int(rng.integers(len(beds)))]
        if len(types) > 1 and beds and rng.random() < 0.35
        else None
    )
    foreground = [t for t in types if t != bed]
    # Foreground events get consecutive slots, so they never overlap one another.
    lo, hi = _span(seconds, bed is not None)
    at, gap = reserve if reserve is not None else (len(foreground), 0.0)
    slot = (hi - lo - gap) / len(foreground)
    events = []
    for i, kind in enumerate(foreground):
        event = _event_facts(rng, kind, 0.8 * slot, bed=False)
        start = lo + i * slot + (gap if i >= at else 0.0)
        event["onset"] = start + float(rng.uniform(0.05 * slot, slot - event["duration"]))
        events.append(event)
    if bed is not None:
        event = _event_facts(rng, bed, seconds, bed=True)
        event["onset"] = float(rng.uniform(0.0, 0.04 * seconds))
        event["duration"] = float(rng.uniform(0.95 * seconds, seconds)) - event["onset"]
        events.insert(0, event)
    level = str(rng.choice(list(BACKGROUND_DB), p=[0.4, 0.35, 0.25]))
    return events, {"level": level, "level_db": BACKGROUND_DB[level]}


def _render_scene(
    events: list[dict[str, Any]],
    background: dict[str, Any],
    rng: np.random.Generator,
    settings: _Settings,
) -> np.ndarray:
    """Mix the events into one waveform; onsets, durations and levels in ``events`` become exact."""
    sr = settings.sample_rate
    mix = np.zeros(round(settings.clip_seconds * sr))
    if background["level_db"] is not None:
        noise = _colored_noise(len(mix), sr, rng, exponent=1.5, band=(40.0, sr / 2))
        mix += noise * 10 ** (background["level_db"] / 20)
    spans = []
    for event in events:
        start = round(event["onset"] * sr)
        n = min(round(event["duration"] * sr), len(mix) - start)
        mix[start : start + n] += _render_event(event, n, sr, rng)
        event.update(onset=round(start / sr, 4), duration=round(n / sr, 4))
        spans.append((start, start + n))
    # The whole clip gets quieter together, so the loudness classes stay true relative to each other.
    gain_db = min(0.0, _db(_PEAK) - _db(_peak(mix)))
    for event, (a, b) in zip(events, spans, strict=True):
        others = zip(events, spans, strict=True)
        event["overlaps"] = [
            o["type"] for o, (c, d) in others if o is not event and a < d and c < b
        ]
        event.update(level_db=round(event["level_db"] + gain_db, 1))
        event.update(peak_db=round(event["peak_db"] + gain_db, 1))
    if background["level_db"] is not None:
        background["level_db"] = round(background["level_db"] + gain_db, 1)
    return mix * 10 ** (gain_db / 20)


def _render_event(event: dict[str, Any], n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One event's waveform at its loudness; records its sound parameters and levels in ``event``."""
    if event["type"] == SPEECH_LABEL:  # no draw from ``rng``: the other events sound as without
        from slit_lightning.builtin import speech

        signal, params = speech.render(event, n, sr), {}
    else:
        signal, params = _RENDERERS[event["type"]](n, sr, event, rng)
    signal = _set_level(signal, sr, LOUDNESS_DB[event["loudness"]], event["type"] in IMPULSIVE)
    event["params"] = {**event["params"], **params}
    event["level_db"] = _db(_active_rms(signal, sr))
    event["peak_db"] = _db(_peak(signal))
    return signal


def _add_speech(
    events: list[dict[str, Any]],
    background: dict[str, Any],
    rng: np.random.Generator,
    replan: Callable[[tuple[int, float]], tuple[list[dict[str, Any]], dict[str, Any]]],
    settings: _Settings,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The clip's events with a spoken phrase among them, or as they are where it gets none.

    ``rng`` is the clip's speech stream; ``replan(reserve)`` plans the clip again from its own
    stream with a gap kept free (see :func:`_plan_scene`).
    """
    from slit_lightning.builtin import speech

    foreground = sum(e["role"] == "foreground" for e in events)
    bed = any(e["role"] == "background" for e in events)
    lo, hi = _span(settings.clip_seconds, bed)
    room = hi - lo - foreground * speech.MIN_SLOT_S
    event = speech.plan(rng, room * speech.SLOT_FILL, settings.sample_rate, SPEECH_SHARE)
    if event is None:
        return events, background
    at, gap = int(rng.integers(foreground + 1)), event["duration"] / speech.SLOT_FILL
    events, background = replan((at, gap))
    slot = (hi - lo - gap) / foreground
    event["onset"] = lo + at * slot + float(rng.uniform(0.05 * gap, gap - event["duration"]))
    events.insert(int(bed) + at, event)
    return events, background


def _db(x: float) -> float:
    return 20 * float(np.log10(max(x, 1e-12)))


def _active_rms(x: np.ndarray, sr: int) -> float:
    """RMS over the 10 ms frames within 20 dB of the loudest, so gaps between beeps don't count."""
    hop = max(1, sr // 100)
    frames = len(x) // hop
    if frames == 0:
        return float(np.sqrt(np.mean(x**2)))
    energy = (x[: frames * hop] ** 2).reshape(frames, hop).mean(axis=1)
    return float(np.sqrt(energy[energy >= 0.01 * energy.max()].mean()))


def _set_level(x: np.ndarray, sr: int, level_db: float, impulsive: bool) -> np.ndarray:
    """Scale to the loudness class, then lower it if its peak would pass about -2 dBFS.

    Sustained sounds get ``level_db`` of active RMS. Impulsive ones (clicks, knocks) get a peak of
    ``level_db + IMPULSE_PEAK_OFFSET_DB``: their RMS says little about how loud they sound, and an
    RMS target would push their peaks past full scale.
    """
    if impulsive:
        scale = 10 ** ((level_db + IMPULSE_PEAK_OFFSET_DB) / 20) / _peak(x)
    else:
        scale = 10 ** (level_db / 20) / max(_active_rms(x, sr), 1e-12)
    return x * scale * min(1.0, 0.9 * _PEAK / (scale * _peak(x)))


def _peak(x: np.ndarray) -> float:
    return max(float(np.abs(x).max()), 1e-12)


# ---- sound makers: (n samples, sample rate, event facts, rng) -> (signal, extra params) ----


def _fade(x: np.ndarray, sr: int, ms: float = 10.0) -> np.ndarray:
    k = min(len(x) // 2, int(sr * ms / 1000))
    if k > 0:
        ramp = np.linspace(0.0, 1.0, k, endpoint=False)
        x[:k] *= ramp
        x[len(x) - k :] *= ramp[::-1]
    return x


def _pitch(rng: np.random.Generator, register: str) -> float:
    lo, hi = REGISTER_HZ[register]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _partials(t: np.ndarray, freqs: np.ndarray, amps: np.ndarray, sr: int) -> np.ndarray:
    keep = freqs < 0.45 * sr  # no aliasing at low sample rates
    return amps[keep] @ np.sin(2 * np.pi * np.outer(freqs[keep], t))


def _colored_noise(
    n: int, sr: int, rng: np.random.Generator, exponent: float, band: tuple[float, float]
) -> np.ndarray:
    """Unit-RMS noise with power falling as 1/f**exponent inside ``band`` (Hz)."""
    freqs = np.fft.rfftfreq(n, 1 / sr)
    inside = (freqs >= band[0]) & (freqs <= band[1])
    shape = np.where(inside, np.maximum(freqs, band[0]) ** (-exponent / 2), 0.0)
    x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n)
    return x / max(float(np.std(x)), 1e-12)


def _repeat(n: int, sr: int, burst: np.ndarray, count: int, period: float) -> np.ndarray:
    out = np.zeros(n)
    for j in range(count):
        start = round(j * period * sr)
        piece = burst[: max(0, n - start)]
        out[start : start + len(piece)] += piece
    return out


def _pure_tone(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f = _pitch(rng, ev["register"])
    return _fade(np.sin(2 * np.pi * f * np.arange(n) / sr), sr), {"frequency_hz": round(f, 2)}


def _beeps(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, period = _pitch(rng, ev["register"]), ev["params"]["period"]
    beep = _fade(np.sin(2 * np.pi * f * np.arange(int(0.5 * period * sr)) / sr), sr, 5.0)
    return _repeat(n, sr, beep, ev["count"], period), {"frequency_hz": round(f, 2)}


def _clicks(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    t = np.arange(int(0.003 * sr)) / sr
    click = rng.standard_normal(len(t)) * np.exp(-t / 0.0008)
    return _repeat(n, sr, click, ev["count"], ev["params"]["period"]), {}


def _knocks(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, period = float(rng.uniform(90, 160)), ev["params"]["period"]
    t = np.arange(int(min(0.08, 0.7 * period) * sr)) / sr
    thud = np.sin(2 * np.pi * f * t) * np.exp(-t / 0.018)
    thud += 0.3 * rng.standard_normal(len(t)) * np.exp(-t / 0.002)  # the attack of a knuckle
    return _repeat(n, sr, thud, ev["count"], period), {"frequency_hz": round(f, 2)}


def _sweep(n: int, sr: int, rising: bool, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    lo, hi = float(rng.uniform(150, 300)), min(float(rng.uniform(1500, 3000)), 0.4 * sr)
    f0, f1 = (lo, hi) if rising else (hi, lo)
    seconds, t = n / sr, np.arange(n) / sr
    phase = 2 * np.pi * f0 * seconds * ((f1 / f0) ** (t / seconds) - 1) / np.log(f1 / f0)
    return _fade(np.sin(phase), sr), {"start_hz": round(f0, 2), "end_hz": round(f1, 2)}


def _noise(
    n: int, sr: int, exponent: float, band: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    return _fade(np.clip(_colored_noise(n, sr, rng, exponent, band), -3.0, 3.0), sr, 20.0)


def _hum(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, h = float(rng.uniform(50, 120)), np.arange(1, 9)
    return _fade(_partials(np.arange(n) / sr, f * h, 1.0 / h, sr), sr, 20.0), {
        "frequency_hz": round(f, 2)
    }


def _chord(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    root, quality = _pitch(rng, ev["register"]), str(rng.choice(["major", "minor"]))
    notes = root * 2 ** (np.array([0, 4 if quality == "major" else 3, 7]) / 12)
    freqs, amps = np.concatenate([notes, 2 * notes]), np.array([1, 1, 1, 0.3, 0.3, 0.3])
    return _fade(_partials(np.arange(n) / sr, freqs, amps, sr), sr), {
        "root_hz": round(root, 2),
        "quality": quality,
    }


def _tremolo(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, rate, t = _pitch(rng, ev["register"]), float(rng.uniform(5, 10)), np.arange(n) / sr
    gain = 1 - 0.45 * (1 + np.sin(2 * np.pi * rate * t))  # 90 % deep amplitude modulation
    return _fade(gain * np.sin(2 * np.pi * f * t), sr), {
        "frequency_hz": round(f, 2),
        "rate_hz": round(rate, 2),
    }


def _fm_tone(
    n: int, sr: int, f: float, rate: float, depth: float, harmonics: np.ndarray
) -> np.ndarray:
    t = np.arange(n) / sr
    phase = 2 * np.pi * f * t + f * depth * (1 - np.cos(2 * np.pi * rate * t)) / rate
    keep = harmonics * f * (1 + depth) < 0.45 * sr
    return _fade((1.0 / harmonics[keep]) @ np.sin(np.outer(harmonics[keep], phase)), sr)


def _vibrato(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, rate = _pitch(rng, ev["register"]), float(rng.uniform(5, 7))
    x = _fm_tone(n, sr, f, rate, 0.03, np.array([1.0, 2.0]))
    return x, {"frequency_hz": round(f, 2), "rate_hz": round(rate, 2)}


def _siren(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, rate = float(rng.uniform(600, 1000)), float(rng.uniform(1.5, 3.0))
    x = _fm_tone(n, sr, f, rate, 0.25, np.array([1.0, 2.0, 3.0]))
    return x, {"frequency_hz": round(f, 2), "rate_hz": round(rate, 2)}


def _vowel(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    # A glottal buzz through formant resonances, summed harmonic by harmonic (no filter state).
    f0 = float(rng.uniform(100, 200))
    h = np.arange(1, int(0.45 * sr / f0) + 1)
    formants = np.array(_VOWELS[ev["params"]["vowel"]], dtype=float)[:, None]
    resonance = (1 / np.sqrt(1 + ((h * f0 - formants) / 90.0) ** 2)).sum(axis=0)
    return _fade(_partials(np.arange(n) / sr, h * f0, resonance / h, sr), sr, 20.0), {
        "f0_hz": round(f0, 2)
    }


def _bell(n: int, sr: int, ev: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    f, tau, t = _pitch(rng, ev["register"]), float(rng.uniform(0.25, 0.5)), np.arange(n) / sr
    ratios, amps = np.array([1.0, 2.0, 2.76, 3.5, 5.4]), np.array([1.0, 0.5, 0.35, 0.25, 0.15])
    keep = ratios * f < 0.45 * sr
    decays = np.exp(-np.outer(ratios[keep], t) / tau)  # higher partials die away sooner
    x = (amps[keep][:, None] * decays * np.sin(2 * np.pi * np.outer(ratios[keep] * f, t))).sum(
        axis=0
    )
    return _fade(x, sr, 2.0), {"frequency_hz": round(f, 2), "decay_s": round(tau, 3)}


_RENDERERS: dict[str, Callable[[int, int, dict, np.random.Generator], tuple[np.ndarray, dict]]] = {
    "beeps": _beeps,
    "bell": _bell,
    "chord": _chord,
    "clicks": _clicks,
    "falling sweep": lambda n, sr, ev, rng: _sweep(n, sr, False, rng),
    "hum": _hum,
    "knocks": _knocks,
    "pink noise": lambda n, sr, ev, rng: (_noise(n, sr, 1.0, (40.0, sr / 2), rng), {}),
    "pure tone": _pure_tone,
    "rising sweep": lambda n, sr, ev, rng: _sweep(n, sr, True, rng),
    "rumble": lambda n, sr, ev, rng: (_noise(n, sr, 2.0, (40.0, 400.0), rng), {}),
    "siren": _siren,
    "tremolo tone": _tremolo,
    "vibrato tone": _vibrato,
    "vowel sound": _vowel,
    "white noise": lambda n, sr, ev, rng: (_noise(n, sr, 0.0, (0.0, sr / 2), rng), {}),
}
