import json

import pytest
import torch

from slit_lightning.bench import (
    bench_feature_cache,
    bench_qformer_vs_instructblip,
    bench_stage1_kv_reuse,
    bench_stage2_step,
    main,
)
from slit_lightning.bench.measure import (
    PRECISIONS,
    autocast,
    count_flops,
    matmul_peak,
    peak_memory,
    under,
)


def test_reused_and_recomputed_audio_kv_give_the_same_losses():
    result = bench_stage1_kv_reuse("tiny", frames=20, batch_size=4, peak_flops=1e8)
    assert result["same_losses"], result
    assert result["ours_s"] > 0 and result["blip2_style_s"] > 0
    # the reference projects the audio for 4B rows and the vocabulary at every text position
    assert result["flop_per_step_blip2_style"] > result["flop_per_step_ours"] > 0
    assert result["mfu_ours"] > 0 and result["samples_per_s"] == pytest.approx(
        4 / result["ours_s"], rel=0.01
    )


def test_timed_steps_run_at_the_asked_precision_and_losses_are_compared_in_float32():
    import torch

    a = torch.randn(4, 4)
    assert under("bf16-mixed", lambda: a @ a)().dtype == torch.bfloat16
    assert under("32-true", lambda: a @ a)().dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp8'"):
        autocast("fp8")
    result = bench_stage1_kv_reuse("tiny", frames=12, batch_size=4, precision="bf16-mixed")
    assert result["precision"] == "bf16-mixed" and result["same_losses"], result


def test_flop_count_of_a_matmul_and_a_positive_peak():
    import torch

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert matmul_peak(size=64, repeats=1) > 0


def test_our_qformer_matches_instructblip_outputs_in_the_comparison():
    result = bench_qformer_vs_instructblip(
        "tiny", frames=12, batch_size=3, text_len=5, num_queries=4
    )
    assert result["same_outputs"] and result["max_output_difference"] < 1e-4
    assert result["ours_s"] > 0 and result["instructblip_s"] > 0


def test_stage2_step_bench_reports_throughput_and_memory():
    result = bench_stage2_step("tiny", frames=12, batch_size=2, peak_flops=1e8)
    assert result["step_s"] > 0 and result["samples_per_s"] > 0
    assert result["flop_per_step"] > 0 and result["mfu"] > 0
    assert result["trainable_parameters"] > 0 and result["peak_memory_mib"] >= 0


def test_bench_writes_json(tmp_path, capsys):
    main(["--preset", "tiny", "--frames", "12", "--out", str(tmp_path / "b.json"),
          "--cache_clips", "3", "--cache_seconds", "0.5"])  # fmt: skip
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["device"] and report["results"][0]["name"] == "stage1_step_kv_reuse_T12"
    assert report["precision"] == "32-true" and report["matmul_peak_dtype"] == "float32"
    assert report["feature_cache"]["clips"] == 3 and report["matmul_peak_tflops"] > 0
    assert report["stage2"][0]["name"] == "stage2_step_T12" and report["qformer"]["same_outputs"]
    assert "InstructBlipQFormerModel" in capsys.readouterr().out
    kernels = report["cpu_attention"]  # a CPU run times the Q-Former's attention kernels
    assert kernels["name"] == "cpu_attention_kernel_stage1" and kernels["shape"]["frames"] == 12
    assert all(kernels[p]["math_s"] > 0 and kernels[p]["speedup"] > 0 for p in PRECISIONS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("math", [True, False])
def test_cpu_attention_runs_the_kernel_chosen_with_the_same_result(monkeypatch, math, dtype):
    from torch.profiler import profile

    from slit_lightning.model import qformer_layers

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, dtype=dtype) for n in (10, 30, 30))
    mask = torch.rand(2, 1, 10, 30) > 0.3
    mask[..., 0] = True  # every row sees something
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    monkeypatch.setattr(qformer_layers, "CPU_MATH_ATTENTION", math)
    with profile() as ran:
        out = qformer_layers._sdpa(q, k, v, mask, 0.0)
    fused = any("flash_attention" in e.name for e in ran.events())
    assert fused is not (math and dtype == torch.bfloat16)  # the math kernel for bf16 alone
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.float(), expected.float(), atol=tolerance)


def test_feature_cache_bench_times_both_input_paths():
    result = bench_feature_cache("tiny", clips=4, seconds=0.5, batch_size=2, repeats=1)
    assert result["reencode_epoch_s"] > 0 and result["cached_epoch_s"] > 0
    ratio = result["reencode_epoch_s"] / result["cached_epoch_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=0.01)  # the times are rounded too
    assert result["data_pipeline_clips_per_s"] > 0


def test_peak_memory_counts_weights_state_and_a_temporary_that_is_freed_again():
    import torch

    layer = torch.nn.Linear(256, 256)  # 256 KiB of weights
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with peak_memory(layer, optimizer) as memory:
        kept = torch.zeros(256, 256)  # 256 KiB, alive at the peak too
        scratch = torch.ones(1024, 1024)  # 4 MiB, gone before the block ends
        del scratch
        torch.zeros(128, 1024)  # 512 KiB after the peak: does not raise it
    assert memory["peak_mib"] == pytest.approx(256 * 257 * 4 / 2**20 + 4 + 0.25, abs=0.01)
    assert kept.sum() == 0
