"""Frozen audio encoders behind one small interface: waveform ``(B, S)`` -> frames ``(B, T, D)``.

:class:`AudioEncoder` is the interface the rest of the project sees. :class:`HFAudioEncoder` wraps a
transformers audio model with its own feature extractor; ``HFAudioEncoder.from_pretrained`` reads
``config.model_type`` and picks what that family needs:

- ``whisper``: the encoder only (decoder weights are never loaded); the extractor pads every clip to
  its 30 s window (3000 mel frames, which the encoder insists on) and the output, 1500 frames at one
  per 20 ms, is masked back to the clip's real length. With ``window="clip"`` the encoder instead
  runs on each clip's own length (its mel frames cut after the clip, the position embeddings cut
  to match), clips of equal length batched together: less work on short clips, slightly
  different features (see :class:`_WhisperEncoder`).
- ``audio-spectrogram-transformer`` (AST): patch tokens minus [CLS]/distillation, averaged over
  frequency patches into one frame per time patch (10 Hz); the extractor pads to 1024 mel frames.
- ``clap`` / ``clap_audio_model``: the HTS-AT audio tower only, its time-folded output unfolded into
  time frames and averaged over frequency (32 frames per 10 s window for laion CLAP).
- ``wav2vec2``, ``hubert``, ``data2vec-audio``, ``wavlm``: raw waveform; batched with an attention
  mask when the extractor says the model was trained with one, else clips of equal length together
  and unpadded (zero padding would change group-norm statistics; data2vec-audio's positional
  convolutions read padded frames even under a mask).
- ``slit_small_audio``: the project's own :class:`~slit_lightning.model.small_encoder.SmallAudioModel`.

Every family gives a clip the same features whatever its batch-mates, so features can be cached
per clip under :attr:`AudioEncoder.identity`.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoFeatureExtractor, AutoModel, PretrainedConfig
from transformers.utils import logging as hf_logging

from slit_lightning.errors import SLITError
from slit_lightning.model.small_encoder import SMALL_MODEL_TYPE, SmallAudioConfig, SmallAudioModel

__all__ = [
    "WINDOWS",
    "AudioEncoder",
    "EncoderConfigError",
    "HFAudioEncoder",
    "SmallAudioConfig",
    "SmallAudioModel",
    "prefix_mask",
    "supported_model_types",
]

# data2vec-audio stacks 5 positional convolutions but zeroes padded frames only before the first,
# so even with an attention mask padding leaks into the last real frames.
_NO_MASKING = ("data2vec-audio",)
# Weights some checkpoints omit that frozen inference never uses (wav2vec2's masking vector).
_UNUSED_WEIGHTS = ("masked_spec_embed",)
#: How much audio an encoder with a fixed window sees: ``"full"`` its whole window, the clip
#: padded (the model as trained); ``"clip"`` only the clip's own length (Whisper only).
WINDOWS = ("full", "clip")


class EncoderConfigError(SLITError, ValueError):
    """An encoder name, layer or checkpoint that cannot be used; the message says what to change."""


class AudioEncoder(nn.Module):
    """Waveform ``(B, S)`` + mask ``(B, S)`` -> frames ``(B, T, D)`` + frame mask ``(B, T)``.

    A frozen encoder (the default) has no trainable parameter, stays in eval mode even when a
    parent module calls ``.train()`` (dropout off), and runs without building an autograd graph.

    Attributes:
        sample_rate: rate in Hz the waveform must have.
        width: ``D``, the size of a frame feature.
        identity: a string naming the weights, feature settings, layer and rate; two encoders with
            the same identity give the same features (a feature cache key).
        frozen: whether the encoder is frozen.
    """

    sample_rate: int
    width: int

    def __init__(self, frozen: bool = True) -> None:
        super().__init__()
        self.frozen = frozen

    @property
    def identity(self) -> str:
        raise NotImplementedError

    def set_frozen(self, frozen: bool = True) -> AudioEncoder:
        """Freeze (no grad, eval mode for good) or unfreeze (trainable, follows ``train()``)."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        if frozen:
            super().train(False)
        return self

    def train(self, mode: bool = True) -> AudioEncoder:
        # A frozen encoder ignores train(True) from a parent LightningModule: dropout stays off.
        return super().train(mode and not self.frozen)

    def forward(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a batch.

        Args:
            wave: ``(B, S)`` float waveform at :attr:`sample_rate`, right-padded.
            mask: ``(B, S)`` bool, True on real samples (each row a prefix of at least one).

        Returns:
            ``(B, T, D)`` float32 frames and ``(B, T)`` bool frame mask; frames that cover only
            padding are False (and hold zeros or whatever the model computed there).
        """
        _check_batch(wave, mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            frames, frame_mask = self.encode(wave, mask)
        return frames.float(), frame_mask

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """What :meth:`forward` computes, on validated inputs; subclasses implement it."""
        raise NotImplementedError


def _check_batch(wave: Tensor, mask: Tensor) -> None:
    if wave.dim() != 2 or mask.shape != wave.shape:
        raise ValueError(
            f"audio encoder expects wave (B, S) and mask (B, S); got {tuple(wave.shape)} and"
            f" {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"audio mask must be bool (True = real sample), got {mask.dtype}")
    lengths = mask.sum(-1)
    if wave.shape[0] and int(lengths.min()) < 1:
        raise ValueError("every clip needs at least one real sample; got an all-padding row")
    if not torch.equal(mask, prefix_mask(lengths, mask.shape[1])):
        raise ValueError("audio mask must mark a prefix of each row (right padding only)")


def prefix_mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size)`` bool, True on the first ``lengths[b]`` positions."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


class HFAudioEncoder(AudioEncoder):
    """A transformers audio model and its feature extractor as a frozen :class:`AudioEncoder`.

    Build it with :meth:`from_pretrained` (a hub id or a local folder) or :meth:`from_model`
    (a model already in memory, e.g. built from a config in a test). Both return the subclass for
    the model's family; :meth:`encode` is family specific, the rest is shared.

    Args:
        model: the encoder module (for Whisper the encoder, for CLAP the audio model).
        feature_extractor: its transformers feature extractor (None for ``slit_small_audio``).
        layer: which hidden state: -1 the last (after the final norm), -2 the penultimate, ...
        frozen: freeze the encoder (see :class:`AudioEncoder`).
        window: ``"full"`` (default) or ``"clip"``, one of :data:`WINDOWS`; only families
            listed in :attr:`windows` accept ``"clip"``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    needs_extractor: ClassVar[bool] = True
    #: the ``window`` settings this family supports
    windows: ClassVar[tuple[str, ...]] = ("full",)

    def __init__(
        self,
        model: nn.Module,
        feature_extractor: Any,
        layer: int = -1,
        frozen: bool = True,
        window: str = "full",
    ) -> None:
        super().__init__(frozen)
        self.model, self.feature_extractor = model, feature_extractor
        self.model_type: str = model.config.model_type
        self.window = _check_window(window, self.windows, self.model_type)
        if self.needs_extractor and feature_extractor is None:
            raise EncoderConfigError(
                f"a {self.model_type} encoder needs its feature extractor (preprocessor_config.json)"
            )
        self.max_seconds = self.window_seconds()
        self.index = _layer_index(layer, self.num_hidden_states(), self.model_type)
        self.layer = layer
        self.last = self.index == self.num_hidden_states() - 1
        self.sample_rate = self.rate()
        self.width = self.layer_width(self.index)
        self._identity: str | None = None
        self.set_frozen(frozen)
        # computed now, from the weights as loaded: a later cast (bf16-true) must not change it
        _ = self.identity

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        layer: int = -1,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        frozen: bool = True,
        window: str = "full",
    ) -> HFAudioEncoder:
        """Load an encoder and its feature extractor with transformers' own ``from_pretrained``.

        Args:
            name_or_path: hub id (e.g. ``openai/whisper-small``) or a local folder.
            layer: hidden state to return (-1 last, -2 penultimate, ...).
            dtype: weights dtype (``torch.bfloat16``, ``"float16"``...); features come out float32.
            trust_remote_code: passed to transformers (custom code from the hub).
            frozen: freeze the encoder.
            window: ``"full"`` pads each clip to a fixed-window model's window (as trained);
                ``"clip"`` (Whisper only) runs the encoder on the clip's own length.
        """
        model_type = _model_type(name_or_path, trust_remote_code)
        family = _family(model_type, name_or_path)
        _check_window(window, family.windows, model_type)  # before loading any weights
        with _quiet_transformers():
            model = family.load_model(name_or_path, dtype, trust_remote_code)
            extractor = family.load_extractor(name_or_path, trust_remote_code)
        return family(model, extractor, layer=layer, frozen=frozen, window=window)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        feature_extractor: Any = None,
        layer: int = -1,
        frozen: bool = True,
        window: str = "full",
    ) -> HFAudioEncoder:
        """Wrap a model already built (e.g. from a tiny config); dispatches on its model_type."""
        family = _family(model.config.model_type, type(model).__name__)
        unwrapped = family.unwrap(model)
        return family(unwrapped, feature_extractor, layer=layer, frozen=frozen, window=window)

    @classmethod
    def load_model(cls, name: str, dtype: Any, trust_remote_code: bool) -> nn.Module:
        return _load(AutoModel, name, dtype=dtype, trust_remote_code=trust_remote_code)

    @classmethod
    def load_extractor(cls, name: str, trust_remote_code: bool) -> Any:
        try:
            return AutoFeatureExtractor.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise EncoderConfigError(
                f"{name}: no feature extractor (preprocessor_config.json) could be loaded: {err}"
            ) from err

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The part of a full model that encodes audio (the model itself by default)."""
        return model

    # -- family specifics (overridden) ---------------------------------------------------------

    def num_hidden_states(self) -> int:
        """Entries of the model's ``hidden_states`` (embeddings + one per layer)."""
        return self.model.config.num_hidden_layers + 1

    def layer_width(self, index: int) -> int:
        return self.model.config.hidden_size

    def rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def window_seconds(self) -> float | None:
        """Length of the fixed window the model sees (None: any length)."""
        return None

    # -- shared helpers ------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """``model_type:digest:layer:rate``, plus ``:window-clip`` when not the full window (the
        default's identity stays what it always was, so caches already written stay valid); the
        digest covers weights and feature settings."""
        if self._identity is None:
            digest = _digest(self.model, self.feature_extractor)
            self._identity = f"{self.model_type}:{digest}:layer{self.index}:{self.sample_rate}Hz"
            if self.window != "full":
                self._identity += f":window-{self.window}"
        return self._identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def clips(
        self, wave: Tensor, mask: Tensor, min_samples: int = 1
    ) -> tuple[list[np.ndarray], Tensor]:
        """Per-clip float32 numpy arrays (what feature extractors take) and their lengths ``(B,)``.

        Clips longer than the family's window are cut to it (with a warning); clips shorter than
        ``min_samples`` are zero-padded to it, so every clip yields at least one frame.
        """
        lengths = mask.sum(-1).cpu()
        limit = round(self.max_seconds * self.sample_rate) if self.max_seconds else None
        if limit is not None and int(lengths.max()) > limit:
            warnings.warn(
                f"{self.model_type} encodes at most {self.max_seconds:g} s per clip; longer clips"
                f" are cut to their first {self.max_seconds:g} s (crop them in the data settings)",
                stacklevel=4,
            )
            lengths = lengths.clamp_max(limit)
        host = wave.detach().float().cpu().numpy()
        real = [host[b, :n] for b, n in enumerate(lengths.tolist())]
        # pad with zeros, never with whatever the batch held past the clip
        arrays = [np.pad(x, (0, max(0, min_samples - len(x)))) for x in real]
        lengths = lengths.clamp_min(min_samples)
        return arrays, lengths

    def extract(self, arrays: list[np.ndarray], **kwargs: Any) -> Any:
        """The feature extractor on per-clip arrays, outside any autocast: extractors compute
        their spectrograms in float32 (some through torch, then numpy, which has no bfloat16),
        whatever precision the model then runs in."""
        with torch.autocast(self.device.type, enabled=False):
            return self.feature_extractor(arrays, sampling_rate=self.sample_rate, **kwargs)

    def run(self, **inputs: Tensor) -> Tensor:
        """Call the model on ``inputs`` (moved to its device/dtype); the chosen hidden state."""
        moved = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else None)
            for k, v in inputs.items()
        }
        out = self.model(**moved, output_hidden_states=not self.last)
        return out.last_hidden_state if self.last else out.hidden_states[self.index]

    def windowed_mask(self, lengths: Tensor, frames: int, window: int) -> Tensor:
        """``(B, T)`` mask for models that see a fixed window of ``window`` samples: frame ``k``
        starts at ``k * window / T`` and is real when it starts inside the clip."""
        valid = torch.ceil(lengths.double() * frames / window).long().clamp(1, frames)
        return prefix_mask(valid, frames).to(self.device)


def _check_window(window: str, supported: tuple[str, ...], model_type: str) -> str:
    """``window`` if this family supports it, else a clear :class:`EncoderConfigError`."""
    if window not in WINDOWS:
        raise EncoderConfigError(
            f"encoder window={window!r} is not one of {', '.join(map(repr, WINDOWS))}"
        )
    if window not in supported:
        raise EncoderConfigError(
            f"a {model_type} encoder supports window={', '.join(map(repr, supported))} only;"
            f" window={window!r} is for Whisper"
        )
    return window


def _layer_index(layer: int, count: int, model_type: str) -> int:
    if not -count <= layer < count:
        raise EncoderConfigError(
            f"layer={layer} is out of range for this {model_type} encoder: it has {count} hidden"
            f" states (embeddings + {count - 1} layers); use -1 (last), -2 (penultimate), ..."
        )
    return layer % count


# -- families ---------------------------------------------------------------------------------


class _WhisperEncoder(HFAudioEncoder):
    """Whisper's encoder; ``window="full"`` runs transformers' own forward on the padded 30 s
    window, ``window="clip"`` runs the same submodules on each clip's own length.

    transformers' ``WhisperEncoder.forward`` refuses any input but the full window, so the own-length
    path calls the module's own pieces (``conv1``, ``conv2``, ``embed_positions``, ``layers``,
    ``layer_norm``) in the order its forward does, with the position embeddings cut to the clip's
    frames. Whisper attends over every frame without a mask, so padding a short clip to its
    batch's longest would change its frames: clips are instead grouped by their own length and
    each group runs unpadded, which keeps a clip's frames independent of its batch-mates (the
    feature cache relies on it). Mostly one group per batch when the data crops clips to one
    length. The features differ slightly from the padded run's: a clip's frames no longer attend
    to the silence after it, and the convolutions see zeros at the cut.
    """

    model_types = ("whisper",)
    windows = WINDOWS

    def window_seconds(self) -> float:
        return float(self.feature_extractor.chunk_length)  # 30 s for every released Whisper

    @classmethod
    def load_model(cls, name: str, dtype: Any, trust_remote_code: bool) -> nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        # Checkpoints store the encoder under model.encoder. (generation) or encoder. (base model).
        mapping = {r"^model\.encoder\.": "", r"^encoder\.": ""}
        return _load(WhisperEncoder, name, dtype=dtype, key_mapping=mapping)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.get_encoder() if hasattr(model, "get_encoder") else model

    def num_hidden_states(self) -> int:
        return self.model.config.encoder_layers + 1

    def layer_width(self, index: int) -> int:
        return self.model.config.d_model

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        fe = self.feature_extractor
        arrays, lengths = self.clips(wave, mask)
        # The mel spectrogram is always that of the padded window (its log-mel normalisation
        # reads the whole window), so both modes see the same input frames.
        feats = self.extract(
            arrays, padding="max_length", return_tensors="pt", device=str(self.device)
        )
        if self.window == "clip":
            return self._own_length(feats.input_features, lengths)
        # Whisper's own forward only accepts the full window: every clip padded, masked afterwards.
        hidden = self.run(input_features=feats.input_features)
        return hidden, self.windowed_mask(lengths, hidden.shape[1], fe.n_samples)

    def _own_length(self, mel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Each clip on its own length: mel ``(B, n_mels, 3000)`` -> ``(B, T, D)`` and mask.

        A clip keeps the frames the padded run marks real (one per ``stride`` mel frames, where
        ``stride`` is the conv stack's), so ``T`` is the batch's longest clip's; clips with the
        same frame count run together, unpadded, and the rest is zero-filled.
        """
        full = self.model.config.max_source_positions
        stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]
        valid = self.windowed_mask(lengths, full, self.feature_extractor.n_samples).sum(-1).cpu()
        parts: list[Tensor] = [mel.new_empty(0)] * len(valid)
        for n in valid.unique().tolist():
            rows = (valid == n).nonzero().flatten().tolist()
            hidden = self._forward_cut(mel[rows, :, : n * stride])
            for j, b in enumerate(rows):
                parts[b] = hidden[j : j + 1]
        return _pad_stack(parts), prefix_mask(valid.to(self.device), int(valid.max()))

    def _forward_cut(self, mel: Tensor) -> Tensor:
        """The encoder's forward on ``(B, n_mels, 2 * T)`` mel frames, any ``T`` up to its
        window: the chosen hidden state ``(B, T, D)``.

        Mirrors ``WhisperEncoder.forward`` (conv stem, positions, layers, final norm) with the
        position embeddings cut to ``T``; hidden state ``i`` is the output of layer ``i`` (0: the
        embeddings), the last one after the final norm, as in ``output_hidden_states``. Layer
        drop (``encoder_layerdrop``, 0 in released Whisper) is not applied.
        """
        m = self.model
        x = mel.to(self.device, self.dtype)
        x = nn.functional.gelu(m.conv2(nn.functional.gelu(m.conv1(x)))).permute(0, 2, 1)
        x = x + m.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=m.dropout, training=m.training)
        for layer in m.layers[: self.index]:
            x = layer(x, None)
        return m.layer_norm(x) if self.last else x


class _ASTEncoder(HFAudioEncoder):
    model_types = ("audio-spectrogram-transformer",)

    def window_seconds(self) -> float:
        # the extractor pads or cuts to max_length fbank frames of 10 ms (1024: 10.24 s)
        return self.feature_extractor.max_length / 100.0

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return getattr(model, "audio_spectrogram_transformer", model)

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        arrays, lengths = self.clips(wave, mask)
        feats = self.extract(arrays, return_tensors="pt")
        hidden = self.run(input_values=feats.input_values)
        f_dim, t_dim = self.model.embeddings.get_shape(self.model.config)
        # Tokens: [CLS], [DIST], then patches frequency-major; average the frequency patches.
        patches = hidden[:, 2:].reshape(hidden.shape[0], f_dim, t_dim, hidden.shape[-1])
        frames = patches.mean(1)
        window = round(self.max_seconds * self.sample_rate)
        return frames, self.windowed_mask(lengths, t_dim, window)


class _ClapEncoder(HFAudioEncoder):
    model_types = ("clap", "clap_audio_model")

    def window_seconds(self) -> float:
        fe = self.feature_extractor
        return fe.nb_max_samples / fe.sampling_rate  # 10 s for laion CLAP

    @classmethod
    def load_model(cls, name: str, dtype: Any, trust_remote_code: bool) -> nn.Module:
        from transformers import ClapAudioModel

        # A full ClapModel checkpoint keeps the audio tower under audio_model.; the text tower
        # and projections are left unloaded.
        return _load(ClapAudioModel, name, dtype=dtype, key_mapping={r"^audio_model\.": ""})

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return getattr(model, "audio_model", model)

    def num_hidden_states(self) -> int:
        return len(self.model.config.depths) + 1

    def layer_width(self, index: int) -> int:
        # hidden_states[i] comes after stage i's patch merging, which doubles the width
        c = self.model.config
        return c.patch_embeds_hidden_size * 2 ** min(index, len(c.depths) - 1)

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        fe = self.feature_extractor
        arrays, lengths = self.clips(wave, mask)
        # "fusion" stacks 4 mel views, which only a fusion model takes. Clips never exceed the
        # window here, so "rand_trunc" never crops at random, and is_longer is False for all
        # (under fusion the extractor would flag one clip at random: non-deterministic features).
        truncation = "fusion" if self.model.config.enable_fusion else "rand_trunc"
        feats = self.extract(arrays, truncation=truncation, return_tensors="pt")
        is_longer = torch.zeros(len(arrays), 1, dtype=torch.bool)
        hidden = self.run(input_features=feats.input_features, is_longer=is_longer)
        ratio = self.model.audio_encoder.freq_ratio
        frames = _unfold_clap(hidden, ratio, folded=not self.last)
        return frames, self.windowed_mask(lengths, frames.shape[1], fe.nb_max_samples)


def _unfold_clap(hidden: Tensor, ratio: int, folded: bool) -> Tensor:
    """HTS-AT states -> time frames ``(B, T, C)``, averaged over frequency.

    HTS-AT folds a long spectrogram into a square image: ``ratio`` consecutive time chunks are
    stacked along the height. The last state is already unfolded to ``(B, C, F, ratio * W)``;
    intermediate ones are ``(B, C, ratio * F, W)`` images.
    """
    if folded:
        b, c, h, w = hidden.shape
        hidden = hidden.reshape(b, c, ratio, h // ratio, w).permute(0, 1, 3, 2, 4)
        hidden = hidden.reshape(b, c, h // ratio, ratio * w)
    return hidden.mean(2).transpose(1, 2)


class _Wav2Vec2Encoder(HFAudioEncoder):
    model_types = ("wav2vec2", "hubert", "data2vec-audio", "wavlm")

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.base_model

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        arrays, lengths = self.clips(wave, mask, min_samples=self._receptive_field())
        # Ask for the mask either way: the extractor normalises each clip over its real samples.
        feats = self.extract(arrays, padding=True, return_attention_mask=True, return_tensors="pt")
        valid = self.model._get_feat_extract_output_lengths(lengths).long()
        if self.feature_extractor.return_attention_mask and self.model_type not in _NO_MASKING:
            hidden = self.run(input_values=feats.input_values, attention_mask=feats.attention_mask)
        else:
            hidden = self._by_length(feats.input_values, lengths)
        return hidden, prefix_mask(valid.to(self.device), hidden.shape[1])

    def _by_length(self, values: Tensor, lengths: Tensor) -> Tensor:
        """Run clips of equal length together and unpadded: ``(B, S)`` -> ``(B, T, D)``.

        For models whose output depends on zero padding (group norm over time, or stacked
        positional convolutions that read padded frames), this keeps each clip's frames what
        they are when it runs alone; cropped training data mostly has one length per batch.
        """
        parts: list[Tensor] = [values.new_empty(0)] * len(lengths)
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().flatten().tolist()
            hidden = self.run(input_values=values[rows, :n])
            for j, b in enumerate(rows):
                parts[b] = hidden[j : j + 1]
        return _pad_stack(parts)

    def _receptive_field(self) -> int:
        """Fewest samples that give one frame."""
        c = self.model.config
        need = 1
        for kernel, stride in reversed(list(zip(c.conv_kernel, c.conv_stride, strict=True))):
            need = (need - 1) * stride + kernel
        return need


def _pad_stack(parts: list[Tensor]) -> Tensor:
    """``[(1, T_i, D)]`` -> ``(B, max T_i, D)`` with zeros after each."""
    longest = max(p.shape[1] for p in parts)
    return torch.cat([nn.functional.pad(p, (0, 0, 0, longest - p.shape[1])) for p in parts])


class _SmallEncoder(HFAudioEncoder):
    model_types = (SMALL_MODEL_TYPE,)
    needs_extractor = False

    @classmethod
    def load_model(cls, name: str, dtype: Any, trust_remote_code: bool) -> nn.Module:
        return _load(SmallAudioModel, name, dtype=dtype)

    @classmethod
    def load_extractor(cls, name: str, trust_remote_code: bool) -> Any:
        return None  # the log-mel front end is part of the model

    def rate(self) -> int:
        return int(self.model.config.sample_rate)

    def encode(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(wave.to(self.device), mask.to(self.device), layer=self.layer)


_FAMILIES: tuple[type[HFAudioEncoder], ...] = (
    _WhisperEncoder,
    _ASTEncoder,
    _ClapEncoder,
    _Wav2Vec2Encoder,
    _SmallEncoder,
)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values :class:`HFAudioEncoder` can load."""
    return sorted(t for family in _FAMILIES for t in family.model_types)


def _family(model_type: str, name: str) -> type[HFAudioEncoder]:
    for family in _FAMILIES:
        if model_type in family.model_types:
            return family
    raise EncoderConfigError(
        f"{name}: unsupported audio encoder model_type {model_type!r}; supported model types:"
        f" {', '.join(supported_model_types())}"
    )


def _model_type(name: str, trust_remote_code: bool) -> str:
    """``model_type`` from ``config.json`` (read without building anything)."""
    try:
        config, _ = PretrainedConfig.get_config_dict(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise EncoderConfigError(
            f"cannot read the config of audio encoder {name!r}: give a local folder with"
            f" config.json, or a hub id that is in the local cache or reachable ({err})"
        ) from err
    if "model_type" not in config:
        raise EncoderConfigError(f"{name}: config.json has no model_type")
    return str(config["model_type"])


def _load(model_class: Any, name: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained`` that refuses checkpoints missing weights the model uses."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model, info = model_class.from_pretrained(name, output_loading_info=True, **kwargs)
    missing = [k for k in info["missing_keys"] if not k.endswith(_UNUSED_WEIGHTS)]
    if missing:
        raise EncoderConfigError(
            f"{name}: the checkpoint lacks {len(missing)} weights of {type(model).__name__}"
            f" (e.g. {', '.join(sorted(missing)[:3])}); is it the model its config names?"
        )
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the load report (it lists every decoder / text-tower weight we leave out on purpose)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _digest(model: nn.Module, feature_extractor: Any) -> str:
    """Short hash of the weights (names, shapes, dtypes, leading values) and extractor settings.

    Reads at most 4096 values per tensor, copied to the CPU, so it is cheap and the same on every
    device; the feature extractor's settings (window, mel bins, normalisation) change features too.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)[:4096].to("cpu", torch.float32)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat.numpy().tobytes())
    if feature_extractor is not None:
        h.update(feature_extractor.to_json_string().encode())
    return h.hexdigest()[:16]
