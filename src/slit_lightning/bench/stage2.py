"""Stage-2 training step: samples/s, peak memory and MFU with a 125M-class frozen LLM (OPT-125m's
shape, random weights: the timing does not depend on them) behind the preset's Q-Former."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from slit_lightning.bench.measure import autocast, interleaved, peak_memory, under
from slit_lightning.bench.stage1 import (
    PRESETS,
    feature_batch,
    forward_backward_flops,
    save_models,
    training_step,
)
from slit_lightning.stages import Stage2

#: the LLM per preset: layers, width, heads, vocabulary (OPT-125m: 12 x 768, 50272 words)
LLM_SIZES = {
    "tiny": (2, 64, 4, 1000),
    "small": (12, 768, 12, 50272),
    "realistic": (12, 768, 12, 50272),
}


class FeatureStage2(Stage2):
    """Stage 2 fed precomputed encoder features, as `FeatureStage1`."""

    def encode_audio(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["feats"], batch["frames"]


def save_llm(folder: Path, preset: str) -> Path:
    """An OPT-shaped causal LM with random weights and a small BPE tokenizer, saved locally."""
    from transformers import OPTConfig, OPTForCausalLM

    from slit_lightning.builtin.llm import train_tokenizer

    layers, width, heads, vocab = LLM_SIZES[preset]
    words = [f"sound {i} then a long tone number {i * 7} over noise" for i in range(200)]
    tokenizer = train_tokenizer(words, vocab_size=600, max_length=512)
    config = OPTConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, ffn_dim=4 * width, word_embed_proj_dim=width,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bench_stage2_step(
    preset: str,
    frames: int,
    batch_size: int = 8,
    peak_flops: float | None = None,
    steps: int | None = None,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Median seconds of a stage-2 step (forward + backward through the frozen LLM + AdamW)
    at ``precision``."""
    sizes = PRESETS[preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_models(Path(tmp), sizes, audio_width=sizes["audio_width"])
        save_llm(folder / "llm", preset)
        model = FeatureStage2(
            str(folder / "encoder"), str(folder / "bert"), str(folder / "llm"),
            num_queries=32, max_target_len=32, qformer_dropout=0.0,
        )  # fmt: skip
    model = model.to(device).train()
    model.log = lambda *_, **__: None  # type: ignore[method-assign]  (no Trainer here)
    batch = feature_batch(batch_size, frames, sizes["audio_width"], device)
    batch["caption"] = [  # 32 target tokens each (cut at max_target_len), then EOS
        " then ".join(f"a long tone number {i * 7 + k} over noise" for k in range(4))
        for i in range(batch_size)
    ]
    step, optimizer = training_step(model, batch)
    flops = forward_backward_flops(model, batch)
    (step_s,) = interleaved([under(precision, step)], steps or sizes["steps"])
    with peak_memory(model, optimizer) as memory, autocast(precision):
        step()
    targets = model.llm.tokenizer(batch["caption"])["input_ids"]
    result = {
        "name": f"stage2_step_T{frames}",
        "preset": preset,
        "precision": precision,
        "llm": "OPT-125m-shaped (12 x 768)" if preset != "tiny" else "OPT-shaped (2 x 64)",
        "batch": batch_size,
        "frames": frames,
        "target_tokens_mean": round(sum(map(len, targets)) / batch_size, 1),
        "step_s": round(step_s, 4),
        "samples_per_s": round(batch_size / step_s, 3),
        "peak_memory_mib": round(memory["peak_mib"], 1),
        "memory_kind": memory["kind"],
        "trainable_parameters": model.trainable_parameters(),
        "flop_per_step": flops,
    }
    if peak_flops:
        result["mfu"] = round(flops / step_s / peak_flops, 3)
    return result
