"""The project's own small audio encoder (trained once by :mod:`slit_lightning.builtin.encoder_bootstrap`).

The built-in default must run offline, where no pretrained audio encoder can be downloaded, so the
project trains a small one itself (``slit bootstrap encoder``) and saves it as ``config.json`` +
``model.safetensors``. From then on it is loaded and frozen like any pretrained encoder:
``HFAudioEncoder.from_pretrained(out_dir)``.

Architecture: log-mel front end (100 frames/s, optionally with its deltas) -> two stride-2
convolutions (25 frames/s) -> a small pre-norm transformer -> ``(B, T, D)`` frames. The built-in
encoder (:data:`BUILTIN_SIZES`) uses kernel-7 convolutions: they see 190 ms of audio, a whole cycle
of a 5-10 Hz tremolo or the gap between two beeps, where kernel-3 ones see 70 ms. Padding never
changes the frames of real audio: padded mel frames and conv outputs are zeroed (what a clip alone
sees at its edge), deltas repeat a clip's last frame and attention ignores padded keys, so a
clip's features do not depend on its batch-mates.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

__all__ = ["SMALL_MODEL_TYPE", "CountReadout", "SmallAudioConfig", "SmallAudioModel"]

SMALL_MODEL_TYPE = "slit_small_audio"
_LOG_FLOOR = 1e-8  # power floor before the log: digital silence maps to a finite value
_LOG_SHIFT, _LOG_SCALE = 8.0, 8.0  # bring the built-in corpus's log-mel near mean 0, spread 1


class CountReadout(nn.Module):
    """Frames ``(B, T, D)`` -> per-frame count logits ``(B, T, types, classes)``, and frames with
    the count probabilities added.

    Linear ``D -> width``, GELU, a depthwise convolution over ``kernel`` frames (the span of the
    longest counted event at 25 frames/s) that can add up the bursts it sees, then a linear layer
    on ``[frame, sum]``. ``projection`` is a fixed ``(types * classes, D)`` matrix with orthonormal
    rows, seeded, and saved with the model.
    """

    def __init__(
        self, hidden: int, types: int, classes: int, width: int, kernel: int, scale: float
    ) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"count_kernel must be odd and positive; got {kernel}")
        if types * classes > hidden:
            raise ValueError(
                f"{types} counted types x {classes} classes do not fit in {hidden} dims:"
                " lower count_classes or count fewer types"
            )
        self.types, self.classes, self.scale = types, classes, scale
        self.inp = nn.Linear(hidden, width)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.out = nn.Linear(2 * width, types * classes)
        self.register_buffer("projection", torch.empty(types * classes, hidden))

    def reset_buffers(self) -> None:
        """Fill ``projection`` (transformers builds models on the meta device)."""
        generator = torch.Generator().manual_seed(0)
        rows, hidden = self.projection.shape
        q, _ = torch.linalg.qr(torch.randn(hidden, rows, generator=generator))
        init.copy_(self.projection, q.T.contiguous())

    def logits(self, frames: Tensor, mask: Tensor) -> Tensor:
        """``(B, T, D)`` frames, ``(B, T)`` mask -> ``(B, T, types, classes)`` logits."""
        h = F.gelu(self.inp(frames)) * mask.unsqueeze(-1).to(frames.dtype)
        summed = self.conv(h.transpose(1, 2)).transpose(1, 2)
        out = self.out(torch.cat([h, summed], dim=-1))
        return out.unflatten(-1, (self.types, self.classes))

    def forward(self, frames: Tensor, mask: Tensor) -> Tensor:
        """``frames + scale * probabilities @ projection``, ``(B, T, D)``."""
        probs = self.logits(frames, mask).float().softmax(-1).flatten(-2)
        return frames + self.scale * (probs @ self.projection.float()).to(frames.dtype)


class SmallAudioConfig(PretrainedConfig):
    """Sizes of :class:`SmallAudioModel` (the built-in encoder's: ``SmallAudioConfig(**BUILTIN_SIZES)``).

    ``conv_kernel_size`` defaults to 3, what encoders saved before the setting existed used, so
    their ``config.json`` still loads into the right shapes. ``delta_scale`` above 0 stacks the
    log-mel's time derivative (deltas over 5 frames), times that scale, on the log-mel as
    ``n_mels`` more input channels; 0 (the default, as saved before the setting) feeds the log-mel
    alone. Deltas make amplitude modulation a signal of its own: a tremolo tone's 20-dB swings
    are a small wobble on a log-mel dominated by the spectrum's shape, and a tagger trained on
    the log-mel alone hardly told tremolo from pure tones (see :data:`BUILTIN_SIZES`).
    ``count_types`` (default: none) adds a
    :class:`~slit_lightning.builtin.encoder_counts.CountReadout` for those event types with
    ``count_classes`` classes (no event, then counts 1 .. ``count_classes - 1``), ``count_width``
    channels, a ``count_kernel``-frame convolution, and ``count_scale`` times its probabilities
    added to the last layer's frames. The scale must be large next to the frames' own norm, or
    the counts hardly reach the captions (docs/builtin.md).
    """

    model_type = SMALL_MODEL_TYPE

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        num_conv_layers: int = 2,
        conv_kernel_size: int = 3,
        delta_scale: float = 0.0,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        count_types: list[str] | None = None,
        count_classes: int = 6,
        count_width: int = 64,
        count_kernel: int = 63,
        count_scale: float = 8.0,
        **kwargs: Any,
    ) -> None:
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = (
            sample_rate,
            n_fft,
            hop_length,
            n_mels,
        )
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.num_conv_layers, self.conv_kernel_size = num_conv_layers, conv_kernel_size
        if delta_scale < 0:
            raise ValueError(f"delta_scale must be >= 0 (0: no deltas); got {delta_scale}")
        self.delta_scale = delta_scale
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.count_types = list(count_types or [])
        self.count_classes, self.count_width = count_classes, count_width
        self.count_kernel, self.count_scale = count_kernel, count_scale
        super().__init__(**kwargs)


class SmallAudioModel(PreTrainedModel):
    """Waveform ``(B, S)`` -> frames ``(B, T, D)`` at ``sample_rate / hop_length / 2**num_conv_layers`` Hz."""

    config_class = SmallAudioConfig
    config: SmallAudioConfig
    base_model_prefix = "small_audio"
    main_input_name = "wave"
    _no_split_modules: ClassVar[list[str]] = ["TransformerEncoderLayer"]  # FSDP wraps these

    def __init__(self, config: SmallAudioConfig) -> None:
        super().__init__(config)
        c = config
        self.mel = LogMel(c.sample_rate, c.n_fft, c.hop_length, c.n_mels)
        inputs = 2 * c.n_mels if c.delta_scale > 0 else c.n_mels
        widths = [inputs] + [c.hidden_size] * c.num_conv_layers
        k = c.conv_kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd and positive; got {k}")
        self.convs = nn.ModuleList(
            nn.Conv1d(widths[i], widths[i + 1], k, stride=2, padding=k // 2)
            for i in range(c.num_conv_layers)
        )
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(c.num_hidden_layers)
        )
        # conv features start far smaller than the sinusoids; normalising them keeps the content
        # from drowning in the positions
        self.conv_norm = nn.LayerNorm(c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.counts = (
            CountReadout(
                c.hidden_size,
                len(c.count_types),
                c.count_classes,
                c.count_width,
                c.count_kernel,
                c.count_scale,
            )
            if c.count_types
            else None
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (LogMel, CountReadout)):
            module.reset_buffers()

    @property
    def num_hidden_states(self) -> int:
        """Entries of ``hidden_states``: the conv output, then one per transformer layer."""
        return self.config.num_hidden_layers + 1

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Valid output frames ``(B,)`` for clips of ``lengths (B,)`` samples (at least one)."""
        frames = self._mel_frames(lengths)
        for _ in range(self.config.num_conv_layers):
            frames = _halved(frames)
        return frames

    def _mel_frames(self, lengths: Tensor) -> Tensor:
        """STFT frames that lie wholly inside the clip (at least one: short clips are padded)."""
        c = self.config
        return (torch.div(lengths - c.n_fft, c.hop_length, rounding_mode="floor") + 1).clamp_min(1)

    def forward(self, wave: Tensor, mask: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
        """Frames of one layer; the last layer's carry the count readout's answer, if any.

        Args:
            wave: ``(B, S)`` float waveform at ``config.sample_rate``, right-padded.
            mask: ``(B, S)`` bool, True on real samples.
            layer: index into [conv output, layer 1, ..., layer N]; -1 is the last layer after
                the final norm (plus the count probabilities), -2 the penultimate layer.

        Returns:
            ``(B, T, D)`` frames and their ``(B, T)`` bool mask (True = frame of real audio).
        """
        x, frame_mask = self.trunk(wave, mask, layer)
        if self.counts is not None and _layer_index(layer, self.num_hidden_states) == (
            self.num_hidden_states - 1
        ):
            x = self.counts(x, frame_mask).masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        return x, frame_mask

    def trunk(self, wave: Tensor, mask: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
        """:meth:`forward` without the count readout (what the tagger trains and the readout reads)."""
        index = _layer_index(layer, self.num_hidden_states)
        x, frame_mask = self._front_end(wave, mask)
        pad = ~frame_mask
        for block in self.layers[:index]:
            x = block(x, src_key_padding_mask=pad)
        if index == self.num_hidden_states - 1:
            x = self.norm(x)
        return x.masked_fill(pad.unsqueeze(-1), 0.0), frame_mask

    def _front_end(self, wave: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel and convolutions: ``(B, S)`` -> ``(B, T, D)`` with positions added, ``(B, T)`` mask."""
        c = self.config
        if wave.shape[-1] < c.n_fft:  # too short for one STFT window: zero-pad like a longer clip
            wave = F.pad(wave, (0, c.n_fft - wave.shape[-1]))
        x = self.mel(wave).to(self.dtype)  # (B, n_mels, F)
        frames = self._mel_frames(mask.sum(-1))
        if c.delta_scale > 0:
            x = torch.cat([x, c.delta_scale * _deltas(x, frames)], dim=1)
        x = x * _prefix_mask(frames, x.shape[-1]).unsqueeze(1)
        for conv in self.convs:
            x = F.gelu(conv(x))
            frames = _halved(frames)
            # zero what lies past the clip, so the next conv sees what it would see on the clip alone
            x = x * _prefix_mask(frames, x.shape[-1]).unsqueeze(1)
        x = self.conv_norm(x.transpose(1, 2))
        return x + _sinusoids(x.shape[1], x.shape[2], x), _prefix_mask(frames, x.shape[1])


class LogMel(nn.Module):
    """Scaled log-mel power spectrogram: ``(B, S)`` -> ``(B, n_mels, F)``, no centring padding.

    The window and filterbank are saved buffers (a saved model fully defines its front end);
    they are filled by :meth:`reset_buffers` because transformers builds models on the meta device.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = (
            sample_rate,
            n_fft,
            hop_length,
            n_mels,
        )
        self.register_buffer("window", torch.empty(n_fft))
        self.register_buffer("filterbank", torch.empty(n_fft // 2 + 1, n_mels))

    def reset_buffers(self) -> None:
        """Fill window and filterbank (transformers' ``init`` skips tensors loaded from a file)."""
        fb = torchaudio.functional.melscale_fbanks(
            self.n_fft // 2 + 1, 0.0, self.sample_rate / 2, self.n_mels, self.sample_rate
        )
        init.copy_(self.window, torch.hann_window(self.n_fft))
        init.copy_(self.filterbank, fb)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop_length,
            window=self.window.float(),
            center=False,
            return_complex=True,
        )
        mel = torch.einsum("bfn,fm->bmn", spec.abs().square(), self.filterbank.float())
        return (mel.clamp_min(_LOG_FLOOR).log() + _LOG_SHIFT) / _LOG_SCALE


def _deltas(mel: Tensor, frames: Tensor) -> Tensor:
    """Time derivative of ``(B, C, F)`` over 5 frames, each clip's last real frame repeated past
    its end (so a clip's deltas are those it has alone, whatever its batch-mates' lengths)."""
    last = (frames - 1).clamp(0, mel.shape[-1] - 1).unsqueeze(-1)
    held = torch.minimum(torch.arange(mel.shape[-1], device=mel.device), last)  # (B, F)
    mel = mel.gather(-1, held.unsqueeze(1).expand(-1, mel.shape[1], -1))
    return torchaudio.functional.compute_deltas(mel, win_length=5)


def _halved(frames: Tensor) -> Tensor:
    """Output length of a kernel-3, stride-2, padding-1 convolution: ceil(L / 2)."""
    return torch.div(frames + 1, 2, rounding_mode="floor")


def _prefix_mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size)`` bool, True on the first ``lengths[b]`` positions."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


def _sinusoids(length: int, width: int, like: Tensor) -> Tensor:
    """Fixed sinusoidal positions ``(T, D)``: no learned table, so clips of any length work."""
    half = width // 2
    scale = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=like.device) / max(half - 1, 1)
    )
    angles = torch.arange(length, device=like.device).unsqueeze(1) * scale
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(like.dtype)


def _layer_index(layer: int, count: int) -> int:
    """``layer`` (negative counts from the end) as an index into ``count`` hidden states."""
    if not -count <= layer < count:
        raise ValueError(
            f"layer={layer} is out of range: this encoder has {count} hidden states"
            f" (use -1 for the last, -2 for the penultimate, 0..{count - 1})"
        )
    return layer % count
