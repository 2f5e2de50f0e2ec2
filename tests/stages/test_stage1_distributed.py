"""Stage 1 on two real processes (gloo): the contrastive loss over the global batch."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slit_lightning.losses import contrastive_loss
from slit_lightning.stages import Stage1
from tests.data.test_distributed import _free_port

CAPTIONS = [f"{n} short beeps then a hum" for n in ("one", "two", "three", "four")] + [
    "a rising sweep",
    "a falling sweep",
    "white noise",
    "a low knock",
]
KEYS = [0, 1, 2, 3, 4, 5, 6, 6]  # the last two captions describe one clip: positives


def _contrastive(model: Stage1, rows: slice) -> float:
    torch.manual_seed(1)
    audio = torch.randn(8, 4000)[rows] * 0.1
    batch = {"audio": audio, "audio_mask": torch.ones_like(audio, dtype=torch.bool)}
    with torch.no_grad():
        feats, frames = model.encode_audio(batch)
        kv = model.qformer.audio_keys_values(feats, frames)
        ids, mask = model.tokenize(model.tokenizer, CAPTIONS[rows], 16, pad_to_max=True)
        out = contrastive_loss(model.audio_embeddings(kv), model.text_embeddings(ids, mask),
                               torch.tensor(KEYS[rows]), model.temperature)  # fmt: skip
    return out.loss.item()


def _build(encoder: str, bert: str) -> Stage1:
    torch.manual_seed(0)
    return Stage1(encoder, bert, num_queries=4, embed_dim=16, max_text_len=16).eval()


def _rank_main(rank: int, world: int, port: int, encoder: str, bert: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = _contrastive(_build(encoder, bert), slice(rank * 4, rank * 4 + 4))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(loss, handle)
    finally:
        dist.destroy_process_group()


def test_two_process_contrastive_loss_equals_one_process_loss(tiny_encoder, tiny_bert, tmp_path):
    single = _contrastive(_build(str(tiny_encoder), str(tiny_bert)), slice(0, 8))
    args = (2, _free_port(), str(tiny_encoder), str(tiny_bert), str(tmp_path))
    mp.spawn(_rank_main, args=args, nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank averages its 4 rows against all 8 columns: the mean over ranks is the global loss
    assert abs(sum(ranks) / 2 - single) < 1e-5
    assert abs(ranks[0] - ranks[1]) > 1e-4  # the ranks really saw different halves
