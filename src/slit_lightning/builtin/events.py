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

:func:`event_breakdown` (``slit data agreement ... --details``) says where captions go wrong: clips
by fault, recall per type, and the number words said for each true count.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from slit_lightning.builtin.corpus_text import COUNT_WORDS, wording_table

# What separates one event's noun phrase from the one before: a number word found after the last
# of these belongs to the event that follows it.
_PHRASE_BREAK = re.compile(
    r",|\.|;|\b(?:then|and|after|next|followed|by|over|with|while|on top of|hear|heard|of)\b"
)


@cache
def _patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple(
        (label, re.compile(rf"(?<![\w-]){re.escape(form)}(?![\w-])"))
        for table in wording_table(speech=True).values()
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


@dataclass(frozen=True)
class _ClipCheck:
    """One caption read against its clip's events (shared by the scores and the breakdown)."""

    named: list[str]  # types the caption names, in order of first mention
    said: dict[str, int | None]  # type -> the number word of its first mention
    sequence: list[str]  # the clip's foreground types in onset order
    truth: set[str]  # every type of the clip, background beds included
    counted: dict[str, int]  # counted foreground type -> its true count

    @property
    def exact(self) -> bool:
        """The named types are exactly the clip's."""
        return set(self.named) == self.truth

    @property
    def ordered(self) -> bool:
        """Every foreground type is named, in onset order (``in_order``)."""
        foreground = set(self.sequence)
        return [label for label in self.named if label in foreground] == self.sequence

    @property
    def in_onset_order(self) -> bool:
        """The foreground types the caption names come in onset order (missing ones aside)."""
        rank = {label: i for i, label in enumerate(self.sequence)}
        ranks = [rank[label] for label in self.named if label in rank]
        return ranks == sorted(ranks)

    @property
    def counts_right(self) -> bool:
        return all(self.said.get(label) == n for label, n in self.counted.items())


def _check(caption: str, events: Sequence[dict[str, Any]]) -> _ClipCheck:
    found = named_events(caption)
    foreground = sorted((e for e in events if e["role"] == "foreground"), key=_onset)
    return _ClipCheck(
        named=[label for label, _ in found],
        said=dict(found),
        sequence=list(dict.fromkeys(e["type"] for e in foreground)),
        truth={e["type"] for e in events},
        # the first onset of a type wins, as in the captions
        counted={e["type"]: e["count"] for e in reversed(foreground) if e["count"] is not None},
    )


def _checks(captions: Sequence[str], clips: Sequence[Sequence[dict[str, Any]]]) -> list[_ClipCheck]:
    if len(captions) != len(clips):
        raise ValueError(f"{len(captions)} captions for {len(clips)} clips")
    return [_check(c, events) for c, events in zip(captions, clips, strict=True)]


def event_agreement(
    captions: Sequence[str], clips: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, float]:
    """Scores of ``captions[i]`` against the events of clip ``i`` (a manifest row's ``events``:
    ``type``, ``onset``, ``count``, ``role``); see the module docstring."""
    totals = dict.fromkeys(
        ("hits", "named", "truth", "first", "pairs", "pairs_right", "exact", "ordered", "counted",
         "counts_right", "all_right"),
        0,
    )  # fmt: skip
    for clip in _checks(captions, clips):
        named, sequence = clip.named, clip.sequence
        totals["hits"] += len(set(named) & clip.truth)
        totals["named"] += len(named)
        totals["truth"] += len(clip.truth)
        totals["first"] += bool(named and sequence) and named[0] == sequence[0]
        rank = {label: i for i, label in enumerate(sequence)}
        in_clip = [rank[label] for label in named if label in rank]
        for i, a in enumerate(in_clip):
            for b in in_clip[i + 1 :]:
                totals["pairs"] += 1
                totals["pairs_right"] += a < b
        for label, count in clip.counted.items():
            if label in clip.said:
                totals["counted"] += 1
                totals["counts_right"] += clip.said[label] == count
        totals["exact"] += clip.exact
        totals["ordered"] += clip.ordered
        totals["all_right"] += clip.exact and clip.ordered and clip.counts_right
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


def event_breakdown(
    captions: Sequence[str], clips: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, Any]:
    """Where captions go wrong, for :func:`event_agreement`'s inputs.

    Returns:
        ``failures``: clips by what keeps them from ``all_right`` (``"ok"``, or the ``+``-joined
        faults ``extra`` (a type not in the clip named), ``missing`` (a type of the clip not named),
        ``order`` (named foreground types out of onset order) and ``count`` (a counted
        event unnamed or with a wrong or no number word)); ``types``: per
        type, ``clips`` holding it, ``named`` (of those, captions naming it), ``recall`` and
        ``false`` (captions naming it for a clip without it); ``counts``: per true count of a
        counted event, the number words said for it (``"unnamed"`` where the type is not named,
        ``"none"`` where it is named without a number word).
    """
    failures: Counter[str] = Counter()
    held: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    false: Counter[str] = Counter()
    counts: dict[int, Counter[str]] = {}
    for clip in _checks(captions, clips):
        faults = [
            name
            for name, fault in (
                ("extra", bool(set(clip.named) - clip.truth)),
                ("missing", bool(clip.truth - set(clip.named))),
                ("order", not clip.in_onset_order),
                ("count", not clip.counts_right),
            )
            if fault
        ]
        failures["+".join(faults) or "ok"] += 1
        held.update(clip.truth)
        hits.update(clip.truth & set(clip.named))
        false.update(set(clip.named) - clip.truth)
        for label, n in clip.counted.items():
            if label not in clip.said:
                word = "unnamed"
            else:
                said = clip.said[label]
                word = "none" if said is None else COUNT_WORDS[said]
            counts.setdefault(n, Counter())[word] += 1
    labels = sorted(set(held) | set(false))
    return {
        "failures": dict(failures.most_common()),
        "types": {
            label: {
                "clips": held[label],
                "named": hits[label],
                "recall": round(hits[label] / held[label], 4) if held[label] else None,
                "false": false[label],
            }
            for label in labels
        },
        "counts": {COUNT_WORDS[n]: dict(counts[n].most_common()) for n in sorted(counts)},
    }


def _onset(event: dict[str, Any]) -> float:
    return float(event["onset"])


def _read_captions_file(
    captions_file: str | Path, corpus: str | Path
) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Predictions of a captions JSON (what stage 2's validation and test write:
    ``{"captions": [{"clip_id", "prediction", ...}]}``) and their clips' events from a built-in
    corpus's manifests.

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
    return [r["prediction"] for r in rows], [events[r["clip_id"]] for r in rows]


def score_captions_file(captions_file: str | Path, corpus: str | Path) -> dict[str, float]:
    """:func:`event_agreement` of a captions JSON against a built-in corpus's manifests (see
    :func:`_read_captions_file` for the format and the errors)."""
    return event_agreement(*_read_captions_file(captions_file, corpus))


def breakdown_captions_file(captions_file: str | Path, corpus: str | Path) -> dict[str, Any]:
    """:func:`event_breakdown` of a captions JSON against a built-in corpus's manifests."""
    return event_breakdown(*_read_captions_file(captions_file, corpus))
