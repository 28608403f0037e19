"""MoL top-k: exact == naive full scoring; RAILS approximations are exact at k' = N and improve with k'."""

import pytest
import torch
import torch.nn.functional as F

from rails_lightning.retrieval import Exclusion, SearchOptions
from rails_lightning.similarity import MixtureOfLogits, MoLItems, MoLQueries
from rails_lightning.similarity.mol.topk import AveragedEmbeddingTopK, CombinedTopK, MoLExactTopK, PerEmbeddingTopK

B, N, P_Q, P_X, D_P = 13, 300, 3, 4, 16
APPROXIMATE = [PerEmbeddingTopK, AveragedEmbeddingTopK, CombinedTopK]
BACKENDS = ["torch", "faiss"]
EXACT = SearchOptions()


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    similarity = MixtureOfLogits(8, 1, P_Q, P_X, D_P, gate_hidden_dim=8, gate_dropout=0.2).eval()
    queries = MoLQueries(F.normalize(torch.randn(B, P_Q, D_P, generator=gen), dim=-1), torch.randn(B, P_Q * P_X, generator=gen), torch.zeros(B))
    items = MoLItems(F.normalize(torch.randn(N, P_X, D_P, generator=gen), dim=-1), torch.randn(N, P_Q * P_X, generator=gen))
    exclude = [sorted(set(torch.randint(1, N + 1, (int(n),), generator=gen).tolist())) for n in torch.randint(0, 40, (B,), generator=gen)]
    exclude[3] = list(range(1, N - 4))  # only 5 items left for this query: fewer than k
    return similarity, queries, items, exclude


def _csr(exclude):
    counts = torch.tensor([len(e) for e in exclude])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return Exclusion(offsets, torch.tensor([i for e in exclude for i in e], dtype=torch.long))


def _naive_scores(similarity, queries, items):
    """(B, N) MoL scores written out from the definition, independently of the chunked code paths."""
    logits = torch.einsum("bid,njd->bnij", queries.components, items.components).reshape(B, N, P_Q * P_X)
    gate_logits = queries.gate_logits[:, None] + items.gate_logits[None] + similarity.gate.pair_part(logits) + similarity.gate.logit_scale * logits
    return (torch.softmax(gate_logits, -1) * logits).sum(-1)


def _naive_topk(scores, k, exclude):
    scores = scores.clone()
    for row, excluded in enumerate(exclude):
        scores[row, [i - 1 for i in excluded]] = float("-inf")
    top, cols = scores.topk(k, dim=1)
    return top, (cols + 1).masked_fill(top == float("-inf"), 0)


def _recall(ids, reference):
    found = (reference[:, :, None] == ids[:, None, :]).any(-1) & (reference > 0)
    return (found.sum() / (reference > 0).sum()).item()


@torch.no_grad()
@pytest.mark.parametrize("block", [1 << 22, B * 12 * 7, B * 12 * N, 200, 1])
def test_exact_matches_naive(problem, block):
    similarity, queries, items, exclude = problem
    expected_scores, expected_ids = _naive_topk(_naive_scores(similarity, queries, items), 20, exclude)
    scores, ids = MoLExactTopK(similarity, items, SearchOptions(score_block_elements=block)).search(queries, 20, _csr(exclude))
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)
    assert (ids[3, 5:] == 0).all() and (ids[3, :5] > 0).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


@torch.no_grad()
def test_exact_without_exclusion(problem):
    similarity, queries, items, _ = problem
    expected_scores, expected_ids = _naive_topk(_naive_scores(similarity, queries, items), N, [[]] * B)
    scores, ids = MoLExactTopK(similarity, items, SearchOptions(score_block_elements=B * 12 * 50)).search(queries, N)
    assert torch.equal(ids, expected_ids) and sorted(ids[0].tolist()) == list(range(1, N + 1))


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", APPROXIMATE)
def test_approximate_is_exact_with_k_prime_n(problem, algorithm, backend):
    similarity, queries, items, exclude = problem
    excluded = _csr(exclude)
    exact_scores, exact_ids = MoLExactTopK(similarity, items, EXACT).search(queries, 20, excluded)
    retriever = algorithm(similarity, items, SearchOptions(backend, score_block_elements=50_000), k_prime=N)
    scores, ids = retriever.search(queries, 20, excluded)
    assert torch.equal(ids, exact_ids)
    torch.testing.assert_close(scores, exact_scores)
    for row, items_out in enumerate(exclude):  # exclusion respected
        assert not set(ids[row].tolist()) & set(items_out)


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm, k_primes", [(PerEmbeddingTopK, [1, 3, 10, 40]), (AveragedEmbeddingTopK, [20, 40, 80, 160])])
def test_recall_grows_with_k_prime(problem, algorithm, k_primes, backend):
    similarity, queries, items, _ = problem
    _, exact_ids = MoLExactTopK(similarity, items, EXACT).search(queries, 20)
    options = SearchOptions(backend)
    recalls = [_recall(algorithm(similarity, items, options, k_prime=k).search(queries, 20)[1], exact_ids) for k in k_primes]
    assert recalls == sorted(recalls), recalls
    assert recalls[0] < 1.0 and recalls[-1] > recalls[0]


@torch.no_grad()
def test_combined_is_the_union(problem):
    similarity, queries, items, _ = problem
    torch_search = SearchOptions("torch")
    combined = CombinedTopK(similarity, items, torch_search, k_prime=5, averaged_k_prime=30)
    per = PerEmbeddingTopK(similarity, items, torch_search, k_prime=5).candidates(queries, None)
    avg = AveragedEmbeddingTopK(similarity, items, torch_search, k_prime=30).candidates(queries, None)
    union = combined.candidates(queries, None)
    for row in range(B):
        assert set(union[row].tolist()) == set(per[row].tolist()) | set(avg[row].tolist())
    # The result is the MoL ranking of the union: ids unique, best first, each score the true one.
    scores, ids = combined.search(queries, 20)
    naive = _naive_scores(similarity, queries, items)
    torch.testing.assert_close(scores, naive.gather(1, ids - 1))
    assert all(len(set(r.tolist())) == 20 for r in ids)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@torch.no_grad()
def test_per_embedding_candidates_are_pairwise_topk(problem):
    """Torch and FAISS backends return, for every (query component, item component) pair, its top k' items."""
    similarity, queries, items, _ = problem
    k = 6
    pair_scores = torch.einsum("bid,njd->bijn", queries.components, items.components)  # (B, P_Q, P_X, N)
    expected = pair_scores.topk(k, dim=-1).indices + 1
    for backend in BACKENDS:
        ids = PerEmbeddingTopK(similarity, items, SearchOptions(backend), k_prime=k).candidates(queries, None)
        got = ids.view(B, P_Q * P_X, k)  # per pair; the pair order depends on the backend
        for row in range(B):
            want = sorted(sorted(s.tolist()) for s in expected[row].reshape(-1, k))
            assert sorted(sorted(s.tolist()) for s in got[row]) == want
