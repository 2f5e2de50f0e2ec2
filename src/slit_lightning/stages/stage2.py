"""Stage 2, generative learning: the stage-1 Q-Former feeds a frozen LLM through a projection.

The queries read the audio (the stage-1 uni-modal path), a linear layer maps them to the LLM's
width, and the LLM learns nothing: only the Q-Former's query path and the projection train, on
the LLM's loss for the caption (see :class:`~slit_lightning.model.llm.FrozenLLM` for the layout).
Validation and test generate a caption per clip and score it against all of the clip's
references with the captioning metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from slit_lightning.metrics.captioning import CaptionScores, caption_metrics, require_java
from slit_lightning.model.heads import soft_prompt
from slit_lightning.model.llm import FrozenLLM, Generation
from slit_lightning.model.qformer import AudioKV, QFormer
from slit_lightning.model.state import check_state, read_checkpoint
from slit_lightning.stages.base import (
    CheckpointError,
    SLITStage,
    frozen_references,
    gathered,
    stage_of,
)

log = logging.getLogger(__name__)

# Q-Former weights that only text passes use: stage 2 keeps them (instruction tuning needs them)
# but does not train them, since no stage-2 loss reaches them.
TEXT_ONLY = ("embeddings.word.", "embeddings.position.", "lm_head.")
TEXT_FFN = ".ffn."


class Stage2(SLITStage):
    """Stage-2 LightningModule.

    Args:
        encoder: hub id or folder of the frozen audio encoder (the one stage 1 was trained on).
        bert: the BERT the stage-1 Q-Former was built from (sizes and tokenizer).
        llm: hub id or folder of the frozen LLM (causal or encoder-decoder).
        init_from: stage-1 checkpoint whose Q-Former this stage starts from (None: straight
            from ``bert``, with a warning: the queries then know nothing of audio).
        num_queries: learned queries (as in stage 1).
        windows: the queries read each of this many equal time spans of a clip, and the LLM gets
            the spans' outputs in time order (SALMONN's window-level Q-Former; ``num_queries *
            windows`` soft-prompt vectors). 1 reads the clip whole (BLIP-2). Windows tell the LLM
            which event came first; the queries' weights are the same whatever the count.
        cross_attention_freq: cross-attention in every n-th layer (as in stage 1).
        qformer_layers: first n layers of ``bert`` (as in stage 1).
        qformer_dropout: Q-Former dropout (None: ``bert``'s own).
        prompt: text between the soft prompt and the caption, e.g. ``"A short caption:"``.
        max_target_len: captions are cut to this many LLM tokens (then EOS).
        llm_dtype: LLM weights dtype (``float32``, ``bfloat16``, ``float16``; None: float32).
        trust_remote_code: let transformers run model code shipped with a hub LLM.
        save_llm_weights: also store the frozen LLM's weights in checkpoints.
        generation: decoding settings for validation, test and ``slit caption``.
        **kwargs: the shared settings of :class:`SLITStage` (encoder layer, optimiser, checkpoint).
    """

    def __init__(
        self,
        encoder: str,
        bert: str,
        llm: str,
        init_from: str | None = None,
        num_queries: int = 32,
        windows: int = 1,
        cross_attention_freq: int = 2,
        qformer_layers: int | None = None,
        qformer_dropout: float | None = None,
        prompt: str = "",
        max_target_len: int = 40,
        llm_dtype: str | None = None,
        trust_remote_code: bool = False,
        save_llm_weights: bool = False,
        generation: Generation | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if windows < 1:
            raise ValueError(f"model.windows must be a positive number of spans; got {windows}")
        if isinstance(generation, dict):  # as stored in a checkpoint's hyper-parameters
            generation = Generation(**generation)
        self.generation = generation or Generation()
        # a plain dict in the hyper-parameters: checkpoints then load with weights_only=True
        self.save_hyperparameters(ignore=["generation"])
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        self.qformer = QFormer.from_bert(
            bert,
            num_queries,
            cross_attention_freq,
            encoder_width=self.encoder.width,
            num_layers=qformer_layers,
            dropout=qformer_dropout,
        )
        self.llm = FrozenLLM.from_pretrained(llm, llm_dtype, trust_remote_code)
        self.llm_proj = nn.Linear(self.qformer.config.hidden_size, self.llm.width)
        if init_from is not None:
            self.load_stage1(init_from)
        freeze_text_path(self.qformer)
        self._eval: dict[str, list[Any]] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # scoring captions needs java: fail before training, not at the first validation's end
        # (`predict` only generates, and a fit that never validates scores nothing)
        if stage in ("validate", "test") or (stage == "fit" and self._fit_validates()):
            require_java()

    def _fit_validates(self) -> bool:
        """Whether this fit will run validation: it has val data and batches to take from it."""
        trainer = self.trainer
        loop = getattr(trainer.fit_loop.epoch_loop, "val_loop", None)
        source = getattr(loop, "_data_source", None)  # Lightning's; absent: assume it validates
        has_data = source.is_defined() if source is not None else True
        return has_data and trainer.limit_val_batches != 0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.init_from is None and self.trainer.ckpt_path is None:
            log.warning(
                "model.init_from is not set: the Q-Former starts from %s, not from stage 1",
                self.hparams.bert,
            )

    def frozen_parts(self) -> dict[str, tuple[str, bool]]:
        return super().frozen_parts() | {"llm": (self.llm.identity, self.hparams.save_llm_weights)}

    def load_stage1(self, path: str) -> dict[str, Any]:
        """Take the Q-Former from a stage-1 checkpoint (loaded with ``weights_only=True``);
        returns the checkpoint."""
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model.init_from: no stage-1 checkpoint at {path}; train one with"
                " `slit fit --config conf/stage1.yaml` (it writes .../checkpoints/last.ckpt)"
            )
        checkpoint = read_checkpoint(path)
        encoder = frozen_references(checkpoint).get("encoder")
        if encoder is not None and encoder != self.encoder.identity:
            raise CheckpointError(
                f"{path} was trained on encoder {encoder!r}, but model.encoder is"
                f" {self.encoder.identity!r}: the Q-Former only understands its own encoder's"
                " features; set model.encoder to the stage-1 encoder"
            )
        prefix = "qformer."
        weights = {
            k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
        }
        if not weights:
            raise CheckpointError(
                f"model.init_from: {path} holds no Q-Former weights (qformer.*): not a stage"
                " checkpoint"
            )
        check_state(
            self.qformer.state_dict(),
            weights,
            f"model.init_from: the Q-Former of {path} ({stage_of(checkpoint) or 'unknown stage'})"
            f" loaded into this {type(self).__name__}'s Q-Former",
            "Set model.num_queries, model.qformer_layers, model.cross_attention_freq and"
            " model.bert to the values that checkpoint was trained with",
        )
        self.qformer.load_converted(weights, strict=True)
        return checkpoint

    # ------------------------------------------------------------------ the model

    def soft_prompt(self, kv: AudioKV) -> Tensor:
        """Queries read the audio -> ``(B, N * windows, W)`` inputs for the LLM (``W`` its width)."""
        return soft_prompt(self.qformer, self.llm_proj, kv, self.hparams.windows)

    def audio_soft_prompt(self, batch: dict[str, Any]) -> Tensor:
        """Waveforms ``(B, S)`` (+ mask) -> soft prompt ``(B, N * windows, W)``."""
        feats, frames = self.encode_audio(batch)
        return self.soft_prompt(self.qformer.audio_keys_values(feats, frames))

    def instructed_soft_prompt(self, kv: AudioKV, instructions: list[str]) -> Tensor:
        """The soft prompt for clips asked ``instructions``: stage 2's queries do not read the
        instruction (instruction tuning's do)."""
        return self.soft_prompt(kv)

    def answer(
        self,
        batch: dict[str, Any],
        instructions: list[str],
        rows: Tensor | None = None,
        settings: Generation | None = None,
    ) -> list[str]:
        """Answers to ``instructions``, the ``i``-th about clip ``rows[i]`` of ``batch`` (default:
        one instruction per clip). The instruction is the LLM's text prompt."""
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        if rows is not None:
            kv = kv.select(rows.to(self.device))
        soft = self.instructed_soft_prompt(kv, instructions)
        return self.llm.generate(soft, instructions, settings or self.generation)

    def attention_maps(self, batch: dict[str, Any]) -> tuple[dict[int, Tensor], Tensor]:
        """As :meth:`SLITStage.attention_maps`, each window's queries in turn: ``(B, heads,
        N * windows, T)``, every query reading its own window's frames."""
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        return self.qformer.cross_attention_weights(kv, windows=self.hparams.windows), frames

    def caption(self, batch: dict[str, Any], settings: Generation | None = None) -> list[str]:
        """One generated caption per clip of ``batch`` (``audio``, ``audio_mask``)."""
        soft = self.audio_soft_prompt(batch)
        prompts = [self.hparams.prompt] * soft.shape[0]
        return self.llm.generate(soft, prompts, settings or self.generation)

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        soft = self.audio_soft_prompt(batch)
        prompts = [self.hparams.prompt] * soft.shape[0]
        loss = self.llm.loss(soft, prompts, batch["caption"], self.hparams.max_target_len)
        size = soft.shape[0]
        self.log("train/loss_lm", loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    # ------------------------------------------------------------------ captioning evaluation

    def on_validation_epoch_start(self) -> None:
        self._eval = {"clip_id": [], "prediction": [], "references": []}

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """``slit predict``: one caption per clip, with the clip's id."""
        captions = self.caption(batch)
        return [
            {"clip_id": c, "caption": t} for c, t in zip(batch["clip_id"], captions, strict=True)
        ]

    def _collect(self, batch: dict[str, Any]) -> None:
        self._eval["clip_id"].extend(batch["clip_id"])
        self._eval["prediction"].extend(self.caption(batch))
        self._eval["references"].extend(batch["captions"])

    def report(self, split: str) -> None:
        store = _gather(self._eval)
        if not store["prediction"] or self.trainer.sanity_checking:
            return
        # every rank must take part in log_dir (a broadcast) and in the scores' broadcast
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        scores = _scored_on_rank_zero(store, self.trainer.is_global_zero)
        for name, reason in scores.unavailable.items():
            log.info("%s/%s unavailable: %s", split, name, reason)
        self.log_dict({f"{split}/{k}": float(v) for k, v in scores.values.items()}, sync_dist=False)
        if self.trainer.is_global_zero:
            _write_captions(folder / f"{split}_captions.json", store, scores)


def _scored_on_rank_zero(store: dict[str, list[Any]], is_zero: bool) -> CaptionScores:
    """Caption metrics computed once (the Java scorers are heavy and share files), on rank 0, and
    sent to every rank so all of them log the same keys."""
    scores = caption_metrics(store["prediction"], store["references"]) if is_zero else None
    if dist.is_available() and dist.is_initialized():
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    assert scores is not None
    return scores


def _write_captions(path: Path, store: dict[str, list[Any]], scores: CaptionScores) -> None:
    """Every clip's caption and references, and the scores, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"clip_id": c, "prediction": p, "references": r}
        for c, p, r in zip(store["clip_id"], store["prediction"], store["references"], strict=True)
    ]
    report = {"metrics": scores.values, "unavailable": scores.unavailable, "captions": rows}
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    log.info("captions written to %s", path)


def freeze_text_path(qformer: QFormer) -> None:
    """Stop training the Q-Former weights only text passes use (word/position embeddings, the LM
    head, the text feed-forwards): the query path alone feeds the LLM."""
    for name, param in qformer.named_parameters():
        if name.startswith(TEXT_ONLY) or TEXT_FFN in name:
            param.requires_grad_(False)


def _gather(store: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Every rank's collected captions (one list per key, rank order)."""
    parts = gathered(store)
    return {key: [x for part in parts for x in part[key]] for key in store}
