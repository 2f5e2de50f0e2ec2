"""Loading the Q-Former's weights: key mapping to other code bases' layouts, BERT, MiniLM.

Functions on `{name: Tensor}` mappings; `QFormer.from_state_dict` / `QFormer.from_bert` /
`QFormer.export_state_dict` use them. Layouts:

- ``"hf_blip2"``: transformers' `Blip2QFormerModel` (``layernorm``, ``encoder.layer.N...``), alone or
  inside a whole BLIP-2 model (``qformer.`` prefix, ``query_tokens`` and, for the retrieval models,
  ``embeddings.word_embeddings`` beside it).
- ``"hf_instructblip"``: transformers' `InstructBlipQFormerModel` (``embeddings.*``, ``encoder.layer.N...``),
  alone or inside a whole InstructBLIP model (``qformer.`` prefix, ``query_tokens`` beside it).
- ``"lavis"``: LAVIS checkpoints (``Qformer.bert.embeddings...``, ``Qformer.bert.encoder.layer.N...``,
  ``Qformer.cls.predictions...``, ``query_tokens``).
- ``"bert"``: transformers' `BertForMaskedLM` / `BertForPreTraining` (``bert.*``, ``cls.predictions.*``);
  the token-type-0 embedding is folded into the position embeddings, which is exact for
  single-segment text.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Layout = Literal["hf_blip2", "hf_instructblip", "lavis", "bert"]
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class _Spec:
    """How one layout names the Q-Former's weights."""

    root: str
    """Prefix of the Q-Former's keys inside a whole-model state dict ("" when there is none)."""
    rules: tuple[tuple[str, str], ...]
    """(ours, theirs) key templates relative to `root`; ``{i}`` is a layer index, ``{p}`` weight|bias."""
    beside_root: tuple[str, ...] = ("query_tokens",)
    """Their Q-Former keys that a whole-model state dict keeps outside `root` (prefixes)."""
    skip: tuple[str, ...] = ()
    """Their keys that hold no weight of ours: buffers, copies of tied weights (prefixes)."""


def _layer_rules(self_attn: str, cross_attn: str) -> list[tuple[str, str]]:
    layer = "layers.{i}"
    theirs = "encoder.layer.{i}"
    rules = []
    for ours_attn, their_attn, their_inner in (
        ("self_attn", "attention", self_attn),
        ("cross_attn", "crossattention", cross_attn),
    ):
        for proj in ("query", "key", "value"):
            rules.append(
                (f"{layer}.{ours_attn}.{proj}", f"{theirs}.{their_attn}.{their_inner}.{proj}")
            )
        rules.append((f"{layer}.{ours_attn}.out", f"{theirs}.{their_attn}.output.dense"))
        rules.append((f"{layer}.{ours_attn}.norm", f"{theirs}.{their_attn}.output.LayerNorm"))
    for ours_ffn, suffix in (("ffn", ""), ("ffn_query", "_query")):
        rules.append((f"{layer}.{ours_ffn}.fc1", f"{theirs}.intermediate{suffix}.dense"))
        rules.append((f"{layer}.{ours_ffn}.fc2", f"{theirs}.output{suffix}.dense"))
        rules.append((f"{layer}.{ours_ffn}.norm", f"{theirs}.output{suffix}.LayerNorm"))
    return rules


def _with_params(rules: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{ours}.{{p}}", f"{theirs}.{{p}}") for ours, theirs in rules)


def _bert_rules(prefix: str) -> tuple[tuple[str, str], ...]:
    modules = [
        ("embeddings.word", "bert.embeddings.word_embeddings"),
        ("embeddings.position", "bert.embeddings.position_embeddings"),
        ("embeddings.norm", "bert.embeddings.LayerNorm"),
        ("lm_head.dense", "cls.predictions.transform.dense"),
        ("lm_head.norm", "cls.predictions.transform.LayerNorm"),
    ]
    modules += [(o, f"bert.{t}") for o, t in _layer_rules("self", "self")]
    return (
        ("query_tokens", "query_tokens"),
        ("lm_head.bias", "cls.predictions.bias"),
        *((o, prefix + t) for o, t in _with_params(modules)),
    )


_HF_INSTRUCTBLIP = (
    ("query_tokens", "query_tokens"),
    *_with_params(
        [
            ("embeddings.word", "embeddings.word_embeddings"),
            ("embeddings.position", "embeddings.position_embeddings"),
            ("embeddings.norm", "embeddings.layernorm"),
            *_layer_rules("attention", "attention"),
        ]
    ),
)
_HF_BLIP2 = (
    ("query_tokens", "query_tokens"),
    *_with_params(
        [
            ("embeddings.word", "embeddings.word_embeddings"),
            ("embeddings.position", "embeddings.position_embeddings"),
            ("embeddings.norm", "layernorm"),
            *_layer_rules("attention", "attention"),
        ]
    ),
)
_TIED = ("cls.predictions.decoder.",)

SPECS: dict[str, _Spec] = {
    "hf_blip2": _Spec("qformer.", _HF_BLIP2, beside_root=("query_tokens", "embeddings.")),
    "hf_instructblip": _Spec("qformer.", _HF_INSTRUCTBLIP, skip=("embeddings.position_ids",)),
    "lavis": _Spec("Qformer.", _bert_rules(""), skip=("bert.embeddings.position_ids", *_TIED)),
    "bert": _Spec(
        "",
        _bert_rules(""),
        skip=(
            "bert.embeddings.position_ids",
            "bert.embeddings.token_type",
            "bert.pooler.",
            "cls.seq_relationship.",
            *_TIED,
        ),
    ),
}


@functools.cache
def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
    return re.compile(pattern + "$")


def _rename(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    """`key` renamed by the first (source, target) template pair whose source matches it."""
    for source, target in rules:
        match = _compile(source).match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def _spec(layout: str) -> _Spec:
    if layout not in SPECS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {sorted(SPECS)}")
    return SPECS[layout]


def _qformer_part(state_dict: Mapping[str, Tensor], spec: _Spec) -> dict[str, Tensor]:
    """The Q-Former's keys, relative to the layout's root; other parts of a whole model are left out."""
    if not spec.root or not any(k.startswith(spec.root) for k in state_dict):
        return dict(state_dict)  # a bare Q-Former: every key must be ours
    part, others = {}, set()
    for key, value in state_dict.items():
        if key.startswith(spec.root):
            part[key[len(spec.root) :]] = value
        elif key.startswith(spec.beside_root):
            part[key] = value
        else:
            others.add(key.split(".")[0])
    if others:
        log.info(
            "Q-Former weights read from %r; left out: %s", spec.root, ", ".join(sorted(others))
        )
    return part


def _check_tied(part: Mapping[str, Tensor]) -> None:
    """Our LM head's decoder is the word embedding matrix: refuse a checkpoint where they differ."""
    decoder = part.get("cls.predictions.decoder.weight")
    words = part.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ValueError(
            "cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight: "
            "this Q-Former ties its LM head to the word embeddings and cannot load an untied head"
        )


def _fold_token_type(part: dict[str, Tensor]) -> None:
    """BERT adds token-type embedding 0 to every token; ours has none, so add it to the positions."""
    token_type = part.get("bert.embeddings.token_type_embeddings.weight")
    position = "bert.embeddings.position_embeddings.weight"
    if token_type is not None and position in part:
        part[position] = part[position] + token_type[0]


def _full_key(key: str, spec: _Spec, rooted: bool) -> str:
    """A root-relative key as the checkpoint spells it."""
    return spec.root + key if rooted and not key.startswith(spec.beside_root) else key


def to_qformer(state_dict: Mapping[str, Tensor], layout: Layout) -> tuple[dict, dict]:
    """Rename a checkpoint's Q-Former weights to ours.

    Returns `(weights, origin)`: `weights` maps our names to tensors, `origin` maps our names to the
    checkpoint's. Raises `KeyError` naming every Q-Former key that has no counterpart in ours.
    """
    spec = _spec(layout)
    part = _qformer_part(state_dict, spec)
    rooted = bool(spec.root) and any(k.startswith(spec.root) for k in state_dict)
    _check_tied(part)
    if layout == "bert":
        _fold_token_type(part)
    reverse = [(theirs, ours) for ours, theirs in spec.rules]
    weights, origin, unknown = {}, {}, []
    for key, value in part.items():
        if key.startswith(spec.skip):
            continue
        ours = _rename(key, reverse)
        if ours is None:
            unknown.append(_full_key(key, spec, rooted))
            continue
        weights[ours], origin[ours] = value, _full_key(key, spec, rooted)
    if unknown:
        raise KeyError(
            f"{len(unknown)} key(s) of the {layout!r} checkpoint have no place in the Q-Former: "
            f"{', '.join(sorted(unknown))}. Is the layout right?"
        )
    return weights, origin


def from_qformer(state_dict: Mapping[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Our weights renamed to `layout`, as a whole model of that layout stores them (root prefix on).

    The LM head is left out for the transformers layouts, which have none.
    """
    spec = _spec(layout)
    has_lm_head = any(ours.startswith("lm_head.") for ours, _ in spec.rules)
    out = {}
    for key, value in state_dict.items():
        theirs = _rename(key, spec.rules)
        if theirs is None and key.startswith("lm_head.") and not has_lm_head:
            continue  # transformers' BLIP-2 / InstructBLIP Q-Formers have no LM head
        if theirs is None:
            raise KeyError(f"{key!r} has no counterpart in the {layout!r} layout")
        out[theirs if theirs.startswith(spec.beside_root) else spec.root + theirs] = value
    return out


def summarize(keys: Iterable[str]) -> str:
    """Keys with their layer index replaced by ``*``, deduplicated, for messages."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", k) for k in keys}))


def infer_sizes(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """The `QFormerConfig` sizes that our-named `weights` determine (not heads, eps, dropout)."""
    sizes: dict[str, int] = {}
    if "query_tokens" in weights:
        sizes["num_queries"], sizes["hidden_size"] = weights["query_tokens"].shape[-2:]
    if "embeddings.word.weight" in weights:
        sizes["vocab_size"], sizes["hidden_size"] = weights["embeddings.word.weight"].shape
    if "embeddings.position.weight" in weights:
        sizes["max_position_embeddings"] = weights["embeddings.position.weight"].shape[0]
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers:
        sizes["num_layers"] = max(layers) + 1
        if "layers.0.ffn_query.fc1.weight" in weights:
            sizes["intermediate_size"] = weights["layers.0.ffn_query.fc1.weight"].shape[0]
    cross = sorted(
        int(m.group(1))
        for k in weights
        if (m := re.match(r"layers\.(\d+)\.cross_attn\.key\.weight", k))
    )
    if cross:
        sizes["encoder_width"] = weights[f"layers.{cross[0]}.cross_attn.key.weight"].shape[1]
        sizes["cross_attention_freq"] = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    return {k: int(v) for k, v in sizes.items()}


def check_fit(
    own: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    origin: Mapping[str, str],
    strict: bool,
) -> list[str]:
    """Our keys that `weights` lacks; raises `ValueError` naming every key that does not fit.

    `own` is the model's state dict, `origin` maps our names to the checkpoint's for messages.
    """
    unexpected = [f"{origin.get(k, k)} (as {k})" for k in weights if k not in own]
    wrong = [
        f"{origin.get(k, k)}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in weights]
    problems = []
    if unexpected:
        problems.append(f"not in this Q-Former's config: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong)}")
    if missing and strict:
        problems.append(
            f"missing from the checkpoint: {summarize(missing)} (strict=False keeps them fresh)"
        )
    if problems:
        raise ValueError("checkpoint does not fit the Q-Former: " + " | ".join(problems))
    return missing


def hf_config_values(hf_config: Any) -> dict[str, Any]:
    """`QFormerConfig` fields from a transformers `BertConfig` / `Blip2QFormerConfig` /
    `InstructBlipQFormerConfig` (the last two also give cross-attention frequency and width)."""
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if hf_config.hidden_act not in _HF_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {hf_config.hidden_act!r}; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    values = dict(
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.layer_norm_eps,
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        hidden_act=_HF_ACTIVATIONS[hf_config.hidden_act],
        pad_token_id=hf_config.pad_token_id or 0,
        initializer_range=hf_config.initializer_range,
    )
    if hasattr(hf_config, "cross_attention_frequency"):  # a BLIP-2 / InstructBLIP Q-Former
        values["cross_attention_freq"] = hf_config.cross_attention_frequency
        values["encoder_width"] = hf_config.encoder_hidden_size
    return values


def load_bert(name_or_path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A BERT checkpoint as (`QFormerConfig` fields, our-named weights), the way BLIP-2 starts.

    The MLM head transform comes along when the checkpoint has one (left out otherwise, so the
    Q-Former keeps its fresh init); the query feed-forward starts as a copy of the text one.
    """
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls a BertModel checkpoint corrupted
    try:
        bert, info = BertForMaskedLM.from_pretrained(
            name_or_path, output_loading_info=True, dtype=torch.float32
        )
    except OSError as err:
        raise OSError(f"cannot load a BERT checkpoint from {name_or_path!r}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    weights, _ = to_qformer(bert.state_dict(), "bert")
    if any(k.startswith("cls.predictions.") for k in info["missing_keys"]):
        log.info("%s has no MLM head: the Q-Former's LM head starts fresh", name_or_path)
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    for key in [k for k in weights if ".ffn." in k]:
        weights[key.replace(".ffn.", ".ffn_query.")] = weights[key].clone()
    return hf_config_values(bert.config), weights
