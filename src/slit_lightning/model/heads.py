"""The plain modules a :class:`~slit_lightning.model.slit.SLIT` holds besides the frozen encoder.

- :class:`ContrastiveHeads`: stage 1's Q-Former with its projections into the shared space
  (embeddings, similarity, search, contrastive classification);
- :class:`TextGenerator`: a stage-2 or instruction-tuned Q-Former, the projection and the frozen
  LLM (captions, answers, generative classification).

- :class:`SLITParts`: the encoder and whichever of the two a checkpoint or export holds, with
  the crop and where each part came from.

The forward passes both they and the stage modules run are the functions here
(:func:`audio_embeddings`, :func:`text_embeddings`, :func:`soft_prompt`): a stage trains the
modules, these functions say what they compute, so training, evaluation and inference cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slit_lightning.instructions import TASKS
from slit_lightning.model.encoders import AudioEncoder
from slit_lightning.model.llm import FrozenLLM, Generation
from slit_lightning.model.qformer import AudioKV, QFormer

CAPTION_INSTRUCTION = TASKS["caption"][0][0]  # what instruction tuning trained captions with
CLASSIFY_INSTRUCTION = TASKS["classify"][0][0]
LABEL_PAIRS_PER_CALL = 64  # (clip, label) pairs scored per LLM call by generative classify


def audio_embeddings(qformer: QFormer, audio_proj: nn.Linear, kv: AudioKV) -> Tensor:
    """Queries read the audio (``kv`` of ``B`` clips) -> ``(B, N, E)`` normalised contrastive
    features, one per query."""
    return F.normalize(audio_proj(qformer(audio_kv=kv, mode="unimodal").query), dim=-1)


def text_embeddings(
    qformer: QFormer,
    text_proj: nn.Linear,
    ids: Tensor,
    mask: Tensor,
    pooling: str,
    words: Tensor | None = None,
) -> Tensor:
    """Text alone ``(B, L)`` -> ``(B, E)`` normalised contrastive features, pooled as stage 1
    trained (``cls``: the [CLS] state; ``mean``: the mean of the tokens); ``words``: the text's
    ``qformer.embed_text(ids)`` when a caller already has it."""
    given = {"text_ids": ids} if words is None else {"text_embeds": words}
    text = qformer(**given, text_mask=mask, use_queries=False).text
    if pooling == "cls":
        pooled = text[:, 0]
    else:
        weights = mask[..., None].to(text.dtype)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(text_proj(pooled), dim=-1)


def soft_prompt(
    qformer: QFormer,
    llm_proj: nn.Linear,
    kv: AudioKV,
    windows: int,
    ids: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Queries read the audio -> ``(B, N * windows, W)`` inputs for the LLM (``W`` its width);
    with an instruction's ``ids`` / ``mask`` ``(B, L)`` the queries read it too (instruction
    tuning), without it they do not (stage 2)."""
    return llm_proj(qformer.window_queries(kv, windows, ids, mask))


class ContrastiveHeads(nn.Module):
    """Stage 1's contrastive path: queries -> ``audio_proj``, text -> ``text_proj``, both
    L2-normalised in the shared space of width ``E``.

    Args:
        qformer: the stage-1 Q-Former.
        audio_proj, text_proj: ``Linear(H, E)`` into the shared space.
        temperature: the learned contrastive temperature (turns similarities into probabilities).
        tokenizer: the Q-Former's (BERT) tokenizer.
        text_pooling: ``cls`` or ``mean``, as stage 1 was trained.
        max_text_len: texts are cut to this many tokens.
    """

    def __init__(
        self,
        qformer: QFormer,
        audio_proj: nn.Linear,
        text_proj: nn.Linear,
        temperature: float,
        tokenizer: Any,
        text_pooling: str,
        max_text_len: int,
    ) -> None:
        super().__init__()
        self.qformer, self.audio_proj, self.text_proj = qformer, audio_proj, text_proj
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.tokenizer, self.text_pooling, self.max_text_len = tokenizer, text_pooling, max_text_len

    def audio(self, feats: Tensor, frames: Tensor) -> Tensor:
        """Encoder features ``(B, T, D)`` + mask ``(B, T)`` -> ``(B, N, E)`` query embeddings."""
        kv = self.qformer.audio_keys_values(feats, frames)
        return audio_embeddings(self.qformer, self.audio_proj, kv)

    def text(self, texts: list[str]) -> Tensor:
        """``T`` texts -> ``(T, E)`` embeddings ([CLS] or mean of tokens, as trained)."""
        device = self.text_proj.weight.device
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_len,
            return_tensors="pt",
        )  # fmt: skip
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

        return text_embeddings(self.qformer, self.text_proj, ids, mask, self.text_pooling)


class TextGenerator(nn.Module):
    """A stage-2 or instruction-tuned Q-Former feeding the frozen LLM through ``llm_proj``.

    Args:
        qformer: the Q-Former (stage 2's or instruction tuning's).
        llm_proj: ``Linear(H, W)`` to the LLM's width.
        llm: the frozen LLM with its tokenizer.
        instructed: the queries read the instruction (instruction tuning) or not (stage 2).
        tokenizer: the Q-Former's tokenizer (needed when ``instructed``).
        prompt: stage 2's text prompt before a caption.
        windows: time spans the queries read in turn (``Stage2``'s ``windows``).
        max_instruction_len: instructions are cut to this many Q-Former tokens (when
            ``instructed``).
        generation: default decoding settings.
    """

    def __init__(
        self,
        qformer: QFormer,
        llm_proj: nn.Linear,
        llm: FrozenLLM,
        instructed: bool,
        tokenizer: Any = None,
        prompt: str = "",
        max_instruction_len: int | None = None,
        generation: Generation | None = None,
        windows: int = 1,
    ) -> None:
        super().__init__()
        self.qformer, self.llm_proj, self.llm = qformer, llm_proj, llm
        self.windows = windows
        self.instructed, self.tokenizer, self.prompt = instructed, tokenizer, prompt
        self.max_instruction_len = max_instruction_len
        self.generation = generation or Generation()
        if instructed and (tokenizer is None or max_instruction_len is None):
            raise ValueError(
                "an instruction-tuned generator needs the Q-Former's tokenizer and"
                " max_instruction_len"
            )

    def soft_prompt(self, feats: Tensor, frames: Tensor, instructions: list[str]) -> Tensor:
        """``(B, T, D)`` features -> ``(B, N * windows, W)`` LLM inputs; instruction tuning's
        queries read ``instructions`` (one per clip), stage 2's do not."""
        kv = self.qformer.audio_keys_values(feats, frames)
        if not self.instructed:
            return soft_prompt(self.qformer, self.llm_proj, kv, self.windows)
        device = self.llm_proj.weight.device
        tokens = self.tokenizer(
            instructions, padding="longest", truncation=True,
            max_length=self.max_instruction_len, return_tensors="pt",
        )  # fmt: skip
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        return soft_prompt(self.qformer, self.llm_proj, kv, self.windows, ids, mask)

    def answer(
        self, feats: Tensor, frames: Tensor, instructions: list[str], settings: Generation | None
    ) -> list[str]:
        """One generated answer per clip; the instruction is also the LLM's text prompt."""
        soft = self.soft_prompt(feats, frames, instructions)
        return self.llm.generate(soft, instructions, settings or self.generation)

    def caption(self, feats: Tensor, frames: Tensor, settings: Generation | None) -> list[str]:
        """One caption per clip: stage 2 after its prompt, instruction tuning when asked to."""
        if self.instructed:
            return self.answer(feats, frames, [CAPTION_INSTRUCTION] * len(feats), settings)
        soft = self.soft_prompt(feats, frames, [])
        return self.llm.generate(soft, [self.prompt] * len(feats), settings or self.generation)

    def label_scores(self, feats: Tensor, frames: Tensor, labels: list[str]) -> Tensor:
        """``(B, L)`` mean log-likelihood per token of each label as the LLM's answer (an
        instruction-tuned model is asked its classification instruction; stage 2 reads the label
        as a caption after its prompt)."""
        prompt = CLASSIFY_INSTRUCTION if self.instructed else self.prompt
        soft = self.soft_prompt(feats, frames, [prompt] * len(feats))
        pairs = torch.cartesian_prod(torch.arange(len(feats)), torch.arange(len(labels)))
        scores = []
        for chunk in pairs.split(LABEL_PAIRS_PER_CALL):  # (clip, label) pairs, batched
            clips, names = chunk[:, 0].to(soft.device), [labels[j] for j in chunk[:, 1].tolist()]
            loss = self.llm.loss(soft[clips], [prompt] * len(names), names, per_row=True)
            scores.append(-loss.float().cpu())
        return torch.cat(scores).view(len(feats), len(labels))


@dataclass
class SLITParts:
    """What a checkpoint or an exported folder holds, as plain modules.

    Args:
        encoder: the frozen audio encoder.
        heads: stage 1's contrastive path (None: no embeddings).
        generator: the LLM path (None: no captions or answers).
        max_seconds: the crop the model was trained with (None: not recorded).
        origin: where the parts came from (checkpoint, encoder and LLM names); export uses it.
    """

    encoder: AudioEncoder
    heads: ContrastiveHeads | None
    generator: TextGenerator | None
    max_seconds: float | None = None
    origin: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> SLITParts:
        """Move every module to ``device``; returns self."""
        for part in (self.encoder, self.heads, self.generator):
            if part is not None:
                part.to(device)
        return self
