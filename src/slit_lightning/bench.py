"""`make bench`: measured ratios, side by side in one run, written as JSON.

Stage-1 step: ours (each clip's cross-attention keys/values projected once per step and reused by
every pass) against the same step done the way BLIP-2's reference code does it (the audio projected
again for each matching pass: B rows for the query pass plus 3B for matching), with the same
weights, inputs and sampled hard negatives. Both must give the same losses; the ratio of their
step times is the figure.

    python -m slit_lightning.bench --out runs/bench/bench.json [--preset small|realistic]

Feature cache: one epoch's input side (decode, resample, batch, then the frozen encoder) against
the same epoch read from the feature cache (``slit cache-features``), on clips written here, with a
Whisper-base-sized encoder (random weights: the timing does not depend on them); the Q-Former step
that follows is the same either way and is left out. The data pipeline alone (clips/s decoded,
resampled and batched) is reported too.

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


def _whisper_base(folder: Path) -> Path:
    """A Whisper-base-sized model (encoder 6 x 512, 80 mel bins; a 1-layer decoder that the
    project never loads) with random weights and Whisper's feature extractor, saved locally."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=256,
    )  # fmt: skip
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def _clips(folder: Path, count: int, seconds: float) -> Path:
    """``count`` stereo 44.1 kHz WAV clips (tones over noise) and their manifest."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        t = np.arange(int(seconds * 44100)) / 44100
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(folder / f"c{i}.wav"), np.stack([wave, wave], 1), 44100, subtype="PCM_16")
        rows.append({"id": f"c{i}", "audio": f"c{i}.wav", "captions": [f"a tone number {i}"]})
    manifest = folder / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def bench_feature_cache(
    preset: str, clips: int = 16, seconds: float = 10.0, batch_size: int = 8, repeats: int = 2
) -> dict[str, Any]:
    """Input side of a training epoch: decode + encode against reading the feature cache."""
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.data.features import write_feature_cache
    from slit_lightning.encoders import HFAudioEncoder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _clips(root, clips, seconds)
        if preset == "tiny":  # tests: the project's small encoder at toy size
            from slit_lightning.encoder_small import SmallAudioConfig, SmallAudioModel

            SmallAudioModel(SmallAudioConfig(hidden_size=32, num_hidden_layers=1)).save_pretrained(
                root / "encoder"
            )
            name = "built-in small encoder (toy size)"
        else:
            _whisper_base(root / "encoder")
            name = "Whisper-base-sized encoder (6 x 512, 30 s window)"
        encoder = HFAudioEncoder.from_pretrained(str(root / "encoder"))
        settings = {"train": str(manifest), "sample_rate": encoder.sample_rate,
                    "max_seconds": seconds, "batch_size": batch_size, "num_workers": 0,
                    "feature_cache": str(root / "cache")}  # fmt: skip
        plain = AudioTextDataModule(**settings)

        def pipeline() -> float:
            start = time.perf_counter()
            assert sum(len(b["clip_id"]) for b in plain.loader("train")) == clips
            return time.perf_counter() - start

        @torch.no_grad()
        def reencode() -> float:
            start = time.perf_counter()
            for batch in plain.loader("train"):
                encoder(batch["audio"], batch["audio_mask"])
            return time.perf_counter() - start

        start = time.perf_counter()
        write_feature_cache(encoder, plain, ["train"], root / "cache")
        write_s = time.perf_counter() - start
        cached_dm = AudioTextDataModule(**settings)
        assert cached_dm.use_feature_cache(encoder.identity) == ["train"]

        def cached() -> float:
            start = time.perf_counter()
            for batch in cached_dm.loader("train"):
                batch["features"].float()  # what a stage does with them
            return time.perf_counter() - start

        runs: dict[str, list[float]] = {"pipeline": [], "reencode": [], "cached": []}
        for _ in range(repeats):  # interleaved, so drift in the machine's speed hits all alike
            runs["pipeline"].append(pipeline())
            runs["reencode"].append(reencode())
            runs["cached"].append(cached())
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "name": "feature_cache_epoch_input",
        "preset": preset,
        "encoder": name,
        "clips": clips,
        "clip_seconds": seconds,
        "batch": batch_size,
        "data_pipeline_clips_per_s": round(clips / med["pipeline"], 2),
        "reencode_epoch_s": round(med["reencode"], 6),
        "cached_epoch_s": round(med["cached"], 6),
        "speedup": round(med["reencode"] / med["cached"], 2),
        "cache_write_s": round(write_s, 3),
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
    parser.add_argument("--cache_clips", type=int, default=16, help="clips for the cache bench")
    parser.add_argument("--cache_seconds", type=float, default=10.0, help="their length")
    args = parser.parse_args(argv)
    results = [bench_stage1_kv_reuse(args.preset, t) for t in args.frames]
    cache = bench_feature_cache(args.preset, args.cache_clips, args.cache_seconds)
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "results": results,
        "feature_cache": cache,
    }
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
    print(
        f"feature cache ({cache['encoder']}, {cache['clips']} clips of {cache['clip_seconds']:g} s):"
        f" epoch input {cache['reencode_epoch_s']:.3f} s re-encoding, {cache['cached_epoch_s']:.3f} s"
        f" cached, {cache['speedup']:.1f}x; data pipeline alone"
        f" {cache['data_pipeline_clips_per_s']:.1f} clips/s"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
