"""What every stage shares: the frozen audio encoder, the Q-Former's tokenizer, the optimiser."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from slit_lightning.model.encoders import AudioEncoder, HFAudioEncoder
from slit_lightning.model.state import (
    FROZEN_REFERENCES,
    STAGE_KEY,
    CheckpointError,
    check_state,
    frozen_references,
    stage_of,
)
from slit_lightning.training.checkpointing import NonFiniteGuard, RNGState
from slit_lightning.training.schedule import warmup_cosine

__all__ = ["CheckpointError", "SLITStage", "frozen_references", "gathered", "stage_of"]

log = logging.getLogger(__name__)


class SLITStage(LightningModule):
    """Base of the stage modules: owns the frozen encoder and the optimisation recipe.

    The encoder is loaded by name (hub id or local folder) through the same ``from_pretrained``
    path for a real model and for the built-in one, frozen (no grad, always in eval mode, out of
    the optimiser) and, unless ``save_encoder_weights``, left out of checkpoints: a checkpoint
    records which encoder it was trained with and refuses to load onto another one.

    Args:
        encoder: hub id or folder of the frozen audio encoder.
        encoder_layer: which hidden layer to take (-1 last, -2 penultimate).
        encoder_window: ``"full"`` (default: each clip padded to a fixed-window encoder's window,
            as the encoder was trained) or ``"clip"`` (Whisper only: the encoder runs on each
            clip's own length, less work on short clips; see
            :class:`~slit_lightning.model.encoders.HFAudioEncoder`).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never applied to biases, norms, queries, temperature).
        warmup_steps: linear warm-up from 0 to ``lr``; then cosine decay to ``lr * min_lr_ratio``
            at the trainer's last step.
        min_lr_ratio: floor of the cosine decay, relative to ``lr``.
        betas: AdamW betas.
        save_encoder_weights: also store the frozen encoder's weights in checkpoints.
        max_nonfinite_steps: training steps with a NaN/inf loss are skipped; this many in a row
            stop the run (see :class:`slit_lightning.training.checkpointing.NonFiniteGuard`).
    """

    def __init__(
        self,
        encoder: str,
        encoder_layer: int = -1,
        encoder_window: str = "full",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        save_encoder_weights: bool = False,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # the stage's own call merges its arguments into these
        self.encoder: AudioEncoder = HFAudioEncoder.from_pretrained(
            encoder, layer=encoder_layer, window=encoder_window
        )

    # ------------------------------------------------------------------ pieces for the stages

    #: whether training and scoring read reference captions (clips without any are then skipped)
    needs_captions = True

    def setup(self, stage: str) -> None:
        # Features cached for this very encoder replace decoding and encoding (see data.features)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "use_feature_cache"):
            datamodule.use_feature_cache(self.encoder.identity)
            # predicting needs no reference text: labelled or QA-only clips are welcome
            datamodule.require_captions = self.needs_captions and stage != "predict"

    def encode_audio(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Frozen features ``(B, T, D)`` and frame mask ``(B, T)`` of a batch: its waveforms
        ``(B, S)`` through the encoder, or the features cached for this encoder."""
        if "features" in batch:
            if batch["feature_identity"] != self.encoder.identity:
                raise ValueError(
                    f"batch features come from encoder {batch['feature_identity']!r}, but this"
                    f" model's encoder is {self.encoder.identity!r}"
                )
            return batch["features"].float(), batch["feature_mask"]
        with torch.no_grad():
            return self.encoder(batch["audio"], batch["audio_mask"])

    @staticmethod
    def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
        """The tokenizer that belongs to a text model, by hub id or local folder."""
        return AutoTokenizer.from_pretrained(name_or_path)

    def tokenize(
        self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int, pad_to_max: bool
    ) -> tuple[Tensor, Tensor]:
        """Texts -> ``ids (B, L)``, ``mask (B, L)`` on this module's device."""
        tokens = tokenizer(
            texts,
            padding="max_length" if pad_to_max else "longest",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def trainable_parameters(self) -> int:
        """Number of parameters the optimiser updates (the frozen parts excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def on_fit_start(self) -> None:
        # Lightning then warns that modules are in eval mode: that is the frozen encoder, on purpose
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", UserWarning)
        count = self.trainable_parameters()
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("trainable parameters: %s; frozen: %s", f"{count:,}", f"{frozen:,}")
        if self.logger is not None:
            self.logger.log_hyperparams(
                {"trainable_parameters": count, "frozen_parameters": frozen}
            )

    # ------------------------------------------------------------------ evaluation

    def attention_maps(self, batch: dict[str, Any]) -> tuple[dict[int, Tensor], Tensor]:
        """How the queries read each clip of ``batch`` (the dashboard draws it): cross-attention
        layer -> ``(B, heads, N, T)`` probabilities over the frames, and the frame mask ``(B, T)``.
        Every stage owns a ``qformer``."""
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        return self.qformer.cross_attention_weights(kv), frames

    def on_validation_epoch_end(self) -> None:
        self.report("val")

    def on_test_epoch_end(self) -> None:
        self.report("test")

    def report(self, split: str) -> None:
        """Log the ``split`` metrics of what this epoch's evaluation steps collected."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation

    def configure_callbacks(self) -> list[Callback]:
        # What every stage's training needs, whatever the trainer's configuration lists
        return [NonFiniteGuard(self.hparams.max_nonfinite_steps), RNGState()]

    def _grad_scaler(self) -> Any:
        """The fp16 gradient scaler of the run's precision plugin (None for 32, bf16)."""
        trainer = self._trainer  # None outside a Trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as ``trainer.gradient_clip_val`` says, under every precision and strategy.

        Lightning's own clipping refuses a fused optimizer under any mixed precision (bf16 has
        no gradient scaler, so nothing needs unscaling first) and refuses norm clipping under
        FSDP, whose sharded gradients need the root module's ``clip_grad_norm_``. Both are the
        presets' settings, so without a gradient scaler this clips directly.
        """
        if not gradient_clip_val:
            return
        if self._grad_scaler() is not None:  # fp16: Lightning unscales, then clips
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        sharded = getattr(self.trainer.strategy.model, "clip_grad_norm_", None)  # FSDP root
        if callable(sharded):
            sharded(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            plain = param.ndim < 2 or name.endswith("query_tokens")
            (no_decay if plain else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            # fp16's gradient scaler: Lightning unscales before clipping, which a fused AdamW
            # (it unscales inside its kernel) does not allow
            fused=fused_adamw_supported(decay + no_decay) and self._grad_scaler() is None,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        if self.trainer.ckpt_path is None:
            # a fresh run learns its length (and fails on an unknown one) now; a resumed run
            # must not, since reading the data this early would start before the checkpoint's
            # data position is restored (the schedule asks once warm-up is over)
            self._run_length()
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        total = self._run_length() if step > hp.warmup_steps else hp.warmup_steps
        return warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)

    def _run_length(self) -> int:
        """Optimiser steps of the whole run (what the cosine decay spans)."""
        if getattr(self, "_total_steps", None) is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                raise ValueError(
                    "the learning-rate schedule needs the run's length, and the training data's"
                    " length is unknown (streamed shards): set trainer.max_steps"
                )
            self._total_steps = int(total)
        return self._total_steps

    # ------------------------------------------------------------------ checkpoints

    def frozen_parts(self) -> dict[str, tuple[str, bool]]:
        """Frozen sub-modules: attribute name -> (identity, whether checkpoints hold its weights).

        A part whose weights are left out is saved by reference: the checkpoint records its
        identity and refuses to load onto a module built from anything else."""
        return {"encoder": (self.encoder.identity, self.hparams.save_encoder_weights)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parts = self.frozen_parts()
        checkpoint[FROZEN_REFERENCES] = {name: identity for name, (identity, _) in parts.items()}
        checkpoint[STAGE_KEY] = type(self).__name__
        state = checkpoint["state_dict"]
        for name, (_, keep) in parts.items():
            if not keep:
                for key in [k for k in state if k.startswith(f"{name}.")]:
                    del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before Lightning's strict load: a clear refusal instead of torch's raw key/size errors
        ours, theirs = type(self).__name__, stage_of(checkpoint)
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"this is a {theirs} checkpoint, but the model is {ours}: resume a run with the"
                f" config of the stage that wrote it; to start {ours} from an earlier stage, set"
                " model.init_from to the checkpoint instead of passing it as ckpt_path"
            )
        saved = frozen_references(checkpoint)
        for name, (identity, _) in self.frozen_parts().items():
            if name in saved and saved[name] != identity:
                raise CheckpointError(
                    f"this checkpoint was trained on {name} {saved[name]!r} but the model was built"
                    f" with {identity!r}; set model.{name} to the checkpoint's {name}"
                )
        state = checkpoint.get("state_dict")
        if state is None:  # a sharded checkpoint's metadata: the strategy loads the weights
            return
        for name in self.frozen_parts():
            if not any(k.startswith(f"{name}.") for k in state):
                # saved by reference: the part just loaded from its folder is the one it names
                module = getattr(self, name)
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        check_state(
            self.state_dict(),
            state,
            f"the {theirs or 'unknown-stage'} checkpoint loaded into this {ours}",
            "Build the model with the checkpoint's settings (num_queries, qformer_layers, bert,"
            " embed_dim, ...): resume with the config of the run that wrote it",
        )


def fused_adamw_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update ``params``: one kernel for all tensors
    instead of a dozen element-wise ops each, much faster on a CPU too (docs/benchmarks.md)."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )


def gathered(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable value) in rank order; ``[obj]`` outside a process
    group. What the stages' evaluation collects is gathered this way before it is scored."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
