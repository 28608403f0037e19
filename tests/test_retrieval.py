"""Top-k routines: FAISS flat == torch brute force == naive full sort, with history exclusion."""

import numpy as np
import pytest
import torch

from rails_lightning.retrieval.popularity import PopularityTopK
from rails_lightning.retrieval.topk import BruteForceTopK, FaissInnerProductTopK, drop_excluded, inner_product_block


def _naive_topk(queries, items, k, exclude):
    scores = queries @ items.T  # (B, N)
    for row, excluded in enumerate(exclude):
        for item in excluded:
            scores[row, item - 1] = float("-inf")
    top_scores, cols = scores.topk(k, dim=1)
    return top_scores, cols + 1


def _csr(exclude):
    offsets = torch.tensor([0] + list(np.cumsum([len(e) for e in exclude])), dtype=torch.long)
    items = torch.tensor([i for e in exclude for i in e], dtype=torch.long)
    return offsets, items


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=gen)
    items = torch.randn(503, 16, generator=gen)
    exclude = [sorted(set(torch.randint(1, 504, (int(n),), generator=gen).tolist())) for n in torch.randint(0, 60, (37,), generator=gen)]
    return queries, items, exclude


@pytest.mark.parametrize("chunk", [64, 100, 503, 10_000])
def test_brute_force_matches_naive(problem, chunk):
    queries, items, exclude = problem
    expected_scores, expected_ids = _naive_topk(queries, items, 50, exclude)
    scores, ids = BruteForceTopK(inner_product_block(items), len(items), item_chunk_size=chunk).search(queries, 50, *_csr(exclude))
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)


def test_faiss_matches_brute_force(problem):
    queries, items, exclude = problem
    offsets, excluded = _csr(exclude)
    torch_scores, torch_ids = BruteForceTopK(inner_product_block(items), len(items)).search(queries, 50, offsets, excluded)
    faiss_scores, faiss_ids = FaissInnerProductTopK(items).search(queries, 50, offsets, excluded)
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-4, rtol=1e-4)
    # Ties aside (random floats have none), the ids agree exactly.
    assert (faiss_ids == torch_ids).float().mean() > 0.999
    for row, excluded_items in enumerate(exclude):
        assert not set(faiss_ids[row].tolist()) & set(excluded_items)


def test_faiss_without_exclusion(problem):
    queries, items, _ = problem
    expected_scores, expected_ids = _naive_topk(queries, items, 10, [[] for _ in queries])
    scores, ids = FaissInnerProductTopK(items).search(queries, 10)
    assert torch.equal(ids, expected_ids)


def test_everything_excluded_leaves_empty_slots():
    items = torch.eye(4)
    queries = torch.ones(1, 4)
    offsets, excluded = _csr([[1, 2, 3]])
    for retriever in (BruteForceTopK(inner_product_block(items), 4), FaissInnerProductTopK(items)):
        scores, ids = retriever.search(queries, 3, offsets, excluded)
        assert ids[0, 0] == 4 and ids[0, 1:].tolist() == [0, 0]
        assert torch.isinf(scores[0, 1:]).all()


def test_drop_excluded_keeps_order():
    ids = torch.tensor([[5, 3, 9, 1, 2]])
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0]])
    offsets, excluded = _csr([[3, 1]])
    kept_scores, kept_ids = drop_excluded(scores, ids, 3, offsets, excluded, num_items=10)
    assert kept_ids.tolist() == [[5, 9, 2]]
    assert kept_scores.tolist() == [[9.0, 7.0, 5.0]]


def test_popularity_ranks_by_count_minus_history():
    counts = np.array([0, 5, 50, 20, 1])  # item 2 most popular, then 3, then 1
    offsets, excluded = _csr([[], [2]])
    _, ids = PopularityTopK(counts).search(torch.zeros(2), 3, offsets, excluded)
    assert ids.tolist() == [[2, 3, 1], [3, 1, 4]]
