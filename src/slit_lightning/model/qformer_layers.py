"""The Q-Former's building blocks: attention, feed-forward, one layer, the text embeddings, the LM
head, the sizes (`QFormerConfig`), and the audio side of the cross-attention (`AudioKV`: each clip's keys/values, computed once
and read by every pass). `slit_lightning.model.qformer` assembles them into the Q-Former."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from slit_lightning.model.qformer_convert import hf_config_values

__all__ = [
    "Activation",
    "Attention",
    "AudioKV",
    "FeedForward",
    "LMHead",
    "QFormerConfig",
    "QFormerLayer",
    "StackedAudioKV",
    "TextEmbeddings",
]

Activation = Literal["gelu", "gelu_tanh", "relu"]

CPU_MATH_ATTENTION = True
"""Run the Q-Former's bf16 attention on PyTorch's math kernel on a CPU (see `_sdpa`); False leaves
the choice to PyTorch (``make bench`` times both)."""


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former; the defaults are BLIP-2's (bert-base, 32 queries)."""

    hidden_size: int = 768
    """Width H of queries and text states."""
    num_layers: int = 12
    """Number of transformer layers."""
    num_heads: int = 12
    """Attention heads per layer (self- and cross-attention)."""
    intermediate_size: int = 3072
    """Inner width of the feed-forward blocks."""
    num_queries: int = 32
    """Number N of learned query embeddings."""
    cross_attention_freq: int = 2
    """Layer i cross-attends to audio when i % cross_attention_freq == 0."""
    encoder_width: int = 768
    """Width D_a of the audio features."""
    vocab_size: int = 30522
    """Text vocabulary size (bert-base-uncased's)."""
    max_position_embeddings: int = 512
    """Longest text, in tokens."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    dropout: float = 0.1
    """Dropout on embeddings and on each block's output."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    hidden_act: Activation = "gelu"
    """Feed-forward and LM-head activation ("gelu" is the exact erf form)."""
    pad_token_id: int = 0
    """Padding token id; its embedding row gets no gradient."""
    initializer_range: float = 0.02
    """Std of the normal init of new weights and of the query embeddings."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if self.cross_attention_freq < 1 or self.num_queries < 1 or self.num_layers < 1:
            raise ValueError(
                "cross_attention_freq, num_queries and num_layers must be >= 1, got "
                f"{self.cross_attention_freq}, {self.num_queries}, {self.num_layers}"
            )
        if self.hidden_act not in get_args(Activation):
            raise ValueError(
                f"hidden_act={self.hidden_act!r}; choose one of {get_args(Activation)}"
            )

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> QFormerConfig:
        """From a transformers `BertConfig`, `Blip2QFormerConfig` or `InstructBlipQFormerConfig`.

        `overrides` (e.g. `num_queries=32, encoder_width=1024`) win over what the config says.
        """
        return cls(**{**hf_config_values(hf_config), **overrides})


@dataclass
class AudioKV:
    """Cross-attention keys and values of a batch of clips, computed once, reused by every pass."""

    layers: dict[int, tuple[Tensor, Tensor]]
    """Layer index -> (keys, values), each (B, heads, T, head_dim)."""
    mask: Tensor | None
    """(B, 1, 1, T) bool, True = attend; None = no padding."""
    repeats: int = 1
    """The rows that read these clips: ``repeats`` copies of the batch in turn, row ``r`` reading
    clip ``r % B`` (see `repeat`); the keys/values are never copied for them."""
    spans: Tensor | None = None
    """(repeats, B, T) bool: the frames each copy of the batch reads (see `windows`); None = the
    whole of every clip."""

    @property
    def clips(self) -> int:
        return next(iter(self.layers.values()))[0].shape[0]

    @property
    def batch_size(self) -> int:
        """Rows of a pass that reads these keys/values."""
        return self.repeats * self.clips

    def repeat(self, times: int) -> AudioKV:
        """The same clips read by ``times`` copies of the batch (e.g. each clip with its caption and
        with a hard-negative caption). No copy: the copies' queries are stacked along the query
        axis of one attention call per clip, which gives each row exactly what a copied batch
        would (attention rows are independent), with each clip's keys/values read once."""
        if self.spans is not None:
            raise ValueError("repeat clips before splitting them into windows")
        return dataclasses.replace(self, repeats=self.repeats * times)

    def windows(self, count: int) -> AudioKV:
        """Each clip read ``count`` times, copy ``w`` (rows ``w * B .. w * B + B - 1``) seeing only
        the ``w``-th of ``count`` equal spans of the clip's own frames, in time order (SALMONN's
        window-level Q-Former). The spans follow each clip's valid frames, not the padded batch, so
        a clip is read the same whatever it is batched with; a clip of fewer than ``count`` frames
        gives some frames to two neighbouring windows, so that no window is empty. No copy of
        the keys/values, as in `repeat`; ``count=1`` is the clip read whole (this object)."""
        if count < 1:
            raise ValueError(f"windows must be a positive number of spans per clip; got {count}")
        if count == 1:
            return self
        if self.repeats != 1:
            raise ValueError("window_queries reads a batch of clips (an AudioKV not repeated)")
        keys = next(iter(self.layers.values()))[0]
        if self.mask is None:
            valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        else:
            valid = self.mask[:, 0, 0]  # at least one True per clip (see the Q-Former's mask)
        rank = valid.cumsum(-1) - 1  # (B, T): the place of each valid frame among its clip's
        length = valid.sum(-1, keepdim=True)  # (B, 1)
        window = torch.arange(count, device=keys.device)[:, None, None]  # (W, 1, 1)
        start = torch.div(window * length, count, rounding_mode="floor")  # (W, B, 1)
        end = torch.maximum(
            torch.div((window + 1) * length, count, rounding_mode="floor"), start + 1
        )
        spans = valid & (rank >= start) & (rank < end)  # (W, B, T)
        return dataclasses.replace(self, repeats=count, spans=spans)

    def select(self, index: Tensor) -> AudioKV:
        """Rows `index` (B',): re-pairs clips with other rows without re-projecting (a copy)."""
        if self.spans is not None:
            raise ValueError("select clips before splitting them into windows")
        index = index % self.clips if self.repeats > 1 else index
        return AudioKV(
            {
                i: (k.index_select(0, index), v.index_select(0, index))
                for i, (k, v) in self.layers.items()
            },
            None if self.mask is None else self.mask.index_select(0, index),
        )

    def attend(self, attention: Attention, queries: Tensor, layer: int) -> Tensor:
        """``queries`` (batch_size, N, H) cross-attend to layer ``layer``'s keys/values."""
        kv = self.layers[layer]
        if self.repeats == 1:
            return attention(queries, self.mask, kv=kv)
        copies, (rows, n, width) = self.repeats, queries.shape
        stacked = queries.view(copies, rows // copies, n, width).transpose(0, 1)
        mask = self.mask
        if self.spans is not None:  # each copy's queries read their own span: (B, 1, copies*n, T)
            spans = self.spans.transpose(0, 1)[:, :, None].expand(-1, -1, n, -1)
            mask = spans.reshape(rows // copies, 1, copies * n, spans.shape[-1])
        out = attention(stacked.reshape(rows // copies, copies * n, width), mask, kv=kv)
        return out.view(rows // copies, copies, n, width).transpose(0, 1).reshape(rows, n, width)


@dataclass
class StackedAudioKV:
    """The rows of one pass read several `AudioKV` in turn: the first ``parts[0].batch_size`` rows
    the first, and so on; e.g. BLIP-2's matching pass, whose rows are B (clip, caption) pairs, B
    (clip, negative caption) and B (negative clip, caption), in one forward."""

    parts: tuple[AudioKV, ...]

    @property
    def batch_size(self) -> int:
        return sum(part.batch_size for part in self.parts)

    def attend(self, attention: Attention, queries: Tensor, layer: int) -> Tensor:
        chunks = queries.split([part.batch_size for part in self.parts])
        return torch.cat(
            [part.attend(attention, c, layer) for part, c in zip(self.parts, chunks, strict=True)]
        )


def _sdpa(
    queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, dropout: float
) -> Tensor:
    """Scaled dot-product attention. In bf16 on a CPU it runs PyTorch's math kernel: for the
    Q-Former's short, masked sequences PyTorch's own pick, the fused flash kernel, was slower
    there, its backward most of all; in float32 the two are even, so float32 keeps PyTorch's
    pick. ``make bench`` times both (docs/benchmarks.md has the figures)."""
    if CPU_MATH_ATTENTION and queries.device.type == "cpu" and queries.dtype == torch.bfloat16:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(queries, keys, values, mask, dropout)
    return F.scaled_dot_product_attention(queries, keys, values, mask, dropout)


def _activation(name: Activation, x: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class Attention(nn.Module):
    """Multi-head attention, residual, post-LayerNorm (BERT); keys/values from `kv_width` features."""

    def __init__(self, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, S, H) -> (B, heads, S, H / heads)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, D) -> keys, values, each (B, heads, S, H / heads)."""
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def forward(
        self, x: Tensor, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """x (B, S, H) attends to itself, or to precomputed `kv`; mask (B|1, 1, S, S_kv) bool."""
        keys, values = self.keys_values(x) if kv is None else kv
        dropout = self.attention_dropout if self.training else 0.0
        context = _sdpa(self.split_heads(self.query(x)), keys, values, mask, dropout)
        return self.norm(x + self.dropout(self.out(context.transpose(1, 2).flatten(2))))

    def attention_weights(
        self, x: Tensor, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The attention probabilities ``forward`` applies, recomputed (SDPA does not return
        them): ``(B, heads, S, S_kv)``, each row summing to 1, 0 where ``mask`` is False."""
        keys, _ = self.keys_values(x) if kv is None else kv
        queries = self.split_heads(self.query(x)).float()
        scores = queries @ keys.float().transpose(-2, -1) / math.sqrt(queries.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)


class FeedForward(nn.Module):
    """BERT feed-forward block: dense, activation, dense, residual, post-LayerNorm."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, H) -> (B, S, H)."""
        return self.norm(x + self.dropout(self.fc2(_activation(self.act, self.fc1(x)))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries, two feed-forwards."""

    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.index = layer_idx
        self.self_attn = Attention(config, config.hidden_size)
        self.cross_attn = (
            Attention(config, config.encoder_width)
            if config.has_cross_attention(layer_idx)
            else None
        )
        self.ffn = FeedForward(config)
        self.ffn_query = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        num_queries: int,
        mask: Tensor | None,
        audio: AudioKV | StackedAudioKV | None,
        queries_only: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, N + L, H) -> (B, N + L, H), and the self-attention keys/values of the first
        `num_queries` positions (the queries), each (B, heads, N, H / heads). The queries read
        ``audio``'s keys/values of this layer if it has cross-attention. ``queries_only``: the
        output is the queries' alone, (B, N, H) (the text still serves as keys/values), for a
        last layer whose text outputs nobody reads."""
        keys, values = self.self_attn.keys_values(x)
        rows = x[:, :num_queries] if queries_only else x
        rows_mask = mask[:, :, :num_queries] if queries_only and mask is not None else mask
        x = self.self_attn(rows, rows_mask, kv=(keys, values))
        query_kv = (keys[:, :, :num_queries], values[:, :, :num_queries])
        if num_queries == 0:
            return self.ffn(x), query_kv
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None and audio is not None:
            queries = audio.attend(self.cross_attn, queries, self.index)
        queries = self.ffn_query(queries)
        if text.shape[1] == 0:
            return queries, query_kv
        return torch.cat([queries, self.ffn(text)], dim=1), query_kv

    def text_after_queries(
        self, text: Tensor, mask: Tensor | None, query_kv: tuple[Tensor, Tensor]
    ) -> Tensor:
        """Text rows (B, L, H) attending to [the queries' cached keys/values; the text]."""
        keys, values = self.self_attn.keys_values(text)
        kv = (torch.cat([query_kv[0], keys], dim=2), torch.cat([query_kv[1], values], dim=2))
        return self.ffn(self.self_attn(text, mask, kv=kv))


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings; queries are prepended; one LayerNorm and dropout on all."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def lookup(self, text_ids: Tensor) -> Tensor:
        """text_ids (B, L) -> word + position embeddings (B, L, H); positions count from 0."""
        length = text_ids.shape[1]
        if length > self.position.num_embeddings:
            raise ValueError(
                f"text of {length} tokens is longer than max_position_embeddings="
                f"{self.position.num_embeddings}; truncate it in the tokenizer"
            )
        positions = torch.arange(length, device=text_ids.device)
        return self.word(text_ids) + self.position(positions)

    def forward(self, text: Tensor | None, queries: Tensor | None) -> Tensor:
        """text (B, L, H) from `lookup`, queries (B, N, H) -> normalised (B, N + L, H)."""
        parts = [p for p in (queries, text) if p is not None]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.norm(x))


class LMHead(nn.Module):
    """BERT's MLM head: dense, activation, LayerNorm, then the (tied) word embeddings and a bias."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """x (B, L, H), word_embeddings (V, H) -> logits (B, L, V)."""
        return F.linear(self.norm(_activation(self.act, self.dense(x))), word_embeddings, self.bias)
