"""The Python API: ``SLIT.from_pretrained(path)`` and a method per task.

::

    from slit_lightning import SLIT

    model = SLIT.from_pretrained("runs/export/demo")        # exported folder or training .ckpt
    model.caption("dog.wav")                                 # 'a dog barks twice'
    model.answer(["a.wav", "b.flac"], "How many beeps?")     # ['three', 'two']
    model.classify("street.mp3", ["dog", "rain", "siren"])   # Classification(label='siren', ...)
    model.embed_audio(wave, sample_rate=44100)               # (1, N, E)
    model.similarity(["a.wav", "b.wav"], ["rain", "a dog"])  # (2, 2)

A :class:`SLIT` holds plain ``nn.Module``s: the frozen audio encoder and one or both of
:class:`~slit_lightning.model.heads.ContrastiveHeads` (stage 1's Q-Former and projections: embeddings,
similarity, search, contrastive classification) and :class:`~slit_lightning.model.heads.TextGenerator`
(a stage-2 or instruction-tuned Q-Former, the projection and the frozen LLM: captions, answers,
generative classification). Neither an exported folder (:mod:`slit_lightning.model.export`) nor
a training checkpoint of any stage (:mod:`slit_lightning.model.load`) needs Lightning or the
stage classes to load; ``save_pretrained`` writes the exported folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from slit_lightning.data.audio import (
    AudioError,
    check,
    crop,
    load_audio,
    pad_batch,
    seconds_to_samples,
    to_mono,
)
from slit_lightning.errors import SLITError
from slit_lightning.model.encoders import AudioEncoder
from slit_lightning.model.export import ExportSummary, export_model, load_exported
from slit_lightning.model.heads import ContrastiveHeads, SLITParts, TextGenerator
from slit_lightning.model.llm import Generation
from slit_lightning.model.load import read_training_checkpoint

#: what the ``audio`` argument of every method accepts
Audio = str | Path | Sequence[str | Path] | np.ndarray | Tensor | Sequence[np.ndarray | Tensor]


class CapabilityError(SLITError, ValueError):
    """A method the loaded model cannot serve; the message names the checkpoint that would."""


@dataclass
class Classification:
    """One clip's classification: the best label and every label's score (they sum to 1)."""

    label: str
    scores: dict[str, float]


class SLIT:
    """A trained SLIT model for inference; build it with :meth:`from_pretrained`.

    Every method takes ``audio`` as a file path, a list of paths, a waveform (``(S,)`` array or
    tensor, or ``(B, S)`` for several clips, or a list of 1-D waveforms) with its
    ``sample_rate``. Clips are mixed to mono, resampled to the encoder's rate, cut to
    :attr:`max_seconds` and batched :attr:`batch_size` at a time. Text methods return one result
    for one clip and a list for several; tensor methods always have a batch dimension.
    Unreadable files raise :class:`~slit_lightning.data.audio.AudioError` naming the file.

    Args:
        encoder: the frozen audio encoder.
        heads: stage 1's contrastive path (None: no embeddings).
        generator: the LLM path (None: no captions or answers).
        max_seconds: clips are cut to this (None: the encoder's window, else whole clips).
        origin: where the parts came from (checkpoint, encoder and LLM names); export uses it.
        batch_size: clips per forward pass.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        heads: ContrastiveHeads | None,
        generator: TextGenerator | None,
        max_seconds: float | None = None,
        origin: dict[str, Any] | None = None,
        batch_size: int = 8,
    ) -> None:
        if heads is None and generator is None:
            raise ValueError("a SLIT model needs contrastive heads, a generator, or both")
        self.encoder, self.heads, self.generator = encoder.eval(), heads, generator
        for part in (heads, generator):
            if part is not None:
                part.eval().requires_grad_(False)
        self.max_seconds = max_seconds or getattr(encoder, "max_seconds", None)
        self.origin = dict(origin or {})
        self.batch_size = batch_size

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        stage1: str | Path | None = None,
        encoder: str | None = None,
        llm: str | None = None,
    ) -> SLIT:
        """Load an exported folder (``slit export``) or a training checkpoint of any stage.

        Args:
            path: exported folder, or ``.ckpt`` of stage 1, stage 2 or instruction tuning.
            device: ``cpu``, ``cuda``, ``cuda:1``... (None: ``cuda`` when available).
            stage1: with a stage-2 / instruction-tuned checkpoint, the stage-1 checkpoint whose
                contrastive heads (and Q-Former) then serve embeddings, similarity and
                contrastive classification too.
            encoder, llm: the frozen models' folders when they have moved since training
                (checkpoints only; an exported folder carries its own).
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(path)
        if path.is_dir():
            parts = load_exported(path, device)
        else:
            parts = read_training_checkpoint(path, device, stage1, encoder, llm)
        return cls(parts.encoder, parts.heads, parts.generator, parts.max_seconds, parts.origin)

    @property
    def parts(self) -> SLITParts:
        """The modules this model holds, with its crop and origin."""
        return SLITParts(self.encoder, self.heads, self.generator, self.max_seconds, self.origin)

    def save_pretrained(
        self,
        out: str | Path,
        copy_frozen: bool = True,
        overwrite: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExportSummary:
        """Write this model to the folder ``out`` (``slit export``; see
        :mod:`slit_lightning.model.export`): trained weights as safetensors, a JSON config, the
        tokenizer, and the frozen encoder / LLM copied in (``copy_frozen``) or referenced."""
        return export_model(self.parts, out, copy_frozen, overwrite, progress)

    def to(self, device: str | torch.device) -> SLIT:
        """Move every part to ``device``; returns self."""
        for part in (self.encoder, self.heads, self.generator):
            if part is not None:
                part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def sample_rate(self) -> int:
        """The rate clips are resampled to (the encoder's)."""
        return int(self.encoder.sample_rate)

    @property
    def identity(self) -> str:
        """Digest of what an embedding depends on (encoder, Q-Former, heads): two models with
        one identity give the same embeddings, so a search index records it."""
        heads = self.need_heads("identity")
        h = hashlib.sha256(self.encoder.identity.encode())
        for name, tensor in heads.state_dict().items():
            h.update(f"{name}{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().reshape(-1)[:4096].to("cpu", torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ the tasks

    @torch.no_grad()
    def caption(
        self, audio: Audio, sample_rate: int | None = None, settings: Generation | None = None
    ) -> str | list[str]:
        """A caption per clip (``str`` for one clip, ``list[str]`` for several).

        Example: ``model.caption("dog.wav")`` -> ``'a dog barks twice'``."""
        generator = self.need_generator("caption")
        out = [
            c
            for f, m in self._features(audio, sample_rate)
            for c in generator.caption(f, m, settings)
        ]
        return out[0] if _is_single(audio) else out

    @torch.no_grad()
    def answer(
        self,
        audio: Audio,
        question: str | Sequence[str],
        sample_rate: int | None = None,
        settings: Generation | None = None,
    ) -> str | list[str]:
        """The answer to ``question`` (any instruction) about each clip; ``question`` is one
        string for all clips or one per clip.

        Example: ``model.answer("beeps.wav", "How many beeps are there?")`` -> ``'three'``."""
        generator = self.need_generator("answer")
        out: list[str] = []
        for feats, frames in self._features(audio, sample_rate):
            if isinstance(question, str):
                asked = [question] * len(feats)
            else:
                asked = list(question[len(out) : len(out) + len(feats)])
            if len(asked) != len(feats):
                raise ValueError("give one question, or exactly one question per clip")
            out += generator.answer(feats, frames, asked, settings)
        return out[0] if _is_single(audio) else out

    @torch.no_grad()
    def embed_audio(self, audio: Audio, sample_rate: int | None = None) -> Tensor:
        """L2-normalised query embeddings ``(B, N, E)`` on the CPU (``N`` queries, shared space
        of width ``E``); a clip's similarity to a text is the best of its ``N`` queries.

        Example: ``model.embed_audio(["a.wav", "b.wav"]).shape`` -> ``(2, 32, 256)``."""
        heads = self.need_heads("embed_audio")
        parts = [heads.audio(f, m).float().cpu() for f, m in self._features(audio, sample_rate)]
        return torch.cat(parts)

    @torch.no_grad()
    def embed_text(self, text: str | Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(T, E)`` on the CPU (``T = 1`` for one string).

        Example: ``model.embed_text(["rain", "a dog barks"]).shape`` -> ``(2, 256)``."""
        heads = self.need_heads("embed_text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("embed_text needs one or more non-empty strings")
        parts = [heads.text(texts[i : i + 64]).float().cpu() for i in range(0, len(texts), 64)]
        return torch.cat(parts)

    def similarity(
        self, audio: Audio, text: str | Sequence[str], sample_rate: int | None = None
    ) -> Tensor:
        """Cosine similarities ``(B, T)`` of clips and texts (each clip's best query).

        Example: ``model.similarity("rain.wav", ["rain", "a dog"])`` -> ``tensor([[0.61, 0.12]])``."""
        return scores(self.embed_audio(audio, sample_rate), self.embed_text(text))

    @torch.no_grad()
    def classify(
        self,
        audio: Audio,
        labels: Sequence[str],
        sample_rate: int | None = None,
        method: Literal["auto", "contrastive", "generative"] = "auto",
        prompt: str = "the sound of {label}",
    ) -> Classification | list[Classification]:
        """Zero-shot classification of each clip among ``labels``.

        ``contrastive`` scores each label's text prompt (``prompt`` with ``{label}``) against the
        clip in the shared space, probabilities at the model's learned temperature; ``generative``
        scores each label by the LLM's likelihood of it as the answer. ``auto`` takes the
        contrastive heads when the model has them.

        Example: ``model.classify("x.wav", ["dog", "rain"])`` ->
        ``Classification(label='rain', scores={'dog': 0.08, 'rain': 0.92})``."""
        labels = parse_labels(labels)
        if method == "auto":
            method = "contrastive" if self.heads is not None else "generative"
        if method == "contrastive":
            heads = self.need_heads("classify(method='contrastive')")
            if "{label}" not in prompt:
                raise ValueError(f"prompt {prompt!r} needs a {{label}} placeholder")
            sim = self.similarity(audio, [prompt.format(label=lab) for lab in labels], sample_rate)
            logits = sim / heads.temperature.float().cpu()
        elif method == "generative":
            generator = self.need_generator("classify(method='generative')")
            logits = torch.cat(
                [
                    generator.label_scores(f, m, labels)
                    for f, m in self._features(audio, sample_rate)
                ]
            )
        else:
            raise ValueError(f"method={method!r}; choose auto, contrastive or generative")
        probs = logits.softmax(dim=-1)
        out = [
            Classification(labels[int(row.argmax())], dict(zip(labels, row.tolist(), strict=True)))
            for row in probs
        ]
        return out[0] if _is_single(audio) else out

    # ------------------------------------------------------------------ audio in, features out

    def load_clip(self, path: str | Path) -> Tensor:
        """One file as the model reads it: mono ``(S,)`` at :attr:`sample_rate`, cut to
        :attr:`max_seconds` (raises ``AudioError``)."""
        return self._crop(load_audio(str(path), self.sample_rate))

    def encode_waves(self, waves: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Clips ``[(S_i,)]`` -> frozen features ``(B, T, D)`` and frame mask ``(B, T)``."""
        audio, mask = pad_batch(waves)
        return self.encoder(audio.to(self.device), mask.to(self.device))

    def _features(self, audio: Audio, sample_rate: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        for waves in self._batches(audio, sample_rate):
            yield self.encode_waves(waves)

    def _batches(self, audio: Audio, sample_rate: int | None) -> Iterator[list[Tensor]]:
        """Clips ``(S_i,)``, at most :attr:`batch_size` at a time; files are read lazily."""
        items = _as_items(audio)
        if not items:
            raise ValueError("no audio given")
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            yield [self._wave(item, start + i, sample_rate) for i, item in enumerate(chunk)]

    def _wave(self, item: Any, index: int, sample_rate: int | None) -> Tensor:
        if isinstance(item, str | Path):
            return self.load_clip(item)
        if sample_rate is None:
            raise ValueError("a waveform needs its sample rate: pass sample_rate=... (e.g. 16000)")
        samples = item.detach().cpu().float().numpy() if isinstance(item, Tensor) else item
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(
                f"waveform {index} has shape {samples.shape}: give (S,) per clip or (B, S) for a"
                " batch, mixed to mono"
            )
        wave = to_mono(samples[:, None], int(sample_rate), self.sample_rate)
        return self._crop(check(wave, f"<waveform {index}>"))

    def _crop(self, wave: Tensor) -> Tensor:
        if not self.max_seconds:
            return wave
        return crop(wave, seconds_to_samples(self.max_seconds, self.sample_rate), None)

    # ------------------------------------------------------------------ capabilities

    def need_heads(self, method: str) -> ContrastiveHeads:
        """The contrastive heads, or a :class:`CapabilityError` saying which checkpoint has them."""
        if self.heads is None:
            raise CapabilityError(
                f"{method} needs stage 1's contrastive heads, which this model lacks: load a"
                " stage-1 checkpoint, or pass stage1=... (slit export --stage1) along with a"
                " stage-2 / instruction-tuned checkpoint"
            )
        return self.heads

    def need_generator(self, method: str) -> TextGenerator:
        """The generator, or a :class:`CapabilityError` saying which checkpoint has one."""
        if self.generator is None:
            raise CapabilityError(
                f"{method} needs an LLM, which this stage-1 model lacks: load a stage-2 or"
                " instruction-tuned checkpoint (or a folder exported from one)"
            )
        return self.generator

    def capabilities(self) -> list[str]:
        """The methods this model serves."""
        out = []
        if self.generator is not None:
            out += ["caption", "answer", "classify(generative)"]
        if self.heads is not None:
            out += ["embed_audio", "embed_text", "similarity", "classify(contrastive)"]
        return out

    def __repr__(self) -> str:
        return f"SLIT({self.origin.get('source', '?')}: {', '.join(self.capabilities())})"


def scores(audio: Tensor, text: Tensor) -> Tensor:
    """``audio (B, N, E)`` x ``text (T, E)`` -> ``(B, T)``: each clip's best query per text."""
    return torch.einsum("te,bne->btn", text.float(), audio.float()).amax(dim=-1)


def _is_single(audio: Audio) -> bool:
    if isinstance(audio, str | Path):
        return True
    return isinstance(audio, np.ndarray | Tensor) and audio.ndim == 1


def _as_items(audio: Audio) -> list[Any]:
    """Paths and 1-D waveforms, one per clip."""
    if isinstance(audio, str | Path):
        return [audio]
    if isinstance(audio, np.ndarray | Tensor):
        if audio.ndim == 1:
            return [audio]
        if audio.ndim == 2:
            return list(audio)
        raise ValueError(f"audio array of shape {tuple(audio.shape)}: give (S,) or (B, S)")
    if isinstance(audio, Sequence):
        return list(audio)
    raise TypeError(
        f"audio is a {type(audio).__name__}: give a path, a list of paths, or a waveform array"
        " or tensor with sample_rate=..."
    )


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels as a list (a string is split at commas), stripped; two or more, distinct."""
    if isinstance(labels, str):
        labels = [lab.strip() for lab in labels.split(",")]
    out = [lab.strip() for lab in labels if lab and lab.strip()]
    if len(out) < 2 or len(set(out)) != len(out):
        raise ValueError(f"classify needs two or more distinct labels, got {list(labels)!r}")
    return out


__all__ = [
    "SLIT",
    "AudioError",
    "CapabilityError",
    "Classification",
    "ContrastiveHeads",
    "TextGenerator",
    "scores",
]
