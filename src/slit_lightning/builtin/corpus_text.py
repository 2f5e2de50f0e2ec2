"""Wordings, captions and questions of the built-in corpus (the audio side is in ``synth.py``).

Every sentence is built from the ground-truth facts of one clip, so it is true by construction:
foreground events are named in onset order, counts are number words, and an adjective is only used
where its attribute exists. An event dict here is a row of a manifest's ``events`` list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Wording:
    """One way to name an event type: singular (or mass) form, plural form, article rule."""

    one: str
    many: str
    mass: bool = False  # mass nouns take no article: "loud white noise", not "a loud white noise"


def _w(one: str, many: str | None = None, mass: bool = False) -> Wording:
    return Wording(one, many or one, mass)


# Keys are the canonical labels; the first wording of each type renders its canonical label.
TRAIN_WORDINGS: dict[str, tuple[Wording, ...]] = {
    "beeps": (_w("beep", "beeps"), _w("short beep", "short beeps")),
    "bell": (_w("bell"), _w("bell strike")),
    "chord": (_w("chord"), _w("three-note chord")),
    "clicks": (_w("click", "clicks"), _w("sharp click", "sharp clicks")),
    "falling sweep": (_w("falling sweep"), _w("downward sweep")),
    "hum": (_w("hum"), _w("electrical hum")),
    "knocks": (_w("knock", "knocks"), _w("thud", "thuds")),
    "pink noise": (_w("pink noise", mass=True),),
    "pure tone": (_w("pure tone"), _w("steady tone"), _w("sine tone")),
    "rising sweep": (_w("rising sweep"), _w("upward sweep")),
    "rumble": (_w("rumble"), _w("brown noise", mass=True)),
    "siren": (_w("siren"), _w("warbling siren")),
    "tremolo tone": (_w("tremolo tone"), _w("pulsing tone")),
    "vibrato tone": (_w("vibrato tone"), _w("wavering tone")),
    "vowel sound": (_w("vowel sound"), _w("voice-like sound")),
    "white noise": (_w("white noise", mass=True), _w("noise burst")),
}

# Synonyms that never occur in a train/val/test caption: zero-shot captions use them, so a model
# is tested on wordings it has never been trained on.
HELDOUT_WORDINGS: dict[str, tuple[Wording, ...]] = {
    "beeps": (_w("bleep", "bleeps"),),
    "bell": (_w("chime"),),
    "chord": (_w("triad"),),
    "clicks": (_w("tick", "ticks"),),
    "falling sweep": (_w("falling glide"),),
    "hum": (_w("drone"),),
    "knocks": (_w("thump", "thumps"),),
    "pink noise": (_w("static", mass=True),),
    "pure tone": (_w("sine wave"),),
    "rising sweep": (_w("rising glide"),),
    "rumble": (_w("low roar"),),
    "siren": (_w("wailing alarm"),),
    "tremolo tone": (_w("throbbing tone"),),
    "vibrato tone": (_w("wobbly tone"),),
    "vowel sound": (_w("sung vowel"),),
    "white noise": (_w("hiss"),),
}

EVENT_LABELS: tuple[str, ...] = tuple(sorted(TRAIN_WORDINGS))

# A spoken phrase (``synthesize_corpus(speech=True)``) is one more event type, kept out of
# EVENT_LABELS so that a corpus without speech is planned and worded exactly as before. Each
# wording's form is the word a caption names it by; its template places the speaker ({s}), the
# phrase ({t}) and the language ({l}) around it.
SPEECH_LABEL = "speech"
SPEECH_TRAIN_WORDINGS: tuple[Wording, ...] = (_w("speech", mass=True), _w("saying"))
SPEECH_HELDOUT_WORDINGS: tuple[Wording, ...] = (_w("uttering"), _w("utterance"))
_SPEECH_TEMPLATES = {
    "speech": '{l} speech by {s}: "{t}"',
    "saying": '{s} saying "{t}" in {l}',
    "uttering": '{s} uttering "{t}" in {l}',
    "utterance": 'an utterance in {l} by {s}: "{t}"',
}
_SPEAKER_WORDS = {"female": ("a woman", "a female speaker"), "male": ("a man", "a male speaker")}

_LOUDNESS_WORDS = {"quiet": ("quiet", "soft"), "moderate": ("moderately loud",), "loud": ("loud",)}
_REGISTER_WORDS = {
    "low": ("low", "low-pitched", "deep"),
    "mid": ("mid-pitched", "medium-pitched"),
    "high": ("high", "high-pitched"),
}
_BED_CLAUSES = (
    " while {} plays in the background",
    " over {} in the background",
    ", with {} throughout",
    ", all on top of {}",
)
_NOISE_CLAUSES = {
    "faint": (", with faint background noise", " against a faint noise floor"),
    "noticeable": (", with noticeable background noise", " against a clearly audible noise floor"),
}


def wording_table(speech: bool = False) -> dict[str, dict[str, list[str]]]:
    """Every surface form of every wording, ``{"train"|"heldout": {label: [forms]}}``; with
    ``speech``, the forms that name a spoken phrase too (under ``"speech"``)."""

    def forms(table: dict[str, tuple[Wording, ...]]) -> dict[str, list[str]]:
        return {
            k: list(dict.fromkeys(f for w in ws for f in (w.one, w.many)))
            for k, ws in table.items()
        }

    if not speech:
        return {"train": forms(TRAIN_WORDINGS), "heldout": forms(HELDOUT_WORDINGS)}
    return {
        "train": forms({**TRAIN_WORDINGS, SPEECH_LABEL: SPEECH_TRAIN_WORDINGS}),
        "heldout": forms({**HELDOUT_WORDINGS, SPEECH_LABEL: SPEECH_HELDOUT_WORDINGS}),
    }


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return "an" if phrase.lstrip("'")[0] in "aeiou" else "a"


def _phrase(event: dict[str, Any], wording: Wording, rng: np.random.Generator) -> str:
    """Noun phrase for one event, e.g. "three loud high beeps" or "an 'ee' vowel sound"."""
    words = []
    chance = 0.3 if event["loudness"] == "moderate" else 0.5
    if rng.random() < chance:
        words.append(_pick(rng, _LOUDNESS_WORDS[event["loudness"]]))
    if event["register"] is not None and rng.random() < 0.6:
        words.append(_pick(rng, _REGISTER_WORDS[event["register"]]))
    if "vowel" in event["params"] and rng.random() < 0.7:
        words.append(f"'{event['params']['vowel']}'")
    count = event["count"]
    body = " ".join([*words, wording.one if count in (None, 1) else wording.many])
    if count is not None:
        return f"{COUNT_WORDS[count]} {body}"
    return body if wording.mass else f"{_article(body)} {body}"


def _speech_phrase(event: dict[str, Any], wording: Wording, rng: np.random.Generator) -> str:
    """Noun phrase for a spoken phrase: who says what in which language, e.g.
    ``a woman saying "see you tomorrow" in English``."""
    speaker = _pick(rng, _SPEAKER_WORDS[event["speaker"]])
    template = _SPEECH_TEMPLATES[wording.one]
    return template.format(s=speaker, t=event["text"], l=event["language"])


def _name(event: dict[str, Any], choose: Callable[[str], Wording], rng: np.random.Generator) -> str:
    """Noun phrase for any event, spoken phrases included."""
    if event["type"] == SPEECH_LABEL:
        return _speech_phrase(event, choose(SPEECH_LABEL), rng)
    return _phrase(event, choose(event["type"]), rng)


def _then(ps: list[str]) -> str:
    return ", then ".join(ps)


def _first(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"you can hear {ps[0]}"
    tail = "".join(f", then {p}" for p in ps[2:-1]) + (
        f", and finally {ps[-1]}" if len(ps) > 2 else ""
    )
    return f"first {ps[0]}, followed by {ps[1]}{tail}"


def _opens(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"the clip features {ps[0]}"
    middle = "".join(f", continues with {p}" for p in ps[1:-1])
    return f"the clip opens with {ps[0]}{middle} and ends with {ps[-1]}"


def _hear(ps: list[str]) -> str:
    return "we hear " + ", after that ".join(ps)


def _recording(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"a recording of {ps[0]}"
    return f"a recording of {', '.join(ps[:-1])} and then {ps[-1]}"


def _after(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"the audio contains {ps[0]}"
    return f"after {ps[0]} we hear {ps[1]}" + "".join(f", and after that {p}" for p in ps[2:])


def _sound_of(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"the sound of {ps[0]}"
    return f"the sound of {ps[0]}, followed by " + ", then ".join(ps[1:])


def _heard(ps: list[str]) -> str:
    if len(ps) == 1:
        return f"{ps[0]} can be heard"
    return f"{ps[0]} can be heard, and next " + ", then ".join(ps[1:])


# Their fixed words differ, so five different templates always give five different captions.
_TEMPLATES: tuple[Callable[[list[str]], str], ...] = (
    _then, _first, _opens, _hear, _recording, _after, _sound_of, _heard,
)  # fmt: skip


def _wording_chooser(
    rng: np.random.Generator, zeroshot: bool, all_heldout: bool
) -> Callable[[str], Wording]:
    def choose(label: str) -> Wording:
        speech = label == SPEECH_LABEL
        heldout = SPEECH_HELDOUT_WORDINGS if speech else HELDOUT_WORDINGS[label]
        if all_heldout:
            return _pick(rng, heldout)
        pool = (SPEECH_TRAIN_WORDINGS if speech else TRAIN_WORDINGS[label]) + (
            heldout if zeroshot else ()
        )
        return _pick(rng, pool)

    return choose


def captions(
    events: list[dict[str, Any]], background: str, rng: np.random.Generator, zeroshot: bool
) -> list[str]:
    """Five different true captions of one clip.

    Args:
        events: the clip's events sorted by onset (``role`` "foreground" or "background").
        background: background noise level, "none", "faint" or "noticeable".
        rng: the clip's text random generator.
        zeroshot: allow held-out wordings; the first caption then uses only held-out wordings.
    """
    foreground = [e for e in events if e["role"] == "foreground"]
    bed = next((e for e in events if e["role"] == "background"), None)
    out = []
    for i, template in enumerate(rng.permutation(len(_TEMPLATES))[:5]):
        choose = _wording_chooser(rng, zeroshot, all_heldout=zeroshot and i == 0)
        text = _TEMPLATES[template]([_name(e, choose, rng) for e in foreground])
        if bed is not None:
            text += _pick(rng, _BED_CLAUSES).format(_phrase(bed, choose(bed["type"]), rng))
        if background != "none" and rng.random() < 0.6:
            text += _pick(rng, _NOISE_CLAUSES[background])
        out.append(text[0].upper() + text[1:] + ".")
    return out


def fact_sheet(events: list[dict[str, Any]]) -> str:
    """A terse list of a clip's events, e.g. ``"Sounds: two knocks, hum, chord. Background: rumble."``

    Foreground events in onset order, by canonical label, counted events with their number word,
    a spoken phrase with its text, language and voice; the background bed (if any) after them.
    """
    foreground = [e for e in events if e["role"] == "foreground"]
    named = [_sheet_name(e) for e in foreground]
    text = f"Sounds: {', '.join(named)}."
    bed = next((e for e in events if e["role"] == "background"), None)
    return text if bed is None else f"{text} Background: {bed['type']}."


def _sheet_name(event: dict[str, Any]) -> str:
    if event["type"] == SPEECH_LABEL:
        return f'speech "{event["text"]}" ({event["language"]}, {event["voice"]})'
    if event["count"] is None:
        return event["type"]
    return f"{COUNT_WORDS[event['count']]} {event['type']}"


def _noun_for_question(label: str) -> str:
    if label == SPEECH_LABEL:
        return "speech"
    canonical = TRAIN_WORDINGS[label][0]
    if canonical.mass or canonical.many == label != canonical.one:
        return label
    return f"{_article(label)} {label}"


def questions(events: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, str]]:
    """Question/answer pairs true of the clip: counts, first event, pitch register, presence.

    Answers: counts as digit strings ("3"), the first event as its canonical label, registers as
    "low"/"mid"/"high", presence as "yes"/"no" (one of each per clip). A clip with a spoken phrase
    also gets what is said, its language, the speaker and the sounds right before and after it.
    """
    qa: list[dict[str, str]] = []

    def add(kind: str, question: str, answer: str) -> None:
        qa.append({"question": question, "answer": answer, "kind": kind})

    for e in events:
        if e["count"] is not None:
            add("count", f"How many {e['type']} are there?", str(e["count"]))
    if len(events) >= 2:
        asked = _pick(rng, ("Which sound comes first?", "What is the first sound you hear?"))
        add("first", asked, events[0]["type"])
    for e in events:
        if e["register"] is not None:
            question = f"Which pitch register fits the {e['type']}: low, mid or high?"
            add("register", question, e["register"])
    present = sorted({e["type"] for e in events})
    absent = [label for label in EVENT_LABELS if label not in present]
    add("presence", f"Does the clip contain {_noun_for_question(_pick(rng, present))}?", "yes")
    add("presence", f"Does the clip contain {_noun_for_question(_pick(rng, absent))}?", "no")
    for e in events:
        if e["type"] == SPEECH_LABEL:
            qa += _speech_questions(e, [x for x in events if x["role"] == "foreground"], rng)
    return qa


def _speech_questions(
    speech: dict[str, Any], foreground: list[dict[str, Any]], rng: np.random.Generator
) -> list[dict[str, str]]:
    """What is said, in which language, by whom, and which sounds come right before and after."""
    said = _pick(rng, ("What is said?", "What does the speaker say?"))
    qa = [
        {"question": said, "answer": speech["text"], "kind": "speech_text"},
        {
            "question": "In which language is the speaker talking?",
            "answer": speech["language"],
            "kind": "speech_language",
        },
        {
            "question": "Is the speaker a man or a woman?",
            "answer": "a woman" if speech["speaker"] == "female" else "a man",
            "kind": "speaker",
        },
    ]
    at = next(i for i, e in enumerate(foreground) if e is speech)
    if at + 1 < len(foreground):
        question = "What comes right after the speech?"
        qa.append(
            {"question": question, "answer": foreground[at + 1]["type"], "kind": "after_speech"}
        )
    if at > 0:
        question = "What comes right before the speech?"
        qa.append(
            {"question": question, "answer": foreground[at - 1]["type"], "kind": "before_speech"}
        )
    return qa
