"""MoL's heads (``similarity/mol/heads.py``): the query components with the user-id embedding (its dropout and its
initial scale), the item components (their dropout), the SwiGLU query MLP and the item side's linear map."""

import torch
import torch.nn.functional as F
from torch import nn

from mol_helpers import D, NUM_ITEMS, NUM_USERS, REFERENCE_OPTIONS, MoL, batches, quiet
from rails_lightning.similarity import MixtureOfLogits, MoLQueries
from rails_lightning.similarity.mol.heads import SwiGLU


def test_user_id_component():
    torch.manual_seed(0)
    mol = MoL(num_query_components=3, component_dim=8, user_id_component=True)
    train, query = batches()
    queries = mol.encode_queries(query)
    assert isinstance(queries, MoLQueries) and queries.components.shape == (5, 3, 8)
    torch.testing.assert_close(queries.components[:, -1], F.normalize(mol.similarity.query_head.user_component(query.user_ids), dim=-1))
    loss = quiet(mol).training_step(train, 0)
    loss.backward()
    assert mol.similarity.query_head.user_component.weight.grad.abs().sum() > 0
    only = MoL(num_query_components=1, component_dim=8, user_id_component=True)  # the user id is the one query component
    components = only.encode_queries(query).components  # (5, 1, 8)
    torch.testing.assert_close(components[:, 0], F.normalize(only.similarity.query_head.user_component(query.user_ids), dim=-1))


def test_reference_options_change_the_module_structure():
    default, reference = MixtureOfLogits(D, NUM_USERS), MixtureOfLogits(D, NUM_USERS, **REFERENCE_OPTIONS)
    first, gate, last = reference.query_head.components
    assert isinstance(gate, SwiGLU) and (first.in_features, first.out_features) == (D, 2 * 12) and last.in_features == 12
    assert last.out_features == 2 * 8  # the encoded components; the third is the user id
    assert [type(m) for m in default.query_head.components] == [nn.Linear, nn.SiLU, nn.Linear]
    assert isinstance(reference.item_head.components, nn.Linear) and isinstance(default.item_head.components, nn.Sequential)
    assert reference.gate.form == "multiplicative" and default.gate.form == "additive"
    halves = torch.tensor([[1.0, -2.0, 3.0, 0.5]])  # SiLU(first half) * second half
    torch.testing.assert_close(SwiGLU()(halves), F.silu(torch.tensor([[1.0, -2.0]])) * torch.tensor([[3.0, 0.5]]))


def test_user_id_dropout_only_while_training():
    torch.manual_seed(0)
    mol = MoL(num_query_components=3, component_dim=8, user_id_component=True, user_id_dropout=0.5)
    _, query = batches()
    with torch.no_grad():
        mol.eval()
        evaluated = [mol.encode_queries(query).components for _ in range(2)]
        mol.train()
        trained = [mol.encode_queries(query).components for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1])  # eval: deterministic
    torch.testing.assert_close(evaluated[0][:, -1], F.normalize(mol.similarity.query_head.user_component(query.user_ids), dim=-1))
    assert not torch.allclose(trained[0][:, -1], trained[1][:, -1])  # train: a fresh mask each call
    torch.testing.assert_close(trained[0][:, :-1], evaluated[0][:, :-1])  # only the user-id component is dropped
    assert (trained[0][:, -1] == 0).any()  # elementwise: coordinates are zeroed
    undropped = MoL(num_query_components=3, component_dim=8, user_id_component=True)
    undropped.load_state_dict(mol.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(undropped.encode_queries(query).components, evaluated[0])  # train mode, rate 0


def test_item_dropout_reaches_the_item_components_only_while_training():
    torch.manual_seed(0)
    mol = MoL(component_dim=8, item_dropout=0.5)
    ids = torch.arange(1, NUM_ITEMS + 1)
    with torch.no_grad():
        trained = [mol.encode_items(ids) for _ in range(2)]
        mol.eval()
        evaluated = [mol.encode_items(ids) for _ in range(2)]
    assert not torch.allclose(trained[0].components, trained[1].components)
    torch.testing.assert_close(trained[0].gate_logits, evaluated[0].gate_logits)  # the item gate sees the vector undropped
    torch.testing.assert_close(evaluated[0].components, evaluated[1].components)


def test_user_id_init_std_rescales_without_a_second_draw():
    torch.manual_seed(0)
    default = MixtureOfLogits(D, NUM_USERS, user_id_component=True)
    torch.manual_seed(0)
    small = MixtureOfLogits(D, NUM_USERS, user_id_component=True, user_id_init_std=0.02)
    torch.testing.assert_close(small.query_head.user_component.weight, 0.02 * default.query_head.user_component.weight)
    for (name, a), (_, b) in zip(default.named_parameters(), small.named_parameters()):
        if name != "query_head.user_component.weight":
            torch.testing.assert_close(a, b, msg=name)  # every other parameter starts as before
    # The default keeps PyTorch's own draw: the query MLP's parameters, then N(0, 1) for the embedding.
    torch.manual_seed(0)
    nn.Sequential(nn.Linear(D, 256), nn.SiLU(), nn.Linear(256, 7 * 64))
    torch.testing.assert_close(default.query_head.user_component.weight, nn.Embedding(NUM_USERS, 64).weight)
