"""Checkpoints of another stage or architecture, damaged files and pickled objects are refused
with a message naming the mismatch, never half-loaded."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slit_lightning.cli.main import main
from slit_lightning.model.export import ExportError
from slit_lightning.model.slit import SLIT
from slit_lightning.model.state import CheckpointError, check_state, read_checkpoint
from slit_lightning.stages import Instruct, Stage1, Stage2
from slit_lightning.stages.load import load_stage

SIZES = {"num_queries": 4, "qformer_layers": 2}


def _stage2(tiny_encoder, tiny_bert, tiny_llm_factory, **kwargs):
    kw = SIZES | kwargs
    return Stage2(str(tiny_encoder), str(tiny_bert), str(tiny_llm_factory("llama")), **kw)


def test_check_state_names_shapes_missing_and_unexpected_keys_up_to_a_few():
    own = {f"w{i}": torch.zeros(2) for i in range(6)} | {"s": torch.zeros(3, 4)}
    saved = {"s": torch.zeros(4, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_state(own, saved, "ckpt X loaded into Y", "Do Z.")
    text = str(info.value)
    assert text.startswith("ckpt X loaded into Y does not fit")
    assert "s (4, 4) vs (3, 4)" in text and "not in the model: extra" in text
    assert "w0, w1, w2, w3 and 2 more" in text and text.endswith("Do Z.")
    check_state(own, own, "same", "")  # a fitting state passes
    check_state({"llm.x": torch.zeros(1), "p": torch.zeros(1)}, {"p": torch.zeros(1)}, "", "",
                optional=("llm.",))  # fmt: skip


def test_resuming_a_stage_from_another_stages_checkpoint_is_refused(
    stage_checkpoints, tiny_encoder, tiny_bert, tiny_llm_factory
):
    # what Lightning calls with --ckpt_path, before its strict load_state_dict
    stage2 = _stage2(tiny_encoder, tiny_bert, tiny_llm_factory)
    with pytest.raises(
        CheckpointError, match="Stage1 checkpoint, but the model is Stage2.*init_from"
    ):
        stage2.on_load_checkpoint(read_checkpoint(stage_checkpoints["stage1"]))
    stage1 = Stage1(str(tiny_encoder), str(tiny_bert), embed_dim=16, text_pooling="mean", **SIZES)
    for other, name in (("stage2", "Stage2"), ("instruct", "Instruct")):
        with pytest.raises(CheckpointError, match=f"{name} checkpoint, but the model is Stage1"):
            stage1.on_load_checkpoint(read_checkpoint(stage_checkpoints[other]))
    llm = str(tiny_llm_factory("llama"))
    instruct = Instruct(str(tiny_encoder), str(tiny_bert), llm, **SIZES)
    with pytest.raises(CheckpointError, match="Stage2 checkpoint, but the model is Instruct"):
        instruct.on_load_checkpoint(read_checkpoint(stage_checkpoints["stage2"]))
    stage1.on_load_checkpoint(read_checkpoint(stage_checkpoints["other_stage1"]))  # same stage


def test_resuming_with_another_qformer_shape_names_the_keys_and_shapes(
    stage_checkpoints, tiny_encoder, tiny_bert, tiny_llm_factory
):
    wider = _stage2(tiny_encoder, tiny_bert, tiny_llm_factory, num_queries=6, qformer_layers=1)
    with pytest.raises(CheckpointError) as info:
        wider.on_load_checkpoint(read_checkpoint(stage_checkpoints["stage2"]))
    text = str(info.value)
    assert "qformer.query_tokens (1, 4, 32) vs (1, 6, 32)" in text
    assert "not in the model: qformer.layers.1." in text and "num_queries" in text
    assert "size mismatch" not in text  # not torch's raw error


def test_a_checkpoint_whose_weights_disagree_with_its_hyperparameters_is_not_half_loaded(
    stage_checkpoints, tmp_path
):
    checkpoint = read_checkpoint(stage_checkpoints["stage1"])
    checkpoint["hyper_parameters"]["embed_dim"] = 24  # as if the file were edited or mixed up
    torch.save(checkpoint, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match=r"audio_proj.weight \(16, 32\) vs \(24, 32\)"):
        load_stage(tmp_path / "mixed.ckpt")


def test_init_from_a_qformer_of_another_size_names_the_mismatch(
    stage_checkpoints, tiny_encoder, tiny_bert, tiny_llm_factory
):
    with pytest.raises(CheckpointError) as info:
        _stage2(tiny_encoder, tiny_bert, tiny_llm_factory, num_queries=8,
                init_from=str(stage_checkpoints["stage1"]))  # fmt: skip
    text = str(info.value)
    assert "model.init_from" in text and "(Stage1)" in text
    assert "query_tokens (1, 4, 32) vs (1, 8, 32)" in text and "model.num_queries" in text


def test_damaged_pickled_and_foreign_files_are_refused(stage_checkpoints, tmp_path):
    data = stage_checkpoints["stage1"].read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.ckpt is not a readable checkpoint"):
            load_stage(tmp_path / "cut.ckpt")
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "x": _Trap(str(marker))}, tmp_path / "trap.ckpt")
    with pytest.raises(CheckpointError, match="holds a pickled object .*run code"):
        load_stage(tmp_path / "trap.ckpt")
    assert not marker.exists()  # the object was never unpickled
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_stage(tmp_path / "tensor.ckpt")
    with pytest.raises(SystemExit, match="^slit: .*trap.ckpt holds a pickled object"):
        main(["caption", str(tmp_path / "x.wav"), "--ckpt", str(tmp_path / "trap.ckpt")])


class _Trap:
    """Unpickling this would create a file: proof that loading ran code from the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def exported_stage1(stage_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    main(["export", "--ckpt", str(stage_checkpoints["stage1"]), "--out", str(out), "--quiet"])
    return out


def test_exported_folder_with_other_shapes_or_broken_files_is_refused(exported_stage1, tmp_path):
    folder = shutil.copytree(exported_stage1, tmp_path / "m")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("query_tokens"))
    save_file(state | {key: torch.zeros(1, 7, 32)}, str(weights))
    with pytest.raises(CheckpointError, match=r"query_tokens \(1, 7, 32\) vs \(1, 4, 32\)"):
        SLIT.from_pretrained(folder, device="cpu")
    save_file(state, str(weights))
    SLIT.from_pretrained(folder, device="cpu")  # the intact folder loads
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        SLIT.from_pretrained(folder, device="cpu")
    weights.unlink()
    with pytest.raises(ExportError, match="model.safetensors is missing"):
        SLIT.from_pretrained(folder, device="cpu")
    (folder / "slit_config.json").write_text("{not json")
    with pytest.raises(ExportError, match="slit_config.json is not valid JSON"):
        SLIT.from_pretrained(folder, device="cpu")
    (folder / "slit_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ExportError, match="format"):
        SLIT.from_pretrained(folder, device="cpu")
