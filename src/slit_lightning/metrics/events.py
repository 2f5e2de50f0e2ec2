"""Do captions of the built-in corpus name the right events, counts and order?

n-gram metrics (CIDEr-D, BLEU) reward wording as much as content. On the built-in corpus every
clip's events are known, so a caption can be checked fact by fact: which event types it names
(any train or held-out wording), in which order, and with which number words. Used as::

    slit data agreement runs/demo/logs/stage2/version_1/test_captions.json --corpus runs/demo/corpus

Scores (all over the clips of one captions file):

- ``precision``: named types that are in the clip; ``recall``: the clip's types that are named
  (background beds included, micro-averaged over clips).
- ``first_event``: the first-named type is the clip's first foreground event.
- ``pair_order``: of two of the clip's foreground types a caption names, the share named in onset
  order (``pairs`` counts them).
- ``exact_types``: the named types are exactly the clip's types.
- ``in_order``: every foreground type is named, in onset order (other named types ignored).
- ``counts``: of counted events (beeps, clicks, knocks) a caption names, the share whose number
  word is right (``counted`` counts them).
- ``all_right``: exact types, in order, and every counted event named with the right number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from slit_lightning.data.synth_text import COUNT_WORDS, wording_table

# What separates one event's noun phrase from the one before: a number word found after the last
# of these belongs to the event that follows it.
_PHRASE_BREAK = re.compile(
    r",|\.|;|\b(?:then|and|after|next|followed|by|over|with|while|on top of|hear|heard|of)\b"
)


@cache
def _patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple(
        (label, re.compile(rf"(?<![\w-]){re.escape(form)}(?![\w-])"))
        for table in wording_table().values()
        for label, forms in table.items()
        for form in forms
    )


def named_events(text: str) -> list[tuple[str, int | None]]:
    """The event types a sentence names, in order of first mention, each with the number word of
    its first mention (None where there is none): ``"two thuds, then a drone"`` ->
    ``[("knocks", 2), ("hum", None)]``."""
    lowered = text.lower()
    first: dict[str, tuple[int, int | None]] = {}
    for label, pattern in _patterns():
        match = pattern.search(lowered)
        if match is None or (label in first and first[label][0] <= match.start()):
            continue
        head = _PHRASE_BREAK.split(lowered[: match.start()])[-1]
        numbers = [w for w in re.findall(r"[a-z]+", head) if w in COUNT_WORDS]
        first[label] = (match.start(), COUNT_WORDS.index(numbers[-1]) if numbers else None)
    return [(label, count) for label, (_, count) in sorted(first.items(), key=lambda kv: kv[1][0])]


def named_event_types(text: str) -> list[str]:
    """The event types a sentence names, in order of first mention (see :func:`named_events`)."""
    return [label for label, _ in named_events(text)]


def event_agreement(
    captions: Sequence[str], clips: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, float]:
    """Scores of ``captions[i]`` against the events of clip ``i`` (a manifest row's ``events``:
    ``type``, ``onset``, ``count``, ``role``); see the module docstring."""
    if len(captions) != len(clips):
        raise ValueError(f"{len(captions)} captions for {len(clips)} clips")
    totals = dict.fromkeys(
        ("hits", "named", "truth", "first", "pairs", "pairs_right", "exact", "ordered", "counted",
         "counts_right", "all_right"),
        0,
    )  # fmt: skip
    for caption, events in zip(captions, clips, strict=True):
        found = named_events(caption)
        named = [label for label, _ in found]
        foreground = sorted((e for e in events if e["role"] == "foreground"), key=_onset)
        sequence = list(dict.fromkeys(e["type"] for e in foreground))
        truth = {e["type"] for e in events}
        totals["hits"] += len(set(named) & truth)
        totals["named"] += len(named)
        totals["truth"] += len(truth)
        totals["first"] += bool(named and sequence) and named[0] == sequence[0]
        rank = {label: i for i, label in enumerate(sequence)}
        in_clip = [rank[label] for label in named if label in rank]
        for i, a in enumerate(in_clip):
            for b in in_clip[i + 1 :]:
                totals["pairs"] += 1
                totals["pairs_right"] += a < b
        exact = set(named) == truth
        ordered = [label for label in named if label in rank] == sequence
        said = dict(found)
        counted = {e["type"]: e["count"] for e in reversed(foreground) if e["count"] is not None}
        counts_right = True
        for label, count in counted.items():
            if label in said:
                totals["counted"] += 1
                totals["counts_right"] += said[label] == count
            counts_right &= said.get(label) == count
        totals["exact"] += exact
        totals["ordered"] += ordered
        totals["all_right"] += exact and ordered and counts_right
    clips_n = max(len(captions), 1)
    return {
        "precision": totals["hits"] / max(totals["named"], 1),
        "recall": totals["hits"] / max(totals["truth"], 1),
        "first_event": totals["first"] / clips_n,
        "pair_order": totals["pairs_right"] / max(totals["pairs"], 1),
        "pairs": totals["pairs"],
        "exact_types": totals["exact"] / clips_n,
        "in_order": totals["ordered"] / clips_n,
        "counts": totals["counts_right"] / max(totals["counted"], 1),
        "counted": totals["counted"],
        "all_right": totals["all_right"] / clips_n,
        "types_named_per_clip": totals["named"] / clips_n,
        "types_per_clip": totals["truth"] / clips_n,
    }


def _onset(event: dict[str, Any]) -> float:
    return float(event["onset"])


def score_captions_file(captions_file: str | Path, corpus: str | Path) -> dict[str, float]:
    """:func:`event_agreement` of a captions JSON (what stage 2's validation and test write:
    ``{"captions": [{"clip_id", "prediction", ...}]}``) against a built-in corpus's manifests.

    Raises:
        FileNotFoundError: the captions file or the corpus's manifests are missing.
        ValueError: a clip id is in none of the corpus's manifests.
    """
    rows = json.loads(Path(captions_file).read_text(encoding="utf-8"))["captions"]
    manifests = sorted(Path(corpus).glob("*.jsonl"))
    if not manifests:
        raise FileNotFoundError(f"{corpus} holds no *.jsonl manifests: not a built-in corpus")
    events: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                events[row["id"]] = row.get("events") or []
    missing = [r["clip_id"] for r in rows if r["clip_id"] not in events]
    if missing:
        raise ValueError(
            f"{len(missing)} clips of {captions_file} (e.g. {missing[0]!r}) are not in {corpus}:"
            " score captions against the corpus they were generated for"
        )
    return event_agreement([r["prediction"] for r in rows], [events[r["clip_id"]] for r in rows])
