import json

from slit_lightning.bench import bench_stage1_kv_reuse, main


def test_reused_and_recomputed_audio_kv_give_the_same_losses():
    result = bench_stage1_kv_reuse("tiny", frames=20, batch_size=4)
    assert result["same_losses"], result
    assert result["ours_s"] > 0 and result["blip2_style_s"] > 0


def test_bench_writes_json(tmp_path):
    main(["--preset", "tiny", "--frames", "12", "--out", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["device"] and report["results"][0]["name"] == "stage1_step_kv_reuse_T12"
