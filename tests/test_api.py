"""The Python API (`SLIT`): every method, every kind of audio input, what a checkpoint cannot do."""

import numpy as np
import pytest
import soundfile as sf
import torch

from slit_lightning import SLIT
from slit_lightning.data.audio import AudioError, crop, load_audio, pad_batch
from slit_lightning.model.slit import CapabilityError, Classification, scores
from slit_lightning.stages.load import load_stage
from tests.conftest import write_tone


def stage_batch(module, paths, max_seconds):
    """The clips as the stage module reads them: mono, its rate, cut to ``max_seconds``."""
    rate = module.encoder.sample_rate
    waves = [crop(load_audio(str(p), rate), round(max_seconds * rate), None) for p in paths]
    audio, mask = pad_batch(waves)
    return {"audio": audio, "audio_mask": mask}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three clips in three formats, rates and channel counts; one longer than the crop."""
    folder = tmp_path_factory.mktemp("api_clips")
    return [
        write_tone(folder / "a.wav", 300, 0.7, 16000, 1),
        write_tone(folder / "b.mp3", 900, 1.6, 44100, 2),
        write_tone(folder / "c.flac", 500, 0.4, 8000, 1),
    ]


@pytest.fixture(scope="module")
def stage1_model(stage_checkpoints):
    return SLIT.from_pretrained(stage_checkpoints["stage1"], device="cpu")


@pytest.fixture(scope="module")
def full_model(stage_checkpoints):
    """Instruction-tuned checkpoint + the stage-1 heads: serves every method."""
    paths = stage_checkpoints
    return SLIT.from_pretrained(paths["instruct"], device="cpu", stage1=paths["stage1"])


def _stage1_embeddings(stage, waves):
    audio, mask = pad_batch(waves)
    with torch.no_grad():
        feats, frames = stage.encode_audio({"audio": audio, "audio_mask": mask})
        return stage.audio_embeddings(stage.qformer.audio_keys_values(feats, frames))


def test_stage1_checkpoint_embeds_compares_and_classifies_like_the_stage(
    stage1_model, stage_checkpoints, clips
):
    model = stage1_model
    assert model.max_seconds == 1.0  # the crop the checkpoint was trained with
    emb = model.embed_audio(clips)
    assert emb.shape == (3, 4, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 4))
    # the same numbers the stage module gives on the same clips (cut to 1 s as trained)
    stage = load_stage(stage_checkpoints["stage1"])
    waves = [load_audio(c, 16000)[:16000] for c in clips]
    torch.testing.assert_close(emb, _stage1_embeddings(stage, waves), rtol=1e-4, atol=1e-5)
    texts = ["a tone", "rain on a roof", "a dog barks"]
    text = model.embed_text(texts)
    assert text.shape == (3, 16)
    ids, mask = stage.tokenize(stage.tokenizer, texts, 40, False)
    with torch.no_grad():
        torch.testing.assert_close(text, stage.text_embeddings(ids, mask), rtol=1e-4, atol=1e-5)
    sim = model.similarity(clips, texts)
    torch.testing.assert_close(sim, scores(emb, text))
    assert sim.shape == (3, 3) and not torch.allclose(sim[:, 0], sim[:, 1])
    labels = ["tone", "rain", "dog"]
    result = model.classify(clips[0], labels, prompt="{label}")
    assert isinstance(result, Classification)
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.label == labels[int(model.similarity(clips[0], labels).argmax())]
    assert len(model.classify(clips, labels)) == 3


def test_methods_a_checkpoint_cannot_serve_name_the_one_that_can(stage1_model, stage_checkpoints):
    with pytest.raises(CapabilityError, match="stage-2 or instruction-tuned"):
        stage1_model.caption("x.wav")
    with pytest.raises(CapabilityError, match="LLM"):
        stage1_model.classify("x.wav", ["a", "b"], method="generative")
    stage2 = SLIT.from_pretrained(stage_checkpoints["stage2"], device="cpu")
    for call in (
        lambda: stage2.embed_audio("x.wav"),
        lambda: stage2.embed_text("rain"),
        lambda: stage2.classify("x.wav", ["a", "b"], method="contrastive"),
    ):
        with pytest.raises(CapabilityError, match="stage1="):
            call()
    assert stage2.capabilities() == ["caption", "answer", "classify(generative)"]


@pytest.mark.parametrize("stage", ["stage2", "instruct"])
def test_captions_and_answers_are_those_of_the_stage_module(stage, stage_checkpoints, clips):
    path = stage_checkpoints[stage]
    model = SLIT.from_pretrained(path, device="cpu")
    module = load_stage(path)
    captions = model.caption(clips)
    with torch.no_grad():  # the stage module itself, as training and `slit eval` run it
        assert captions == module.caption(stage_batch(module, clips, 1.0))
    assert model.caption(clips[1]) == captions[1]  # one clip in, one string out
    question = "How many beeps are there?"
    with torch.no_grad():
        expected = module.answer(stage_batch(module, clips[:1], 1.0), [question])[0]
    assert model.answer(clips[0], question) == expected
    assert len(model.answer(clips, ["one?", "two?", "three?"])) == 3
    with pytest.raises(ValueError, match="one question per clip"):
        model.answer(clips, ["one?", "two?"])
    result = model.classify(clips, ["tone", "siren", "rain"])  # generative: no heads
    assert [r.label in ("tone", "siren", "rain") for r in result] == [True] * 3
    assert all(sum(r.scores.values()) == pytest.approx(1.0, abs=1e-5) for r in result)
    assert len({tuple(r.scores.values()) for r in result}) == 3  # the audio matters


def test_one_final_checkpoint_plus_stage1_serves_every_method(full_model, stage1_model, clips):
    assert full_model.capabilities() == [
        "caption", "answer", "classify(generative)",
        "embed_audio", "embed_text", "similarity", "classify(contrastive)",
    ]  # fmt: skip
    torch.testing.assert_close(full_model.embed_audio(clips), stage1_model.embed_audio(clips))
    assert full_model.identity == stage1_model.identity
    contrastive = full_model.classify(clips[0], ["tone", "rain"])
    generative = full_model.classify(clips[0], ["tone", "rain"], method="generative")
    assert contrastive.scores != generative.scores
    assert isinstance(full_model.caption(clips[0]), str)


def test_audio_as_paths_arrays_and_tensors_gives_the_same_embeddings(stage1_model, tmp_path):
    path = write_tone(tmp_path / "t.wav", 440, 0.5, 8000, 1)
    samples, rate = sf.read(str(path), dtype="float32")
    from_file = stage1_model.embed_audio(path)
    for given in (samples, torch.from_numpy(samples), [samples], samples[None]):
        torch.testing.assert_close(stage1_model.embed_audio(given, sample_rate=rate), from_file)
    batch = np.stack([samples, samples[::-1].copy()])
    assert stage1_model.embed_audio(torch.from_numpy(batch), sample_rate=rate).shape[0] == 2
    with pytest.raises(ValueError, match="sample_rate"):
        stage1_model.embed_audio(samples)
    with pytest.raises(ValueError, match=r"give \(S,\) or \(B, S\)"):
        stage1_model.embed_audio(np.zeros((1, 2, 3)), sample_rate=8000)
    with pytest.raises(AudioError, match="missing.wav: missing file"):
        stage1_model.embed_audio([path, tmp_path / "missing.wav"])
    with pytest.raises(ValueError, match="two or more distinct labels"):
        stage1_model.classify(path, ["rain"])


def test_batches_of_any_size_give_the_same_results(stage1_model, clips):
    stage1_model.batch_size = 1
    one_by_one = stage1_model.embed_audio(clips)
    stage1_model.batch_size = 8
    torch.testing.assert_close(stage1_model.embed_audio(clips), one_by_one, rtol=1e-4, atol=1e-5)
