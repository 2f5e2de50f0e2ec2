"""Instruction tuning: the queries read the instruction, the LLM answers it.

As InstructBLIP: the instruction is tokenised for the Q-Former and placed after the queries with
full attention between them (``mode="instruction"``), so what the queries extract from the audio
depends on what is asked; the projected queries, then the instruction as text, go to the frozen
LLM, which is trained on the answer. Each training clip gets one example drawn from a mix of tasks
and wordings (:class:`~slit_lightning.instructions.InstructionMix`); held-out wordings and tasks
stay for evaluation (``slit eval``). Everything of the Q-Former trains (the instruction passes
through its text path) except the LM head, which no loss here reaches; the projection trains too.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slit_lightning.instructions import (
    DEFAULT_MIX,
    TASKS,
    ClipText,
    InstructionMix,
    Wordings,
    batch_examples,
    can_do,
)
from slit_lightning.metrics.answers import answer_rows, score_answers
from slit_lightning.model.heads import soft_prompt
from slit_lightning.model.qformer import AudioKV
from slit_lightning.model.state import check_state
from slit_lightning.stages.base import CheckpointError, frozen_references
from slit_lightning.stages.stage2 import Stage2, _gather, _scored_on_rank_zero

log = logging.getLogger(__name__)

VALIDATION_TASKS = ("caption", "qa", "classify", "tag")


class Instruct(Stage2):
    """Instruction-tuning LightningModule (initialised from a stage-2 checkpoint).

    Args:
        encoder, bert, llm: as in stage 2 (the same encoder and LLM the checkpoint was trained on).
        init_from: stage-2 checkpoint (its Q-Former and projection), or a stage-1 checkpoint (the
            Q-Former only; the projection then starts untrained).
        tasks: task -> mixing weight of the training examples (see
            :data:`slit_lightning.instructions.TASKS`); default ``DEFAULT_MIX``.
        held_out_tasks: tasks never trained, kept for zero-shot evaluation.
        max_instruction_len: instructions are cut to this many Q-Former tokens.
        eval_tasks: tasks that validation and test generate answers for.
        eval_wordings: ``train`` (validation) or ``held_out`` (zero-shot wordings).
        seed: seed of the example draws (mixed with the step and the rank).
        **kwargs: the settings of :class:`Stage2` (queries, layers, generation, optimiser, ...).
    """

    # labelled or QA-only clips (instruction data, Clotho-AQA) have examples too
    needs_captions = False

    def __init__(
        self,
        encoder: str,
        bert: str,
        llm: str,
        init_from: str | None = None,
        tasks: dict[str, float] | None = None,
        held_out_tasks: tuple[str, ...] = ("choose",),
        max_instruction_len: int = 48,
        eval_tasks: tuple[str, ...] = VALIDATION_TASKS,
        eval_wordings: Wordings = "train",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, bert, llm, init_from=init_from, **kwargs)
        self.mix = InstructionMix(dict(tasks or DEFAULT_MIX), tuple(held_out_tasks))
        self.tokenizer = self.load_tokenizer(bert)
        for name, param in self.qformer.named_parameters():
            param.requires_grad_(not name.startswith("lm_head."))

    def load_stage1(self, path: str) -> dict[str, Any]:
        """The Q-Former (and, from a stage-2 checkpoint, the projection) of ``path``."""
        checkpoint = super().load_stage1(path)
        trained = checkpoint.get("hyper_parameters", {}).get("windows")
        if trained is not None and trained != self.hparams.windows:
            log.warning(
                "model.init_from: %s was trained reading %d window(s) per clip, this run reads %d;"
                " the weights fit, but the queries start out reading spans they were not trained"
                " on (set model.windows: %d to continue as trained)",
                path, trained, self.hparams.windows, trained,
            )  # fmt: skip
        llm = frozen_references(checkpoint).get("llm")
        if llm is not None and llm != self.llm.identity:
            raise CheckpointError(
                f"{path} was trained into LLM {llm!r}, but model.llm is {self.llm.identity!r}:"
                " its projection only fits its own LLM; set model.llm to that LLM"
            )
        proj = {
            k.removeprefix("llm_proj."): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("llm_proj.")
        }
        if proj:
            check_state(
                self.llm_proj.state_dict(),
                proj,
                f"model.init_from: the projection of {path} loaded into this Instruct",
                "Start from a stage-2 checkpoint trained into the same LLM",
            )
            self.llm_proj.load_state_dict(proj)
        return checkpoint

    # ------------------------------------------------------------------ the model

    def instructed_soft_prompt(self, kv: AudioKV, instructions: list[str]) -> Tensor:
        ids, mask = self.tokenize(
            self.tokenizer, instructions, self.hparams.max_instruction_len, pad_to_max=False
        )
        return soft_prompt(self.qformer, self.llm_proj, kv, self.hparams.windows, ids, mask)

    def caption(self, batch: dict[str, Any], settings: Any = None) -> list[str]:
        """A caption per clip, asked with the first training wording of the caption task."""
        size = (batch["features"] if "features" in batch else batch["audio"]).shape[0]
        return self.answer(batch, [TASKS["caption"][0][0]] * size, settings=settings)

    def attention_maps(self, batch: dict[str, Any]) -> tuple[dict[int, Tensor], Tensor]:
        """As :meth:`Stage2.attention_maps`, with the queries reading the caption instruction
        (what they look for depends on it)."""
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        ids, mask = self.tokenize(
            self.tokenizer,
            [TASKS["caption"][0][0]] * frames.shape[0],
            self.hparams.max_instruction_len,
            pad_to_max=False,
        )
        return self.qformer.cross_attention_weights(kv, ids, mask, self.hparams.windows), frames

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rng = random.Random(f"{self.hparams.seed}/{self.global_step}/{self.global_rank}")
        clips = ClipText.rows(batch)
        vocabulary = sorted({label for clip in clips for label in clip.labels})
        # a clip none of the mix's tasks can use (say, captions only under a QA-only mix) sits
        # out this step; every rank still runs the step (a clip-less batch gives a zero loss)
        rows = [
            i for i, c in enumerate(clips) if any(can_do(t, c, vocabulary) for t in self.mix.tasks)
        ]
        if len(rows) < len(clips):
            self.log("train/clips_without_task", float(len(clips) - len(rows)), reduce_fx="sum")
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        if not rows:
            return sum(p.sum() for p in self.llm_proj.parameters()) * 0.0
        if len(rows) < len(clips):
            kv = kv.select(torch.tensor(rows, device=self.device))
        examples = [self.mix.draw(clips[i], rng, vocabulary) for i in rows]
        instructions = [e.instruction for e in examples]
        soft = self.instructed_soft_prompt(kv, instructions)
        loss = self.llm.loss(
            soft, instructions, [e.answer for e in examples], self.hparams.max_target_len
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(examples))
        return loss

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def _start_evaluation(self, split: str) -> None:
        self._eval = {"task": [], "example": [], "prediction": [], "labels": [], "clip_id": []}
        # the split's label set, as `slit eval` reads it; None: the data module cannot say (a
        # plain loader), and each batch's labels stand in
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        labels = getattr(datamodule, "labels", None)
        self._vocabulary: list[str] | None = labels(split) if callable(labels) else None

    def _collect(self, batch: dict[str, Any]) -> None:
        rng = random.Random(f"eval/{batch['clip_id'][0]}")
        clips = ClipText.rows(batch)
        self._eval["labels"].extend(label for clip in clips for label in clip.labels)
        vocabulary = self._vocabulary
        if vocabulary is None:
            vocabulary = sorted({label for c in clips for label in c.labels})
        wordings = self.hparams.eval_wordings
        for task in self.hparams.eval_tasks:
            examples, rows = batch_examples(task, clips, wordings, rng, vocabulary)
            if not examples:
                continue
            answers = self.answer(batch, [e.instruction for e in examples], torch.tensor(rows))
            self._eval["task"] += [task] * len(examples)
            self._eval["example"] += examples
            self._eval["prediction"] += answers
            self._eval["clip_id"] += [batch["clip_id"][i] for i in rows]

    def report(self, split: str) -> None:
        store = _gather(self._eval)
        if not store["prediction"] or self.trainer.sanity_checking:
            return
        # every rank must take part in log_dir (a broadcast)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        vocabulary = self._vocabulary or sorted(set(store["labels"]))
        logged: dict[str, float] = {}
        for task in self.hparams.eval_tasks:
            picked = [i for i, t in enumerate(store["task"]) if t == task]
            if not picked:
                continue
            examples = [store["example"][i] for i in picked]
            predictions = [store["prediction"][i] for i in picked]
            if task in ("caption", "detailed"):
                scores = _scored_on_rank_zero(
                    {
                        "prediction": predictions,
                        "references": [list(e.references) for e in examples],
                    },
                    self.trainer.is_global_zero,
                )
            else:
                scores = score_answers(task, examples, predictions, vocabulary)
            logged |= {f"{split}/{task}_{k}": float(v) for k, v in scores.values.items()}
        self.log_dict(logged, sync_dist=False)
        if self.trainer.is_global_zero:
            _write_answers(folder / f"{split}_answers.json", store, logged)


def _write_answers(path: Path, store: dict[str, list[Any]], metrics: dict[str, float]) -> None:
    """Every instruction with its expected and generated answer, and the scores, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = answer_rows(store["clip_id"], store["example"], store["prediction"])
    path.write_text(json.dumps({"metrics": metrics, "answers": rows}, indent=1), encoding="utf-8")
