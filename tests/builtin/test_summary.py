"""The summary `make demo` ends with, read from what the demo's commands write."""

import json
import shutil

from slit_lightning.builtin.summary import summary


def test_summary_reports_each_stage_and_names_what_is_missing(tiny_corpus, tmp_path):
    runs = tmp_path / "demo"
    shutil.copytree(tiny_corpus, runs / "corpus")
    assert "stage 1 (test retrieval): not run" in summary(runs)
    stage1 = runs / "logs" / "stage1" / "version_0"
    stage1.mkdir(parents=True)
    metrics = {"test/t2a_R@1": 0.5, "test/a2t_R@1": 0.75, "test/chance_R@1": 0.25}
    (stage1 / "test_metrics.json").write_text(json.dumps(metrics))
    rows = [json.loads(line) for line in (runs / "corpus" / "test.jsonl").read_text().splitlines()]
    # captions that repeat a reference of their own clip: the event agreement is perfect
    captions = [{"clip_id": r["id"], "prediction": r["captions"][0]} for r in rows]
    stage2 = runs / "logs" / "stage2" / "version_3"
    stage2.mkdir(parents=True)
    report = {"metrics": {"cider_d": 1.25, "bleu_4": 0.5}, "captions": captions}
    (stage2 / "test_captions.json").write_text(json.dumps(report))
    text = summary(runs)
    assert "text-to-audio R@1 0.500, audio-to-text R@1 0.750 (chance 0.250)" in text
    assert "CIDEr-D 1.250, BLEU-4 0.500" in text and "all right 1.00" in text
    assert f"no checkpoint at {runs}/instruct/checkpoints/last.ckpt" in text
    wrong = [{"clip_id": r["id"], "prediction": "silence."} for r in rows]
    (stage2 / "test_captions.json").write_text(json.dumps(report | {"captions": wrong}))
    assert "all right 0.00" in summary(runs)


def test_summary_asks_the_instruction_tuned_checkpoint(tiny_corpus, stage_checkpoints, tmp_path):
    runs = tmp_path / "demo"
    shutil.copytree(tiny_corpus, runs / "corpus")
    (runs / "instruct" / "checkpoints").mkdir(parents=True)
    shutil.copy(stage_checkpoints["instruct"], runs / "instruct" / "checkpoints" / "last.ckpt")
    lines = summary(runs).splitlines()
    asked = next(i for i, line in enumerate(lines) if line.startswith("instruction-tuned, asked"))
    assert "test-000000.flac" in lines[asked]
    assert lines[asked + 1].startswith("  answer:") and lines[asked + 2].startswith("  reference:")
