"""Instruction data: how a clip's captions, labels and question/answer pairs become
``(instruction, answer)`` examples, task by task, in several wordings.

Tasks (:data:`TASKS`):

- ``caption``: a short caption (the clip's shortest reference); ``detailed``: the longest one;
- ``qa``: a question about the clip (counts, order, pitch, presence yes/no in the built-in corpus;
  any question in a user's QA or instruction data), answered as annotated;
- ``classify``: name a sound in the clip (open set; any of the clip's labels is right);
- ``choose``: pick the label that fits from a given list (one right label, up to 3 others);
- ``tag``: list all the sounds (the clip's labels, comma-separated).

Every task has training wordings and held-out wordings; held-out wordings, and the tasks in
``held_out_tasks`` (``choose`` by default), are never trained on and serve zero-shot evaluation.
The held-out wordings are paraphrases made of words the training wordings use, so that the
built-in LLM, which knows no English beyond its corpus, can read them as a real LLM would.
A question from user data is used in the ``{question}`` slot of a QA wording; instruction data
(``audio, instruction, answer``) arrives as QA pairs too, and its instructions are used verbatim.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Wordings = Literal["train", "held_out"]
VERBATIM = "{question}"  # the QA wording that passes a question or instruction through unchanged

# task -> (training wordings, held-out wordings)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "caption": (
        ("Describe the sound.", "A short caption:", "Write a caption for the audio clip."),
        ("Describe what happens in this clip.",),
    ),
    "detailed": (
        ("Describe the audio in detail.", "Give a detailed description of every sound you hear."),
        ("Describe every sound in this clip, in order.",),
    ),
    "qa": (
        (
            "Question: {question} Answer:",
            VERBATIM,
            "Answer the question about the audio: {question}",
        ),
        ("Listen to the clip and answer. Question: {question} Answer:",),
    ),
    "classify": (
        ("What sound is this? Answer with its name.", "Name a sound you hear."),
        ("Which sound can be heard? Answer with its name.",),
    ),
    "choose": (
        ("Which of these sounds is in the clip: {options}? Answer:",),
        ("Pick the sound that fits the audio from: {options}. Answer:",),
    ),
    "tag": (
        ("List all the sounds you hear.", "Tag the audio with every sound in it."),
        ("List every sound in this clip.",),
    ),
}
DEFAULT_MIX = {"caption": 1.0, "detailed": 0.5, "qa": 2.0, "classify": 0.5, "tag": 0.5}


@dataclass(frozen=True)
class Example:
    """One instruction with its expected answer.

    ``references`` are all acceptable answers for scoring (a clip's captions; its labels for
    ``classify``); ``options`` the labels offered by ``choose``."""

    task: str
    instruction: str
    answer: str
    references: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass
class ClipText:
    """What a batch row says about a clip: captions, labels, ``(question, answer)`` pairs."""

    captions: Sequence[str]
    labels: Sequence[str]
    qa: Sequence[Sequence[str]]

    @classmethod
    def rows(cls, batch: Mapping[str, Any]) -> list[ClipText]:
        return [
            cls(c, lab, q)
            for c, lab, q in zip(batch["captions"], batch["labels"], batch["qa"], strict=True)
        ]


def can_do(task: str, clip: ClipText, vocabulary: Sequence[str] = ()) -> bool:
    """Whether ``clip`` has what ``task`` needs."""
    if task in ("caption", "detailed"):
        return bool(clip.captions)
    if task == "qa":
        return bool(clip.qa)
    if task == "choose":
        return bool(clip.labels) and len(set(vocabulary) - set(clip.labels)) > 0
    return bool(clip.labels)


def make_example(
    task: str,
    clip: ClipText,
    wording: str,
    rng: random.Random,
    vocabulary: Sequence[str] = (),
    pair: Sequence[str] | None = None,
) -> Example:
    """One example of ``task`` for ``clip`` in ``wording`` (random choices drawn from ``rng``)."""
    if task in ("caption", "detailed"):
        pick = min if task == "caption" else max
        answer = pick(clip.captions, key=lambda c: (len(c.split()), c))
        return Example(task, wording, answer, tuple(clip.captions))
    if task == "qa":
        question, answer = pair if pair is not None else rng.choice(list(clip.qa))
        return Example(task, wording.replace("{question}", question), answer, (answer,))
    labels = list(clip.labels)
    if task == "classify":
        return Example(task, wording, rng.choice(labels), tuple(labels))
    if task == "tag":
        return Example(task, wording, ", ".join(labels), tuple(labels))
    if task == "choose":
        right = rng.choice(labels)
        others = sorted(set(vocabulary) - set(labels))
        options = [right, *rng.sample(others, min(3, len(others)))]
        rng.shuffle(options)
        return Example(
            task, wording.replace("{options}", ", ".join(options)), right, (right,), tuple(options)
        )
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


@dataclass
class InstructionMix:
    """Draws one training example per clip, tasks in proportion to ``mix``.

    Args:
        mix: task -> weight (only tasks a clip can do are drawn; weights are renormalised).
        held_out_tasks: tasks never trained (evaluation only); they may not appear in ``mix``.
    """

    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    held_out_tasks: tuple[str, ...] = ("choose",)

    def __post_init__(self) -> None:
        unknown = (set(self.mix) | set(self.held_out_tasks)) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; tasks: {', '.join(TASKS)}")
        both = set(self.held_out_tasks) & {t for t, w in self.mix.items() if w > 0}
        if both:
            raise ValueError(f"tasks {sorted(both)} are held out, so they cannot be in the mix")
        if any(w < 0 for w in self.mix.values()) or not any(w > 0 for w in self.mix.values()):
            raise ValueError(f"task weights must be >= 0 with one > 0; got {self.mix}")

    @property
    def tasks(self) -> list[str]:
        """The tasks drawn from (weight above zero)."""
        return [t for t, w in self.mix.items() if w > 0]

    def draw(self, clip: ClipText, rng: random.Random, vocabulary: Sequence[str] = ()) -> Example:
        tasks = [t for t, w in self.mix.items() if w > 0 and can_do(t, clip, vocabulary)]
        if not tasks:
            raise ValueError(
                "a clip has nothing any task of the mix can use (no captions, labels or QA pairs)"
            )
        task = rng.choices(tasks, weights=[self.mix[t] for t in tasks])[0]
        wording = rng.choice(TASKS[task][0])
        return make_example(task, clip, wording, rng, vocabulary)


def evaluation_examples(
    task: str,
    clip: ClipText,
    wordings: Wordings,
    rng: random.Random,
    vocabulary: Sequence[str] = (),
) -> list[Example]:
    """The examples ``task`` is scored on for ``clip``: every QA pair, else one example, each in
    the first wording of the chosen set."""
    if not can_do(task, clip, vocabulary):
        return []
    wording = TASKS[task][0 if wordings == "train" else 1][0]
    if task == "qa":
        return [make_example(task, clip, wording, rng, pair=p) for p in clip.qa]
    return [make_example(task, clip, wording, rng, vocabulary)]


def batch_examples(
    task: str,
    clips: Sequence[ClipText],
    wordings: Wordings,
    rng: random.Random,
    vocabulary: Sequence[str],
) -> tuple[list[Example], list[int]]:
    """The examples ``task`` is scored on for a batch of clips, and the clip row of each: what
    ``slit eval`` and instruction tuning's validation both ask. ``vocabulary`` is the labels of
    the whole split (``choose`` draws its other options from it)."""
    examples: list[Example] = []
    rows: list[int] = []
    for i, clip in enumerate(clips):
        found = evaluation_examples(task, clip, wordings, rng, vocabulary)
        examples += found
        rows += [i] * len(found)
    return examples, rows


# ---------------------------------------------------------------------------- scoring answers


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, single spaces."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def closest_label(answer: str, labels: Sequence[str]) -> str:
    """The label an answer names: the one mentioned earliest in it (longest first on ties), else
    the most similar string."""
    text = f" {normalise(answer)} "
    found = [(text.find(f" {normalise(lab)} "), -len(lab), lab) for lab in labels]
    named = [f for f in found if f[0] >= 0]
    if named:
        return min(named)[2]
    return max(labels, key=lambda lab: difflib.SequenceMatcher(None, text, normalise(lab)).ratio())


def named_labels(answer: str, labels: Sequence[str]) -> set[str]:
    """Every label an answer names (for tagging)."""
    text = f" {normalise(answer)} "
    return {lab for lab in labels if f" {normalise(lab)} " in text}


def answer_matches(answer: str, expected: str) -> bool:
    """QA: the normalised answer equals the expected one, or starts with it as a whole word
    (``"three"`` for ``"three."`` and ``"yes, it does"`` for ``"yes"``)."""
    a, e = normalise(answer), normalise(expected)
    return a == e or a.startswith(e + " ")
