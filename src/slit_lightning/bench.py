"""`make bench`: measured ratios, side by side in one run, written as JSON.

Stage-1 step: ours (each clip's cross-attention keys/values projected once per step and reused by
every pass) against the same step done the way BLIP-2's reference code does it (the audio projected
again for each matching pass: B rows for the query pass plus 3B for matching), with the same
weights, inputs and sampled hard negatives. Both must give the same losses; the ratio of their
step times is the figure.

    python -m slit_lightning.bench --out runs/bench/bench.json [--preset small|realistic]

The ``realistic`` preset is the shape of a real run (Q-Former 12 x 768, 32 queries, audio width
768 at T = 250 and T = 1500, text 32 tokens, batch 8); ``small`` (4 x 256) keeps a CPU run to
minutes. The device and preset are recorded with every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slit_lightning.stages import Stage1

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


def _models(folder: Path, preset: dict[str, int], audio_width: int) -> Path:
    """A random BERT of the preset's size (with the bert-base-uncased vocabulary) and a random
    built-in encoder of width ``audio_width``, saved where Stage1 loads them from."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from slit_lightning.encoder_small import SmallAudioConfig, SmallAudioModel
    from slit_lightning.qformer import minilm_path

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


def _one_step(model: Stage1, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    """Seconds of one forward + backward + AdamW step (hard negatives drawn from seed 0)."""
    torch.manual_seed(0)  # same hard negatives in both variants
    start = time.perf_counter()
    model.training_step(batch, 0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _side_by_side(
    models: list[Stage1], batch: dict[str, Any], steps: int
) -> tuple[list[float], list[list[float]]]:
    """Median step seconds of each model, steps interleaved (A, B, A, B...) so that drift in the
    machine's speed hits both alike; and each model's losses at its first step."""
    optimizers, logged = [], []
    for model in models:
        optimizers.append(
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
        )
        record: dict[str, float] = {}
        model.log_dict = lambda values, record=record, **_: record.update(
            {k: float(v.detach()) for k, v in values.items()}
        )
        model.log = lambda *_, **__: None
        logged.append(record)
    times: list[list[float]] = [[] for _ in models]
    losses: list[list[float]] = [[] for _ in models]
    for step in range(steps + 1):  # step 0 warms up allocators and kernels
        for i, model in enumerate(models):
            seconds = _one_step(model, optimizers[i], batch)
            if step == 0:
                losses[i] = [logged[i][f"train/loss_{k}"] for k in ("atc", "atm", "atg")]
            else:
                times[i].append(seconds)
    return [statistics.median(t) for t in times], losses


def bench_stage1_kv_reuse(preset: str, frames: int, batch_size: int = 8) -> dict[str, Any]:
    """Ours vs BLIP-2-style stage-1 step at ``frames`` audio frames."""
    sizes = PRESETS[preset]
    width = sizes["audio_width"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _models(Path(tmp), sizes, audio_width=width)
        common = {"num_queries": 32, "max_text_len": 32, "qformer_dropout": 0.0}
        ours = FeatureStage1(str(folder / "encoder"), str(folder / "bert"), **common)
        reference = FeatureStage1(
            str(folder / "encoder"), str(folder / "bert"), reuse_audio_kv=False, **common
        )
    reference.load_state_dict(ours.state_dict())
    batch = {
        "feats": torch.randn(batch_size, frames, width),
        "frames": torch.ones(batch_size, frames, dtype=torch.bool),
        "caption": [f"caption number {i} with a few more words" for i in range(batch_size)],
        "clip_key": torch.arange(batch_size),
    }
    ours.train()
    reference.train()
    (ours_s, ref_s), (ours_losses, ref_losses) = _side_by_side(
        [ours, reference], batch, sizes["steps"]
    )
    same = all(
        abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(ours_losses, ref_losses, strict=True)
    )
    return {
        "name": f"stage1_step_kv_reuse_T{frames}",
        "preset": preset,
        "batch": batch_size,
        "frames": frames,
        "ours_s": round(ours_s, 4),
        "blip2_style_s": round(ref_s, 4),
        "speedup": round(ref_s / ours_s, 3),
        "losses_ours": ours_losses,
        "losses_blip2_style": ref_losses,
        "same_losses": same,
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/bench.json", help="JSON file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--frames", type=int, nargs="+", default=[250, 1500])
    args = parser.parse_args(argv)
    results = [bench_stage1_kv_reuse(args.preset, t) for t in args.frames]
    report = {"device": device_name(), "torch": torch.__version__, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}")
    print(f"{'benchmark':<30} {'ours s':>8} {'BLIP-2 s':>9} {'speedup':>8} {'same losses':>12}")
    for r in results:
        print(
            f"{r['name']:<30} {r['ours_s']:>8.3f} {r['blip2_style_s']:>9.3f}"
            f" {r['speedup']:>7.2f}x {r['same_losses']!s:>12}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
