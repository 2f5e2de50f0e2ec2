"""Audio-text retrieval metrics as the field reports them (AudioCaps, Clotho, DCASE task 6b).

Every caption has exactly one audio clip; a clip has one or more captions (Clotho: five).

- text-to-audio: R@k is the share of captions whose clip ranks in the top k; mAP@10 (DCASE) is
  the mean of ``1 / rank`` when the clip ranks in the top 10, else 0.
- audio-to-text: R@k is the share of clips with at least one of their captions in the top k
  (the convention of the AudioCaps/Clotho retrieval papers); mAP@10 averages precision at each
  relevant caption within the top 10, divided by ``min(#captions, 10)``.

torchmetrics' ``RetrievalRecall`` divides by the number of relevant items, which for several
captions per clip is a different quantity than the "any caption in the top k" the papers report,
so these few lines compute the reported numbers directly from the similarity matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10)


def text_to_audio(sim: Tensor, text_clip: Tensor) -> dict[str, float]:
    """Metrics for ``sim (N_text, N_audio)`` where caption ``i`` belongs to clip ``text_clip[i]``."""
    correct = sim.gather(1, text_clip[:, None])
    # rank = number of clips scored strictly higher (ties count in the caption's favour)
    rank = (sim > correct).sum(1)
    out = {f"t2a_R@{k}": (rank < k).float().mean().item() for k in KS}
    out["t2a_mAP@10"] = torch.where(rank < 10, 1.0 / (rank + 1).float(), 0.0).mean().item()
    return out


def audio_to_text(sim: Tensor, text_clip: Tensor) -> dict[str, float]:
    """Metrics for ``sim (N_audio, N_text)``; clip ``j``'s captions are where ``text_clip == j``."""
    relevant = text_clip[None, :] == torch.arange(sim.shape[0], device=sim.device)[:, None]
    order = sim.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order[:, :10]).float()  # (N_audio, min(10, N_text))
    out = {f"a2t_R@{k}": (hits[:, :k].sum(1) > 0).float().mean().item() for k in KS}
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, device=sim.device)
    denom = relevant.sum(1).clamp(max=10).clamp(min=1).float()
    out["a2t_mAP@10"] = ((precision * hits).sum(1) / denom).mean().item()
    return out


def retrieval_metrics(sim_t2a: Tensor, text_clip: Tensor) -> dict[str, float]:
    """Both directions from one ``(N_text, N_audio)`` similarity matrix, plus the mean R (rsum/6)."""
    out = text_to_audio(sim_t2a, text_clip) | audio_to_text(sim_t2a.T, text_clip)
    out["mean_R"] = sum(out[f"{d}_R@{k}"] for d in ("t2a", "a2t") for k in KS) / 6
    return out
