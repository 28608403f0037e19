"""MoL's gate (``similarity/mol/gate.py``): each form's probabilities by hand (uniform, additive with a linear pair part,
multiplicative), the probabilities for analysis, and the load-balancing loss: its value and its gradient into the gate."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mol_helpers import D, NUM_ITEMS, NUM_USERS, REFERENCE_OPTIONS, MoL, batches, load_balancing_of, quiet, score_shared, zero_gate
from rails_lightning.losses import entropy
from rails_lightning.similarity import MixtureOfLogits, with_group_dim
from rails_lightning.similarity.mol import scoring


def test_uniform_gates_average_the_component_dot_products():
    torch.manual_seed(0)
    mol = MoL(num_query_components=2, num_item_components=3, component_dim=8).eval()
    zero_gate(mol)
    _, query = batches()
    with torch.no_grad():
        queries, items = mol.encode_queries(query), mol.encode_corpus()
        scores, _ = score_shared(mol.similarity, queries, items)
        expected = queries.components.mean(1) @ items.components.mean(1).T  # (B, N)
    torch.testing.assert_close(scores, expected)


def test_linear_logit_gate_is_one_map_with_the_scale():
    """logit_gate_hidden_dim=0: the per-pair gate is Linear(P, P) + s * logits (folded into one map), the query and item
    gates keep their MLPs; the scale still learns."""
    torch.manual_seed(0)
    similarity = MixtureOfLogits(D, NUM_USERS, 3, 2, 8, gate_hidden_dim=5, logit_gate_hidden_dim=0, gate_logit_scale=0.5, gate_dropout=0.0)
    gate = similarity.gate
    assert isinstance(gate.pair_part, nn.Linear) and isinstance(gate.query_part, nn.Sequential)
    queries = with_group_dim(similarity.query_representation(torch.randn(7, D), torch.zeros(7, dtype=torch.long)), 0)
    items = with_group_dim(similarity.item_representation(torch.randn(11, D)), 0)
    output = scoring.score(queries, items, gate, 11)  # (1, 7, 11)
    logits = torch.einsum("mid,rjd->mrij", queries.components[0], items.components[0]).flatten(2)  # (7, 11, P)
    expected = torch.softmax(queries.gate_logits[0, :, None] + items.gate_logits[0, None] + gate.pair_part(logits) + 0.5 * logits, dim=-1)
    torch.testing.assert_close(output.scores[0], (expected * logits).sum(-1))
    torch.testing.assert_close(output.usage, expected.flatten(0, 1).sum(0))
    (scale_gradient,) = torch.autograd.grad(output.scores.sum(), gate.logit_scale)
    assert scale_gradient.abs() > 0


def test_reference_options_shapes_and_multiplicative_gate():
    torch.manual_seed(0)
    mol = MoL(**REFERENCE_OPTIONS)
    train, query = batches()
    queries, items = mol.encode_queries(query), mol.encode_corpus()
    assert queries.components.shape == (5, 3, 8) and queries.gate_logits.shape == (5, 6) and queries.user_id_squared_norms.shape == (5,)
    assert items.components.shape == (NUM_ITEMS, 2, 8) and items.gate_logits.shape == (NUM_ITEMS, 6)
    scores, aux = score_shared(mol.similarity, queries, items)
    assert scores.shape == (5, NUM_ITEMS) and set(aux.losses) == {"load_balancing_loss", "user_id_l2_loss"}
    # The gate is softmax(SiLU(query part * item part + pair MLP + scale * logits)), by hand, in eval mode (no dropout);
    # with and without autograd the same.
    mol.eval()
    queries, items = with_group_dim(mol.encode_queries(query), 0), with_group_dim(mol.encode_corpus(), 0)
    output = scoring.score(queries, items, mol.similarity.gate, NUM_ITEMS)
    with torch.no_grad():
        no_grad_scores = mol.similarity.score(queries, items)[0]
    logits = torch.einsum("mid,rjd->mrij", queries.components[0], items.components[0]).flatten(2)  # (5, N, P)
    gate = mol.similarity.gate
    expected_gates = torch.softmax(
        F.silu(queries.gate_logits[0, :, None] * items.gate_logits[0, None] + gate.pair_part(logits) + gate.logit_scale * logits), dim=-1
    )
    torch.testing.assert_close(output.scores[0], (expected_gates * logits).sum(-1))
    torch.testing.assert_close(output.usage, expected_gates.flatten(0, 1).sum(0))
    torch.testing.assert_close(output.entropy, entropy(expected_gates).sum())
    torch.testing.assert_close(no_grad_scores, output.scores.detach())
    mol.train()
    assert torch.isfinite(quiet(mol).training_step(train, 0))


@pytest.mark.parametrize("form", ["additive", "multiplicative", "separable"])
def test_gates_for_analysis_are_the_probabilities_the_score_mixes(form):
    torch.manual_seed(0)
    similarity = MixtureOfLogits(16, 10, 4, 2, component_dim=8, gate=form).eval()
    queries = similarity.query_representation(torch.randn(5, 16), torch.arange(5))
    items = similarity.item_representation(torch.randn(7, 16))
    gates = similarity.gates(queries, items)  # (5, 7, 8)
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 7))
    logits = torch.einsum("qid,rjd->qrij", queries.components, items.components).flatten(2)  # (5, 7, P), p = i * P_X + j
    with torch.no_grad():
        scores = similarity.score(with_group_dim(queries, 0), with_group_dim(items, 0))[0][0]
    torch.testing.assert_close(scores, (gates * logits).sum(-1), rtol=1e-4, atol=1e-5)


def test_load_balancing_value():
    """-H(mean pi) + mean H(pi), checked on gates made by hand."""
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # each pair commits, the batch uses both: the minimum
    torch.testing.assert_close(load_balancing_of(gates), torch.tensor(-math.log(2)))
    uniform = torch.full((1, 2, 2), 0.5)  # uncommitted: 0
    torch.testing.assert_close(load_balancing_of(uniform), torch.tensor(0.0))
    assert entropy(torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))


def test_load_balancing_gradient_reaches_the_gate():
    torch.manual_seed(0)
    mol = quiet(MoL(component_dim=8, gate_hidden_dim=4))
    train, _ = batches()
    has_target = train.target_ids > 0
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    user_ids = train.user_ids[:, None].expand_as(train.target_ids)[has_target]
    queries = mol.similarity.query_representation(states, user_ids)
    _, aux = score_shared(mol.similarity, queries, mol.encode_items(torch.arange(1, 31)))
    # The logged statistic is the formula on the gates; the declared loss is the weighted term.
    assert set(aux.losses) == {"load_balancing_loss"}
    torch.testing.assert_close(aux.losses["load_balancing_loss"], mol.similarity.load_balancing_weight * aux.statistics["load_balancing"])
    stats = aux.statistics
    assert 0 < stats["gate_entropy"] < math.log(32) and 0 < stats["gate_effective_components"] <= 32
    assert stats["gate_usage_min"] <= 1 / 32 <= stats["gate_usage_max"]
    assert not any(value.requires_grad for value in stats.values())  # statistics are only logged
    aux.losses["load_balancing_loss"].backward()
    for name in ("similarity.gate.query_part", "similarity.gate.item_part", "similarity.gate.pair_part"):
        grads = [p.grad for p in mol.get_submodule(name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert mol.similarity.gate.logit_scale.grad.abs() > 0
    assert mol.item_tower.embedding.weight.grad is not None  # and on through the gate inputs into the towers
