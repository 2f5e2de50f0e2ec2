"""Feature cache: one epoch's input side (decode, resample, batch, then the frozen encoder)
against the same epoch read from the feature cache (``slit cache-features``), on clips written
here, with a Whisper-base-sized encoder (random weights: the timing does not depend on them). The
Q-Former step that follows is the same either way and is left out. The data pipeline alone
(clips/s decoded, resampled and batched) is reported too.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def whisper_base(folder: Path) -> Path:
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


def write_clips(folder: Path, count: int, seconds: float) -> Path:
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
    from slit_lightning.data.cache_features import write_feature_cache
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.model.encoders import HFAudioEncoder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_clips(root, clips, seconds)
        if preset == "tiny":  # tests: the project's small encoder at toy size
            from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

            SmallAudioModel(SmallAudioConfig(hidden_size=32, num_hidden_layers=1)).save_pretrained(
                root / "encoder"
            )
            name = "built-in small encoder (toy size)"
        else:
            whisper_base(root / "encoder")
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
