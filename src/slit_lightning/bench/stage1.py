"""Stage-1 step: ours against the same step done the way BLIP-2's reference code does it.

Ours projects each clip's cross-attention keys/values once per step and reuses them in every
pass (the matching pass reads each clip once for its two rows), looks the captions up once for
all their passes, skips the text positions of the matching pass's last layer (the matching head
reads the queries alone) and applies the vocabulary projection of the generation loss only where
a label is. The reference does what BLIP-2's ``Blip2Qformer`` does: the audio projected for the
query pass (B rows) and again for the one matching pass (3B rows), the captions embedded in each
pass, every layer computed in full, and vocabulary logits at every text position. Both reuse the
query pass's self-attention keys/values in the generation pass, as BLIP-2 does with
``past_key_values``. Same weights, inputs and sampled hard negatives: both must give the same losses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from slit_lightning.bench.measure import autocast, count_flops, interleaved, peak_memory, under
from slit_lightning.losses import generation_loss, labels_from_ids
from slit_lightning.stages import Stage1
from slit_lightning.stages.base import fused_adamw_supported

PRESETS = {
    "tiny": {"layers": 2, "width": 32, "heads": 4, "steps": 1, "audio_width": 64},  # tests
    "small": {"layers": 4, "width": 256, "heads": 4, "steps": 5, "audio_width": 768},
    "realistic": {"layers": 12, "width": 768, "heads": 12, "steps": 5, "audio_width": 768},
}


class FeatureStage1(Stage1):
    """Stage 1 fed precomputed encoder features (``batch["feats"]``), for timing the Q-Former
    side alone: the encoder is frozen and identical in both variants."""

    def encode_audio(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["feats"], batch["frames"]


class Blip2StyleStage1(FeatureStage1):
    """The reference: keys/values projected per pass and captions embedded per pass
    (``reuse_audio_kv=False``), the matching pass's last layer computed in full, and the
    generation loss over logits of every text position."""

    skip_unread_text = False

    def _generation_loss(
        self, query_states: Any, ids: torch.Tensor, mask: torch.Tensor, words: Any = None
    ) -> torch.Tensor:
        text = self.qformer(
            text_ids=ids, text_mask=mask, mode="causal", query_states=query_states
        ).text  # BLIP-2 too reuses the query pass (past_key_values)
        return generation_loss(self.qformer.lm_logits(text), labels_from_ids(ids, mask))


def save_models(folder: Path, preset: dict[str, int], audio_width: int) -> Path:
    """A random BERT of the preset's size (with the bert-base-uncased vocabulary) and a random
    built-in encoder of width ``audio_width``, saved where the stages load them from."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from slit_lightning.builtin.bert import minilm_path
    from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder / "bert")
    bert = BertConfig(
        hidden_size=preset["width"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        intermediate_size=4 * preset["width"],
    )
    BertForMaskedLM(bert).save_pretrained(folder / "bert")
    encoder = SmallAudioConfig(hidden_size=audio_width, num_hidden_layers=1, num_attention_heads=8)
    SmallAudioModel(encoder).save_pretrained(folder / "encoder")
    return folder


def feature_batch(batch_size: int, frames: int, width: int, device: str) -> dict[str, Any]:
    """Random encoder features and fixed captions (over 32 BERT tokens each)."""
    return {
        "feats": torch.randn(batch_size, frames, width, device=device),
        "frames": torch.ones(batch_size, frames, dtype=torch.bool, device=device),
        # 32 BERT tokens each once truncated at max_text_len (the text length)
        "caption": [
            " then ".join(f"a loud sound number {i * 5 + k} over soft noise" for k in range(4))
            for i in range(batch_size)
        ],
        "clip_key": torch.arange(batch_size, device=device),
    }


def _record_losses(model: Stage1) -> dict[str, float]:
    """Route the stage's logging into a dict (no Trainer here)."""
    record: dict[str, float] = {}
    model.log_dict = lambda values, **_: record.update(  # type: ignore[method-assign]
        {k: float(v.detach()) for k, v in values.items()}
    )
    model.log = lambda *_, **__: None  # type: ignore[method-assign]
    return record


def training_step(model: Any, batch: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    """One forward + backward + AdamW step of a stage, as a callable, and its optimiser."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-9, fused=fused_adamw_supported(params))

    def step() -> None:
        model.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def forward_backward_flops(model: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one forward + backward of a stage's training step (gradients cleared after)."""
    flops = count_flops(lambda: model.training_step(batch, 0).backward())
    model.zero_grad(set_to_none=True)
    return flops


def bench_stage1_kv_reuse(
    preset: str,
    frames: int,
    batch_size: int = 8,
    peak_flops: float | None = None,
    steps: int | None = None,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Ours vs BLIP-2-style stage-1 step at ``frames`` audio frames; throughput, memory, MFU.

    The losses are compared in float32; the timed steps run at ``precision``."""
    sizes = PRESETS[preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_models(Path(tmp), sizes, audio_width=sizes["audio_width"])
        common = {"num_queries": 32, "max_text_len": 32, "qformer_dropout": 0.0}
        ours = FeatureStage1(str(folder / "encoder"), str(folder / "bert"), **common)
        reference = Blip2StyleStage1(
            str(folder / "encoder"), str(folder / "bert"), reuse_audio_kv=False, **common
        )
    reference.load_state_dict(ours.state_dict())
    batch = feature_batch(batch_size, frames, sizes["audio_width"], device)
    models = [ours.to(device).train(), reference.to(device).train()]
    records = [_record_losses(m) for m in models]
    losses = []
    for model, record in zip(models, records, strict=True):
        model.training_step(batch, 0)  # same weights, same per-step negatives: same losses
        losses.append([record[f"train/loss_{k}"] for k in ("atc", "atm", "atg")])
    flops = [forward_backward_flops(m, batch) for m in models]
    (step, optimizer), (ref_step, _) = [training_step(m, batch) for m in models]
    works = [under(precision, step), under(precision, ref_step)]
    ours_s, ref_s = interleaved(works, steps or sizes["steps"])
    with peak_memory(ours, optimizer) as memory, autocast(precision):
        step()
    same = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(*losses, strict=True))
    result = {
        "name": f"stage1_step_kv_reuse_T{frames}",
        "preset": preset,
        "precision": precision,
        "batch": batch_size,
        "frames": frames,
        "ours_s": round(ours_s, 4),
        "blip2_style_s": round(ref_s, 4),
        "speedup": round(ref_s / ours_s, 3),
        "losses_ours": losses[0],
        "losses_blip2_style": losses[1],
        "same_losses": same,
        "samples_per_s": round(batch_size / ours_s, 3),
        "peak_memory_mib": round(memory["peak_mib"], 1),
        "memory_kind": memory["kind"],
        "flop_per_step_ours": flops[0],
        "flop_per_step_blip2_style": flops[1],
    }
    if peak_flops:
        result["mfu_ours"] = round(flops[0] / ours_s / peak_flops, 3)
        result["mfu_blip2_style"] = round(flops[1] / ref_s / peak_flops, 3)
    return result


DEMO_STAGE1 = {"layers": 3, "width": 384, "heads": 12, "audio_width": 256, "frames": 125,
               "num_queries": 8, "cross_attention_freq": 1, "batch_size": 32, "steps": 5}  # fmt: skip
"""The shape of the demo's stage 1 (``conf/stage1.yaml``: MiniLM's first 3 layers, 8 queries,
the built-in encoder's 125 frames of 5 s, batch 32)."""


def bench_cpu_attention_kernel(
    shape: dict[str, int] | None = None, steps: int | None = None
) -> dict[str, Any]:
    """A stage-1 step on the CPU, the Q-Former's attention on PyTorch's math kernel (what
    ``qformer_layers.CPU_MATH_ATTENTION`` chooses) against the kernel PyTorch picks itself, at
    both precisions; the same weights and batch, timed in turn. ``shape``: sizes as
    :data:`DEMO_STAGE1` (the default)."""
    from slit_lightning.model import qformer_layers

    shape = {**DEMO_STAGE1, **(shape or {})}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_models(Path(tmp), shape, audio_width=shape["audio_width"])
        model = FeatureStage1(
            str(folder / "encoder"),
            str(folder / "bert"),
            num_queries=shape["num_queries"],
            cross_attention_freq=shape["cross_attention_freq"],
            max_text_len=32,
            qformer_dropout=0.0,
        ).train()
    batch = feature_batch(shape["batch_size"], shape["frames"], shape["audio_width"], "cpu")
    step, _ = training_step(model, batch)

    def kernel(math: bool, work: Any) -> Any:
        def run() -> object:
            before = qformer_layers.CPU_MATH_ATTENTION
            qformer_layers.CPU_MATH_ATTENTION = math
            try:
                return work()
            finally:
                qformer_layers.CPU_MATH_ATTENTION = before

        return run

    result: dict[str, Any] = {"name": "cpu_attention_kernel_stage1", "shape": shape}
    for precision in ("32-true", "bf16-mixed"):
        timed = [kernel(math, under(precision, step)) for math in (True, False)]
        math_s, chosen_s = interleaved(timed, steps or shape["steps"])
        result[precision] = {
            "math_s": round(math_s, 4),
            "pytorch_choice_s": round(chosen_s, 4),
            "speedup": round(chosen_s / math_s, 3),
        }
    return result
