"""`slit export`: the folder loads without Lightning and gives what the checkpoint gives."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slit_lightning
from slit_lightning import SLIT
from slit_lightning.cli.main import main
from slit_lightning.model.export import CONFIG, ExportError
from slit_lightning.model.slit import CapabilityError
from tests.conftest import write_tone

NO_LIGHTNING = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked: an exported model must not need it")

sys.meta_path.insert(0, Block())
from slit_lightning import SLIT

model = SLIT.from_pretrained(sys.argv[1], device="cpu")
print(model.caption(sys.argv[2]))
print(model.embed_text("a tone").shape[-1])
assert not [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")]
print("no lightning")
"""


@pytest.fixture(scope="module")
def exported(stage_checkpoints, tmp_path_factory):
    """The instruction-tuned checkpoint with its stage-1 heads, exported through the CLI."""
    out = tmp_path_factory.mktemp("export") / "model"
    paths = stage_checkpoints
    main(["export", "--ckpt", str(paths["instruct"]), "--stage1", str(paths["stage1"]),
          "--out", str(out), "--quiet"])  # fmt: skip
    return out


def test_export_writes_safetensors_config_tokenizer_and_the_frozen_parts(exported, capsys):
    names = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {CONFIG, "model.safetensors", "encoder/config.json", "llm/config.json"} <= names
    assert any(n.startswith("tokenizer/") for n in names)
    assert any(n.startswith("llm/tokenizer") for n in names)
    config = json.loads((exported / CONFIG).read_text())
    assert config["encoder"]["folder"] == "encoder" and config["generator"]["instructed"]
    assert config["max_seconds"] == 1.0 and config["heads"]["text_pooling"] == "mean"
    assert not list(exported.parent.glob(".*tmp*"))  # the temporary folder was renamed


def test_exported_folder_gives_the_checkpoints_outputs(exported, stage_checkpoints, tmp_path):
    paths = stage_checkpoints
    from_ckpt = SLIT.from_pretrained(paths["instruct"], "cpu", stage1=paths["stage1"])
    from_dir = SLIT.from_pretrained(exported, "cpu")
    clips = [write_tone(tmp_path / "a.wav", 350, 0.8), write_tone(tmp_path / "b.ogg", 700, 1.4)]
    assert from_dir.identity == from_ckpt.identity
    torch.testing.assert_close(from_dir.embed_audio(clips), from_ckpt.embed_audio(clips))
    torch.testing.assert_close(
        from_dir.embed_text(["a", "b c"]), from_ckpt.embed_text(["a", "b c"])
    )
    assert from_dir.caption(clips) == from_ckpt.caption(clips)
    assert from_dir.answer(clips[0], "How many?") == from_ckpt.answer(clips[0], "How many?")
    for method in ("contrastive", "generative"):
        ours = from_dir.classify(clips[1], ["tone", "noise"], method=method).scores
        theirs = from_ckpt.classify(clips[1], ["tone", "noise"], method=method).scores
        assert ours == pytest.approx(theirs, abs=1e-5)


def test_exported_folder_loads_and_runs_without_lightning(exported, tmp_path):
    clip = write_tone(tmp_path / "x.flac", 500, 0.6)
    src = str(Path(slit_lightning.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    run = subprocess.run(
        [sys.executable, "-c", NO_LIGHTNING, str(exported), str(clip)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-2:] == ["16", "no lightning"] and lines[0].strip()


def test_export_refuses_a_used_folder_and_a_changed_frozen_part(
    exported, stage_checkpoints, tmp_path
):
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["export", "--ckpt", str(stage_checkpoints["stage1"]), "--out", str(exported)])
    model = SLIT.from_pretrained(stage_checkpoints["stage1"], "cpu")
    out = tmp_path / "ref"
    summary = model.save_pretrained(out, copy_frozen=False)
    assert "encoder referenced as" in summary.line() and "contrastive heads" in summary.line()
    config = json.loads((out / CONFIG).read_text())
    assert Path(config["encoder"]["name"]).is_dir() and not (out / "encoder").exists()
    loaded = SLIT.from_pretrained(out, "cpu")
    assert loaded.identity == model.identity and loaded.generator is None
    with pytest.raises(CapabilityError, match="instruction-tuned"):
        loaded.caption("x.wav")
    config["encoder"]["identity"] = "slit_small_audio:0000:layer1:16000Hz"
    (out / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match="has changed"):
        SLIT.from_pretrained(out, "cpu")
    (tmp_path / "not_export").mkdir()
    (tmp_path / "not_export" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="other than an export"):
        model.save_pretrained(tmp_path / "not_export", overwrite=True)
    model.save_pretrained(out, overwrite=True)  # an earlier export is replaced
    assert SLIT.from_pretrained(out, "cpu").identity == model.identity
    with pytest.raises(ExportError, match="not an exported model"):
        SLIT.from_pretrained(tmp_path / "not_export", "cpu")


def test_caption_and_ask_take_an_exported_folder(exported, tmp_path, capsys):
    clips = [write_tone(tmp_path / "a.wav", 350, 0.8), write_tone(tmp_path / "b.mp3", 900, 1.2)]
    main(["caption", *map(str, clips), "--ckpt", str(exported), "--max_new_tokens", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    model = SLIT.from_pretrained(exported, "cpu")
    settings = dataclasses.replace(model.generator.generation, max_new_tokens=3)
    assert lines == [
        f"{c}\t{t}" for c, t in zip(clips, model.caption(clips, settings=settings), strict=True)
    ]
    main(["ask", str(clips[1]), "How many beeps?", "--ckpt", str(exported)])
    assert capsys.readouterr().out.strip() == model.answer(clips[1], "How many beeps?")
