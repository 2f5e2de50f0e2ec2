import json

import lightning.pytorch as pl
import pytest
import torch

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.model.llm import Generation
from slit_lightning.stages import Instruct
from slit_lightning.stages.base import CheckpointError
from tests.conftest import write_manifest
from tests.stages.conftest import QFORMER
from tests.stages.test_stage2 import make_stage2


@pytest.fixture(scope="module")
def stage2_ckpt(tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path_factory):
    """A stage-2 checkpoint as Lightning writes it (encoder and LLM by reference)."""
    stage2 = make_stage2(tiny_encoder, tiny_bert, tiny_llm_factory("opt"))
    with torch.no_grad():
        stage2.llm_proj.weight.normal_()  # not the init an Instruct gets by itself
    checkpoint = {"state_dict": stage2.state_dict()}
    stage2.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("stage2") / "last.ckpt"
    torch.save(checkpoint, path)
    return path, stage2


def make_instruct(encoder, bert, llm, init_from, **kwargs) -> Instruct:
    torch.manual_seed(0)
    return Instruct(
        str(encoder),
        str(bert),
        str(llm),
        init_from=str(init_from),
        max_target_len=12,
        warmup_steps=1,
        generation=Generation(max_new_tokens=5),
        **QFORMER,
        **kwargs,
    )


@pytest.fixture
def instruct(tiny_encoder, tiny_bert, tiny_llm_factory, stage2_ckpt) -> Instruct:
    return make_instruct(tiny_encoder, tiny_bert, tiny_llm_factory("opt"), stage2_ckpt[0])


@pytest.fixture
def qa_clips(clip_dir):
    """The clip fixture with labels and QA pairs, as the built-in corpus has them."""
    rows = [json.loads(line) for line in (clip_dir / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["labels"] = ["tone", "beeps" if i % 2 else "hum"]
        row["qa"] = [{"question": "Is there a hum?", "answer": "no" if i % 2 else "yes"}]
    return write_manifest(clip_dir / "train.jsonl", rows)


def test_starts_from_the_stage2_qformer_and_projection(instruct, stage2_ckpt):
    stage2 = stage2_ckpt[1]
    for name, tensor in stage2.qformer.state_dict().items():
        torch.testing.assert_close(instruct.qformer.state_dict()[name], tensor)
    torch.testing.assert_close(instruct.llm_proj.weight, stage2.llm_proj.weight)


def test_the_whole_qformer_but_its_lm_head_trains(instruct):
    trainable = {n for n, p in instruct.named_parameters() if p.requires_grad}
    q = instruct.qformer
    expected = sum(p.numel() for p in q.parameters()) - sum(
        p.numel() for p in q.lm_head.parameters()
    )
    expected += sum(p.numel() for p in instruct.llm_proj.parameters())
    assert instruct.trainable_parameters() == expected
    assert "qformer.embeddings.word.weight" in trainable
    assert not any("lm_head" in n or n.startswith(("llm.", "encoder.")) for n in trainable)


def test_the_soft_prompt_depends_on_the_instruction(instruct, stage2_ckpt, qa_clips):
    dm = AudioTextDataModule(val=str(qa_clips), batch_size=2, num_workers=0, max_seconds=0.5)
    batch = next(iter(dm.val_dataloader()))
    feats, frames = instruct.encode_audio(batch)
    kv = instruct.qformer.audio_keys_values(feats, frames)
    instruct.eval(), stage2_ckpt[1].eval()  # no dropout
    with torch.no_grad():
        a = instruct.instructed_soft_prompt(kv, ["Describe the sound."] * 2)
        b = instruct.instructed_soft_prompt(kv, ["How many beeps are there?"] * 2)
        plain = stage2_ckpt[1].instructed_soft_prompt(kv, ["Describe the sound."] * 2)
        other = stage2_ckpt[1].instructed_soft_prompt(kv, ["How many beeps are there?"] * 2)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(plain, other)  # stage 2's queries never read the instruction


def test_training_step_reaches_the_instruction_path(instruct, qa_clips):
    dm = AudioTextDataModule(train=str(qa_clips), batch_size=4, num_workers=0, max_seconds=0.5)
    batch = next(iter(dm.train_dataloader()))
    instruct.log = lambda *a, **k: None
    loss = instruct.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert instruct.qformer.embeddings.word.weight.grad.abs().sum() > 0
    assert instruct.qformer.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in instruct.llm.parameters())


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_decoder_only_and_encoder_decoder_llms_train_and_answer(
    kind, tiny_encoder, tiny_bert, tiny_llm_factory, stage1_ckpt, qa_clips
):
    """From a stage-1 checkpoint (the projection then starts fresh), with either LLM layout."""
    model = make_instruct(tiny_encoder, tiny_bert, tiny_llm_factory(kind), stage1_ckpt[0])
    dm = AudioTextDataModule(train=str(qa_clips), batch_size=3, num_workers=0, max_seconds=0.5)
    batch = next(iter(dm.train_dataloader()))
    model.log = lambda *a, **k: None
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.llm_proj.weight.grad.abs().sum() > 0
    model.eval()
    answers = model.answer(batch, ["Is there a hum?"] * 3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_fit_and_validate_score_every_task(instruct, qa_clips, tmp_path):
    manifest = str(qa_clips)
    dm = AudioTextDataModule(
        train=manifest, val=manifest, batch_size=4, num_workers=0, max_seconds=0.5
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(instruct, datamodule=dm)
    assert dm.require_captions is False  # QA-only and labelled clips train too
    metrics = trainer.callback_metrics
    for key in ("val/caption_cider_d", "val/qa_accuracy", "val/classify_accuracy", "val/tag_f1"):
        assert key in metrics and 0.0 <= float(metrics[key]) <= 10.0, key
    report = json.loads((tmp_path / "val_answers.json").read_text())
    tasks = {row["task"] for row in report["answers"]}
    assert tasks == {"caption", "qa", "classify", "tag"}
    clip_ids = {json.loads(line)["id"] for line in qa_clips.read_text().splitlines()}
    answered = {row["clip_id"] for row in report["answers"]}  # each answer names its clip
    assert len(answered) == 8 and answered <= clip_ids  # 2 val batches of 4 clips
    qa = [row for row in report["answers"] if row["task"] == "qa"]
    assert len(qa) == 8 and all(
        row["instruction"].endswith("Is there a hum? Answer:") for row in qa
    )


def test_refuses_a_stage2_checkpoint_of_another_llm(
    stage2_ckpt, tiny_encoder, tiny_bert, tiny_llm_factory
):
    with pytest.raises(CheckpointError, match="LLM"):
        make_instruct(tiny_encoder, tiny_bert, tiny_llm_factory("llama"), stage2_ckpt[0])


def test_warns_when_it_reads_other_windows_than_its_stage2(
    stage2_ckpt, tiny_encoder, tiny_bert, tiny_llm_factory, tmp_path, caplog
):
    checkpoint = torch.load(stage2_ckpt[0], weights_only=True)
    checkpoint["hyper_parameters"] = {"windows": 2}
    path = tmp_path / "stage2_windows2.ckpt"
    torch.save(checkpoint, path)
    llm = tiny_llm_factory("opt")
    with caplog.at_level("WARNING", logger="slit_lightning.stages.instruct"):
        make_instruct(tiny_encoder, tiny_bert, llm, path, windows=2)
        assert not caplog.records
        make_instruct(tiny_encoder, tiny_bert, llm, path, windows=3)
    assert "trained reading 2 window(s) per clip, this run reads 3" in caplog.text


def test_validation_asks_choose_from_the_splits_labels_as_slit_eval_does(
    tiny_encoder, tiny_bert, tiny_llm_factory, stage2_ckpt, clip_dir, tmp_path
):
    """One clip per batch holds one label: only the split's label set gives `choose` the other
    options it needs, as `slit eval` has them (a batch's own labels would give none)."""
    rows = [json.loads(line) for line in (clip_dir / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["labels"] = [("hum", "beeps", "siren")[i % 3]]
    manifest = str(write_manifest(clip_dir / "labelled.jsonl", rows))
    model = make_instruct(
        tiny_encoder, tiny_bert, tiny_llm_factory("opt"), stage2_ckpt[0], eval_tasks=("choose",)
    )
    dm = AudioTextDataModule(val=manifest, batch_size=1, num_workers=0, max_seconds=0.5)
    assert dm.labels("val") == ["beeps", "hum", "siren"]
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=3,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm)
    choose = json.loads((tmp_path / "val_answers.json").read_text())["answers"]
    assert len(choose) == 3 and all(row["task"] == "choose" for row in choose)
    assert "val/choose_accuracy" in trainer.callback_metrics
    dm.sources["val"] = []  # the label set was read once and is kept: no second pass
    assert dm.labels("val") == ["beeps", "hum", "siren"]
