import math

import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from rails_lightning.metrics import RetrievalMetrics


def _inv_log2(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def _assert_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].ndim == 0 and got[key].is_floating_point(), key
        assert got[key].item() == pytest.approx(value, abs=1e-9), key


def test_keys_and_dtype():
    m = RetrievalMetrics(ks=(1, 10))
    m.update(torch.arange(1, 11).unsqueeze(0), torch.tensor([3]))
    assert set(m.compute()) == {"hr@1", "hr@10", "recall@1", "recall@10", "ndcg@1", "ndcg@10", "mrr"}


def test_single_target_hand_computed():
    # Query 0: target at rank 1; query 1: rank 3; query 2: absent. Extra 6th column is ignored.
    topk = torch.tensor(
        [
            [7, 2, 3, 4, 5, 6],
            [1, 2, 7, 4, 5, 6],
            [1, 2, 3, 4, 5, 7],
        ]
    )
    m = RetrievalMetrics(ks=(1, 3, 5))
    m.update(topk, torch.tensor([7, 7, 7]))
    hr = {1: 1 / 3, 3: 2 / 3, 5: 2 / 3}
    ndcg = {1: 1 / 3, 3: (1 + 0.5) / 3, 5: (1 + 0.5) / 3}
    expected = {f"hr@{k}": hr[k] for k in hr}
    expected |= {f"recall@{k}": hr[k] for k in hr}
    expected |= {f"ndcg@{k}": ndcg[k] for k in ndcg}
    expected["mrr"] = (1 + 1 / 3 + 0) / 3  # rank 6 is past max(ks)=5: truncated to 0
    _assert_close(m.compute(), expected)


def test_multi_target_hand_computed_with_padding_and_duplicates():
    topk = torch.tensor(
        [
            [5, 7, 9, 11, 13],  # targets 7 (rank 2) and 13 (rank 5) found, 20 missing
            [4, 1, 2, 3, 6],  # target 4 given twice: counts once, found at rank 1
        ]
    )
    targets = torch.tensor([[7, 13, 20, 0], [4, 0, 4, 0]])
    m = RetrievalMetrics(ks=(1, 3, 5))
    m.update(topk, targets)

    idcg3 = 1 + _inv_log2(2) + _inv_log2(3)  # 3 targets, all fit in the top 3 / top 5
    row0 = {
        "hr@1": 0.0, "hr@3": 1.0, "hr@5": 1.0,
        "recall@1": 0.0, "recall@3": 1 / 3, "recall@5": 2 / 3,
        "ndcg@1": 0.0, "ndcg@3": _inv_log2(2) / idcg3, "ndcg@5": (_inv_log2(2) + _inv_log2(5)) / idcg3,
        "mrr": 0.5,
    }  # fmt: skip
    row1 = {key: 1.0 for key in row0}
    _assert_close(m.compute(), {key: (row0[key] + row1[key]) / 2 for key in row0})


def test_padding_zero_never_matches_retrieved_zero():
    # A retrieved id 0 (e.g. padding in an index) must not match target padding.
    m = RetrievalMetrics(ks=(2,))
    m.update(torch.tensor([[0, 9]]), torch.tensor([[9, 0]]))
    out = m.compute()
    assert out["recall@2"].item() == pytest.approx(1.0)
    assert out["mrr"].item() == pytest.approx(0.5)


def _random_batch(gen, n_queries, n_items, k_max, max_targets):
    scores = torch.rand(n_queries, n_items, generator=gen)
    topk = scores.topk(k_max, dim=1).indices + 1  # ids 1..n_items; 0 is padding
    targets = torch.randint(1, n_items + 1, (n_queries, max_targets), generator=gen)
    keep = torch.rand(n_queries, max_targets, generator=gen) < 0.5
    keep[:, 0] = True
    return topk, targets * keep


def test_accumulation_equals_single_update_and_reset():
    gen = torch.Generator().manual_seed(0)
    topk, targets = _random_batch(gen, 90, 40, 20, 4)
    ks = (1, 5, 20)

    whole = RetrievalMetrics(ks=ks)
    whole.update(topk, targets)
    parts = RetrievalMetrics(ks=ks)
    for chunk in (slice(0, 7), slice(7, 50), slice(50, 90)):
        parts.update(topk[chunk], targets[chunk])
    expected = whole.compute()
    got = parts.compute()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])

    # DDP-style merge of states from two "ranks" also equals the whole.
    a, b = RetrievalMetrics(ks=ks), RetrievalMetrics(ks=ks)
    a.update(topk[:30], targets[:30])
    b.update(topk[30:], targets[30:])
    a.merge_state(b)
    for key, value in a.compute().items():
        torch.testing.assert_close(value, expected[key])

    # After reset, only the new data counts.
    parts.reset()
    assert parts.count.item() == 0
    parts.update(topk[:10], targets[:10])
    fresh = RetrievalMetrics(ks=ks)
    fresh.update(topk[:10], targets[:10])
    fresh_out = fresh.compute()
    for key, value in parts.compute().items():
        torch.testing.assert_close(value, fresh_out[key])
    assert fresh_out["recall@5"].item() != pytest.approx(expected["recall@5"].item())


@pytest.mark.parametrize("multi_target", [False, True])
def test_matches_torchmetrics_functional(multi_target):
    # Independent check on positive scores (torchmetrics drops scores <= 0 from recall / RR).
    gen = torch.Generator().manual_seed(1 if multi_target else 2)
    n_queries, n_items = 150, 50
    ks = (1, 5, 10, 50)  # max(ks) == corpus size, so MRR truncation is irrelevant
    scores = torch.rand(n_queries, n_items, generator=gen) + 0.1
    topk = scores.topk(n_items, dim=1).indices + 1
    if multi_target:
        targets = torch.randint(1, n_items + 1, (n_queries, 5), generator=gen)
        targets = targets * (torch.rand(n_queries, 5, generator=gen) < 0.6)
        targets[:, 0] = torch.randint(1, n_items + 1, (n_queries,), generator=gen)
    else:
        targets = torch.randint(1, n_items + 1, (n_queries,), generator=gen)

    m = RetrievalMetrics(ks=ks)
    m.update(topk, targets)
    got = m.compute()

    relevance = torch.zeros(n_queries, n_items + 1, dtype=torch.long)
    relevance.scatter_(1, targets.view(n_queries, -1), 1)
    relevance = relevance[:, 1:]  # drop padding column 0; column j is item j + 1
    assert multi_target == bool((relevance.sum(1) > 1).any())

    fns = {"hr": retrieval_hit_rate, "recall": retrieval_recall, "ndcg": retrieval_normalized_dcg}
    for k in ks:
        for name, fn in fns.items():
            ref = torch.stack([fn(scores[q], relevance[q], top_k=k) for q in range(n_queries)]).mean()
            assert got[f"{name}@{k}"].item() == pytest.approx(ref.item(), abs=1e-6), f"{name}@{k}"
    ref_mrr = torch.stack([retrieval_reciprocal_rank(scores[q], relevance[q]) for q in range(n_queries)]).mean()
    assert got["mrr"].item() == pytest.approx(ref_mrr.item(), abs=1e-6)

    # With max(ks) < corpus size our MRR is truncated; that matches torchmetrics' RR with top_k.
    m10 = RetrievalMetrics(ks=(10,))
    m10.update(topk, targets)
    ref_mrr10 = torch.stack(
        [retrieval_reciprocal_rank(scores[q], relevance[q], top_k=10) for q in range(n_queries)]
    ).mean()
    assert m10.compute()["mrr"].item() == pytest.approx(ref_mrr10.item(), abs=1e-6)
    assert ref_mrr10.item() < ref_mrr.item()


def test_too_few_columns_raises():
    m = RetrievalMetrics(ks=(1, 10))
    with pytest.raises(ValueError, match="columns"):
        m.update(torch.arange(1, 10).unsqueeze(0), torch.tensor([1]))


def test_row_without_target_raises():
    m = RetrievalMetrics(ks=(1, 2))
    with pytest.raises(ValueError, match="at least one"):
        m.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="at least one"):
        m.update(torch.tensor([[1, 2]]), torch.tensor([0]))
