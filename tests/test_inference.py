"""`slit caption` and the inference helpers, on audio files written here (formats, rates, channels)."""

import pytest
import torch

from slit_lightning.cli.main import main
from slit_lightning.model.llm import Generation
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
    from slit_lightning import SLIT

    one_by_one = SLIT.from_pretrained(stage2_ckpt[0], "cpu")
    alone = [" ".join(one_by_one.caption(f).split()) for f in files]
    assert [line.split("\t", 1)[1] for line in lines] == alone
    model = stage2_ckpt[1].eval()
    # and the soft prompts, which differ per clip, are those of each clip alone
    from slit_lightning.data.audio import load_audio, pad_batch

    waves = [load_audio(f, model.encoder.sample_rate) for f in files]
    audio, mask = pad_batch(waves)
    with torch.no_grad():
        batched = model.audio_soft_prompt({"audio": audio, "audio_mask": mask})
        for i, wave in enumerate(waves):
            one = model.audio_soft_prompt(
                {"audio": wave[None], "audio_mask": torch.ones(1, len(wave), dtype=torch.bool)}
            )
            torch.testing.assert_close(batched[i : i + 1], one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_caption_command_mistakes_are_one_line(tmp_path, stage2_ckpt):
    clip = str(write_tone(tmp_path / "x.wav"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["caption", clip, "--ckpt", str(tmp_path / "none.ckpt")])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        main(["caption", clip, "--ckpt", str(tmp_path / "junk.ckpt")])
    stage1_like = {"state_dict": {}, "hyper_parameters": {"encoder": "e", "bert": "b"}}
    torch.save(stage1_like, tmp_path / "s1.ckpt")
    with pytest.raises(SystemExit, match="not a checkpoint of a slit-lightning stage"):
        main(["caption", clip, "--ckpt", str(tmp_path / "s1.ckpt")])


def test_a_runs_checkpoint_finds_its_frozen_models_from_another_directory(
    tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path, monkeypatch
):
    """Frozen parts stored by relative path (``runs/x/encoder``) resolve from the checkpoint's
    parent folders when the working directory is elsewhere."""
    import shutil

    import lightning

    from slit_lightning.model.llm import LLMConfigError
    from slit_lightning.stages.load import load_stage

    run = tmp_path / "project"
    shutil.copytree(tiny_encoder, run / "runs" / "x" / "encoder")
    shutil.copytree(tiny_llm_factory("llama"), run / "runs" / "x" / "llm")
    monkeypatch.chdir(run)
    torch.manual_seed(0)
    model = Stage2("runs/x/encoder", str(tiny_bert), "runs/x/llm", num_queries=4)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    ckpt = run / "runs" / "x" / "stage2" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(checkpoint, ckpt)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_stage(ckpt)
    assert loaded.hparams.encoder == str(run / "runs" / "x" / "encoder")
    assert loaded.hparams.llm == str(run / "runs" / "x" / "llm")
    shutil.rmtree(run / "runs" / "x" / "llm")  # gone: the stored reference stands, and fails
    with pytest.raises(LLMConfigError, match="cannot load the LLM 'runs/x/llm'"):
        load_stage(ckpt)


def test_caption_and_ask_print_one_line_whatever_the_llm_writes(
    stage2_ckpt, tmp_path, capsys, monkeypatch
):
    from slit_lightning.model.slit import SLIT

    clips = [str(write_tone(tmp_path / f"{i}.wav")) for i in range(2)]
    monkeypatch.setattr(SLIT, "caption", lambda self, audio, *a, **k: ["two\nlines", "a\ttab "])
    main(["caption", *clips, "--ckpt", str(stage2_ckpt[0])])
    assert capsys.readouterr().out.splitlines() == [f"{clips[0]}\ttwo lines", f"{clips[1]}\ta tab"]
    monkeypatch.setattr(SLIT, "answer", lambda self, audio, question, **k: "yes,\n\nthree")
    main(["ask", clips[0], "How many?", "--ckpt", str(stage2_ckpt[0])])
    assert capsys.readouterr().out == "yes, three\n"
