"""Losses: golden values from explicit formulas, multi-positives, hard negatives, two ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from slit_lightning.losses import (
    contrastive_loss,
    gather_nograd,
    gather_with_grad,
    generation_loss,
    labels_from_ids,
    matching_loss,
    max_query_similarity,
    sample_hard_negatives,
)

# --------------------------------------------------------------------------- pure-Python references


def _py_cross_entropy(row: list[float], target: list[float], smoothing: float = 0.0) -> float:
    """-sum_j q_j log softmax(row)_j with q = (1 - s) * target + s / C."""
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    q = [(1 - smoothing) * p + smoothing / len(row) for p in target]
    return -sum(p * (v - log_z) for p, v in zip(q, row, strict=True))


def _py_contrastive(queries, texts, keys, temperature, smoothing=0.0) -> float:
    """The ATC loss written out: max over queries, soft multi-positive targets, both directions."""
    n = len(texts)

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True))

    sim = [
        [max(dot(q, texts[t]) for q in queries[a]) / temperature for t in range(n)]
        for a in range(n)
    ]
    targets = []
    for i in range(n):
        count = sum(keys[i] == keys[j] for j in range(n))
        targets.append([float(keys[i] == keys[j]) / count for j in range(n)])
    a2t = sum(_py_cross_entropy(sim[i], targets[i], smoothing) for i in range(n)) / n
    columns = [[sim[a][t] for a in range(n)] for t in range(n)]
    t2a = sum(_py_cross_entropy(columns[i], targets[i], smoothing) for i in range(n)) / n
    return (a2t + t2a) / 2


def _unit_rows(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


# --------------------------------------------------------------------------- contrastive


def test_contrastive_golden_two_by_two():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.6, 0.8]]])
    texts = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])
    out = contrastive_loss(queries, texts, torch.tensor([0, 1]), torch.tensor(0.5))
    # by hand: sim[a][t] = max over the two queries of q.t
    #   a0: t0 max(0.8, 0.6) = 0.8   t1 max(-1, 0) = 0
    #   a1: t0 max(0.96, 0) = 0.96   t1 max(-0.6, 0.6) = 0.6        / 0.5 -> logits
    # two-class cross-entropy with target logit x and other y: log(1 + exp(y - x))
    a2t = (math.log1p(math.exp(0.0 - 1.6)) + math.log1p(math.exp(1.92 - 1.2))) / 2
    t2a = (math.log1p(math.exp(1.92 - 1.6)) + math.log1p(math.exp(0.0 - 1.2))) / 2
    assert out.loss.item() == pytest.approx((a2t + t2a) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.607418, abs=1e-5)  # the same, as a number
    assert out.loss_a2t.item() == pytest.approx(a2t, abs=1e-6)
    assert out.loss_t2a.item() == pytest.approx(t2a, abs=1e-6)
    expected_sim = torch.tensor([[1.6, 0.0], [1.92, 1.2]])
    torch.testing.assert_close(out.sim_a2t, expected_sim)
    torch.testing.assert_close(out.sim_t2a, expected_sim.t())
    assert out.clip_keys_global.tolist() == [0, 1]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_contrastive_matches_python_reference(smoothing):
    queries, texts = _unit_rows((5, 3, 4), 0), _unit_rows((5, 4), 1)
    keys = [3, 8, 3, 5, 8]
    out = contrastive_loss(
        queries,
        texts,
        torch.tensor(keys),
        torch.tensor(0.07, dtype=torch.float64),
        label_smoothing=smoothing,
    )
    expected = _py_contrastive(queries.tolist(), texts.tolist(), keys, 0.07, smoothing)
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)


def test_two_captions_of_one_clip_are_both_positives():
    # rows 0 and 1: two captions of clip 7 (two crops of its audio); row 2: another clip
    queries, texts = _unit_rows((3, 2, 4), 2), _unit_rows((3, 4), 3)
    queries[1] = F.normalize(queries[0] + 0.3 * queries[1], dim=-1)
    texts[1] = F.normalize(texts[0] + 0.3 * texts[1], dim=-1)
    temperature = torch.tensor(0.1, dtype=torch.float64)
    shared = contrastive_loss(queries, texts, torch.tensor([7, 7, 9]), temperature)
    apart = contrastive_loss(queries, texts, torch.tensor([7, 8, 9]), temperature)
    reference = _py_contrastive(queries.tolist(), texts.tolist(), [7, 7, 9], 0.1)
    assert shared.loss.item() == pytest.approx(reference, abs=1e-9)
    # written out for row 0 of audio->text: half the mass on each caption of clip 7
    log_p = torch.log_softmax(shared.sim_a2t[0], dim=0)
    assert -(0.5 * log_p[0] + 0.5 * log_p[1]).item() == pytest.approx(
        _py_cross_entropy(shared.sim_a2t[0].tolist(), [0.5, 0.5, 0.0]), abs=1e-9
    )
    # calling the sibling caption a negative punishes a correct match
    assert apart.loss.item() > shared.loss.item()


def test_similarity_is_the_max_over_queries_and_only_the_winner_gets_gradient():
    queries = _unit_rows((3, 5, 4), 4).requires_grad_()
    texts = _unit_rows((2, 4), 5)
    sim = max_query_similarity(queries, texts)
    for a in range(3):
        for t in range(2):
            dots = [float(queries[a, n].detach() @ texts[t]) for n in range(5)]
            assert sim[a, t].item() == pytest.approx(max(dots), abs=1e-12)
            assert sim[a, t].item() > sum(dots) / 5  # really the max, not the mean
    sim[0, 1].backward()
    winner = int(torch.argmax(queries[0].detach() @ texts[1]))
    touched = queries.grad.abs().sum(-1) > 0
    assert touched.nonzero().tolist() == [[0, winner]]


def test_contrastive_bad_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="clip_keys"):
        contrastive_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(3), 0.07)
    with pytest.raises(ValueError, match=r"query_feats \(B, N, E\)"):
        contrastive_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2), 0.07)


# --------------------------------------------------------------------------- hard negatives

# chi-square critical values at p = 0.001 by degrees of freedom
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_hard_negatives_follow_softmax_of_non_positives_and_never_pick_positives():
    keys_global = torch.tensor([0, 0, 1, 2, 3])  # clip 0 has two captions
    gen = torch.Generator().manual_seed(0)
    base_a2t = torch.randn(3, 5, generator=gen) * 2
    base_t2a = torch.randn(3, 5, generator=gen) * 2
    patterns = torch.tensor([0, 2, 3])  # local rows: clip 0, clip 1, clip 2
    repeats = 4000
    keys_local = patterns.repeat_interleave(repeats)
    sim_a2t, sim_t2a = (
        base_a2t.repeat_interleave(repeats, 0),
        base_t2a.repeat_interleave(repeats, 0),
    )
    neg = sample_hard_negatives(sim_a2t, sim_t2a, keys_local, keys_global, gen)
    assert neg.valid.all()
    for index, base in ((neg.text_index, base_a2t), (neg.audio_index, base_t2a)):
        assert (keys_global[index] != keys_local).all()  # never a positive
        for p, key in enumerate(patterns.tolist()):
            allowed = (keys_global != key).nonzero().squeeze(1)
            picks = index[p * repeats : (p + 1) * repeats]
            counts = torch.stack([(picks == c).sum() for c in allowed]).double()
            assert counts.sum() == repeats
            probs = torch.softmax(base[p, allowed].double(), dim=0)
            assert _chi_square(counts, probs) < _CHI2_999[len(allowed) - 1]


def test_hard_negatives_are_reproducible_with_a_generator():
    sim = torch.randn(6, 6)
    keys = torch.arange(6)
    first = sample_hard_negatives(sim, sim, keys, keys, torch.Generator().manual_seed(3))
    second = sample_hard_negatives(sim, sim, keys, keys, torch.Generator().manual_seed(3))
    assert torch.equal(first.text_index, second.text_index)
    assert torch.equal(first.audio_index, second.audio_index)


def test_hard_negatives_all_positive_rows_and_non_finite_similarities():
    keys_global = torch.tensor([5, 5, 6, 7])
    keys_local = torch.tensor([5, 6, 7, 5])
    nan, inf = float("nan"), float("inf")
    sim = torch.tensor(
        [
            [9.0, 9.0, nan, -inf],  # every non-positive unusable: uniform over columns 2, 3
            [0.0, inf, 50.0, 1.0],  # +inf at a non-positive: always column 1
            [nan, nan, nan, 100.0],  # NaN and a huge positive: only columns 0-2 allowed
            [1.0, 2.0, -inf, -inf],
        ]
    )
    gen = torch.Generator().manual_seed(1)
    repeats = 200
    neg = sample_hard_negatives(
        sim.repeat(repeats, 1), sim.repeat(repeats, 1), keys_local.repeat(repeats), keys_global, gen
    )
    assert neg.valid.all()
    text = neg.text_index.view(repeats, 4)
    assert set(text[:, 0].tolist()) == {2, 3}
    assert set(text[:, 1].tolist()) == {1}
    assert set(text[:, 2].tolist()) <= {0, 1, 2} and len(set(text[:, 2].tolist())) == 3
    assert set(text[:, 3].tolist()) == {2, 3}
    # a global batch with only one clip has no negative at all: flagged, still a valid index
    one_clip = torch.tensor([4, 4, 4])
    neg = sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 3), one_clip, one_clip, gen)
    assert not neg.valid.any()
    assert ((neg.text_index >= 0) & (neg.text_index < 3)).all()


def test_hard_negatives_carry_no_gradient_and_check_shapes():
    sim = torch.randn(3, 3, requires_grad=True)
    neg = sample_hard_negatives(sim, sim, torch.arange(3), torch.arange(3))
    assert not neg.text_index.requires_grad and neg.text_index.dtype == torch.long
    with pytest.raises(ValueError, match=r"\(B, Bg\)"):
        sample_hard_negatives(sim, sim, torch.arange(3), torch.arange(4))


# --------------------------------------------------------------------------- matching


def test_matching_golden():
    logits = torch.tensor([[0.2, 1.0], [2.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 0])
    # -log softmax at the label: log(1 + exp(other - target))
    expected = (
        math.log1p(math.exp(0.2 - 1.0)) + math.log1p(math.exp(-1.0 - 2.0)) + math.log(2.0)
    ) / 3
    assert matching_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        matching_loss(torch.zeros(3, 3), labels)


# --------------------------------------------------------------------------- generation


def test_generation_golden_with_shift_and_padding():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [7.0, 7.0, 7.0]]])
    labels = torch.tensor([[2, 1, -100]])  # position 0 predicts token 1; token 2 is padding

    def nll(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    assert generation_loss(logits, labels).item() == pytest.approx(
        nll([1.0, 2.0, 0.5], 1), abs=1e-6
    )
    both = torch.tensor([[2, 1, 2]])
    expected = (nll([1.0, 2.0, 0.5], 1) + nll([0.0, -1.0, 3.0], 2)) / 2
    assert generation_loss(logits, both).item() == pytest.approx(expected, abs=1e-6)
    # label smoothing 0.2 over V = 3: 0.8 * nll(target) + 0.2 * mean_v nll(v)
    row = [1.0, 2.0, 0.5]
    smooth = 0.8 * nll(row, 1) + 0.2 * sum(nll(row, v) for v in range(3)) / 3
    got = generation_loss(logits, labels, label_smoothing=0.2).item()
    assert got == pytest.approx(smooth, abs=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_generation_equals_cross_entropy_on_shifted_tensors(smoothing):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, 5:] = -100
    labels[2, :3] = -100
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), label_smoothing=smoothing
    )
    torch.testing.assert_close(generation_loss(logits, labels, label_smoothing=smoothing), expected)


def test_generation_ignores_padded_positions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=gen, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=gen)
    labels[0, 4:] = -1  # custom ignore index
    loss = generation_loss(logits, labels, ignore_index=-1)
    # logits at t predict t + 1: positions 3, 4, 5 of row 0 and the last of row 1 predict nothing
    unused = torch.zeros(2, 6, dtype=torch.bool)
    unused[0, 3:] = True
    unused[:, -1] = True
    changed = logits.detach().clone()
    changed[unused] = torch.randn(int(unused.sum()), 9, generator=gen) * 100
    torch.testing.assert_close(generation_loss(changed, labels, ignore_index=-1), loss.detach())
    loss.backward()
    assert (logits.grad[unused] == 0).all() and (logits.grad[~unused] != 0).any(dim=-1).all()


def test_generation_without_labels_is_zero_and_backpropagates():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = generation_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.isnan().any()


def test_labels_from_ids_masks_padding_and_prompt_for_both_paddings():
    ids = torch.tensor([[11, 12, 13, 14, 0, 0], [0, 0, 21, 22, 23, 24]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    i = -100
    assert labels_from_ids(ids, mask).tolist() == [[11, 12, 13, 14, i, i], [i, i, 21, 22, 23, 24]]
    assert labels_from_ids(ids, mask, ignore_first=1).tolist() == [
        [i, 12, 13, 14, i, i],
        [i, i, i, 22, 23, 24],
    ]
    per_row = labels_from_ids(ids, mask, ignore_index=-1, ignore_first=torch.tensor([2, 3]))
    assert per_row.tolist() == [[-1, -1, 13, 14, -1, -1], [-1, -1, -1, -1, -1, 24]]
    with pytest.raises(ValueError, match="one shape"):
        labels_from_ids(ids, mask[:, :3])


# --------------------------------------------------------------------------- two ranks (gloo)

WORLD, LOCAL, N, E, D = 2, 3, 4, 5, 6
KEYS = [0, 1, 2, 0, 3, 1]  # clips 0 and 1 have a caption on each rank: positives cross ranks


def _global_problem():
    """Raw features, a shared projection and a temperature, identical in every process."""
    gen = torch.Generator().manual_seed(1234)
    raw_q = torch.randn(WORLD * LOCAL, N, D, generator=gen)
    raw_t = torch.randn(WORLD * LOCAL, D, generator=gen)
    proj = torch.nn.Linear(D, E)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(E, D, generator=gen))
        proj.bias.copy_(torch.randn(E, generator=gen))
    log_temp = torch.nn.Parameter(torch.tensor(math.log(0.07)))
    return raw_q, raw_t, proj, log_temp


def _step(raw_q, raw_t, keys, proj, log_temp, gather):
    """One ATC forward + backward; returns the loss and the leaves' gradients."""
    raw_q, raw_t = raw_q.clone().requires_grad_(), raw_t.clone().requires_grad_()
    queries, texts = F.normalize(proj(raw_q), dim=-1), F.normalize(proj(raw_t), dim=-1)
    out = contrastive_loss(queries, texts, keys, log_temp.exp(), gather=gather)
    out.loss.backward()
    params = [proj.weight.grad, proj.bias.grad, log_temp.grad]
    return out.loss.detach(), raw_q.grad, raw_t.grad, params


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        raw_q, raw_t, proj, log_temp = _global_problem()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        keys = torch.tensor(KEYS)[rows]
        loss, grad_q, grad_t, params = _step(raw_q[rows], raw_t[rows], keys, proj, log_temp, True)
        for grad in params:  # what DDP does to parameter gradients: average over ranks
            dist.all_reduce(grad)
            grad /= WORLD
        losses = gather_nograd(loss[None])
        negatives = _sampled_negatives(rows)
        generation = gather_nograd(_uneven_generation_loss(rows)[None])
        # unequal local sizes (a short last batch): 1 row here, 4 there; backward sums per slice
        x = torch.arange(5.0)[:1] if rank == 0 else torch.arange(5.0)[1:]
        x.requires_grad_()
        gathered = gather_with_grad(x)
        (gathered * torch.arange(10.0, 15.0)).sum().backward()
        torch.save(
            {
                "losses": losses,
                "grad_q": grad_q,
                "grad_t": grad_t,
                "params": params,
                "gathered": gathered.detach(),
                "x_grad": x.grad,
                "negatives": negatives,
                "generation": generation,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _sampled_negatives(rows: slice) -> torch.Tensor:
    """Hard negatives of ``rows`` of one global problem, drawn with a generator seeded alike."""
    gen = torch.Generator().manual_seed(5)
    sim = torch.randn(WORLD * LOCAL, WORLD * LOCAL, generator=gen) * 3
    keys = torch.tensor(KEYS)
    neg = sample_hard_negatives(sim[rows], sim.t()[rows], keys[rows], keys, gen)
    return torch.stack([neg.text_index, neg.audio_index])


def _uneven_generation_loss(rows: slice) -> torch.Tensor:
    """Generation loss of ``rows`` where the rows hold very different numbers of labels."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(WORLD * LOCAL, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (WORLD * LOCAL, 7), generator=gen)
    labels[:LOCAL, 3:] = -100  # the first rank's rows have few labelled tokens
    return generation_loss(logits[rows], labels[rows])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    raw_q, raw_t, proj, log_temp = _global_problem()
    loss, grad_q, grad_t, params = _step(raw_q, raw_t, torch.tensor(KEYS), proj, log_temp, False)
    # each rank's loss covers its local rows; their mean is the global-batch loss
    torch.testing.assert_close(ranks[0]["losses"].mean(), loss, atol=1e-6, rtol=0)
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # feature gradients are world-size times the single-process slice (summed over ranks) ...
        torch.testing.assert_close(result["grad_q"] / WORLD, grad_q[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result["grad_t"] / WORLD, grad_t[rows], atol=1e-6, rtol=1e-5)
        # ... so DDP's averaging of parameter gradients gives exactly the single-process gradient
        for got, want in zip(result["params"], params, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result["gathered"], torch.arange(5.0))
    # d/dx of sum(gathered * c), summed over both ranks' identical losses: 2 * c at the own slice
    torch.testing.assert_close(ranks[0]["x_grad"], torch.tensor([20.0]))
    torch.testing.assert_close(ranks[1]["x_grad"], torch.tensor([22.0, 24.0, 26.0, 28.0]))
    # hard negatives do not depend on the world size: each rank draws its rows of one matrix
    single = _sampled_negatives(slice(0, WORLD * LOCAL))
    torch.testing.assert_close(torch.cat([r["negatives"] for r in ranks], dim=1), single)
    # the generation loss averages over the global batch's tokens, not over rank means
    whole = _uneven_generation_loss(slice(0, WORLD * LOCAL))
    torch.testing.assert_close(ranks[0]["generation"].mean(), whole, atol=1e-6, rtol=0)
    assert abs(ranks[0]["generation"][0] - ranks[0]["generation"][1]) > 1e-3


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_nograd(x) is x


def test_generation_loss_with_head_projects_only_labelled_rows_and_matches_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 1, -100]])
    seen = []

    def counting_head(rows):
        seen.append(rows.shape[0])
        return head(rows)

    full = generation_loss(head(hidden), labels)
    lean = generation_loss(hidden, labels, head=counting_head)
    torch.testing.assert_close(lean, full)
    assert seen == [5]  # 2 + 3 positions predict a labelled token, not 2 x 4
