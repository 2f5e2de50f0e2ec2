"""The Q-Former: learned queries that read frozen audio features, BERT layers shared with text.

Data flow: audio features `(B, T, D_a)` -> per-layer cross-attention keys/values (`AudioKV`) ->
query outputs `(B, N, H)`. Text `(B, L)` token ids share the self-attention layers with the queries;
an attention mode decides who sees whom (see `attention_mask`). Only queries cross-attend to audio,
in layers `i % cross_attention_freq == 0`, and queries and text have separate feed-forward blocks
(BLIP-2's ``intermediate_query`` / ``output_query``). A tied BERT-style LM head turns text states into
logits. Plain PyTorch; weights load from BERT (`QFormer.from_bert`) or from BLIP-2 / InstructBLIP /
LAVIS checkpoints (`QFormer.from_state_dict`, key mapping in `slit_lightning.model.qformer_convert`).
The layers, embeddings, LM head and `AudioKV` are in `slit_lightning.model.qformer_layers`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from slit_lightning.model.qformer_convert import (
    Layout,
    check_fit,
    from_qformer,
    infer_sizes,
    load_bert,
    summarize,
    to_qformer,
)
from slit_lightning.model.qformer_layers import (
    Attention,
    AudioKV,
    LMHead,
    QFormerConfig,
    QFormerLayer,
    StackedAudioKV,
    TextEmbeddings,
)
from slit_lightning.model.qformer_published import read_published

__all__ = [
    "AttentionMode",
    "AudioKV",
    "QFormer",
    "QFormerConfig",
    "QFormerOutput",
    "StackedAudioKV",
    "attention_mask",
]

AttentionMode = Literal["unimodal", "bidirectional", "causal", "instruction"]
"""Who sees whom in [queries; text]:

- ``"unimodal"``: queries see queries, text sees text (contrastive loss);
- ``"bidirectional"``: everyone sees everyone (matching loss);
- ``"causal"``: queries see queries; text sees all queries and earlier text (generation loss);
- ``"instruction"``: the instruction text follows the queries with full attention between them
  (InstructBLIP); the same mask as ``"bidirectional"``, named for its use.
"""


@dataclass
class QFormerOutput:
    """Final hidden states; a part is None when it was not in the input."""

    query: Tensor | None
    """(B, N, H) query outputs."""
    text: Tensor | None
    """(B, L, H) text outputs."""
    query_states: list[tuple[Tensor, Tensor]] | None = None
    """Per layer, the self-attention keys and values of the query positions, each
    (B, heads, N, H / heads); set when the queries saw no text (``unimodal`` and ``causal``), so
    that a later ``causal`` text pass can attend to them instead of running the queries again."""


def _layer_beyond(key: str, count: int) -> bool:
    """True for a weight of layer ``count`` or later (``layers.{i}.``)."""
    parts = key.split(".")
    return parts[0] == "layers" and int(parts[1]) >= count


def attention_mask(
    mode: AttentionMode,
    num_queries: int,
    text_mask: Tensor | None,
    text_len: int,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Self-attention mask over [queries; text]: (B|1, 1, N + L, N + L) bool, True = may attend.

    `text_mask` (B, L) marks real tokens (True/1) and padding (False/0); padding is never attended
    to. None means no masking at all (full attention, no padding), which lets SDPA pick its fastest
    kernel. The mask lives on `text_mask`'s device, else on `device`.
    """
    if mode not in get_args(AttentionMode):
        raise ValueError(f"attention mode {mode!r}; choose one of {get_args(AttentionMode)}")
    n, size = num_queries, num_queries + text_len
    # the block pattern is tiny: built on the CPU, so asking whether it is all-True costs no sync
    allowed = torch.ones(size, size, dtype=torch.bool)
    allowed[:n, n:] = mode in ("bidirectional", "instruction")
    allowed[n:, :n] = mode != "unimodal"
    if mode == "causal":
        allowed[n:, n:] = allowed[n:, n:].tril()
    if text_mask is None:
        return None if bool(allowed.all()) else allowed.to(device)[None, None]
    keys = torch.cat([text_mask.new_ones(text_mask.shape[0], n), text_mask], dim=1).bool()
    allowed = allowed.to(text_mask.device) & keys[:, None, :]
    # A padding row that may see nothing would give NaN; let it see itself (its output is unused).
    eye = torch.eye(size, dtype=torch.bool, device=text_mask.device)
    return (allowed | (eye & ~allowed.any(-1, keepdim=True)))[:, None]


def _check_text(text: Tensor | None, text_mask: Tensor | None, batch: int | None) -> None:
    """Embedded text (B', L, H) must fit its mask and the queries' batch `batch` (None: no
    queries)."""
    if text is None:
        if batch is None:
            raise ValueError("nothing to encode: pass text_ids, or use_queries=True with audio")
        if text_mask is not None:
            raise ValueError("text_mask given without text_ids")
        return
    if text_mask is not None and text_mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask {tuple(text_mask.shape)} != text {tuple(text.shape[:2])}")
    if batch is not None and text.shape[0] != batch:
        raise ValueError(
            f"text batch {text.shape[0]} != audio batch {batch}; "
            "pass audio_index to pair clips with texts"
        )


def _audio_attention_mask(audio_mask: Tensor | None) -> Tensor | None:
    """(B, T) True = valid frame -> (B, 1, 1, T); a clip without valid frames attends to all."""
    if audio_mask is None:
        return None
    audio_mask = audio_mask.bool()
    return (audio_mask | ~audio_mask.any(-1, keepdim=True))[:, None, None]


class QFormer(nn.Module):
    """Learned queries + BERT layers shared with text; queries cross-attend to audio features."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))
        self.lm_head = LMHead(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: weights N(0, initializer_range), biases 0, LayerNorms 1/0, queries N(0, std)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.lm_head.bias)
        nn.init.normal_(self.query_tokens, std=std)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def audio_keys_values(self, audio: Tensor, audio_mask: Tensor | None = None) -> AudioKV:
        """Project audio (B, T, D_a) once for every cross-attention layer; audio_mask (B, T) True = valid."""
        if audio.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"audio features have width {audio.shape[-1]} but encoder_width="
                f"{self.config.encoder_width}; set QFormerConfig.encoder_width to the encoder's width"
            )
        if audio_mask is not None and audio_mask.shape != audio.shape[:2]:
            raise ValueError(
                f"audio_mask {tuple(audio_mask.shape)} does not match audio {tuple(audio.shape)}"
            )
        audio = audio.to(self.query_tokens.dtype)
        layers = {
            i: layer.cross_attn.keys_values(audio)
            for i, layer in enumerate(self.layers)
            if layer.cross_attn is not None
        }
        return AudioKV(layers, _audio_attention_mask(audio_mask))

    def forward(
        self,
        audio: Tensor | None = None,
        audio_mask: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        mode: AttentionMode = "unimodal",
        *,
        audio_kv: AudioKV | StackedAudioKV | None = None,
        audio_index: Tensor | None = None,
        use_queries: bool = True,
        query_states: list[tuple[Tensor, Tensor]] | None = None,
        text_embeds: Tensor | None = None,
        text_output: bool = True,
    ) -> QFormerOutput:
        """Encode queries (reading the audio) and/or text.

        Args:
            audio: (B, T, D_a) frozen-encoder features, or None when `audio_kv` is given.
            audio_mask: (B, T) bool, True = valid frame; None = no padding.
            text_ids: (B', L) token ids, or None for queries alone.
            text_mask: (B', L) 1 = token, 0 = padding; None = no padding.
            mode: who sees whom (`AttentionMode`); padding is respected in every mode.
            audio_kv: `audio_keys_values(...)` computed earlier, instead of `audio`; a
                `StackedAudioKV` (or an `AudioKV.repeat`) pairs each row with its clip.
            audio_index: (B',) rows of the audio batch that pair with the text rows (hard negatives).
            use_queries: False encodes the text alone (the contrastive loss's text encoder).
            query_states: ``QFormerOutput.query_states`` of an earlier pass over the same clips:
                a ``causal`` text pass then attends to them instead of running the queries again
                (in that mode the queries never see the text, so they would come out the same;
                BLIP-2's image-grounded text generation reuses them the same way). Gradients flow
                back into the earlier pass.
            text_embeds: ``embed_text(text_ids)`` computed earlier, instead of ``text_ids``: one
                lookup (and one embedding gradient) shared by every pass over the same captions.
            text_output: False when only the query outputs are wanted (the matching loss): the
                last layer then skips the text positions' attention and feed-forward, whose
                outputs nothing reads (``QFormerOutput.text`` is None).

        Returns:
            `QFormerOutput(query=(B', N, H) | None, text=(B', L, H) | None, query_states=...)`.
        """
        text = self._text(text_ids, text_embeds)
        if query_states is not None:
            return self._text_after_queries(text, text_mask, mode, query_states)
        kv = self._audio_kv(audio, audio_mask, audio_kv, audio_index) if use_queries else None
        queries = None if kv is None else self.query_tokens.expand(kv.batch_size, -1, -1)
        _check_text(text, text_mask, None if queries is None else queries.shape[0])
        n = 0 if queries is None else queries.shape[1]
        length = 0 if text is None else text.shape[1]
        x = self.embeddings(text, queries)
        mask = attention_mask(mode, n, text_mask, length, x.device)
        states = []
        queries_only = bool(n) and text is not None and not text_output
        for i, layer in enumerate(self.layers):
            last = queries_only and i == len(self.layers) - 1
            x, query_kv = layer(x, n, mask, kv, queries_only=last)
            states.append(query_kv)
        unseen = n and (text is None or mode in ("unimodal", "causal"))
        return QFormerOutput(
            query=x[:, :n] if n else None,
            text=x[:, n:] if text is not None and not queries_only else None,
            query_states=states if unseen else None,
        )

    def window_queries(
        self,
        audio_kv: AudioKV,
        windows: int = 1,
        text_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Query outputs ``(B, windows * N, H)``: the queries read each of ``windows`` equal spans
        of every clip (`AudioKV.windows`), and the spans' outputs follow one another in time order.

        SALMONN's window-level Q-Former: an LLM reading these as its soft prompt gets the order of
        events from the order of its inputs, where BLIP-2's clip-level pass (``windows=1``, the
        same as ``forward``) leaves order to whatever the frames' features encode. With text (an
        instruction, ``(B, L)``), every window's queries read it (``mode="instruction"``).
        """
        if audio_kv.repeats != 1:
            raise ValueError("window_queries reads a batch of clips (an AudioKV not repeated)")
        mode: AttentionMode = "unimodal"
        if text_ids is not None:
            mode = "instruction"
            text_ids = text_ids.repeat(windows, 1)
            text_mask = None if text_mask is None else text_mask.repeat(windows, 1)
        out = self(
            audio_kv=audio_kv.windows(windows),
            text_ids=text_ids,
            text_mask=text_mask,
            mode=mode,
            text_output=False,  # only the queries go on: the last layer skips the text rows
        ).query
        clips, n, width = audio_kv.clips, out.shape[1], out.shape[2]
        return (
            out.reshape(windows, clips, n, width).transpose(0, 1).reshape(clips, windows * n, width)
        )

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """Token ids (B, L) -> the embeddings a pass starts from (``text_embeds`` of ``forward``)."""
        return self.embeddings.lookup(text_ids)

    def _text(self, text_ids: Tensor | None, text_embeds: Tensor | None) -> Tensor | None:
        if text_ids is not None and text_embeds is not None:
            raise ValueError("pass text_ids or text_embeds, not both")
        return self.embed_text(text_ids) if text_ids is not None else text_embeds

    def _text_after_queries(
        self,
        text: Tensor | None,
        text_mask: Tensor | None,
        mode: AttentionMode,
        query_states: list[tuple[Tensor, Tensor]],
    ) -> QFormerOutput:
        """The text part of a ``causal`` pass whose queries ran earlier (see ``forward``)."""
        if mode != "causal" or text is None:
            raise ValueError("query_states serve a causal pass over text (mode='causal', text_ids)")
        if len(query_states) != len(self.layers):
            raise ValueError(
                f"query_states has {len(query_states)} layers, the Q-Former {len(self.layers)}"
            )
        n = query_states[0][0].shape[2]
        _check_text(text, text_mask, query_states[0][0].shape[0])
        x = self.embeddings(text, None)
        mask = attention_mask(mode, n, text_mask, text.shape[1], x.device)
        mask = None if mask is None else mask[:, :, n:]  # the text rows: (B|1, 1, L, N + L)
        for layer, query_kv in zip(self.layers, query_states, strict=True):
            x = layer.text_after_queries(x, mask, query_kv)
        return QFormerOutput(query=None, text=x)

    @torch.no_grad()
    def cross_attention_weights(
        self,
        audio_kv: AudioKV,
        text_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        windows: int = 1,
    ) -> dict[int, Tensor]:
        """How the queries attend over the audio frames, for inspection (dashboards).

        Runs the forward pass once (no gradients) and recomputes each cross-attention layer's
        probabilities from the inputs it received; the training path never computes them.

        Args:
            audio_kv: ``audio_keys_values(...)`` of B clips with T frames.
            text_ids, text_mask, windows: as in `window_queries` (an instruction changes what
                the queries look for).

        Returns:
            layer index -> ``(B, heads, windows * N, T)`` probabilities, the windows' queries in
            turn, each with weight on its own window only; padded frames get 0.
        """
        weights: dict[int, Tensor] = {}

        def keep(index: int) -> Any:
            def hook(module: Attention, args: tuple, kwargs: dict, output: Tensor) -> None:
                given = dict(zip(("x", "mask", "kv"), args, strict=False)) | kwargs
                weights[index] = module.attention_weights(given["x"], given["mask"], given["kv"])

            return hook

        handles = [
            layer.cross_attn.register_forward_hook(keep(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
            if layer.cross_attn is not None
        ]
        try:
            self.window_queries(audio_kv, windows, text_ids, text_mask)
        finally:
            for handle in handles:
                handle.remove()
        return weights

    def _audio_kv(
        self,
        audio: Tensor | None,
        audio_mask: Tensor | None,
        audio_kv: AudioKV | StackedAudioKV | None,
        audio_index: Tensor | None,
    ) -> AudioKV | StackedAudioKV:
        if (audio is None) == (audio_kv is None):
            raise ValueError("the queries need exactly one of audio and audio_kv")
        if isinstance(audio_kv, StackedAudioKV) and audio_index is not None:
            raise ValueError("audio_index re-pairs an AudioKV; a StackedAudioKV is paired already")
        if audio_kv is None:
            audio_kv = self.audio_keys_values(audio, audio_mask)
        elif audio_mask is not None:
            raise ValueError("audio_mask goes to audio_keys_values(), not with audio_kv")
        return audio_kv if audio_index is None else audio_kv.select(audio_index)

    def lm_logits(self, text_hidden: Tensor) -> Tensor:
        """Text states (B, L, H) -> vocabulary logits (B, L, V) through the tied LM head."""
        return self.lm_head(text_hidden, self.embeddings.word.weight)

    def resize_vocab(self, vocab_size: int) -> None:
        """Resize the (tied) vocabulary, e.g. after adding BLIP-2's ``[DEC]`` token to the tokenizer.

        Existing rows are kept, new rows start N(0, initializer_range) with a zero bias. Build the
        optimizer afterwards: the embedding and bias are new parameters.
        """
        old = self.embeddings.word
        word = nn.Embedding(vocab_size, old.embedding_dim, old.padding_idx).to(old.weight)
        bias = torch.zeros_like(word.weight[:, 0])
        nn.init.normal_(word.weight, std=self.config.initializer_range)
        keep = min(vocab_size, old.num_embeddings)
        with torch.no_grad():
            word.weight[:keep] = old.weight[:keep]
            bias[:keep] = self.lm_head.bias[:keep]
        self.embeddings.word = word
        self.lm_head.bias = nn.Parameter(bias)
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_bert(
        cls,
        name_or_path: str,
        num_queries: int = QFormerConfig.num_queries,
        cross_attention_freq: int = QFormerConfig.cross_attention_freq,
        encoder_width: int = QFormerConfig.encoder_width,
        num_layers: int | None = None,
        dropout: float | None = None,
    ) -> QFormer:
        """A Q-Former initialised from a BERT checkpoint (hub id or local folder), as BLIP-2 does.

        Copies embeddings, self-attention, feed-forward and the MLM head transform when the
        checkpoint has one (fresh init otherwise); the query feed-forward starts as a copy of the
        text one; queries and cross-attention are new. Sizes come from the BERT config, except
        ``num_layers`` (keep only the first n BERT layers, for a cheaper Q-Former) and
        ``dropout`` (hidden and attention dropout; None keeps the checkpoint's).
        """
        values, weights = load_bert(name_or_path)
        if num_layers is not None:
            if not 1 <= num_layers <= values["num_layers"]:
                raise ValueError(
                    f"num_layers={num_layers}: {name_or_path} has {values['num_layers']} layers"
                )
            values["num_layers"] = num_layers
            weights = {k: v for k, v in weights.items() if not _layer_beyond(k, num_layers)}
        if dropout is not None:
            values["dropout"] = values["attention_dropout"] = dropout
        config = QFormerConfig(
            **values,
            num_queries=num_queries,
            cross_attention_freq=cross_attention_freq,
            encoder_width=encoder_width,
        )
        model = cls(config)
        missing, _ = model.load_state_dict(weights, strict=False)
        new = [
            k
            for k in missing
            if not k.startswith(("query_tokens", "lm_head.")) and ".cross_attn." not in k
        ]
        assert not new, f"BERT conversion left weights out: {summarize(new)}"
        return model

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        layout: Layout,
        config: QFormerConfig | None = None,
        strict: bool = True,
        num_heads: int | None = None,
    ) -> QFormer:
        """A Q-Former holding a BLIP-2 / InstructBLIP / LAVIS checkpoint's weights.

        Args:
            state_dict: the Q-Former's weights, alone or inside a whole model's state dict (other
                parts, e.g. ``vision_model.*``, are left out).
            layout: "hf_blip2", "hf_instructblip", "lavis" or "bert" (see `qformer_convert`).
            config: sizes; None reads them from the tensor shapes, with ``num_heads`` (no shape
                records it) and eps and dropout from `QFormerConfig`'s defaults (BLIP-2's).
            strict: raise when the checkpoint lacks some of our weights (e.g. the LM head, which
                transformers' checkpoints do not hold); False keeps them at their fresh init, with
                a warning naming them.
            num_heads: attention heads, when ``config`` is None (12 for the bert-base Q-Formers
                of BLIP-2, InstructBLIP and SALMONN).

        Raises:
            KeyError / ValueError naming the keys that do not fit (unknown, missing, wrong
            shape), or a ValueError when neither ``config`` nor ``num_heads`` is given.
        """
        weights, origin = to_qformer(state_dict, layout)
        if config is None:
            if num_heads is None:
                raise ValueError(
                    "the number of attention heads is not in the weights: give num_heads (12 for"
                    " the bert-base Q-Formers of BLIP-2, InstructBLIP and SALMONN) or a"
                    " QFormerConfig; a transformers folder states it (QFormer.from_pretrained)"
                )
            config = QFormerConfig(**infer_sizes(weights), num_heads=num_heads)
        model = cls(config)
        model.load_converted(weights, origin, strict=strict)
        return model

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, num_heads: int | None = None, strict: bool = False
    ) -> QFormer:
        """The Q-Former of a published model, as published.

        Args:
            name_or_path: a transformers BLIP-2 or InstructBLIP folder or hub id (sizes from its
                ``config.json``; only the Q-Former's tensors are read), or a LAVIS / SALMONN
                checkpoint file (``{"model": {...}}`` as published, or a bare state dict; sizes
                from the tensor shapes).
            num_heads: attention heads, needed for a checkpoint file only (its tensors do not
                record it); refused if it contradicts a folder's config.
            strict: as in :meth:`from_state_dict` (transformers' Q-Formers hold no LM head).
        """
        published = read_published(name_or_path)
        if not published.config:
            return cls.from_state_dict(
                published.state_dict, published.layout, strict=strict, num_heads=num_heads
            )
        stated = published.config["num_heads"]
        if num_heads is not None and num_heads != stated:
            raise ValueError(f"num_heads={num_heads}, but {name_or_path} states {stated}")
        config = QFormerConfig(**published.config)
        return cls.from_state_dict(published.state_dict, published.layout, config, strict)

    def load_converted(
        self,
        weights: Mapping[str, Tensor],
        origin: Mapping[str, str] | None = None,
        strict: bool = True,
    ) -> None:
        """Load our-named weights; every key and shape must fit (`origin` names them in messages)."""
        missing = check_fit(self.state_dict(), weights, origin or {}, strict)
        if missing:
            warnings.warn(
                f"Q-Former weights kept at fresh init: {summarize(missing)}", stacklevel=2
            )
        self.load_state_dict(weights, strict=False)

    def export_state_dict(self, layout: Layout) -> dict[str, Tensor]:
        """Our weights under `layout`'s names, as a whole model of that layout stores them."""
        return from_qformer(self.state_dict(), layout)
