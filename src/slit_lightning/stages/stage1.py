"""Stage 1, representation learning: Q-Former + frozen audio encoder, three losses.

- ATC (audio-text contrastive): queries read the audio, text reads itself (uni-modal mask);
  max-over-queries similarity in a 256-d space, learnable temperature, global-batch negatives,
  all captions of a clip positive.
- ATM (audio-text matching): [queries; text] see each other (bidirectional mask); a 2-way head on
  the mean query output; one hard negative text per audio and one hard negative audio per text.
- ATG (audio-grounded text generation): text attends causally to itself and to all queries.

The audio side of the cross-attention (keys/values of every clip) is computed once per step and
reused by all three losses, and the captions are embedded once for all their passes; BLIP-2's
reference code projects the audio again for every pass and looks the captions up in each. The
matching pass reads each clip's keys/values once for both rows that pair it (with its caption and
with a hard-negative caption): `AudioKV.repeat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from slit_lightning.losses import (
    HardNegatives,
    contrastive_loss,
    gather_nograd,
    generation_loss,
    labels_from_ids,
    matching_loss,
    sample_hard_negatives,
)
from slit_lightning.metrics.retrieval import retrieval_metrics
from slit_lightning.model.heads import audio_embeddings, text_embeddings
from slit_lightning.model.qformer import AudioKV, QFormer, StackedAudioKV
from slit_lightning.stages.base import SLITStage, gathered


class Stage1(SLITStage):
    """Stage-1 LightningModule.

    Args:
        encoder: hub id or folder of the frozen audio encoder (see :class:`SLITStage`).
        bert: hub id or folder of the BERT the Q-Former starts from (its tokenizer too);
            ``bert-base-uncased`` for real runs, the packaged MiniLM for the built-in default.
        num_queries: learned queries.
        cross_attention_freq: cross-attention to the audio in every n-th layer.
        qformer_layers: keep only the first n layers of ``bert`` (None: all of them).
        qformer_dropout: hidden and attention dropout of the Q-Former (None: ``bert``'s own).
        embed_dim: width of the shared contrastive space.
        text_pooling: the text's contrastive feature: ``cls`` (its first token, as BLIP-2 with
            bert-base) or ``mean`` (average of its tokens; right for sentence-embedding models
            such as MiniLM, whose first token carries little in the lower layers).
        max_text_len: captions are cut to this many tokens.
        temperature: initial contrastive temperature (learned, clamped to [0.001, 0.5]).
        loss_atc: weight of the contrastive loss.
        loss_atm: weight of the matching loss.
        loss_atg: weight of the generation loss.
        rerank_k: at test time, re-rank each query's top-k by the matching head (0: off).
        reuse_audio_kv: project each clip's audio to cross-attention keys/values, and look each
            caption's tokens up, once per step, and reuse both in every pass; False projects the
            audio for the query pass and again for all rows of the matching pass, and embeds the
            captions in every pass, as BLIP-2's reference code does (kept to measure the
            difference: ``make bench``).
        **kwargs: the shared settings of :class:`SLITStage` (encoder layer, optimiser, checkpoint).
    """

    skip_unread_text: ClassVar[bool] = True
    """The matching head reads the query outputs alone, so the matching pass's last layer skips
    the text positions' attention and feed-forward (BLIP-2 computes them; the bench's reference
    does too)."""

    def __init__(
        self,
        encoder: str,
        bert: str,
        num_queries: int = 32,
        cross_attention_freq: int = 2,
        qformer_layers: int | None = None,
        qformer_dropout: float | None = None,
        embed_dim: int = 256,
        text_pooling: Literal["cls", "mean"] = "cls",
        max_text_len: int = 40,
        temperature: float = 0.07,
        loss_atc: float = 1.0,
        loss_atm: float = 1.0,
        loss_atg: float = 1.0,
        rerank_k: int = 16,
        reuse_audio_kv: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        self.save_hyperparameters()
        self.tokenizer = self.load_tokenizer(bert)
        self.qformer = QFormer.from_bert(
            bert,
            num_queries,
            cross_attention_freq,
            encoder_width=self.encoder.width,
            num_layers=qformer_layers,
            dropout=qformer_dropout,
        )
        width = self.qformer.config.hidden_size
        self.audio_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.atm_head = nn.Linear(width, 2)
        self.temperature = nn.Parameter(torch.tensor(temperature))
        self._eval: dict[str, Any] = {}
        self._negative_seed = torch.initial_seed()  # made equal on every rank at fit start

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._negative_seed = int(self.trainer.strategy.broadcast(torch.initial_seed() % 2**62))

    def negatives_generator(self, batch_idx: int) -> torch.Generator:
        """The generator hard negatives are drawn with at this step: seeded from the run's seed,
        the step and the batch, alike on every rank, so that the draws depend on neither the
        world size (see `sample_hard_negatives`) nor on what else consumed random numbers, and a
        resumed run draws what the uninterrupted one would have."""
        seed = hash((self._negative_seed, self.global_step, batch_idx)) % 2**62
        return torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------ the three views

    def audio_embeddings(self, kv: AudioKV) -> Tensor:
        """Queries read the audio -> ``(B, N, E)`` normalised contrastive features."""
        return audio_embeddings(self.qformer, self.audio_proj, kv)

    def project_queries(self, queries: Tensor) -> Tensor:
        """Query outputs ``(B, N, H)`` -> ``(B, N, E)`` normalised contrastive features."""
        return F.normalize(self.audio_proj(queries), dim=-1)

    def text_embeddings(self, ids: Tensor, mask: Tensor, words: Tensor | None = None) -> Tensor:
        """Text alone -> ``(B, E)`` normalised contrastive features ([CLS] or mean of tokens);
        ``words``: the step's shared ``qformer.embed_text(ids)``, if any."""
        pooling = self.hparams.text_pooling
        return text_embeddings(self.qformer, self.text_proj, ids, mask, pooling, words)

    def match_logits(
        self,
        kv: AudioKV | StackedAudioKV,
        ids: Tensor,
        mask: Tensor,
        index: Tensor | None = None,
        words: Tensor | None = None,
    ) -> Tensor:
        """[queries; text] jointly -> ``(B', 2)`` matching logits; ``index`` picks audio rows."""
        out = self.qformer(
            audio_kv=kv,
            audio_index=index,
            **_text(ids, words),
            text_mask=mask,
            mode="bidirectional",
            text_output=not self.skip_unread_text,
        )
        return self.atm_head(out.query.mean(dim=1))

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        distributed = dist.is_available() and dist.is_initialized()
        ids, mask = self.tokenize(
            self.tokenizer, batch["caption"], self.hparams.max_text_len, pad_to_max=distributed
        )
        # one embedding lookup for the captions' five passes (one dense gradient, not five)
        words = self.qformer.embed_text(ids) if self.hparams.reuse_audio_kv else None
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        # the queries' pass: contrastive features, and the states the generation pass reuses
        queries = self.qformer(audio_kv=kv, mode="unimodal")
        atc = contrastive_loss(
            self.project_queries(queries.query),
            self.text_embeddings(ids, mask, words),
            batch["clip_key"],
            self.temperature,
        )
        neg = sample_hard_negatives(
            atc.sim_a2t.detach(),
            atc.sim_t2a.detach(),
            batch["clip_key"],
            atc.clip_keys_global,
            self.negatives_generator(batch_idx),
        )
        atm = self._matching_loss(neg, kv, feats, frames, ids, mask, words)
        atg = self._generation_loss(queries.query_states, ids, mask, words)
        hp = self.hparams
        loss = hp.loss_atc * atc.loss + hp.loss_atm * atm + hp.loss_atg * atg
        size = len(batch["caption"])
        self.log_dict(
            {
                "train/loss_atc": atc.loss,
                "train/loss_atm": atm,
                "train/loss_atg": atg,
                "train/temperature": self.temperature,
            },
            batch_size=size,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _matching_loss(
        self,
        neg: HardNegatives,
        kv: AudioKV,
        feats: Tensor,
        frames: Tensor,
        ids: Tensor,
        mask: Tensor,
        words: Tensor | None,
    ) -> Tensor:
        """ATM in one pass, as BLIP-2: B positives, B (audio, hard-negative text) and B
        (hard-negative audio, text)."""
        keep = neg.valid
        local = torch.arange(ids.shape[0], device=ids.device)
        reuse = self.hparams.reuse_audio_kv
        if not keep.any():  # e.g. every caption of the batch describes one clip: no negatives
            audio = kv if reuse else self.qformer.audio_keys_values(feats, frames)
            logits = self.match_logits(audio, ids, mask, None, words)
            return matching_loss(logits, torch.ones_like(keep, dtype=torch.long))
        distributed = dist.is_available() and dist.is_initialized()
        neg_ids, neg_mask = gather_nograd(ids)[neg.text_index], gather_nograd(mask)[neg.text_index]
        own = torch.cat([local, local[keep]])  # the step's clips: with their caption, a negative
        if distributed:  # negative clips may live on another rank: project just those clips
            all_feats, all_frames = _gather_frames(feats, frames)
            chosen = neg.audio_index[keep]
            negative = self.qformer.audio_keys_values(all_feats[chosen], all_frames[chosen])
            audio = StackedAudioKV((self._own_audio(kv, feats, frames, own, keep), negative))
        elif reuse:
            negative = kv.select(neg.audio_index[keep])
            audio = StackedAudioKV((self._own_audio(kv, feats, frames, own, keep), negative))
        else:  # BLIP-2: the audio of all 3B rows projected again, as one batch
            rows = torch.cat([own, neg.audio_index[keep]])
            audio = self.qformer.audio_keys_values(feats[rows], frames[rows])
        if words is not None:
            # negative captions from another rank are looked up here; local ones are re-indexed
            neg_words = self.qformer.embed_text(neg_ids) if distributed else words[neg.text_index]
            words = torch.cat([words, neg_words[keep], words[keep]])
        logits = self.match_logits(
            audio,
            torch.cat([ids, neg_ids[keep], ids[keep]]),
            torch.cat([mask, neg_mask[keep], mask[keep]]),
            None,
            words,
        )
        labels = torch.cat(
            [
                torch.ones_like(local),
                torch.zeros(2 * int(keep.sum()), dtype=torch.long, device=ids.device),
            ]
        )
        return matching_loss(logits, labels)

    def _own_audio(
        self, kv: AudioKV, feats: Tensor, frames: Tensor, rows: Tensor, keep: Tensor
    ) -> AudioKV:
        """Keys/values of the matching rows that pair the step's own clips ``rows`` with a caption.
        Reused: with every row kept, all B clips twice (with their caption, with a negative),
        read once per clip in one attention call (`AudioKV.repeat`), nothing copied; else
        re-indexed. Not reused: projected again."""
        if not self.hparams.reuse_audio_kv:
            return self.qformer.audio_keys_values(feats[rows], frames[rows])
        return kv.repeat(2) if bool(keep.all()) else kv.select(rows)

    def _generation_loss(
        self, query_states: Any, ids: Tensor, mask: Tensor, words: Tensor | None = None
    ) -> Tensor:
        """ATG: next-token loss of the caption given the queries (their states from the step's
        query pass, not run again); the vocabulary projection runs only at positions that have a
        label (padding never reaches it)."""
        text = self.qformer(
            **_text(ids, words), text_mask=mask, mode="causal", query_states=query_states
        ).text
        return generation_loss(text, labels_from_ids(ids, mask), head=self.qformer.lm_logits)

    # ------------------------------------------------------------------ retrieval evaluation

    def on_validation_epoch_start(self) -> None:
        self._eval = {
            "audio": [],
            "text": [],
            "text_clip": [],
            "feats": [],
            "captions": [],
            "clip_id": [],
            "clips": 0,
        }

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``slit predict``: each clip's normalised contrastive features ``(B, N, E)`` with its id."""
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        return {"clip_id": batch["clip_id"], "audio_embedding": self.audio_embeddings(kv).cpu()}

    def _collect(self, batch: dict[str, Any]) -> None:
        feats, frames = self.encode_audio(batch)
        kv = self.qformer.audio_keys_values(feats, frames)
        first = self._eval["clips"]
        captions = [c for clip in batch["captions"] for c in clip]
        clip_of = [first + i for i, clip in enumerate(batch["captions"]) for _ in clip]
        ids, mask = self.tokenize(self.tokenizer, captions, self.hparams.max_text_len, False)
        # float32 whatever the autocast: bf16 similarities tie (three significant digits) and the
        # re-ranking adds float32 match logits to them
        self._eval["audio"].append(self.audio_embeddings(kv).float().cpu())
        self._eval["text"].append(self.text_embeddings(ids, mask).float().cpu())
        self._eval["text_clip"].append(torch.tensor(clip_of))
        self._eval["captions"].extend(captions)
        self._eval["clip_id"].extend(batch["clip_id"])
        self._eval["clips"] += len(batch["captions"])
        if self.hparams.rerank_k and self.trainer.testing:
            # half precision on the CPU: the re-ranking needs them once, at the end
            self._eval["feats"].extend(
                f[m].half().cpu() for f, m in zip(feats, frames, strict=True)
            )

    def collected_embeddings(self) -> dict[str, Any]:
        """What this evaluation epoch has embedded so far on this rank (the dashboard's
        projector reads it): ``audio (A, E)`` (each clip's query features, averaged and
        normalised), ``clip_id`` (A ids), ``text (C, E)``, ``text_clip (C,)`` (the clip each
        caption belongs to) and ``captions`` (C)."""
        store = self._eval
        if not store.get("audio"):
            return {"audio": torch.zeros(0, 1), "clip_id": [], "text": torch.zeros(0, 1),
                    "text_clip": torch.zeros(0, dtype=torch.long), "captions": []}  # fmt: skip
        return {
            "audio": F.normalize(torch.cat(store["audio"]).mean(dim=1), dim=-1),
            "clip_id": list(store["clip_id"]),
            "text": torch.cat(store["text"]),
            "text_clip": torch.cat(store["text_clip"]),
            "captions": list(store["captions"]),
        }

    def report(self, split: str) -> None:
        store = _gather_eval(self._eval)
        audio, text, text_clip = store["audio"], store["text"], store["text_clip"]
        if audio.shape[0] == 0:
            return
        sim = torch.einsum("te,ane->tan", text, audio).amax(dim=-1)  # (N_text, N_audio)
        metrics = {f"{split}/{k}": v for k, v in retrieval_metrics(sim, text_clip).items()}
        if split == "test" and self.hparams.rerank_k and store["feats"]:
            feats = [f.float() for f in store["feats"]]
            reranked = self._rerank(sim, text_clip, feats, store["captions"])
            metrics |= {f"{split}/rerank_{k}": v for k, v in reranked.items()}
        metrics[f"{split}/chance_R@1"] = 1.0 / audio.shape[0]
        self.log_dict(metrics, rank_zero_only=True, sync_dist=False)

    @torch.no_grad()
    def _rerank(
        self, sim: Tensor, text_clip: Tensor, clips: list[Tensor], captions: list[str]
    ) -> dict[str, float]:
        """BLIP-2's re-ranking: each caption's top-k clips, and each clip's top-k captions, get the
        matching head's match logit added to their contrastive score; the rest keep their order
        below them. ``clips`` are the clips' unpadded encoder features ``(T_i, D)``."""
        k = min(self.hparams.rerank_k, sim.shape[1], sim.shape[0])
        ids, mask = self.tokenize(self.tokenizer, captions, self.hparams.max_text_len, False)
        t2a = sim - 1e4  # below every re-ranked pair, same order as before
        top = sim.topk(k, dim=1).indices  # (N_text, k)
        for t, scores in self._pair_scores(top, clips, ids, mask, by_text=True):
            t2a[t, top[t]] = sim[t, top[t]] + scores
        a2t = sim.T - 1e4
        top = sim.T.topk(k, dim=1).indices  # (N_audio, k)
        for a, scores in self._pair_scores(top, clips, ids, mask, by_text=False):
            a2t[a, top[a]] = sim.T[a, top[a]] + scores
        t2a_metrics = retrieval_metrics(t2a, text_clip)
        a2t_metrics = retrieval_metrics(a2t.T, text_clip)
        return {k: v for k, v in t2a_metrics.items() if k.startswith("t2a")} | {
            k: v for k, v in a2t_metrics.items() if k.startswith("a2t")
        }

    def _pair_scores(
        self, top: Tensor, clips: list[Tensor], ids: Tensor, mask: Tensor, by_text: bool
    ) -> Iterator[tuple[int, Tensor]]:
        """Match logits of row ``r`` against its candidates ``top[r]``, a few rows at a time so the
        audio keys/values of only ``rows x k`` clips are ever in memory."""
        k = top.shape[1]
        chunk = max(1, 256 // k)
        for start in range(0, top.shape[0], chunk):
            rows = range(start, min(start + chunk, top.shape[0]))
            pairs = [(r, int(c)) for r in rows for c in top[r]]
            audio = [c if by_text else r for r, c in pairs]
            text = torch.tensor([r if by_text else c for r, c in pairs], device=self.device)
            feats = nn.utils.rnn.pad_sequence([clips[a] for a in audio], batch_first=True)
            lengths = torch.tensor([clips[a].shape[0] for a in audio])
            frames = torch.arange(feats.shape[1])[None] < lengths[:, None]
            kv = self.qformer.audio_keys_values(feats.to(self.device), frames.to(self.device))
            logits = self.match_logits(kv, ids[text], mask[text], None)[:, 1].float().cpu()
            for i, r in enumerate(rows):
                yield r, logits[i * k : (i + 1) * k]


def _text(ids: Tensor, words: Tensor | None) -> dict[str, Tensor]:
    """How a pass takes the captions: the step's shared lookup ``words``, else the ids."""
    return {"text_ids": ids} if words is None else {"text_embeds": words}


def _gather_frames(feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(B, T, D)`` features and masks; T is padded to the longest across ranks."""
    length = torch.tensor([feats.shape[1]], device=feats.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length.item()) - feats.shape[1]
    feats, frames = F.pad(feats, (0, 0, 0, pad)), F.pad(frames, (0, pad), value=False)
    return gather_nograd(feats), gather_nograd(frames)


def _gather_eval(store: dict[str, list[Any]]) -> dict[str, Any]:
    """This rank's collected evaluation data, then every rank's (clip indices shifted to match)."""
    local = {
        "audio": torch.cat(store["audio"]) if store["audio"] else torch.zeros(0, 1, 1),
        "text": torch.cat(store["text"]) if store["text"] else torch.zeros(0, 1),
        "text_clip": torch.cat(store["text_clip"])
        if store["text_clip"]
        else torch.zeros(0, dtype=torch.long),
        "feats": store["feats"],
        "captions": store["captions"],
    }
    everyone = gathered(local)
    if len(everyone) == 1:
        return local
    parts = [p for p in everyone if p["audio"].shape[0]]  # a rank may have had no clips
    if not parts:
        return local
    offsets = torch.tensor([0] + [p["audio"].shape[0] for p in parts]).cumsum(0)
    return {
        "audio": torch.cat([p["audio"] for p in parts]),
        "text": torch.cat([p["text"] for p in parts]),
        "text_clip": torch.cat([p["text_clip"] + offsets[r] for r, p in enumerate(parts)]),
        "feats": [f for p in parts for f in p["feats"]],
        "captions": [c for p in parts for c in p["captions"]],
    }
