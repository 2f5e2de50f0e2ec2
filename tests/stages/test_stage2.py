import json

import lightning.pytorch as pl
import pytest
import torch

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.metrics.captioning import spice_missing_reason
from slit_lightning.model.llm import Generation
from slit_lightning.stages import Stage1, Stage2
from tests.stages.conftest import QFORMER


def make_stage2(encoder, bert, llm, init_from=None, **kwargs) -> Stage2:
    torch.manual_seed(0)
    return Stage2(
        str(encoder),
        str(bert),
        str(llm),
        init_from=None if init_from is None else str(init_from),
        max_target_len=12,
        warmup_steps=1,
        generation=Generation(max_new_tokens=6),
        **QFORMER,
        **kwargs,
    )


@pytest.fixture
def stage2(tiny_encoder, tiny_bert, tiny_llm_factory, stage1_ckpt) -> Stage2:
    return make_stage2(tiny_encoder, tiny_bert, tiny_llm_factory("opt"), stage1_ckpt[0])


def test_starts_from_the_stage1_qformer(stage2, stage1_ckpt):
    for name, tensor in stage1_ckpt[1].items():
        torch.testing.assert_close(stage2.qformer.state_dict()[name], tensor)


def test_only_the_query_path_and_projection_train(stage2):
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"qformer", "llm_proj"}
    assert not any(".ffn." in n or "embeddings.word" in n or "lm_head" in n for n in trainable)
    assert "qformer.query_tokens" in trainable and "qformer.embeddings.norm.weight" in trainable
    q = stage2.qformer
    text_only = q.embeddings.word.weight.numel() + q.embeddings.position.weight.numel()
    text_only += sum(p.numel() for p in q.lm_head.parameters())
    text_only += sum(p.numel() for layer in q.layers for p in layer.ffn.parameters())
    expected = sum(p.numel() for p in q.parameters()) - text_only
    expected += sum(p.numel() for p in stage2.llm_proj.parameters())
    assert stage2.trainable_parameters() == expected
    stage2.train()
    assert not stage2.llm.model.training and not stage2.encoder.training
    assert stage2.qformer.training


@pytest.mark.parametrize(("kind", "windows"), [("opt", 1), ("llama", 3), ("t5", 2)])
def test_training_step_reaches_the_query_path_only(
    kind, windows, tiny_encoder, tiny_bert, tiny_llm_factory, stage1_ckpt, clip_dir
):
    llm = tiny_llm_factory(kind)
    stage2 = make_stage2(tiny_encoder, tiny_bert, llm, stage1_ckpt[0], windows=windows)
    dm = AudioTextDataModule(
        train=str(clip_dir / "train.jsonl"), batch_size=4, num_workers=0, max_seconds=0.5
    )
    batch = next(iter(dm.train_dataloader()))
    stage2.log = lambda *a, **k: None
    loss = stage2.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert stage2.qformer.query_tokens.grad.abs().sum() > 0
    assert stage2.llm_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage2.llm.parameters())
    assert not any(p.requires_grad for p in stage2.encoder.parameters())
    assert not stage2.qformer.embeddings.word.weight.requires_grad
    captions = stage2.caption(batch)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    # one soft-prompt vector per query and window, the windows in time order
    assert stage2.audio_soft_prompt(batch).shape[:2] == (4, QFORMER["num_queries"] * windows)
    maps, _ = stage2.attention_maps(batch)
    assert all(m.shape[2] == QFORMER["num_queries"] * windows for m in maps.values())


def test_windows_must_be_positive(tiny_encoder, tiny_bert, tiny_llm_factory):
    with pytest.raises(ValueError, match="model.windows must be a positive"):
        make_stage2(tiny_encoder, tiny_bert, tiny_llm_factory("opt"), windows=0)


def test_fit_scores_captions_and_checkpoints_by_reference(stage2, clip_dir, tmp_path):
    manifest = str(clip_dir / "train.jsonl")
    dm = AudioTextDataModule(
        train=manifest, val=manifest, batch_size=6, num_workers=0, max_seconds=0.5
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=False,
    )
    trainer.fit(stage2, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("val/bleu_1", "val/bleu_4", "val/meteor", "val/rouge_l", "val/cider_d"):
        assert 0.0 <= float(metrics[key]) <= 10.0
    report = json.loads((tmp_path / "val_captions.json").read_text())
    assert len(report["captions"]) == 12
    if spice_missing_reason():  # SPICE cannot run here: reported, never a made-up number
        assert "val/spice" not in metrics and "spice" in report["unavailable"]
    assert report["captions"][0]["references"] == ["a tone number 0", "tone 0 plays"]
    ckpt = tmp_path / "s2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith(("llm.", "encoder.")) for k in saved["state_dict"])
    assert set(saved["slit_frozen_references"]) == {"encoder", "llm"}
    loaded = Stage2.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.generation == stage2.generation
    for name, tensor in stage2.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_refuses_a_stage1_of_another_encoder_or_a_missing_file(
    tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path
):
    from slit_lightning.model.small_encoder import SmallAudioConfig, SmallAudioModel

    other = tmp_path / "other_encoder"
    torch.manual_seed(5)
    SmallAudioModel(
        SmallAudioConfig(
            n_mels=16,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
        )
    ).save_pretrained(other)
    stage1 = Stage1(str(other), str(tiny_bert), embed_dim=16, **QFORMER)
    checkpoint = {"state_dict": stage1.state_dict()}
    stage1.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "s1.ckpt")
    llm = tiny_llm_factory("opt")
    with pytest.raises(ValueError, match="trained on encoder"):
        make_stage2(tiny_encoder, tiny_bert, llm, tmp_path / "s1.ckpt")
    with pytest.raises(FileNotFoundError, match="conf/stage1.yaml"):
        make_stage2(tiny_encoder, tiny_bert, llm, tmp_path / "missing.ckpt")


def test_refuses_a_checkpoint_of_another_llm(stage2, tiny_encoder, tiny_bert, tiny_llm_factory):
    checkpoint = {"state_dict": stage2.state_dict()}
    stage2.on_save_checkpoint(checkpoint)
    other = make_stage2(tiny_encoder, tiny_bert, tiny_llm_factory("llama"))
    with pytest.raises(ValueError, match="trained on llm"):
        other.on_load_checkpoint(checkpoint)


def test_reads_the_encoder_reference_of_older_checkpoints(stage2):
    checkpoint = {"state_dict": {}, "slit_encoder_reference": "another-encoder"}
    with pytest.raises(ValueError, match="trained on encoder 'another-encoder'"):
        stage2.on_load_checkpoint(checkpoint)


def test_java_is_required_where_captions_are_scored_only(stage2, monkeypatch, tmp_path):
    from torch.utils.data import DataLoader

    from slit_lightning.metrics import captioning
    from tests.stages.distributed_fit import global_batches

    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    # a fit with train data only scores nothing: it trains without java
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(stage2, DataLoader(global_batches(1, 2), batch_size=None))
    assert trainer.global_step == 1
    stage2.trainer = pl.Trainer(limit_val_batches=0, logger=False)
    stage2.setup("fit")  # validation switched off
    stage2.setup("predict")  # generates only
    for limit, stage in ((1.0, "fit"), (0, "test"), (0, "validate")):
        stage2.trainer = pl.Trainer(limit_val_batches=limit, logger=False)
        with pytest.raises(RuntimeError, match="`java` was not found on PATH"):
            stage2.setup(stage)
