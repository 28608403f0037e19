"""Top-k routines: FAISS flat == torch brute force == naive full sort, with history exclusion."""

import numpy as np
import pytest
import torch

from rails_lightning.retrieval import SearchOptions, inner_product_retriever
from rails_lightning.retrieval.popularity import PopularityTopK
from rails_lightning.retrieval.topk import BruteForceTopK, Exclusion, FaissInnerProductTopK, keep_allowed, unique_ids


def inner_product_block(items):
    return lambda queries, start, end: queries @ items[start:end].T


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
    return Exclusion(offsets, items)


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=gen)
    items = torch.randn(503, 16, generator=gen)
    exclude = [sorted(set(torch.randint(1, 504, (int(n),), generator=gen).tolist())) for n in torch.randint(0, 60, (37,), generator=gen)]
    return queries, items, exclude


@pytest.mark.parametrize("block_elements", [37, 37 * 64, 37 * 100, 37 * 503, 1 << 22])
def test_brute_force_matches_naive(problem, block_elements):
    queries, items, exclude = problem
    expected_scores, expected_ids = _naive_topk(queries, items, 50, exclude)
    scores, ids = BruteForceTopK(inner_product_block(items), len(items), block_elements).search(queries, 50, _csr(exclude))
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)


def test_faiss_matches_brute_force(problem):
    queries, items, exclude = problem
    excluded = _csr(exclude)
    torch_scores, torch_ids = BruteForceTopK(inner_product_block(items), len(items), 1 << 22).search(queries, 50, excluded)
    faiss_scores, faiss_ids = FaissInnerProductTopK(items).search(queries, 50, excluded)
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
    excluded = _csr([[1, 2, 3]])
    for retriever in (BruteForceTopK(inner_product_block(items), 4, 1 << 22), FaissInnerProductTopK(items)):
        scores, ids = retriever.search(queries, 3, excluded)
        assert ids[0, 0] == 4 and ids[0, 1:].tolist() == [0, 0]
        assert torch.isinf(scores[0, 1:]).all()


def test_keep_allowed_keeps_order_and_pads():
    ids = torch.tensor([[5, 3, 9, 1, 2]])
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0]])
    kept_scores, kept_ids = keep_allowed(scores, ids, 3, _csr([[3, 1]]), num_items=10)
    assert kept_ids.tolist() == [[5, 9, 2]]
    assert kept_scores.tolist() == [[9.0, 7.0, 5.0]]
    kept_scores, kept_ids = keep_allowed(scores, ids, 7, _csr([[3]]), num_items=10)  # fewer than k left
    assert kept_ids.tolist() == [[5, 9, 1, 2, 0, 0, 0]] and torch.isinf(kept_scores[0, 4:]).all()


def test_exclusion_repeat_and_unique_ids():
    exclusion = _csr([[1, 2], [], [7]])
    repeated = exclusion.repeat(2)
    assert repeated.offsets.tolist() == [0, 2, 4, 4, 4, 5, 6] and repeated.items.tolist() == [1, 2, 1, 2, 7, 7]
    assert exclusion.max_per_query() == 2
    assert unique_ids(torch.tensor([[3, 1, 3, 0, 1]])).tolist() == [[0, 1, 0, 3, 0]]  # sorted, repeats blanked


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_one_backend_choice_gives_the_same_results(problem, backend):
    queries, items, exclude = problem
    retriever = inner_product_retriever(items, SearchOptions(backend=backend))
    assert isinstance(retriever, FaissInnerProductTopK if backend == "faiss" else BruteForceTopK)
    _, expected_ids = _naive_topk(queries, items, 20, exclude)
    assert (retriever.search(queries, 20, _csr(exclude))[1] == expected_ids).float().mean() > 0.999
    auto = inner_product_retriever(items, SearchOptions())
    assert isinstance(auto, FaissInnerProductTopK)  # CPU tensors with FAISS installed


def test_popularity_ranks_by_count_minus_history():
    counts = np.array([0, 5, 50, 20, 1])  # item 2 most popular, then 3, then 1
    _, ids = PopularityTopK(counts).search(torch.zeros(2), 3, _csr([[], [2]]))
    assert ids.tolist() == [[2, 3, 1], [3, 1, 4]]
