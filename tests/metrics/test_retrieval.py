import pytest
import torch

from slit_lightning.metrics.retrieval import audio_to_text, retrieval_metrics, text_to_audio


def test_text_to_audio_golden():
    # 3 captions, 3 clips; ranks of the right clip: 0, 1, 2
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.9, 0.8, 0.7]])
    out = text_to_audio(sim, torch.tensor([0, 1, 2]))
    assert out["t2a_R@1"] == pytest.approx(1 / 3)
    assert out["t2a_R@5"] == out["t2a_R@10"] == 1.0
    assert out["t2a_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_audio_to_text_counts_any_caption_and_averages_precision():
    # 2 clips, 4 captions: clip 0 owns captions 0, 1; clip 1 owns 2, 3
    text_clip = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.1, 0.2, 0.3, 0.4]])
    out = audio_to_text(sim, text_clip)
    # clip 0 ranks: c0 (rel), c2, c3, c1 (rel) -> AP = (1/1 + 2/4) / 2
    # clip 1 ranks: c3 (rel), c2 (rel), c1, c0 -> AP = (1 + 1) / 2
    assert out["a2t_R@1"] == 1.0
    assert out["a2t_mAP@10"] == pytest.approx(((1 + 0.5) / 2 + 1.0) / 2)


def test_random_scores_sit_near_chance_and_perfect_scores_at_one():
    torch.manual_seed(0)
    clips = torch.arange(200).repeat_interleave(5)
    random = retrieval_metrics(torch.randn(1000, 200), clips)
    assert random["t2a_R@1"] < 0.02 and random["t2a_R@10"] < 0.1
    perfect = retrieval_metrics(torch.nn.functional.one_hot(clips, 200).float(), clips)
    assert all(v == pytest.approx(1.0) for v in perfect.values())
