"""MoL similarity: parity with the dot product, load-balancing gradients, chunking, a real Lightning fit, configs,
the gate forms against the reference ``gate.pair_gate``, the RAILS reference options (SwiGLU query components, user-id
dropout and L2 penalty, multiplicative gate), and no combination of options refused."""

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from conftest import LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.data import InteractionDataModule, SyntheticSource
from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.errors import ConfigError
from rails_lightning.losses import entropy
from rails_lightning.models import MeanPoolEncoder, RetrievalModule, SASRecEncoder
from rails_lightning.retrieval import SearchOptions
from rails_lightning.similarity.mol.topk import CombinedTopK, MoLExactTopK
from rails_lightning.objectives import PerQueryNegatives, SharedNegatives
from rails_lightning.similarity import DotProduct, MixtureOfLogits, MoLItems, MoLQueries, with_group_dim
from rails_lightning.similarity.mol import scoring
from rails_lightning.similarity.mol.gate import pair_gate
from rails_lightning.similarity.mol.heads import SwiGLU

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS, NUM_USERS, L, D = 60, 10, 8, 16
SEARCH = SearchOptions()


def MoL(num_items=NUM_ITEMS, num_users=NUM_USERS, max_seq_len=L, item_dim=D, query_encoder=MeanPoolEncoder, num_negatives=128, **similarity):
    """A MoL RetrievalModule with the given similarity options."""
    return RetrievalModule(
        num_items, num_users, max_seq_len, item_dim=item_dim, query_encoder=query_encoder, objective=functools.partial(SharedNegatives, num_negatives=num_negatives),
        similarity=functools.partial(MixtureOfLogits, **similarity),
    )


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, NUM_ITEMS + 1, (5, L), generator=gen)
    inputs[0, :3] = 0  # left padding
    targets = torch.randint(1, NUM_ITEMS + 1, (5, L), generator=gen).masked_fill(inputs == 0, 0)
    users = torch.arange(5)
    train = TrainBatch(user_ids=users, input_ids=inputs, target_ids=targets)
    query = QueryBatch(users, inputs, targets[:, -1:], torch.arange(0, 6 * L, L), inputs.flatten())
    return train, query


def _cross(similarity, queries, items):
    """M queries x R items shared by all, as training scores shared negatives: scores (M, R), auxiliary outputs."""
    scores, auxiliary = similarity.score(with_group_dim(queries, 0), with_group_dim(items, 0), auxiliary=True)
    return scores[0], auxiliary


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))
        linear.bias.zero_()


def _zero_gate(model: RetrievalModule) -> None:
    """Make every gate logit 0: uniform gates."""
    gate = model.similarity.gate
    for module in (gate.query_part, gate.item_part, gate.pair_part):
        last = module[-1] if isinstance(module, nn.Sequential) else module
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    nn.init.zeros_(gate.logit_scale)


def _quiet(model):
    model.log = lambda *args, **kwargs: None
    return model


def test_one_component_equals_two_tower():
    """P_Q = P_X = 1, identity component maps: MoL's scores, top-k and training loss are the dot product's."""
    torch.manual_seed(0)
    common = dict(num_items=NUM_ITEMS, num_users=NUM_USERS, max_seq_len=L, item_dim=D, query_encoder=MeanPoolEncoder)
    two_tower = _quiet(RetrievalModule(**common, similarity=DotProduct, objective=functools.partial(SharedNegatives, num_negatives=20)))
    mol = _quiet(MoL(**common, num_negatives=20, num_query_components=1, num_item_components=1, component_dim=D, component_hidden_dim=0, gate_dropout=0.0))
    mol.load_state_dict(two_tower.state_dict(), strict=False)  # item tower, query encoder, temperature
    _identity(mol.similarity.query_head.components)
    _identity(mol.similarity.item_head.components)
    train, query = _batches()
    with torch.no_grad():
        dot_scores, _ = _cross(two_tower.similarity, two_tower.encode_queries(query), two_tower.encode_corpus())
        mol_scores, aux = _cross(mol.similarity, mol.encode_queries(query), mol.encode_corpus())
        torch.testing.assert_close(mol_scores, dot_scores)
        assert aux.statistics["load_balancing"].abs() < 1e-6  # one component: nothing to balance
        _, dot_ids = two_tower.exact_retriever(two_tower.encode_corpus(), SEARCH).search(two_tower.encode_queries(query), 10, query.exclusion)
        _, mol_ids = mol.exact_retriever(mol.encode_corpus(), SEARCH).search(mol.encode_queries(query), 10, query.exclusion)
        assert torch.equal(mol_ids, dot_ids)
    torch.manual_seed(1)
    dot_loss = two_tower.training_step(train, 0)
    torch.manual_seed(1)  # the same negatives
    mol_loss = mol.training_step(train, 0)
    torch.testing.assert_close(mol_loss, dot_loss)


def test_uniform_gates_average_the_component_dot_products():
    torch.manual_seed(0)
    mol = MoL(num_query_components=2, num_item_components=3, component_dim=8).eval()
    _zero_gate(mol)
    _, query = _batches()
    with torch.no_grad():
        queries, items = mol.encode_queries(query), mol.encode_corpus()
        scores, _ = _cross(mol.similarity, queries, items)
        expected = queries.components.mean(1) @ items.components.mean(1).T  # (B, N)
    torch.testing.assert_close(scores, expected)


def test_load_balancing_gradient_reaches_the_gate():
    torch.manual_seed(0)
    mol = _quiet(MoL(component_dim=8, gate_hidden_dim=4))
    train, _ = _batches()
    has_target = train.target_ids > 0
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    user_ids = train.user_ids[:, None].expand_as(train.target_ids)[has_target]
    queries = mol.similarity.query_representation(states, user_ids)
    _, aux = _cross(mol.similarity, queries, mol.encode_items(torch.arange(1, 31)))
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


def _load_balancing_of(gates):
    """losses.load_balancing_loss of gates (..., P) given as such."""
    from rails_lightning.losses import load_balancing_loss

    flat = gates.reshape(-1, gates.shape[-1])
    return load_balancing_loss(flat.mean(0), entropy(flat).mean())


def test_load_balancing_value():
    """-H(mean pi) + mean H(pi), checked on gates made by hand."""
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # each pair commits, the batch uses both: the minimum
    torch.testing.assert_close(_load_balancing_of(gates), torch.tensor(-math.log(2)))
    uniform = torch.full((1, 2, 2), 0.5)  # uncommitted: 0
    torch.testing.assert_close(_load_balancing_of(uniform), torch.tensor(0.0))
    assert entropy(torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))


@torch.no_grad()
def test_chunked_scores_equal_all_at_once():
    torch.manual_seed(0)
    mol = MoL(component_dim=8).eval()
    _, query = _batches()
    queries = mol.encode_queries(query)
    items = mol.encode_corpus()
    chunked_items = mol.encode_corpus(batch_size=7)
    for all_field, chunked_field in zip(items, chunked_items):
        torch.testing.assert_close(chunked_field, all_field)
    at_once, _ = _cross(mol.similarity, queries, items)  # (B, N)
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


def test_user_id_component():
    torch.manual_seed(0)
    mol = MoL(num_query_components=3, component_dim=8, user_id_component=True)
    train, query = _batches()
    queries = mol.encode_queries(query)
    assert isinstance(queries, MoLQueries) and queries.components.shape == (5, 3, 8)
    torch.testing.assert_close(queries.components[:, -1], F.normalize(mol.similarity.query_head.user_component(query.user_ids), dim=-1))
    loss = _quiet(mol).training_step(train, 0)
    loss.backward()
    assert mol.similarity.query_head.user_component.weight.grad.abs().sum() > 0
    only = MoL(num_query_components=1, component_dim=8, user_id_component=True)  # the user id is the one query component
    components = only.encode_queries(query).components  # (5, 1, 8)
    torch.testing.assert_close(components[:, 0], F.normalize(only.similarity.query_head.user_component(query.user_ids), dim=-1))


def test_fit_logs_losses_and_exact_and_approximate_metrics(tmp_path):
    seed_everything(0)
    data = InteractionDataModule(SyntheticSource(num_users=200, num_items=300, num_clusters=10), max_seq_len=20, batch_size=64, eval_batch_size=128)
    model = RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=32, query_encoder=functools.partial(SASRecEncoder, num_layers=1),
        objective=functools.partial(SharedNegatives, num_negatives=32),
        similarity=functools.partial(
            MixtureOfLogits, component_dim=16, num_query_components=4, num_item_components=2,
            approximate_topk=functools.partial(CombinedTopK, k_prime=8, averaged_k_prime=32),
        ),
    )
    trainer = Trainer(
        max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[CorpusEvaluation(ks=(1, 10, 50))],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    for key in (
        "train/softmax_loss", "train/load_balancing_loss", "train/load_balancing", "train/gate_entropy",
        "train/gate_usage_max", "val/hr@10", "val/ndcg@10", "val/mrr", "val/index/hr@10", "val/index/mrr",
        "val/index_recall@100", "val/encode_seconds", "val/search_seconds", "val/index_build_seconds",
        "val/index_search_seconds",
    ):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/index_recall@100"]) <= 1.0
    # CombinedTopK with 8 x 8 + 32 candidates out of 300 items: close to exact, not guaranteed equal.
    assert float(metrics["val/index_recall@100"]) > 0.3
    assert float(metrics["val/index/hr@50"]) <= float(metrics["val/hr@50"]) + 0.05


@pytest.mark.parametrize("config", ["configs/synthetic/mol.yaml", "configs/ml-1m/mol.yaml", "configs/ml-1m/hstu_mol.yaml"])
def test_configs_instantiate(config, tmp_path, monkeypatch):
    from rails_lightning.cli import main

    if "ml-1m" in config and not (ROOT / "../shared/data/ml-1m").exists():
        pytest.skip("ML-1M files not present")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["--config", str(ROOT / config), "--trainer.logger=false", "--run_dir", str(tmp_path)]
    if "ml-1m" in config:
        args.append(f"--data.source.init_args.data_dir={ROOT / '../shared/data/ml-1m'}")
    cli = main(args, run=False)
    similarity = cli.model.similarity
    assert isinstance(similarity, MixtureOfLogits) and cli.model.model_name == "MoL"
    assert similarity.num_components == 32 and cli.model.hparams.similarity["init_args"]["num_query_components"] == 8
    assert similarity.approximate_topk is not None
    if "hstu_mol" in config:  # the RAILS reference's MoL options reached the similarity
        assert similarity.gate.form == "multiplicative" and similarity.query_head.user_component is not None and similarity.user_id_l2 == 0.1
        assert isinstance(similarity.item_head.components, nn.Linear) and cli.model.hparams.decay_all_parameters
        assert cli.model.query_encoder.time_bias_buckets == 64  # the reference's HSTU has a relative time bias


@torch.no_grad()
@pytest.mark.parametrize("own_items", [False, True])
def test_separable_gate_scores_without_the_pair_tensor_equal_the_reference(own_items):
    """gate="separable": the two-matmul scores and statistics are the reference's softmax(a + b) mixture of the
    component logits, for items shared by every group and for each group's own."""
    torch.manual_seed(0)
    mol = MoL(component_dim=8, gate="separable").eval()
    assert mol.similarity.gate.pair_part is None and mol.similarity.gate.logit_scale is None
    _, query = _batches()
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
    mol = _quiet(MoL(component_dim=8, gate="separable", load_balancing_negatives=5, num_negatives=20))
    train, _ = _batches()
    has_target = train.target_ids > 0
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    queries = mol.similarity.query_representation(states, train.user_ids[:, None].expand_as(train.target_ids)[has_target])
    items = mol.encode_items(torch.arange(1, 21))
    _, aux = _cross(mol.similarity, queries, items)
    gates = torch.softmax(queries.gate_logits[:, None] + items.gate_logits[None, :5], dim=-1)  # the first 5 negatives
    torch.testing.assert_close(aux.statistics["load_balancing"], _load_balancing_of(gates).detach())
    assert "gate_logit_scale" not in aux.statistics
    loss = mol.training_step(train, 0)
    loss.backward()
    for name in ("similarity.gate.query_part", "similarity.gate.item_part", "similarity.query_head.components", "item_tower.embedding"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mol.get_submodule(name).parameters()), name


# ---------------------------------------------------------------------- the RAILS reference's options
#: The options configs/ml-1m/hstu_mol.yaml sets, at test sizes.
REFERENCE_OPTIONS = dict(
    num_query_components=3, num_item_components=2, component_dim=8, component_hidden_dim=12, swiglu_query_components=True,
    item_component_hidden_dim=0, item_dropout=0.1, user_id_component=True, user_id_dropout=0.5, user_id_l2=0.1,
    user_id_init_std=0.05, gate_hidden_dim=6, gate="multiplicative",
)


def _logging(model):
    """Keep what the module logs, by name."""
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    return logged


def test_reference_options_shapes_and_multiplicative_gate():
    torch.manual_seed(0)
    mol = MoL(**REFERENCE_OPTIONS)
    train, query = _batches()
    queries, items = mol.encode_queries(query), mol.encode_corpus()
    assert queries.components.shape == (5, 3, 8) and queries.gate_logits.shape == (5, 6) and queries.user_id_squared_norms.shape == (5,)
    assert items.components.shape == (NUM_ITEMS, 2, 8) and items.gate_logits.shape == (NUM_ITEMS, 6)
    scores, aux = _cross(mol.similarity, queries, items)
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
    assert torch.isfinite(_quiet(mol).training_step(train, 0))


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
    _, query = _batches()
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


def test_user_id_l2_loss_is_the_weighted_mean_squared_norm():
    torch.manual_seed(0)
    mol = MoL(num_query_components=3, component_dim=8, user_id_component=True, user_id_dropout=0.5, user_id_l2=0.1)
    train, _ = _batches()
    has_target = train.target_ids > 0
    user_ids = train.user_ids[:, None].expand_as(train.target_ids)[has_target]  # (M,), a user once per position
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    queries = mol.similarity.query_representation(states, user_ids)
    _, aux = _cross(mol.similarity, queries, mol.encode_items(torch.arange(1, 21)))
    weights = mol.similarity.query_head.user_component.weight.detach()
    expected = 0.1 * (weights[user_ids] ** 2).sum(-1).mean()  # before dropout, mean over the M queries
    torch.testing.assert_close(aux.losses["user_id_l2_loss"], expected)
    aux.losses["user_id_l2_loss"].backward()
    grad = mol.similarity.query_head.user_component.weight.grad
    counts = torch.bincount(user_ids, minlength=NUM_USERS).float()
    torch.testing.assert_close(grad, 0.1 * 2 * weights * counts[:, None] / user_ids.numel())
    # Through the training step: added to the loss and logged.
    logged = _logging(mol)
    torch.manual_seed(3)
    loss = mol.training_step(train, 0)
    torch.testing.assert_close(logged["train/user_id_l2_loss"], expected)
    torch.testing.assert_close(loss, logged["train/softmax_loss"] + logged["train/load_balancing_loss"] + expected)
    # Negatives drawn per query are scored as M groups of one query: the same penalty.
    per_query = RetrievalModule(
        NUM_ITEMS, NUM_USERS, L, item_dim=D, query_encoder=MeanPoolEncoder, objective=functools.partial(PerQueryNegatives, num_negatives=7),
        similarity=functools.partial(MixtureOfLogits, num_query_components=3, component_dim=8, user_id_component=True, user_id_dropout=0.5, user_id_l2=0.1),
    )
    per_query.load_state_dict(mol.state_dict())
    logged = _logging(per_query)
    per_query.training_step(train, 0)
    torch.testing.assert_close(logged["train/user_id_l2_loss"], expected)


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


def test_reference_options_fit(tmp_path):
    """A real Lightning fit with every reference option: the L2 loss is logged, the corpus evaluation
    (exact and the approximate top-k) runs on the three-field queries."""
    torch.manual_seed(0)
    data = make_tiny_data()
    similarity = functools.partial(
        MixtureOfLogits, **{**REFERENCE_OPTIONS, "num_query_components": 4, "component_dim": 16, "component_hidden_dim": 32},
        approximate_topk=functools.partial(CombinedTopK, k_prime=8, averaged_k_prime=32),
    )
    module = make_tiny_model(data, "MoL", similarity=similarity)
    recorder = LossRecorder()
    fit = cpu_trainer(tmp_path, 2, [CorpusEvaluation(ks=(1, 10)), recorder], enable_checkpointing=False, limit_train_batches=4)
    fit.fit(module, datamodule=data)
    metrics = fit.callback_metrics
    for key in ("train/user_id_l2_loss", "train/load_balancing_loss", "val/hr@10", "val/index/hr@10"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert len(recorder.losses) == 8 and all(math.isfinite(x) for x in recorder.losses)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(user_id_component=True, user_id_dropout=1.0), "user_id_dropout must be in"),
        (dict(user_id_component=True, user_id_dropout=-0.1), "user_id_dropout must be in"),
        (dict(item_dropout=1.5), "item_dropout must be in"),
        (dict(gate_dropout=1.0), "gate_dropout must be in"),
        (dict(user_id_component=True, user_id_l2=-0.1), "user_id_l2 must be >= 0"),
        (dict(user_id_component=True, user_id_init_std=0.0), "user_id_init_std must be > 0"),
        (dict(load_balancing_negatives=-1), "load_balancing_negatives must be >= 0"),
        (dict(num_query_components=0), "num_query_components must be >= 1"),
    ],
)
def test_option_values_are_checked(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        MixtureOfLogits(D, NUM_USERS, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("form", ["separable", "additive", "multiplicative"])
def test_no_combination_of_options_is_refused(form):
    """Every gate form with every other option builds, scores shared and per-group items, and trains (options that
    only shape a part another option leaves out are unused, not refused)."""
    train, _ = _batches()
    for implementation in ("eager", "kernel"):
        for user_id in (False, True):
            for swiglu, hidden in ((False, 0), (True, 0), (True, 12)):
                torch.manual_seed(0)
                mol = _quiet(MoL(num_query_components=2, num_item_components=4, component_dim=8, component_hidden_dim=hidden, gate=form,
                                 gate_implementation=implementation, user_id_component=user_id, user_id_dropout=0.5, user_id_l2=0.1,
                                 swiglu_query_components=swiglu, logit_gate_hidden_dim=8, gate_logit_scale=0.5))  # fmt: skip
                assert torch.isfinite(mol.training_step(train, 0)), (implementation, user_id, swiglu, hidden)


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


@pytest.mark.parametrize("model_name", ["TwoTower", "MoL"])
def test_bf16_mixed_precision_fits_and_evaluates_on_the_full_corpus(tmp_path, model_name):
    """`--trainer.precision=bf16-mixed`: the queries are encoded under autocast, the corpus outside it; the queries
    leave `encode_queries` in float32, so the search works and gives about the metrics of a float32 validation."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, model_name)
    fit = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=(1, 10))], enable_checkpointing=False, limit_train_batches=4,
                      precision="bf16-mixed")
    fit.fit(module, datamodule=data)
    hr10 = fit.callback_metrics["val/hr@10"]
    assert torch.isfinite(hr10) and 0 < hr10 <= 1
    float32 = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=(1, 10))]).validate(module, datamodule=data, verbose=False)[0]
    assert abs(float32["val/hr@10"] - float(hr10)) < 0.05  # the same model, queries encoded in float32


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
