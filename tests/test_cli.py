import json
import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slit_lightning.cli.data import data_parser
from slit_lightning.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def test_every_yaml_in_conf_parses_as_data_config():
    # the stage pieces, the demo overlays (conf/demo/) and the trainer presets
    configs = sorted((REPO / "conf").rglob("*.yaml"))
    assert configs
    for config in configs:
        data_parser().parse_args(["check", "--config", str(config)])


def test_synth_then_data_check_reports_and_logs_to_tensorboard(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    main(
        ["data", "synth", "--out", str(corpus), "--clips", "24", "--clip_seconds", "1.0", "--quiet"]
    )
    assert {p.name for p in corpus.glob("*.jsonl")} == {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "zeroshot.jsonl",
    }
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    main(
        [
            "data",
            "check",
            "--config",
            str(REPO / "conf" / "demo" / "stage1.yaml"),  # its data section: the built-in corpus
            "--data.root",
            str(corpus),
            "--data.num_workers",
            "0",
            "--log_dir",
            str(tmp_path / "tb"),
        ]
    )
    out = capsys.readouterr().out
    assert f"train: {len(rows)} clips" in out and "skipped 0" in out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Scalars("data/train/clips")[0].value == len(rows)
    # `data agreement` scores a captions file against the corpus's events
    captions = [{"clip_id": r["id"], "prediction": r["captions"][0]} for r in rows]
    captions[0]["prediction"] = "Nothing at all."
    report = tmp_path / "val_captions.json"
    report.write_text(json.dumps({"captions": captions}))
    main(["data", "agreement", str(report), "--corpus", str(corpus)])
    scores = json.loads(capsys.readouterr().out)
    assert scores["precision"] == 1.0
    assert scores["all_right"] == pytest.approx((len(rows) - 1) / len(rows), abs=1e-4)
    main(["data", "agreement", str(report), "--corpus", str(corpus), "--details"])
    details = json.loads(capsys.readouterr().out)
    assert details["all_right"] == scores["all_right"]
    assert sum(details["breakdown"]["failures"].values()) == len(rows)
    assert details["breakdown"]["failures"]["ok"] == len(rows) - 1


def test_shards_command_packs_a_manifest(clip_dir, capsys):
    main(
        [
            "data",
            "shards",
            "--source",
            str(clip_dir / "train.jsonl"),
            "--out",
            str(clip_dir / "sh"),
            "--per_shard",
            "5",
        ]
    )
    assert "written 12, skipped 0, shards 3" in capsys.readouterr().out
    assert len(list((clip_dir / "sh").glob("shard-*.tar"))) == 3


def test_data_mistakes_end_in_one_line_naming_the_file(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", "--data.train", str(tmp_path / "gone.jsonl")])
    message = str(info.value)
    assert message.startswith("slit: ") and "gone.jsonl: manifest not found" in message
    assert "\n" not in message


def test_unknown_command_lists_the_commands():
    with pytest.raises(SystemExit, match="unknown command 'frobnicate'.*fit.*data"):
        main(["frobnicate"])


def test_lightning_cli_takes_the_data_section_from_yaml(clip_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n"
        f"  train: [{{path: {clip_dir / 'train.jsonl'}, allow_outside_root: false}}]\n"
        "  batch_size: 3\n"
        "  num_workers: 0\n"
        "  max_seconds: ${data.batch_size}\n"  # omegaconf interpolation works in YAML
        "model:\n"
        "  class_path: tests.data.test_bad_input._Consumer\n"
        "trainer:\n"
        f"  default_root_dir: {tmp_path}\n"
        "  accelerator: cpu\n"
        "  max_epochs: 1\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
    )
    from slit_lightning.cli.train import lightning_cli

    cli = lightning_cli(["fit", "--config", str(config)])
    assert cli.datamodule.hparams.max_seconds == 3
    assert cli.datamodule.specs["train"][0].path == str(clip_dir / "train.jsonl")
    assert sorted(cli.model.epochs[0]) == [f"clip{i:02d}" for i in range(12)]


def demo(stage: str) -> list[str]:
    """The demo's configs of a stage: the stage piece, then the demo's overlay."""
    return ["--config", str(REPO / "conf" / f"{stage}.yaml"),
            "--config", str(REPO / "conf" / "demo" / f"{stage}.yaml")]  # fmt: skip


def _checkpoint_to(folder) -> str:
    return json.dumps(
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(folder), "save_last": True},
            }
        ]
    )


def test_built_in_chain_synth_bootstrap_stage1_stage2_caption(tmp_path, tiny_bert, capsys, caplog):
    """The demo's chain at toy size through the CLI: corpus, both bootstraps, the feature cache,
    stage 1 and stage 2 (from the stage-1 checkpoint) reading it, then `slit caption` on corpus
    files."""
    from slit_lightning.builtin.llm import tiny_knobs

    corpus, encoder, llm = tmp_path / "corpus", tmp_path / "encoder", tmp_path / "llm"
    main(
        ["data", "synth", "--out", str(corpus), "--clips", "24", "--clip_seconds", "1.0", "--quiet"]
    )
    main(["bootstrap", "encoder", "--corpus", str(corpus), "--out", str(encoder), "--epochs", "1"])
    knobs = [arg for k, v in tiny_knobs().items() for arg in (f"--{k}", str(v))]
    main(["bootstrap", "llm", "--corpus", str(corpus), "--out", str(llm), "--quiet", *knobs])
    out = capsys.readouterr().out
    assert "audio encoder in" in out and "LLM in" in out and "val_perplexity" in out
    assert (encoder / "model.safetensors").is_file() and (llm / "tokenizer.json").is_file()
    shared = [
        "--model.encoder", str(encoder), "--model.bert", str(tiny_bert),
        "--model.num_queries", "4", "--model.qformer_layers", "2",
        "--data.root", str(corpus), "--data.num_workers", "0", "--data.batch_size", "4",
        "--data.max_seconds", "1.0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.feature_cache", str(tmp_path / "features"),
    ]  # fmt: skip
    main(["cache-features", *demo("stage1"), *shared])
    caplog.set_level(logging.INFO, logger="slit_lightning.data.datamodule")
    out = capsys.readouterr().out
    rows = (corpus / "train.jsonl").read_text().splitlines()
    assert f"train: {len(rows)} clips" in out
    assert len(list((tmp_path / "features").glob("*/train.*.f16"))) == 1
    stage1 = tmp_path / "stage1"
    main(["fit", *demo("stage1"), *shared,
          "--trainer.default_root_dir", str(stage1),
          "--trainer.callbacks", _checkpoint_to(stage1)])  # fmt: skip
    stage2 = tmp_path / "stage2"
    main(["fit", *demo("stage2"), *shared,
          "--model.llm", str(llm), "--model.init_from", str(stage1 / "last.ckpt"),
          "--model.generation.max_new_tokens", "8", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.default_root_dir", str(stage2),
          "--trainer.callbacks", _checkpoint_to(stage2)])  # fmt: skip
    reads = [r for r in caplog.records if "reading cached encoder features" in r.getMessage()]
    assert len(reads) == 2  # stage 1 and stage 2
    report = json.loads((stage2 / "val_captions.json").read_text())
    assert set(report["metrics"]) >= {"bleu_4", "meteor", "rouge_l", "cider_d"}
    capsys.readouterr()
    clips = sorted((corpus / "audio").rglob("*.flac"))[:3]
    main(["caption", *map(str, clips), "--ckpt", str(stage2 / "last.ckpt")])
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(c) for c in clips]
    # instruction tuning from the stage-2 checkpoint, then `slit ask` and the evaluation suite
    instruct = tmp_path / "instruct"
    main(["fit", *demo("instruct"), *shared,
          "--model.llm", str(llm), "--model.init_from", str(stage2 / "last.ckpt"),
          "--model.generation.max_new_tokens", "6", "--trainer.default_root_dir", str(instruct),
          "--trainer.callbacks", _checkpoint_to(instruct)])  # fmt: skip
    capsys.readouterr()
    main(["ask", str(clips[0]), "How many beeps are there?", "--ckpt", str(instruct / "last.ckpt")])
    assert capsys.readouterr().out.strip()
    ckpts = ",".join(str(d / "last.ckpt") for d in (stage1, stage2, instruct))
    main(["eval", "--ckpt", f"[{ckpts}]", "--split", "zeroshot", "--out", str(tmp_path / "eval"),
          "--num_workers", "0", "--max_new_tokens", "4"])  # fmt: skip
    table = capsys.readouterr().out
    assert "0-Stage1" in table and "1-Stage2" in table and "2-Instruct" in table
    for task in ("retrieval", "classify_contrastive", "caption", "qa", "classify", "tag", "choose"):
        assert f"\n{task} " in table, task
    assert len(list((tmp_path / "eval").glob("*/eval.json"))) == 3


def test_decoding_comes_from_the_command_line_not_from_the_checkpoint(tmp_path, monkeypatch):
    """Given --ckpt_path, LightningCLI replaces the model's arguments with the checkpoint's
    hyper-parameters; how to decode stays the caller's choice, the architecture the checkpoint's."""
    from lightning.pytorch.cli import LightningCLI

    from slit_lightning.cli.train import lightning_cli

    stored = {"num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 7}
    hparams = {"_class_path": "slit_lightning.stages.Stage2", "encoder": "stored-encoder",
               "llm": "stored-llm", "windows": 2, "generation": stored}  # fmt: skip
    ckpt = tmp_path / "stage2.ckpt"
    torch.save({"hyper_parameters": hparams}, ckpt)

    class Parsed(Exception):
        pass

    def stop(cli: LightningCLI) -> None:  # after parsing, before anything is built
        raise Parsed(cli.config)

    monkeypatch.setattr(LightningCLI, "before_instantiate_classes", stop)
    argv = ["test", *demo("stage2"), "--ckpt_path", str(ckpt)]
    with pytest.raises(Parsed) as parsed:
        lightning_cli([*argv, "--model.generation.num_beams", "5"])
    args = parsed.value.args[0]["test"]["model"]["init_args"]
    assert args["generation"]["num_beams"] == 5  # the command line
    assert args["generation"]["repetition_penalty"] == 1.2  # the YAML, not the checkpoint's 1.0
    assert args["windows"] == 2 and args["encoder"] == "stored-encoder"  # the checkpoint's


def test_a_bad_synth_argument_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="slit: clip_seconds must be a number from 1.0 to 60.0"):
        main(["data", "synth", "--out", str(tmp_path), "--clip_seconds", "0.5"])
