"""Losses as pure functions: contrastive, matching (+ hard negatives), generation.

Nothing here holds state or knows Lightning; the stage modules call these with tensors whose shapes
are in the docstrings (`B` local batch, `Bg` global batch over all ranks, `N` queries, `E` embedding
width, `L` sequence length, `V` vocabulary).

Distributed convention (read this before changing `gather_with_grad` or `contrastive_loss`):
each rank computes the loss of its LOCAL rows against the GLOBAL columns, summed over its local
rows (or tokens) and divided by the GLOBAL count over the world size (`global_mean_divisor`), so
the mean of the rank losses is the single-process loss of the global batch, whatever the local
batch sizes and token counts. The backward of the gather SUMS the gradients every rank sends to a slice and hands
the sum to the slice's owner, so a rank's local features receive ``d(sum_r loss_r)/d(x_local)``,
which is ``world_size`` times the single-process gradient. DDP then AVERAGES parameter gradients
over ranks, which divides by ``world_size`` again: the DDP gradient equals the single-process
gradient of the global batch, and the learning rate means the same on 1 or 8 GPUs. Do not rescale
the loss by ``world_size`` on top of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ContrastiveOutput",
    "HardNegatives",
    "contrastive_loss",
    "gather_nograd",
    "gather_with_grad",
    "generation_loss",
    "global_mean_divisor",
    "labels_from_ids",
    "matching_loss",
    "max_query_similarity",
    "sample_hard_negatives",
    "sequence_losses",
]


# --------------------------------------------------------------------------- all-gather


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local size ``n``, in rank order (one tiny collective and a host sync)."""
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes_t = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes_t, size)
    return [int(s.item()) for s in sizes_t]


def _all_gather_padded(x: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate ``x`` from all ranks in rank order; local batch sizes may differ (last batch).

    ``dist.all_gather`` needs equal shapes, so every rank pads to the largest size first. The size
    exchange costs one tiny collective and a host sync; features are small next to the Q-Former.
    """
    sizes = _rank_sizes(x.shape[0], x.device)
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    chunks = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(chunks, x.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice.

    Written here instead of ``torch.distributed.nn.functional.all_gather`` because that one needs
    equal local batch sizes and returns a list; the backward is the same sum (all-reduce + slice
    here, which every backend supports, where torch uses reduce-scatter on NCCL).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        gathered, sizes = _all_gather_padded(x)
        rank = dist.get_rank()
        ctx.span = (sum(sizes[:rank]), sizes[rank])
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd owns grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, size = ctx.span
        return grad[start : start + size]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x (B, ...)`` along dim 0 over all ranks -> ``(Bg, ...)``, differentiable.

    Only the local slice is a leaf of this rank's graph; the other ranks' slices arrive without
    history, and the gradients that land on them are sent back to their owners and summed there
    (see the module docstring for why this matches DDP's averaging). Identity when
    torch.distributed is not initialised or has one rank. Every rank must call it (and later
    backward through it) in the same order, like any collective.
    """
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """All-gather ``x (B, ...)`` -> ``(Bg, ...)`` without gradient (ids, keys, ATM inputs).

    Identity when not distributed. Local batch sizes may differ between ranks.
    """
    if not _distributed():
        return x
    return _all_gather_padded(x)[0]


def global_mean_divisor(count: int | Tensor, device: torch.device | None = None) -> Tensor:
    """What a rank divides its summed loss by: the global count (rows, tokens) over world size.

    DDP averages gradients over ranks, so ``sum_r / (N_global / W)`` on each rank gives the
    gradient of ``sum / N_global``, the single-process mean of the global batch, even when ranks
    hold different numbers of rows or labelled tokens (a plain local mean weights a rank with few
    tokens as much as one with many). Without a process group it is the local count. At least 1,
    so an empty batch gives a zero loss. Every rank must call it (a collective).
    """
    total = torch.as_tensor(count, dtype=torch.float32, device=device).detach().clone()
    if _distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total / dist.get_world_size()
    return total.clamp_min(1.0)


# --------------------------------------------------------------------------- contrastive (ATC)


class ContrastiveOutput(NamedTuple):
    """Result of `contrastive_loss`; the similarities are logits (divided by the temperature)."""

    loss: Tensor
    """Scalar: mean of the two directions."""
    sim_a2t: Tensor
    """(B, Bg): local audio rows against all texts of the global batch."""
    sim_t2a: Tensor
    """(B, Bg): local text rows against all audios of the global batch."""
    clip_keys_global: Tensor
    """(Bg,): clip keys of the global batch, the columns of both matrices (for hard negatives)."""
    loss_a2t: Tensor
    """Scalar: audio-to-text cross-entropy."""
    loss_t2a: Tensor
    """Scalar: text-to-audio cross-entropy."""


def _upcast(x: Tensor) -> Tensor:
    """bf16/fp16 -> float32 for softmax-based losses; float32/float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def max_query_similarity(query_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Audio-text similarity as the best-matching query: ``(A, N, E), (T, E) -> (A, T)``.

    ``sim[a, t] = max_n query_feats[a, n] . text_feats[t]`` (BLIP-2's ITC); the gradient reaches
    only the winning query of each pair.
    """
    return torch.einsum("ane,te->atn", query_feats, text_feats).amax(dim=-1)


def _check_contrastive(query_feats: Tensor, text_feats: Tensor, clip_keys: Tensor) -> None:
    if query_feats.ndim != 3 or text_feats.ndim != 2:
        raise ValueError(
            f"contrastive_loss wants query_feats (B, N, E) and text_feats (B, E); got "
            f"{tuple(query_feats.shape)} and {tuple(text_feats.shape)}"
        )
    b, _, e = query_feats.shape
    if text_feats.shape != (b, e) or clip_keys.shape != (b,):
        raise ValueError(
            f"contrastive_loss: batch/width mismatch: query_feats {tuple(query_feats.shape)}, "
            f"text_feats {tuple(text_feats.shape)}, clip_keys {tuple(clip_keys.shape)}; "
            "pass one clip key per (audio, caption) row"
        )


def contrastive_loss(
    query_feats: Tensor,
    text_feats: Tensor,
    clip_keys: Tensor,
    temperature: Tensor | float,
    gather: bool = True,
    label_smoothing: float = 0.0,
) -> ContrastiveOutput:
    """Audio-text contrastive loss (ATC) with global negatives and multi-positives.

    Args:
        query_feats: (B, N, E) L2-normalised projected query outputs, one row per (audio, caption).
        text_feats: (B, E) L2-normalised projected text [CLS] outputs.
        clip_keys: (B,) int64 clip id per row; rows with equal keys (several captions of one clip,
            in this rank's batch or another's) are all positives of each other.
        temperature: scalar, > 0; the caller clamps it (BLIP-2: to [0.001, 0.5]).
        gather: take the columns (negatives) from the global batch of all ranks.
        label_smoothing: as in ``F.cross_entropy``, applied on top of the soft targets.

    The targets of a row are its positive mask divided by its number of positives (positives
    share the probability mass equally); cross-entropy is taken in both directions and averaged.
    With one caption per clip this is BLIP-2's ITC exactly. Under DDP the loss covers this rank's
    rows; the module docstring explains why its gradient needs no rescaling.
    """
    _check_contrastive(query_feats, text_feats, clip_keys)
    if gather:
        queries_all, text_all = gather_with_grad(query_feats), gather_with_grad(text_feats)
        keys_all = gather_nograd(clip_keys)
    else:
        queries_all, text_all, keys_all = query_feats, text_feats, clip_keys
    # at least float32 (the features are small): bf16 similarities / 0.07 lose the differences
    # the softmax needs
    query_feats, text_feats = _upcast(query_feats), _upcast(text_feats)
    queries_all, text_all = _upcast(queries_all), _upcast(text_all)
    sim_a2t = max_query_similarity(query_feats, text_all) / temperature
    sim_t2a = max_query_similarity(queries_all, text_feats).t() / temperature
    positive = (clip_keys[:, None] == keys_all[None, :]).to(sim_a2t.dtype)
    # every local row is among the global columns, so each row has at least one positive
    targets = positive / positive.sum(dim=1, keepdim=True)
    rows = global_mean_divisor(sim_a2t.shape[0], sim_a2t.device) if gather else sim_a2t.shape[0]
    loss_a2t = _summed_ce(sim_a2t, targets, label_smoothing) / rows
    loss_t2a = _summed_ce(sim_t2a, targets, label_smoothing) / rows
    return ContrastiveOutput(
        loss=(loss_a2t + loss_t2a) / 2,
        sim_a2t=sim_a2t,
        sim_t2a=sim_t2a,
        clip_keys_global=keys_all,
        loss_a2t=loss_a2t,
        loss_t2a=loss_t2a,
    )


def _summed_ce(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")


# --------------------------------------------------------------------------- matching (ATM)


class HardNegatives(NamedTuple):
    """Result of `sample_hard_negatives`; indices point into the GLOBAL batch (Bg)."""

    text_index: Tensor
    """(B,) int64: for each local audio, a global text of another clip."""
    audio_index: Tensor
    """(B,) int64: for each local text, a global audio of another clip."""
    valid: Tensor
    """(B,) bool: False where the global batch holds no other clip; drop those rows' negatives.

    One mask serves both directions: audio and text columns carry the same keys, so a row has a
    non-positive text exactly when it has a non-positive audio.
    """


def _sample_rows(logits: Tensor, positive: Tensor, uniform_noise: Tensor) -> Tensor:
    """One column per row, P proportional to exp(logit) over non-positives; (R, C) -> (R,).

    Drawn with the Gumbel-max trick from ``uniform_noise (R, C)`` in (0, 1), so that the draw of
    a row depends on its own noise only (see `sample_hard_negatives`)."""
    finite_max = torch.finfo(logits.dtype).max
    # NaN never wins by weight; +inf entries share all the mass instead of making the row NaN
    logits = logits.nan_to_num(nan=float("-inf"), posinf=finite_max, neginf=float("-inf"))
    logits = logits.masked_fill(positive, float("-inf"))
    has_weight = torch.isfinite(logits).any(dim=1, keepdim=True)
    probs = torch.softmax(torch.where(has_weight, logits, torch.zeros_like(logits)), dim=1)
    # rows whose non-positives are all -inf/NaN: uniform over non-positives; rows with none at
    # all: uniform over everything (a placeholder the caller drops via `valid`)
    uniform = (~positive).to(logits.dtype)
    uniform = torch.where(uniform.sum(1, keepdim=True) > 0, uniform, torch.ones_like(uniform))
    probs = torch.where(has_weight, probs, uniform)
    tiny = torch.finfo(uniform_noise.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform_noise.clamp(tiny, 1.0 - 1e-7)))
    return (probs.log() + gumbel.to(probs.dtype)).argmax(dim=1)


def _global_noise(
    rows: int, columns: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """This rank's rows ``(rows, columns)`` of one uniform noise matrix over all ranks' rows."""
    offset, total = 0, rows
    if _distributed():
        sizes = _rank_sizes(rows, device)
        offset, total = sum(sizes[: dist.get_rank()]), sum(sizes)
    noise = torch.rand(total, columns, generator=generator, device=device)
    return noise[offset : offset + rows]


@torch.no_grad()
def sample_hard_negatives(
    sim_a2t: Tensor,
    sim_t2a: Tensor,
    clip_keys_local: Tensor,
    clip_keys_global: Tensor,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """Hard negatives for audio-text matching, sampled in proportion to softmax(similarity).

    Args:
        sim_a2t: (B, Bg) logits of local audios against global texts (`ContrastiveOutput`).
        sim_t2a: (B, Bg) logits of local texts against global audios.
        clip_keys_local: (B,) clip keys of the local rows.
        clip_keys_global: (Bg,) clip keys of the columns.
        generator: for reproducible draws; must live on the similarities' device. Seeded alike
            on every rank (e.g. from the seed and the step, as the stages do), it makes the draws
            independent of the world size: each rank takes its own rows of one noise matrix drawn
            for the global batch, so 1 process and N processes pick the same negatives.

    Every column with the row's clip key (the row itself and the clip's other captions) gets
    probability zero. Rows whose non-positive logits are all NaN/-inf fall back to a uniform
    non-positive; rows without any non-positive are marked invalid. No gradient flows. To build
    the ATM inputs, index gathered (`gather_nograd`) text ids and audio features with the result.
    """
    if sim_a2t.shape != sim_t2a.shape or sim_a2t.shape != (
        clip_keys_local.shape[0],
        clip_keys_global.shape[0],
    ):
        raise ValueError(
            f"sample_hard_negatives: sim_a2t {tuple(sim_a2t.shape)} and sim_t2a "
            f"{tuple(sim_t2a.shape)} must both be (B, Bg) = ({clip_keys_local.shape[0]}, "
            f"{clip_keys_global.shape[0]}) as given by the clip keys"
        )
    positive = clip_keys_local[:, None] == clip_keys_global[None, :]
    rows, columns = positive.shape
    noise_a2t = _global_noise(rows, columns, sim_a2t.device, generator)
    noise_t2a = _global_noise(rows, columns, sim_a2t.device, generator)
    return HardNegatives(
        text_index=_sample_rows(_upcast(sim_a2t), positive, noise_a2t),
        audio_index=_sample_rows(_upcast(sim_t2a), positive, noise_t2a),
        valid=(~positive).any(dim=1),
    )


def matching_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Audio-text matching (ATM) cross-entropy: ``logits (M, 2), labels (M,) int64 -> scalar``.

    Class 1 = matched, 0 = not matched. BLIP-2 stacks ``M = 3B`` rows: the B positive pairs, then
    the B texts each with its hard-negative audio, then the B audios each with its hard-negative
    text, with labels ``[1] * B + [0] * 2B``. The order does not change the loss; rows whose
    negatives are invalid (`HardNegatives.valid`) should simply be left out.
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"matching_loss wants logits (M, 2) and labels (M,); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return _summed_ce(_upcast(logits), labels) / global_mean_divisor(labels.shape[0], labels.device)


# --------------------------------------------------------------------------- generation (ATG / LM)


def generation_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    head: Callable[[Tensor], Tensor] | None = None,
    shift: bool = True,
) -> Tensor:
    """Next-token cross-entropy: ``logits (B, L, V), labels (B, L) -> scalar``.

    With ``head`` (the vocabulary projection, ``(K, H) -> (K, V)``), the first argument is the
    hidden states ``(B, L, H)`` instead, and only the labelled positions are projected.

    The shift is inside: logits at position t predict ``labels[:, t + 1]``, so pass labels
    aligned with the input ids (`labels_from_ids`); ``shift=False`` for logits that already line
    up with their labels (an encoder-decoder's decoder). Positions labelled ``ignore_index`` carry no
    loss; the mean is over the remaining tokens of the whole batch (as ``F.cross_entropy``), and
    under DDP over the tokens of the global batch (`global_mean_divisor`).

    Efficiency: the labelled rows are gathered first and only they go through the float32
    log-softmax, since with padded captions and long prompts most of the ``B * L * V`` logits have
    no label. (Gathering costs a host sync for the count.) A caller that can should go one step
    further and apply the vocabulary projection only to the labelled hidden states.
    Returns an exact zero that still backpropagates when no position has a label.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"generation_loss wants logits (B, L, V) (or hidden states with `head`) and labels"
            f" (B, L); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:] if shift else labels
    keep = targets != ignore_index
    rows = (logits[:, :-1] if shift else logits)[
        keep
    ]  # (K, V): only positions that predict a labelled token
    divisor = global_mean_divisor(rows.shape[0], logits.device)  # a collective: before any return
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    if head is not None:
        rows = head(rows)
    return _summed_ce(_upcast(rows), targets[keep], label_smoothing) / divisor


def sequence_losses(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = True
) -> Tensor:
    """Each row's own mean next-token cross-entropy: ``logits (B, L, V), labels (B, L) -> (B,)``.

    For scoring candidates side by side (one row per candidate), not for training: no reduction
    over rows or ranks. Shift and ``ignore_index`` as in `generation_loss`; a row without a label
    scores 0."""
    targets = labels[:, 1:] if shift else labels
    logits = logits[:, :-1] if shift else logits
    nll = F.cross_entropy(
        _upcast(logits).transpose(1, 2), targets, ignore_index=ignore_index, reduction="none"
    )  # (B, L'), 0 where ignored
    return nll.sum(dim=1) / (targets != ignore_index).sum(dim=1).clamp(min=1)


def labels_from_ids(
    input_ids: Tensor,
    attention_mask: Tensor,
    ignore_index: int = -100,
    ignore_first: int | Tensor = 0,
) -> Tensor:
    """Labels for `generation_loss`: ``input_ids (B, L), attention_mask (B, L) -> labels (B, L)``.

    Padding (mask 0) becomes ``ignore_index``, and so do the first ``ignore_first`` real tokens of
    each row (a prompt prefix that should carry no loss): an int for all rows or a ``(B,)`` tensor
    per row. Counting starts at each row's first attended token, so left and right padding both
    work.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"labels_from_ids wants input_ids and attention_mask of one shape (B, L); got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    attended = attention_mask.bool()
    # index of each position among its row's real tokens (0 for the first attended one)
    position = attended.long().cumsum(dim=1) - 1
    first = torch.as_tensor(ignore_first, device=input_ids.device)
    prompt = position < (first[:, None] if first.ndim == 1 else first)
    return input_ids.masked_fill(~attended | prompt, ignore_index)
