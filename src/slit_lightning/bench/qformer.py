"""Our Q-Former against transformers' ``InstructBlipQFormerModel``, forward + backward on
``[queries; instruction text]`` reading the audio, same config, weights (converted) and inputs."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from slit_lightning.bench.measure import interleaved, under
from slit_lightning.bench.stage1 import PRESETS
from slit_lightning.model.qformer import QFormer, QFormerConfig


def _pair(preset: str, num_queries: int) -> tuple[QFormer, Any, torch.nn.Parameter]:
    """Ours and transformers' Q-Former holding the same random weights."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    sizes = PRESETS[preset]
    hf_config = InstructBlipQFormerConfig(
        hidden_size=sizes["width"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], intermediate_size=4 * sizes["width"],
        encoder_hidden_size=sizes["audio_width"], cross_attention_frequency=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = InstructBlipQFormerModel(hf_config)
    query_tokens = torch.nn.Parameter(torch.randn(1, num_queries, sizes["width"]) * 0.02)
    state = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    config = QFormerConfig.from_hf(hf_config, num_queries=num_queries)
    with warnings.catch_warnings():  # transformers' Q-Former has no LM head: ours keeps its own
        warnings.simplefilter("ignore", UserWarning)
        ours = QFormer.from_state_dict(
            state | {"query_tokens": query_tokens.detach()}, "hf_instructblip", config, strict=False
        )
    return ours, reference, query_tokens


def bench_qformer_vs_instructblip(
    preset: str,
    frames: int = 250,
    batch_size: int = 8,
    text_len: int = 32,
    num_queries: int = 32,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Seconds of forward + backward of each at ``precision``, interleaved; the ratio; the
    output difference (in float32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, reference, query_tokens = _pair(preset, num_queries)
    ours, reference = ours.to(device).train(), reference.to(device).train()
    query_tokens = torch.nn.Parameter(query_tokens.detach().to(device))
    gen = torch.Generator().manual_seed(1)
    audio = torch.randn(batch_size, frames, PRESETS[preset]["audio_width"], generator=gen)
    audio, audio_mask = audio.to(device), torch.ones(batch_size, frames, dtype=torch.bool)
    audio_mask[1:, frames // 2 :] = False  # most clips padded: masks must be honoured
    audio_mask = audio_mask.to(device)
    ids = torch.randint(1000, 30000, (batch_size, text_len), generator=gen).to(device)
    text_mask = torch.ones(batch_size, text_len, dtype=torch.long, device=device)
    hf_mask = torch.cat([torch.ones_like(text_mask[:, :num_queries]), text_mask], dim=1)

    def run_ours() -> torch.Tensor:
        out = ours(audio, audio_mask, ids, text_mask, mode="instruction")
        return torch.cat([out.query, out.text], dim=1)

    def run_reference() -> torch.Tensor:
        return reference(
            input_ids=ids, attention_mask=hf_mask,
            query_embeds=query_tokens.expand(batch_size, -1, -1),
            encoder_hidden_states=audio, encoder_attention_mask=audio_mask.long(),
        ).last_hidden_state  # fmt: skip

    with torch.no_grad():
        difference = (run_ours() - run_reference()).abs().max().item()

    def step(run: Any, module: torch.nn.Module) -> Any:
        def forward_backward() -> None:
            run().square().mean().backward()
            module.zero_grad(set_to_none=True)
            query_tokens.grad = None

        return forward_backward

    works = [step(run_ours, ours), step(run_reference, reference)]
    ours_s, ref_s = interleaved([under(precision, work) for work in works], 3)
    return {
        "name": f"qformer_vs_instructblip_T{frames}",
        "preset": preset,
        "precision": precision,
        "batch": batch_size,
        "frames": frames,
        "text_tokens": text_len,
        "ours_s": round(ours_s, 4),
        "instructblip_s": round(ref_s, 4),
        "speedup": round(ref_s / ours_s, 3),
        "max_output_difference": difference,
        "same_outputs": difference < 1e-3,
    }
