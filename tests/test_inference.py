"""`slit caption` and the inference helpers, on audio files written here (formats, rates, channels)."""

import pytest
import torch

from slit_lightning.cli import main
from slit_lightning.llm import Generation
from slit_lightning.stages import Stage2
from tests.conftest import write_tone


@pytest.fixture(scope="module")
def stage2_ckpt(tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path_factory):
    """A stage-2 checkpoint in Lightning's layout, frozen parts by reference."""
    import lightning

    torch.manual_seed(0)
    model = Stage2(
        str(tiny_encoder),
        str(tiny_bert),
        str(tiny_llm_factory("llama")),
        num_queries=4,
        generation=Generation(max_new_tokens=5),
    )
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("stage2") / "last.ckpt"
    torch.save(checkpoint, path)
    return path, model


def test_caption_command_prints_a_caption_per_file_and_reports_bad_ones(
    stage2_ckpt, tmp_path, capsys
):
    files = [
        write_tone(tmp_path / "a.wav", 300, 0.7, 8000, 1),
        write_tone(tmp_path / "b.mp3", 900, 1.3, 44100, 2),
        write_tone(tmp_path / "c.flac", 500, 0.4, 22050, 1),
    ]
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"not audio at all")
    args = [
        "caption",
        *map(str, files[:2]),
        str(broken),
        str(files[2]),
        "--ckpt",
        str(stage2_ckpt[0]),
    ]
    with pytest.raises(SystemExit, match="1 of 4 files could not be read"):
        main([*args, "--batch_size", "2"])
    captured = capsys.readouterr()
    lines = captured.out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(f) for f in files]
    assert "broken.ogg\tskipped:" in captured.err
    # the same captions as the model gives each file alone: batching and padding change nothing
    model = stage2_ckpt[1]
    from slit_lightning.inference import caption_files

    alone = [next(caption_files(model.eval(), [f]))[1] for f in files]
    assert [line.split("\t", 1)[1] for line in lines] == alone


def test_caption_command_mistakes_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["caption", str(tmp_path / "x.wav"), "--ckpt", str(tmp_path / "none.ckpt")])
