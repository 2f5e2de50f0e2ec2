"""Scores of generated answers, per instruction task (see :mod:`slit_lightning.instructions`).

- ``caption`` / ``detailed``: the captioning metrics against all of the clip's references;
- ``qa``: accuracy (the answer equals the annotated one after normalisation, or starts with it);
- ``classify``: accuracy, the answer mapped to the closest label of the vocabulary, right when
  that label is one of the clip's (single-label data: the usual accuracy);
- ``choose``: accuracy, the answer mapped to the closest offered option;
- ``tag``: micro-averaged precision, recall and F1 of the labels the answer names.
"""

from __future__ import annotations

from collections.abc import Sequence

from slit_lightning.instructions import Example, answer_matches, closest_label, named_labels
from slit_lightning.metrics.captioning import CaptionScores, caption_metrics


def answer_rows(
    clip_ids: Sequence[str], examples: Sequence[Example], predictions: Sequence[str]
) -> list[dict[str, str]]:
    """One JSON row per generated answer: the clip it is about, the task, the instruction, the
    expected answer and the prediction (what ``answers.json`` files hold)."""
    return [
        {"clip_id": c, "task": e.task, "instruction": e.instruction, "answer": e.answer,
         "prediction": p}
        for c, e, p in zip(clip_ids, examples, predictions, strict=True)
    ]  # fmt: skip


def score_answers(
    task: str, examples: Sequence[Example], predictions: Sequence[str], vocabulary: Sequence[str]
) -> CaptionScores:
    """The metrics of ``task`` for ``predictions`` (one per example), as ``CaptionScores``."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if not examples:
        return CaptionScores({}, {task: "no examples"})
    pairs = list(zip(examples, predictions, strict=True))
    if task in ("caption", "detailed"):
        return caption_metrics(list(predictions), [list(e.references) for e in examples])
    if task == "qa":
        hits = [answer_matches(p, e.answer) for e, p in pairs]
        return CaptionScores({"accuracy": sum(hits) / len(hits)}, {})
    if task == "classify":
        if not vocabulary:
            raise ValueError("classify needs the label vocabulary")
        hits = [closest_label(p, vocabulary) in e.references for e, p in pairs]
        return CaptionScores({"accuracy": sum(hits) / len(hits)}, {})
    if task == "choose":
        hits = [closest_label(p, e.options) == e.answer for e, p in pairs]
        return CaptionScores({"accuracy": sum(hits) / len(hits)}, {})
    if task == "tag":
        true_pos = predicted = actual = 0
        for e, p in pairs:
            named, truth = named_labels(p, vocabulary), set(e.references)
            true_pos, predicted, actual = (
                true_pos + len(named & truth),
                predicted + len(named),
                actual + len(truth),
            )
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return CaptionScores({"precision": precision, "recall": recall, "f1": f1}, {})
    raise ValueError(f"unknown task {task!r}")
