"""MoL's one scoring function (``similarity/mol/scoring.py``): every layout of queries and items scores alike (shared
items, each group's own, chunks of the corpus), and the separable gate's two-matmul shortcut equals the reference."""

import pytest
import torch

from mol_helpers import NUM_ITEMS, SEARCH, MoL, batches, load_balancing_of, quiet, score_shared
from rails_lightning.retrieval import SearchOptions
from rails_lightning.similarity import MoLItems, with_group_dim
from rails_lightning.similarity.mol import scoring
from rails_lightning.similarity.mol.gate import pair_gate
from rails_lightning.similarity.mol.topk import MoLExactTopK


@torch.no_grad()
def test_chunked_scores_equal_all_at_once():
    torch.manual_seed(0)
    mol = MoL(component_dim=8).eval()
    _, query = batches()
    queries = mol.encode_queries(query)
    items = mol.encode_corpus()
    chunked_items = mol.encode_corpus(batch_size=7)
    for all_field, chunked_field in zip(items, chunked_items):
        torch.testing.assert_close(chunked_field, all_field)
    at_once, _ = score_shared(mol.similarity, queries, items)  # (B, N)
    exact = MoLExactTopK(mol.similarity, items, SEARCH)
    chunks = torch.cat([exact.score_block(queries, s, min(s + 9, NUM_ITEMS)) for s in range(0, NUM_ITEMS, 9)], dim=1)
    torch.testing.assert_close(chunks, at_once)
    # Each query against its own candidates (B groups of one query), or its own one item, scores as against the corpus.
    ids = torch.randint(1, NUM_ITEMS + 1, (5, 11))
    gathered = MoLItems(*(f[ids - 1] for f in items))  # (5, 11)
    torch.testing.assert_close(mol.similarity.score(with_group_dim(queries, 1), gathered)[0][:, 0], at_once.gather(1, ids - 1))
    pairs = mol.similarity.score(with_group_dim(queries, 1), MoLItems(*(f[ids[:, :1] - 1] for f in items)))[0][:, 0, 0]  # (5,)
    torch.testing.assert_close(pairs, at_once.gather(1, ids[:, :1] - 1)[:, 0])
    for elements in (1, 500, 1 << 22):  # tiny to large blocks: same top-k
        _, top = MoLExactTopK(mol.similarity, items, SearchOptions(score_block_elements=elements)).search(queries, 10)
        assert torch.equal(top, exact.search(queries, 10)[1])


@torch.no_grad()
@pytest.mark.parametrize("own_items", [False, True])
def test_separable_gate_scores_without_the_pair_tensor_equal_the_reference(own_items):
    """gate="separable": the two-matmul scores and statistics are the reference's softmax(a + b) mixture of the
    component logits, for items shared by every group and for each group's own."""
    torch.manual_seed(0)
    mol = MoL(component_dim=8, gate="separable").eval()
    assert mol.similarity.gate.pair_part is None and mol.similarity.gate.logit_scale is None
    _, query = batches()
    queries, items = mol.encode_queries(query), mol.encode_corpus()
    if own_items:  # 5 groups of one query, each with 13 items of its own
        queries, items = with_group_dim(queries, 1), MoLItems(*(f[torch.randint(0, NUM_ITEMS, (5, 13))] for f in items))
    else:  # one group of 5 queries, the corpus shared
        queries, items = with_group_dim(queries, 0), with_group_dim(items, 0)
    counted = 7
    logits = scoring.component_logits(queries.components, items.components)
    expected = pair_gate(logits, queries.gate_logits, items.gate_logits, None, "separable", 0.0, False, counted)
    got = scoring.separable_score(queries, items, mol.similarity.gate, counted)
    for name, a, b in zip(expected._fields, got, expected):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(mol.similarity.score(queries, items)[0], expected.scores)
    gates = torch.softmax(queries.gate_logits[:, :, None] + items.gate_logits[:, None, :counted], dim=-1)  # by hand
    torch.testing.assert_close(expected.usage, gates.flatten(0, 2).sum(0))


def test_separable_gate_trains_and_balances_a_subset_of_negatives():
    torch.manual_seed(0)
    mol = quiet(MoL(component_dim=8, gate="separable", load_balancing_negatives=5, num_negatives=20))
    train, _ = batches()
    has_target = train.target_ids > 0
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    queries = mol.similarity.query_representation(states, train.user_ids[:, None].expand_as(train.target_ids)[has_target])
    items = mol.encode_items(torch.arange(1, 21))
    _, aux = score_shared(mol.similarity, queries, items)
    gates = torch.softmax(queries.gate_logits[:, None] + items.gate_logits[None, :5], dim=-1)  # the first 5 negatives
    torch.testing.assert_close(aux.statistics["load_balancing"], load_balancing_of(gates).detach())
    assert "gate_logit_scale" not in aux.statistics
    loss = mol.training_step(train, 0)
    loss.backward()
    for name in ("similarity.gate.query_part", "similarity.gate.item_part", "similarity.query_head.components", "item_tower.embedding"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mol.get_submodule(name).parameters()), name
