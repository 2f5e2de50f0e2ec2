"""How many: a count readout on the built-in encoder's frames, and the phase that trains it.

The built-in encoder's frames mark every burst of beeps, clicks or knocks (a linear probe finds the
frames where one starts), yet no single frame says how many bursts an event has, and a Q-Former
trained on the demo's captions did not learn to add them up. A summing readout learns it, but only
from many examples: far more than the corpus's train clips hold. So :func:`fit_count_readout`
trains :class:`CountReadout` on scenes the corpus generator renders, after the tagger, with the
trunk frozen; the model then adds the readout's per-frame count probabilities to its last layer's
frames (through a fixed orthonormal projection), and everything downstream reads counts as it
reads event types. Only scenes that hold a counted event are rendered for it: they teach the
readout as much as more scenes of any kind would, at less rendering and encoding time.
docs/builtin.md has the measurements behind these choices.

Targets, per frame and counted type: class ``n`` (1 .. ``classes - 1``) inside an event of that
type with ``n`` bursts, class 0 elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slit_lightning.data.audio import pad_batch
from slit_lightning.model.small_encoder import CountReadout, SmallAudioModel
from slit_lightning.training.precision import cpu_autocast
from slit_lightning.training.schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

__all__ = ["count_targets", "fit_count_readout"]

_BACKGROUND_WEIGHT = 0.2  # class 0 holds most frames; at weight 1 the readout learned little else
_ENCODE_CHUNK = 32  # clips encoded at once while caching the frozen frames


def count_targets(
    events: Sequence[dict[str, Any]],
    frames: int,
    types: Sequence[str],
    classes: int,
    frame_seconds: float,
    first_centre: float,
) -> Tensor:
    """``(frames, len(types))`` long: an event's count on the frames whose centre lies inside it.

    ``events`` are manifest events (``type``, ``onset``, ``duration``, ``count``); frame ``t`` is
    centred at ``first_centre + t * frame_seconds`` seconds. Counts past ``classes - 1`` raise.
    """
    out = torch.zeros(frames, len(types), dtype=torch.long)
    centres = first_centre + frame_seconds * torch.arange(frames, dtype=torch.float64)
    for event in events:
        if event["type"] not in types or event.get("count") is None:
            continue
        count = int(event["count"])
        if not 1 <= count < classes:
            raise ValueError(
                f"a {event['type']} event counts {count}: count_classes={classes} covers 1 to"
                f" {classes - 1}"
            )
        start, end = event["onset"], event["onset"] + event["duration"]
        inside = (centres >= start) & (centres < end)
        out[inside, types.index(event["type"])] = count
    return out


class _CountData:
    """Frozen frames (float16) and their targets, encoded once."""

    def __init__(self, frames: Tensor, mask: Tensor, targets: Tensor) -> None:
        self.frames, self.mask, self.targets = frames, mask, targets

    @classmethod
    @torch.no_grad()
    def encode(
        cls,
        model: SmallAudioModel,
        clips: Iterable[tuple[Tensor, list[dict[str, Any]]]],
        bf16: bool,
    ) -> _CountData:
        c = model.config
        frame_seconds = c.hop_length * 2**c.num_conv_layers / c.sample_rate
        first = 0.5 * c.n_fft / c.sample_rate
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        chunk: list[tuple[Tensor, list[dict[str, Any]]]] = []

        def flush() -> None:
            audio, audio_mask = pad_batch([wave for wave, _ in chunk])
            with cpu_autocast(bf16):
                frames, mask = model.trunk(audio, audio_mask)
            targets = torch.stack(
                [
                    count_targets(events, frames.shape[1], c.count_types, c.count_classes,
                                  frame_seconds, first)
                    for _, events in chunk
                ]
            )  # fmt: skip
            parts.append((frames.to(torch.float16), mask, targets))
            chunk.clear()

        for clip in clips:
            chunk.append(clip)
            if len(chunk) == _ENCODE_CHUNK:
                flush()
        if chunk:
            flush()
        if not parts:
            raise ValueError("no clips to train the count readout on")
        longest = max(p[0].shape[1] for p in parts)

        def cat(i: int) -> Tensor:
            return torch.cat([F.pad(p[i], (0, 0) * (p[i].dim() - 2) + (0, longest - p[i].shape[1]))
                              for p in parts])  # fmt: skip

        return cls(cat(0), cat(1), cat(2))

    def __len__(self) -> int:
        return self.frames.shape[0]


def fit_count_readout(
    model: SmallAudioModel,
    train: Iterable[tuple[Tensor, list[dict[str, Any]]]],
    val: Iterable[tuple[Tensor, list[dict[str, Any]]]],
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    bf16: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model.counts`` on ``train`` clips ``(waveform, events)``; the trunk stays frozen.

    Every clip is encoded once (as float16 frames), then the readout trains for ``steps`` AdamW
    steps (linear warm-up, cosine decay) with cross-entropy per frame and counted type, class 0
    weighted :data:`_BACKGROUND_WEIGHT`. Returns metrics on ``val``: ``count_event_accuracy``
    (events whose span-averaged probabilities pick the right count) and ``count_frame_accuracy``.
    """
    readout = model.counts
    if readout is None:
        raise ValueError("this model has no count readout: its config has no count_types")
    model.eval()
    data = _CountData.encode(model, train, bf16)
    log.info("count readout: %d clips encoded", len(data))
    loss = _train(readout, data, steps, batch_size, lr, seed, progress)
    metrics: dict[str, Any] = {"count_train_clips": len(data), "count_steps": steps}
    metrics["count_train_loss"] = round(loss, 4)
    metrics.update(_evaluate(readout, _CountData.encode(model, val, bf16)))
    log.info("count readout: val event count accuracy %.3f", metrics["count_event_accuracy"])
    return metrics


def _train(
    readout: CountReadout,
    data: _CountData,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """AdamW with warm-up and cosine decay on random batches; the mean loss of the last 50 steps."""
    if steps < 1:
        raise ValueError(f"count_steps must be at least 1, got {steps}")
    weight = torch.ones(readout.classes)
    weight[0] = _BACKGROUND_WEIGHT
    optimizer = torch.optim.AdamW(readout.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine_lr(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    readout.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)
        logits = readout.logits(data.frames[index].float(), data.mask[index])
        loss = _masked_cross_entropy(logits, data.targets[index], data.mask[index], weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    readout.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def _masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean cross-entropy over real frames: ``(B, T, K, C)`` logits, ``(B, T, K)`` targets."""
    per = F.cross_entropy(
        logits.flatten(0, 2), targets.flatten(), weight=weight, reduction="none"
    ).view_as(targets)
    w = weight[targets] * mask.unsqueeze(-1).to(per.dtype)
    return (per * mask.unsqueeze(-1)).sum() / w.sum().clamp_min(1e-8)


@torch.no_grad()
def _evaluate(readout: CountReadout, data: _CountData) -> dict[str, Any]:
    """Frame accuracy, and per-event accuracy of the count read from the span-averaged probabilities."""
    probs = readout.logits(data.frames.float(), data.mask).softmax(-1)  # (N, T, K, C)
    real = data.mask.unsqueeze(-1).expand_as(data.targets)
    right = (probs.argmax(-1) == data.targets) & real
    frame_accuracy = right.sum().item() / max(1, real.sum().item())
    events = hits = 0
    for n in range(len(data)):
        for k in range(readout.types):
            truth = data.targets[n, :, k]
            inside = truth > 0  # one event per type per clip in the built-in corpus
            if inside.any():
                events += 1
                span = probs[n, inside, k, 1:].mean(0)
                hits += int(int(span.argmax()) + 1 == int(truth[inside][0]))
    return {
        "count_frame_accuracy": round(frame_accuracy, 4),
        "count_event_accuracy": round(hits / events, 4) if events else float("nan"),
        "count_val_events": events,
    }
