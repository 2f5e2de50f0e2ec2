"""`make bench`: measured ratios, side by side in one run, written as JSON.

    python -m slit_lightning.bench --out runs/bench/bench.json [--preset small|realistic]

- stage-1 step, ours against the BLIP-2-style reference (`bench.stage1`), with samples/s, peak
  memory, FLOPs per step and model FLOPs utilisation (MFU) against the matmul peak measured in the
  same run (`bench.measure`);
- stage-2 step with a 125M-class LLM: samples/s, peak memory, MFU (`bench.stage2`);
- our Q-Former against transformers' ``InstructBlipQFormerModel``, forward + backward on
  [queries; text] with the same weights (`bench.qformer`);
- the feature cache on against off, and the data pipeline's clips/s (`bench.cache`);
- on a CPU: the demo's stage-1 step with the Q-Former's attention on PyTorch's math kernel
  against the kernel PyTorch picks, at both precisions (`bench.stage1.bench_cpu_attention_kernel`).

The ``realistic`` preset is the shape of a real run (Q-Former 12 x 768, 32 queries, audio width
768 at T = 250 and T = 1500, text 32 tokens, batch 8); ``small`` (4 x 256) keeps a CPU run to
minutes. The device and preset are recorded with every number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from slit_lightning.bench.cache import bench_feature_cache
from slit_lightning.bench.measure import (
    PRECISIONS,
    default_precision,
    device_name,
    matmul_peak,
    peak_dtype,
)
from slit_lightning.bench.qformer import bench_qformer_vs_instructblip
from slit_lightning.bench.stage1 import PRESETS, bench_cpu_attention_kernel, bench_stage1_kv_reuse
from slit_lightning.bench.stage2 import bench_stage2_step

__all__ = [
    "bench_cpu_attention_kernel",
    "bench_feature_cache",
    "bench_qformer_vs_instructblip",
    "bench_stage1_kv_reuse",
    "bench_stage2_step",
    "main",
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every benchmark of the preset; the matmul peak first (in the precision's dtype), so MFU
    uses this run's own."""
    precision = args.precision or default_precision()
    peak = matmul_peak(dtype=peak_dtype(precision))
    timed = {"peak_flops": peak, "steps": args.steps, "precision": precision}
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "preset": args.preset,
        "precision": precision,
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "matmul_peak_dtype": str(peak_dtype(precision)).removeprefix("torch."),
        "results": [bench_stage1_kv_reuse(args.preset, t, **timed) for t in args.frames],
        "stage2": [bench_stage2_step(args.preset, t, **timed) for t in args.frames[:1]],
        "qformer": bench_qformer_vs_instructblip(
            args.preset, frames=args.frames[0], precision=precision
        ),
        "feature_cache": bench_feature_cache(args.preset, args.cache_clips, args.cache_seconds),
    }
    if not torch.cuda.is_available():  # the choice only concerns CPU runs
        tiny = {**PRESETS["tiny"], "frames": args.frames[0], "batch_size": 4}
        shape = tiny if args.preset == "tiny" else None  # else the demo's shape
        report["cpu_attention"] = bench_cpu_attention_kernel(shape, steps=args.steps)
    return report


def table(report: dict[str, Any]) -> str:
    """The short table `make bench` prints."""
    lines = [
        f"device: {report['device']}  precision {report['precision']}  matmul peak"
        f" {report['matmul_peak_tflops']} TFLOP/s ({report['matmul_peak_dtype']})"
    ]
    lines.append(f"{'stage-1 step':<28} {'ours s':>8} {'BLIP-2 s':>9} {'speedup':>8} "
                 f"{'same losses':>12} {'samples/s':>10} {'MFU':>6} {'peak MiB':>9}")  # fmt: skip
    for r in report["results"]:
        lines.append(
            f"{r['name']:<28} {r['ours_s']:>8.3f} {r['blip2_style_s']:>9.3f} {r['speedup']:>7.2f}x"
            f" {r['same_losses']!s:>12} {r['samples_per_s']:>10.2f} {r.get('mfu_ours', 0):>6.2f}"
            f" {r['peak_memory_mib']:>9.0f}"
        )
    for r in report["stage2"]:
        lines.append(
            f"{r['name']} ({r['llm']}): {r['step_s']:.3f} s, {r['samples_per_s']:.2f} samples/s,"
            f" MFU {r.get('mfu', 0):.2f}, peak {r['peak_memory_mib']:.0f} MiB"
        )
    q = report["qformer"]
    lines.append(
        f"Q-Former fwd+bwd vs InstructBlipQFormerModel (T = {q['frames']}): {q['ours_s']:.3f} s vs"
        f" {q['instructblip_s']:.3f} s, {q['speedup']:.2f}x, same outputs {q['same_outputs']}"
        f" (max diff {q['max_output_difference']:.1e})"
    )
    c = report["feature_cache"]
    lines.append(
        f"feature cache ({c['encoder']}, {c['clips']} clips of {c['clip_seconds']:g} s):"
        f" epoch input {c['reencode_epoch_s']:.3f} s re-encoding, {c['cached_epoch_s']:.3f} s"
        f" cached, {c['speedup']:.1f}x; data pipeline alone"
        f" {c['data_pipeline_clips_per_s']:.1f} clips/s"
    )
    a = report.get("cpu_attention")
    if a:
        lines.append(
            "demo-shaped stage-1 step on CPU, Q-Former attention on the math kernel vs PyTorch's"
            " pick: "
            + ", ".join(
                f"{p} {a[p]['math_s']:.3f} s vs {a[p]['pytorch_choice_s']:.3f} s"
                f" ({a[p]['speedup']:.2f}x)"
                for p in ("32-true", "bf16-mixed")
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/bench.json", help="JSON file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--frames", type=int, nargs="+", default=[250, 1500])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: preset's)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="of the timed steps (default: bf16-mixed on a GPU, 32-true on CPU); losses are"
        " compared in float32 either way",
    )
    parser.add_argument("--cache_clips", type=int, default=16, help="clips for the cache bench")
    parser.add_argument("--cache_seconds", type=float, default=10.0, help="their length")
    args = parser.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"written to {out}")
