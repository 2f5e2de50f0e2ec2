"""The frozen LLM: soft prompt in, language-modelling loss or generated text out.

:class:`FrozenLLM` wraps any transformers causal LM (OPT, LLaMA / Vicuna, Qwen2, GPT-2, ...) or
encoder-decoder (T5 / Flan-T5) with its tokenizer. The Q-Former's projected query outputs, the
*soft prompt* ``(B, N, W)``, go in front of the text as input embeddings:

- decoder-only: ``[BOS][soft prompt][prompt text][target text, EOS]`` (BOS only where the
  tokenizer adds one, as LLaMA's and OPT's do; a document starts with it in pretraining, so the soft
  prompt sits inside the document rather than before it); the loss covers only the target and its
  EOS (BOS, soft-prompt and prompt positions carry no label); generation left-pads
  ``[BOS][soft prompt][prompt text]`` so every row ends where its answer starts.
- encoder-decoder: ``[soft prompt][prompt text]`` is the encoder input and ``[target, EOS]`` the
  decoder's; generation decodes from the encoder input.

The LLM is frozen for good: no gradients, eval mode whatever ``train()`` its parent calls, and
identified by a digest of its weights so a checkpoint can store it by reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slit_lightning.errors import SLITError
from slit_lightning.losses import generation_loss, sequence_losses
from slit_lightning.model.encoders import _quiet_transformers

IGNORE_INDEX = -100  # label of positions without a loss (transformers' convention)


class LLMConfigError(SLITError, ValueError):
    """An LLM name, dtype or tokenizer that cannot be used; the message says what to change."""


@dataclasses.dataclass
class Generation:
    """How captions and answers are decoded (transformers' ``generate`` does the search).

    Attributes:
        max_new_tokens: longest answer, in LLM tokens.
        min_new_tokens: shortest answer (EOS is suppressed before it).
        num_beams: 1 is greedy (or sampling); more is beam search.
        do_sample: sample instead of taking the most likely token.
        temperature: softens (> 1) or sharpens (< 1) the distribution when sampling.
        top_p: nucleus sampling mass when sampling.
        repetition_penalty: > 1 discourages repeating tokens (1 = off).
        length_penalty: beam search's length exponent (> 1 favours longer answers).
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``; sampling settings only when sampling."""
        args = dataclasses.asdict(self)
        if not self.do_sample:
            del args["temperature"], args["top_p"]
        if self.num_beams == 1:
            del args["length_penalty"]
        return args


class FrozenLLM(nn.Module):
    """A frozen pretrained LLM and its tokenizer, driven by a soft prompt.

    Build it with :meth:`from_pretrained` (hub id or local folder) or directly from a model
    already in memory (a tiny random one in tests).

    Args:
        model: a transformers ``...ForCausalLM`` or ``...ForConditionalGeneration`` (seq2seq).
        tokenizer: its tokenizer; it needs an EOS token (a pad token is borrowed from EOS if
            missing).
        name: what the model was loaded from (shown in messages).
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = ""
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name or type(model).__name__
        if tokenizer.eos_token_id is None:
            raise LLMConfigError(f"{self.name}: the tokenizer has no EOS token to end answers")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
        self.adds_bos = _adds_bos(tokenizer)
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self.width = model.get_input_embeddings().embedding_dim
        self.model.requires_grad_(False)
        super().train(False)
        self.identity = f"{model.config.model_type}:{_digest(model)}"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ) -> FrozenLLM:
        """Load model and tokenizer with transformers' ``from_pretrained``.

        Args:
            name_or_path: hub id (``facebook/opt-1.3b``, ``lmsys/vicuna-7b-v1.5``,
                ``google/flan-t5-xl``) or a local folder (``runs/demo/llm``).
            dtype: weights dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps
                float32 (right on the CPU; use bfloat16 on a GPU for large models).
            trust_remote_code: run model code shipped with a hub checkpoint (off unless asked).
        """
        torch_dtype = _dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise LLMConfigError(
                f"cannot load the LLM {name_or_path!r}: {err}. Give a hub id or a folder written by"
                " save_pretrained (for the built-in one: slit bootstrap llm)"
            ) from err
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        with _quiet_transformers():
            model = auto.from_pretrained(
                name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code
            )
        return cls(model, tokenizer, name=name_or_path)

    def train(self, mode: bool = True) -> FrozenLLM:
        # frozen: dropout stays off even while the stage around it trains
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ tokens and embeddings

    def _ids(self, texts: list[str], special: bool, max_len: int | None = None) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [row[:max_len] if max_len else row for row in ids]

    def _embed(self, rows: list[list[int]], device: torch.device) -> list[Tensor]:
        """Token rows -> one ``(L_i, W)`` embedding tensor each (one lookup for the batch)."""
        flat = torch.tensor([t for row in rows for t in row], dtype=torch.long, device=device)
        embedded = self.model.get_input_embeddings()(flat)
        return list(embedded.split([len(row) for row in rows]))

    def _inputs(
        self, soft: Tensor, rows: list[list[int]], heads: list[int], left: bool
    ) -> tuple[Tensor, Tensor]:
        """``[soft prompt][tokens]`` per row, padded (left or right) -> embeds, mask ``(B, L)``."""
        soft = soft.to(self.dtype)
        embedded = self._embed(rows, soft.device)
        seqs = [
            torch.cat([e[:head], s, e[head:]])
            for s, e, head in zip(soft, embedded, heads, strict=True)
        ]
        side = "left" if left else "right"
        embeds = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_side=side)
        lengths = torch.tensor([len(s) for s in seqs], device=soft.device)
        positions = torch.arange(embeds.shape[1], device=soft.device)
        if left:
            mask = positions >= (embeds.shape[1] - lengths)[:, None]
        else:
            mask = positions < lengths[:, None]
        return embeds, mask.long()

    def _continuations(
        self, prompts: list[str], prompt_ids: list[list[int]], targets: list[str]
    ) -> list[list[int]]:
        """A decoder-only LLM's target tokens as it reads them after the prompt in running text:
        prompt and target joined by a space (none after an empty prompt or one ending in
        whitespace) and tokenized together, the target being what follows the prompt's tokens.
        Tokenized apart, ``"Answer:"`` + ``"three"`` would give the word without its leading
        space, a token sequence the LLM never saw. Where the joint tokenization does not keep
        the prompt's tokens as its start (a merge across the boundary), the target is tokenized
        alone."""
        joined = [
            p + t if not p or p[-1].isspace() else f"{p} {t}"
            for p, t in zip(prompts, targets, strict=True)
        ]
        alone = self._ids(targets, special=False)
        out = []
        for p, row, own in zip(prompt_ids, self._ids(joined, special=True), alone, strict=True):
            out.append(row[len(p) :] if row[: len(p)] == p else own)
        return out

    def _bos_heads(self, rows: list[list[int]]) -> list[int]:
        """1 where a decoder-only row starts with the BOS its tokenizer added, else 0: the soft
        prompt goes after that BOS, inside the document as in pretraining, not before it."""
        bos = self.tokenizer.bos_token_id
        if self.is_encoder_decoder or bos is None or not self.adds_bos:
            return [0] * len(rows)  # a BOS the text itself holds (a chat turn's start) stays
        return [int(bool(row) and row[0] == bos) for row in rows]

    # ------------------------------------------------------------------ loss

    def loss(
        self,
        soft_prompt: Tensor,
        prompts: list[str],
        targets: list[str],
        max_target_len: int = 64,
        per_row: bool = False,
    ) -> Tensor:
        """Mean next-token loss of ``targets`` after ``[soft prompt][prompt]``.

        Args:
            soft_prompt: ``(B, N, W)`` projected query outputs, ``W`` = :attr:`width`.
            prompts: ``B`` texts between the soft prompt and the target ("" for none).
            targets: ``B`` texts to learn (captions, answers); cut to ``max_target_len`` tokens,
                then EOS is appended.
            per_row: each row's own mean instead (``(B,)``), to score candidates in one batch.

        Returns:
            Scalar loss over the target tokens and their EOS only; gradients flow into
            ``soft_prompt`` (the LLM's own weights stay frozen).
        """
        reduce = sequence_losses if per_row else generation_loss
        _check_batch(soft_prompt, prompts, targets, self.width)
        eos = self.tokenizer.eos_token_id
        prompt_ids = self._ids(prompts, special=True)
        heads = self._bos_heads(prompt_ids)  # from the prompt alone: a target never holds BOS
        if self.is_encoder_decoder:
            target_ids = [[*row, eos] for row in self._ids(targets, False, max_target_len)]
            embeds, mask = self._inputs(soft_prompt, prompt_ids, heads, left=False)
            labels = _pad(target_ids, IGNORE_INDEX, soft_prompt.device)
            # the decoder's inputs from the labels, without the model's own loss on top of ours
            decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.model(
                inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids
            ).logits
            return reduce(logits, labels, shift=False)
        continued = self._continuations(prompts, prompt_ids, targets)
        target_ids = [[*row[:max_target_len], eos] for row in continued]
        rows = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
        embeds, mask = self._inputs(soft_prompt, rows, heads, left=False)
        n = soft_prompt.shape[1]
        unlabelled = [[IGNORE_INDEX] * (n + len(p)) for p in prompt_ids]
        labels = _pad(
            [u + t for u, t in zip(unlabelled, target_ids, strict=True)],
            IGNORE_INDEX,
            soft_prompt.device,
        )
        logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits
        return reduce(logits, labels)  # generation_loss: the mean over the global batch's tokens

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self, soft_prompt: Tensor, prompts: list[str], settings: Generation | None = None
    ) -> list[str]:
        """Decode one text per row from ``[soft prompt][prompt]``.

        Args:
            soft_prompt: ``(B, N, W)`` projected query outputs.
            prompts: ``B`` prompt texts ("" for none).
            settings: search settings (greedy by default).

        Returns:
            ``B`` decoded strings, special tokens removed, whitespace stripped.
        """
        out = self.generate_ids(soft_prompt, prompts, settings)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(
        self, soft_prompt: Tensor, prompts: list[str], settings: Generation | None = None
    ) -> Tensor:
        """As :meth:`generate`, but the new token ids ``(B, L_new)`` (decoder-only: without the
        prompt; encoder-decoder: after the decoder's start token), EOS and padding included."""
        _check_batch(soft_prompt, prompts, None, self.width)
        settings = settings or Generation()
        rows = self._ids(prompts, special=True)
        embeds, mask = self._inputs(
            soft_prompt, rows, self._bos_heads(rows), left=not self.is_encoder_decoder
        )
        with warnings.catch_warnings():
            # the prompt is embeddings, so a repetition penalty sees only new tokens: intended
            warnings.filterwarnings("ignore", "Passing `repetition_penalty` with `inputs_embeds`")
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **settings.kwargs(),
            )
        return out[:, 1:] if self.is_encoder_decoder else out


def _check_batch(soft: Tensor, prompts: list[str], targets: list[str] | None, width: int) -> None:
    if soft.dim() != 3 or soft.shape[-1] != width:
        raise ValueError(
            f"soft prompt must be (B, N, {width}) for this LLM, got {tuple(soft.shape)}"
        )
    if len(prompts) != soft.shape[0] or (targets is not None and len(targets) != soft.shape[0]):
        raise ValueError(
            f"{soft.shape[0]} soft prompts but {len(prompts)} prompts"
            + ("" if targets is None else f" and {len(targets)} targets")
        )


def _pad(rows: list[list[int]], value: int, device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)


def _dtype(name: str | None) -> torch.dtype | None:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name is None:
        return torch.float32
    if name not in choices:
        raise LLMConfigError(f"llm dtype {name!r} is not one of {', '.join(choices)}")
    return choices[name]


def _digest(model: nn.Module) -> str:
    """Short hash of the weights' names, shapes and leading values; the values are rounded to
    bfloat16 first, so the same weights loaded in float32 or bfloat16 have one identity."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        lead = tensor.detach().reshape(-1)[:1024].to("cpu", torch.bfloat16).float()
        h.update(lead.numpy().tobytes())
    return h.hexdigest()[:16]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS before every text by itself (Llama's does; SmolLM2's,
    whose BOS ``<|im_start|>`` opens a chat turn, does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(added) > len(plain) and added[0] == bos
