"""`slit eval` / `slit ask`, the evaluation suite, and the labelled-data sources it reads."""

import csv
import json

import lightning
import pytest
import torch

from slit_lightning.cli.main import main
from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.data.sources import SourceSpec, open_source
from slit_lightning.evaluation.tasks import contrastive_accuracy, evaluate
from slit_lightning.model.llm import Generation
from slit_lightning.stages import Instruct, Stage1, Stage2
from slit_lightning.stages.load import load_stage
from tests.conftest import write_manifest, write_tone

LABELS = ("dog", "rain", "siren")


def _save(model, path):
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path_factory):
    """A stage-1, a stage-2 and an instruction-tuned checkpoint, in Lightning's layout."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    common = {"num_queries": 4, "cross_attention_freq": 2}
    stage1 = Stage1(str(tiny_encoder), str(tiny_bert), embed_dim=16, **common)
    paths = {"stage1": _save(stage1, root / "stage1.ckpt")}
    llm = str(tiny_llm_factory("llama"))
    gen = Generation(max_new_tokens=4)
    stage2 = Stage2(str(tiny_encoder), str(tiny_bert), llm, generation=gen, **common)
    paths["stage2"] = _save(stage2, root / "stage2.ckpt")
    instruct = Instruct(str(tiny_encoder), str(tiny_bert), llm, generation=gen, **common)
    paths["instruct"] = _save(instruct, root / "instruct.ckpt")
    return paths


@pytest.fixture
def esc50(tmp_path):
    """An ESC-50-style set: meta/esc50.csv (filename, fold, target, category) and audio/."""
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta").mkdir()
    rows = []
    for i in range(9):
        name = f"1-{i}-A-{i % 3}.wav"
        write_tone(tmp_path / "audio" / name, 200 + 120 * i, 0.6)
        rows.append({"filename": name, "fold": 1, "target": i % 3, "category": LABELS[i % 3]})
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_labelled_sets_from_a_csv_or_a_folder_tree(esc50, tmp_path):
    source = open_source(
        SourceSpec(str(esc50 / "meta" / "esc50.csv"), audio_dir=str(esc50 / "audio"))
    )
    clips = [c for u in range(source.num_units) for c in source.iter_unit(u)]
    assert [c.labels for c in clips[:3]] == [("dog",), ("rain",), ("siren",)]
    assert all(c.captions == () for c in clips)
    for i, label in enumerate(["dog_bark", "rain"]):
        (tmp_path / "tree" / label).mkdir(parents=True)
        write_tone(tmp_path / "tree" / label / f"{i}.flac", 300.0, 0.3)
    tree = open_source(str(tmp_path / "tree"))
    labels = sorted(c.labels[0] for u in range(tree.num_units) for c in tree.iter_unit(u))
    assert labels == ["dog bark", "rain"]


def test_clotho_aqa_and_instruction_data_become_qa_pairs(tmp_path):
    write_tone(tmp_path / "a.wav", 300.0, 0.3)
    with open(tmp_path / "aqa.csv", "w", newline="") as f:
        f.write("file_name,QuestionText,answer,confidence\n")
        f.write(
            "a.wav,Is it raining?,no,yes\na.wav,Is it raining?,no,maybe\na.wav,Is a tone heard?,yes,yes\n"
        )
    aqa = open_source(str(tmp_path / "aqa.csv"))
    (clip,) = list(aqa.iter_unit(0))
    assert (
        clip.qa == (("Is it raining?", "no"), ("Is a tone heard?", "yes")) and clip.captions == ()
    )
    manifest = write_manifest(
        tmp_path / "instr.jsonl",
        [{"id": "a", "audio": "a.wav", "instruction": "Name the pitch.", "answer": "300 Hz"},
         {"id": "a", "audio": "a.wav", "instruction": "Is it loud?", "answer": "no"}],
    )  # fmt: skip
    (clip,) = list(open_source(str(manifest)).iter_unit(0))
    assert clip.qa == (("Name the pitch.", "300 Hz"), ("Is it loud?", "no"))


def test_manifest_rows_with_an_empty_caption_cell_but_labels_are_kept(tmp_path):
    write_tone(tmp_path / "a.wav", 300.0, 0.3)
    (tmp_path / "m.csv").write_text("audio,caption,labels\na.wav,,dog;rain\na.wav,,\n")
    source = open_source(str(tmp_path / "m.csv"))
    first, second = (next(source.iter_unit(u)) for u in range(2))
    assert first.labels == ("dog", "rain") and first.captions == ()
    assert second.reason == "empty caption"  # nothing to learn from


def test_caption_stages_skip_clips_without_captions_and_say_why(esc50):
    dm = AudioTextDataModule(
        train=[SourceSpec(str(esc50 / "meta" / "esc50.csv"), audio_dir=str(esc50 / "audio"))],
        num_workers=0, max_skip_fraction=1.0,
    )  # fmt: skip
    assert sum(len(b["clip_id"]) for b in dm.loader("train")) == 0
    assert dict(dm.ledgers["train"].reasons) == {"empty caption": 9}
    dm.require_captions = False
    batches = list(dm.loader("train"))
    assert sum(len(b["clip_id"]) for b in batches) == 9 and batches[0]["caption"][0] == ""


def _esc50_dm(esc50):
    spec = SourceSpec(str(esc50 / "meta" / "esc50.csv"), audio_dir=str(esc50 / "audio"))
    return AudioTextDataModule(zeroshot=[spec], num_workers=0, batch_size=4, max_seconds=1.0)


def test_stage1_on_a_labelled_set_classifies_by_contrast_and_skips_generation(checkpoints, esc50):
    model = load_stage(checkpoints["stage1"])
    assert isinstance(model, Stage1)
    report = evaluate(model, _esc50_dm(esc50), "zeroshot")
    scores = report.metrics["classify_contrastive"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["chance"] == pytest.approx(1 / 3)
    assert "no captions" in report.skipped["retrieval"]
    assert set(report.skipped) >= {"caption", "qa", "classify", "tag", "choose"}
    assert "LLM" in report.skipped["qa"] and report.clips == 9


def test_contrastive_accuracy_takes_each_clips_best_query_and_label():
    vocabulary = ["dog", "rain", "siren"]
    text = torch.eye(3, 4)  # label prompts along the first three axes
    audio = torch.zeros(3, 2, 4)
    audio[0, 1] = torch.tensor([0.0, 0.9, 0.0, 0.1])  # query 1 says rain
    audio[1, 0] = torch.tensor([0.2, 0.0, 0.8, 0.0])  # siren
    audio[2, 0] = torch.tensor([0.7, 0.0, 0.3, 0.0])  # dog
    labels = [["rain"], ["dog", "siren"], ["siren"]]
    scores = contrastive_accuracy(audio, text, labels, vocabulary)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["chance"] == pytest.approx((1 + 2 + 1) / 3 / 3)


@pytest.mark.parametrize("stage", ["stage2", "instruct"])
def test_generation_tasks_on_a_labelled_set(checkpoints, esc50, stage):
    model = load_stage(checkpoints[stage])
    report = evaluate(
        model, _esc50_dm(esc50), "zeroshot", tasks=["classify", "tag", "choose", "qa"]
    )
    assert 0.0 <= report.metrics["classify"]["accuracy"] <= 1.0
    assert set(report.metrics["tag"]) == {"precision", "recall", "f1"}
    assert 0.0 <= report.metrics["choose"]["accuracy"] <= 1.0
    assert "nothing" in report.skipped["qa"]
    data = _esc50_dm(esc50)
    data.require_captions = False  # labels only, as evaluate reads it
    data_ids = {c for batch in data.loader("zeroshot") for c in batch["clip_id"]}
    ids = [row["clip_id"] for row in report.answers]  # every answer names the clip it is about
    assert set(ids) == data_ids and len(data_ids) == report.clips == 9
    assert {row["task"] for row in report.answers} == {"classify", "tag", "choose"}


def test_eval_command_prints_one_table_and_writes_json_and_tensorboard(
    checkpoints, esc50, tmp_path, capsys
):
    out = tmp_path / "eval"
    main(["eval", "--ckpt", f"[{checkpoints['stage1']},{checkpoints['instruct']}]",
          "--data", str(esc50 / "meta" / "esc50.csv"), "--audio_dir", str(esc50 / "audio"),
          "--out", str(out), "--num_workers", "0", "--max_new_tokens", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert "0-Stage1" in header and "1-Instruct" in header
    assert "classify_contrastive" in printed and "choose" in printed
    reports = sorted(out.glob("*/eval.json"))
    assert len(reports) == 2
    saved = {json.loads(p.read_text())["stage"]: json.loads(p.read_text()) for p in reports}
    assert "accuracy" in saved["Instruct"]["metrics"]["classify"]
    assert "retrieval" in saved["Instruct"]["skipped"]
    assert all(list(p.parent.glob("events.out.tfevents.*")) for p in reports)


def test_ask_answers_about_one_file(checkpoints, tmp_path, capsys):
    clip = write_tone(tmp_path / "q.mp3", 440.0, 0.8, 44100, 2)
    main(["ask", str(clip), "How many beeps are there?", "--ckpt", str(checkpoints["instruct"]),
          "--max_new_tokens", "3"])  # fmt: skip
    assert capsys.readouterr().out.strip() != ""
    # an instruction-tuned checkpoint captions plain audio files too
    main(["caption", str(clip), "--ckpt", str(checkpoints["instruct"]), "--max_new_tokens", "3"])
    assert capsys.readouterr().out.startswith(str(clip))
    with pytest.raises(SystemExit, match="slit ask needs an LLM, which this stage-1 model lacks"):
        main(["ask", str(clip), "Why?", "--ckpt", str(checkpoints["stage1"])])


def test_an_unknown_task_is_one_line(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match=r"slit: unknown tasks \['bogus'\]; tasks: retrieval"):
        main(["eval", "--ckpt", f"[{checkpoints['stage1']}]", "--split", "zeroshot",
              "--tasks", "[bogus]", "--out", str(tmp_path)])  # fmt: skip
