"""The evaluation suite behind ``slit eval`` and ``make eval-zeroshot``.

One pass over a split (or any labelled data) runs every task the checkpoint can do; what it
cannot do is listed with the reason, never scored as zero:

- ``retrieval`` (stage 1): text-to-audio and audio-to-text R@1/5/10 and mAP@10 over the captions;
- ``classify_contrastive`` (stage 1): zero-shot classification, each clip scored against a text
  prompt per label (``"the sound of {label}"``), right when the best label is one of the clip's;
- ``caption``, ``qa``, ``classify``, ``tag``, ``choose`` (stage 2 and instruction-tuned models):
  answers generated under an instruction and scored per task
  (:mod:`slit_lightning.metrics.answers`); by default in the held-out wordings, which training
  never used. A stage-2 model gets the instruction as its LLM prompt (its queries do not read it),
  which is the comparison that shows what instruction tuning adds.

Labels for classification come from the data (``labels`` in a manifest, ``category`` in an
ESC-50-style CSV, or the sub-folder names of a folder tree); the label set is the data's own.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.errors import SLITError
from slit_lightning.instructions import ClipText, Example, Wordings, batch_examples
from slit_lightning.metrics.answers import answer_rows, score_answers
from slit_lightning.metrics.retrieval import retrieval_metrics
from slit_lightning.stages import SLITStage, Stage1, Stage2

log = logging.getLogger(__name__)

CONTRASTIVE_TASKS = ("retrieval", "classify_contrastive")
GENERATION_TASKS = ("caption", "qa", "classify", "tag", "choose")
TASKS = CONTRASTIVE_TASKS + GENERATION_TASKS


class EvaluationError(SLITError, ValueError):
    """An evaluation that cannot run as asked (an unknown task, ...); the message says why."""


@dataclass
class EvalReport:
    """What one checkpoint scored on one data set."""

    checkpoint: str
    stage: str
    data: str
    wordings: str
    clips: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    #: every generated answer: clip id, task, instruction, expected answer, prediction
    answers: list[dict[str, str]] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> Path:
        """``eval.json`` (scores), ``answers.json`` (every generated answer) and TensorBoard
        scalars (``eval/{task}/{metric}``) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "eval.json"
        summary = {k: v for k, v in asdict(self).items() if k != "answers"}
        path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        (out / "answers.json").write_text(json.dumps(self.answers, indent=1), encoding="utf-8")
        with SummaryWriter(str(out)) as writer:
            for task, values in self.metrics.items():
                for name, value in values.items():
                    writer.add_scalar(f"eval/{task}/{name}", value, 0)
            writer.add_text("eval/skipped", json.dumps(self.skipped))
        return path


def table(reports: Sequence[EvalReport]) -> str:
    """One table: a row per task and metric, a column per checkpoint; then what was skipped."""
    names = [f"{i}-{r.stage}" for i, r in enumerate(reports)]
    rows: list[tuple[str, str]] = []
    for task in TASKS:
        metrics = sorted({m for r in reports for m in r.metrics.get(task, {})})
        rows += [(task, m) for m in metrics]
    width = max([len(n) for n in names] + [10])
    lines = [f"{'task':<22}{'metric':<12}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for task, metric in rows:
        cells = []
        for r in reports:
            value = r.metrics.get(task, {}).get(metric)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"{task:<22}{metric:<12}" + "".join(f"{c:>{width + 2}}" for c in cells))
    for name, r in zip(names, reports, strict=True):
        lines.append(f"{name}: {r.checkpoint}, {r.clips} clips of {r.data}, {r.wordings} wordings")
        lines += [f"  {task}: not run, {why}" for task, why in r.skipped.items()]
    return "\n".join(lines)


@torch.no_grad()
def evaluate(
    model: SLITStage,
    datamodule: AudioTextDataModule,
    split: str,
    tasks: Sequence[str] = TASKS,
    wordings: Wordings = "held_out",
    label_prompt: str = "the sound of {label}",
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Run ``tasks`` on ``split`` of ``datamodule`` (evaluation order, no crops beyond its
    ``max_seconds``). Clips without captions, labels or QA pairs just sit out the tasks that need
    them."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise EvaluationError(f"unknown tasks {sorted(unknown)}; tasks: {', '.join(TASKS)}")
    datamodule.require_captions = False
    datamodule.use_feature_cache(model.encoder.identity)
    vocabulary = datamodule.labels(split)
    report = EvalReport("", type(model).__name__, split, wordings)
    runnable = _runnable(model, tasks, vocabulary, report.skipped)
    store: dict[str, Any] = {"audio": [], "text": [], "text_clip": [], "labels": []}
    examples: dict[str, list[Example]] = {t: [] for t in runnable}
    answers: dict[str, list[str]] = {t: [] for t in runnable}
    asked: dict[str, list[str]] = {t: [] for t in runnable}  # the clip id of each example
    loader = datamodule.loader(split)  # type: ignore[arg-type]
    total = loader.dataset.estimated_batches(datamodule.hparams.num_workers) or 0
    for step, batch in enumerate(loader):
        batch = _to(batch, model.device)
        clips = ClipText.rows(batch)
        if isinstance(model, Stage1):
            _embed(model, batch, store, report.clips)
        store["labels"] += [list(c.labels) for c in clips]
        rng = random.Random(f"eval/{batch['clip_id'][0]}")
        for task in runnable:
            if task in CONTRASTIVE_TASKS:
                continue
            found, rows = batch_examples(task, clips, wordings, rng, vocabulary)
            if found:
                instructions = [e.instruction for e in found]
                answers[task] += model.answer(batch, instructions, torch.tensor(rows))
                examples[task] += found
                asked[task] += [batch["clip_id"][i] for i in rows]
        report.clips += len(clips)
        if progress is not None:
            progress(step + 1, max(total, step + 1))
    for task in runnable:
        if task == "retrieval":
            _retrieval(store, report)
        elif task == "classify_contrastive":
            _contrastive_classification(model, store, vocabulary, label_prompt, report)
        elif not examples[task]:
            report.skipped[task] = "the data has nothing this task needs"
        else:
            report.answers += answer_rows(asked[task], examples[task], answers[task])
            scores = score_answers(task, examples[task], answers[task], vocabulary)
            report.metrics[task] = scores.values
            report.skipped |= {f"{task}/{k}": v for k, v in scores.unavailable.items()}
    return report


def _runnable(
    model: SLITStage, tasks: Sequence[str], vocabulary: list[str], skipped: dict[str, str]
) -> list[str]:
    out = []
    for task in tasks:
        if task in CONTRASTIVE_TASKS and not isinstance(model, Stage1):
            skipped[task] = "needs stage 1's contrastive heads, which later stages do not keep"
        elif task in GENERATION_TASKS and not isinstance(model, Stage2):
            skipped[task] = "needs an LLM (stage 2 or instruction-tuned checkpoint)"
        elif task in ("classify", "classify_contrastive", "tag", "choose") and len(vocabulary) < 2:
            skipped[task] = "the data has fewer than two labels"
        else:
            out.append(task)
    return out


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _embed(model: Stage1, batch: dict[str, Any], store: dict[str, Any], first: int) -> None:
    """Contrastive features of the batch's clips and of all their captions."""
    feats, frames = model.encode_audio(batch)
    kv = model.qformer.audio_keys_values(feats, frames)
    store["audio"].append(model.audio_embeddings(kv).cpu())
    captions = [c for clip in batch["captions"] for c in clip]
    if captions:
        ids, mask = model.tokenize(model.tokenizer, captions, model.hparams.max_text_len, False)
        store["text"].append(model.text_embeddings(ids, mask).cpu())
        clip_of = [first + i for i, clip in enumerate(batch["captions"]) for _ in clip]
        store["text_clip"].append(torch.tensor(clip_of))


def _retrieval(store: dict[str, Any], report: EvalReport) -> None:
    if not store["text"]:
        report.skipped["retrieval"] = "the data has no captions"
        return
    audio, text = torch.cat(store["audio"]), torch.cat(store["text"])
    sim = torch.einsum("te,ane->tan", text, audio).amax(dim=-1)
    report.metrics["retrieval"] = retrieval_metrics(sim, torch.cat(store["text_clip"]))


def _contrastive_classification(
    model: Stage1,
    store: dict[str, Any],
    vocabulary: list[str],
    prompt: str,
    report: EvalReport,
) -> None:
    if not any(store["labels"]) or not store["audio"]:
        report.skipped["classify_contrastive"] = "no labelled clip was read"
        return
    prompts = [prompt.format(label=v) for v in vocabulary]
    ids, mask = model.tokenize(model.tokenizer, prompts, model.hparams.max_text_len, False)
    text = model.text_embeddings(ids, mask).cpu()
    audio = torch.cat(store["audio"])
    report.metrics["classify_contrastive"] = contrastive_accuracy(
        audio, text, store["labels"], vocabulary
    )


def contrastive_accuracy(
    audio: torch.Tensor, text: torch.Tensor, labels: Sequence[Sequence[str]], vocabulary: list[str]
) -> dict[str, float]:
    """Zero-shot classification: clip ``a`` (``audio (A, N, E)``, one embedding per query) takes
    the label whose prompt embedding (``text (L, E)``) scores highest on its best query; right
    when that label is one of the clip's. Clips without labels are left out. ``chance`` is the
    accuracy of a uniform random guess."""
    best = torch.einsum("le,ane->aln", text, audio).amax(dim=-1).argmax(dim=1)
    labelled = [i for i, clip_labels in enumerate(labels) if clip_labels]
    hits = [vocabulary[int(best[i])] in labels[i] for i in labelled]
    chance = sum(len(labels[i]) for i in labelled) / len(labelled) / len(vocabulary)
    return {"accuracy": sum(hits) / len(hits), "chance": chance}
