import json

import pytest

from slit_lightning.bench import bench_feature_cache, bench_stage1_kv_reuse, main


def test_reused_and_recomputed_audio_kv_give_the_same_losses():
    result = bench_stage1_kv_reuse("tiny", frames=20, batch_size=4)
    assert result["same_losses"], result
    assert result["ours_s"] > 0 and result["blip2_style_s"] > 0


def test_bench_writes_json(tmp_path):
    main(["--preset", "tiny", "--frames", "12", "--out", str(tmp_path / "b.json"),
          "--cache_clips", "3", "--cache_seconds", "0.5"])  # fmt: skip
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["device"] and report["results"][0]["name"] == "stage1_step_kv_reuse_T12"
    assert report["feature_cache"]["clips"] == 3


def test_feature_cache_bench_times_both_input_paths():
    result = bench_feature_cache("tiny", clips=4, seconds=0.5, batch_size=2, repeats=1)
    assert result["reencode_epoch_s"] > 0 and result["cached_epoch_s"] > 0
    ratio = result["reencode_epoch_s"] / result["cached_epoch_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=0.01)  # the times are rounded too
    assert result["data_pipeline_clips_per_s"] > 0
