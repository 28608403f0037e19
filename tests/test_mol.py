"""MoL similarity: parity with the dot product, load-balancing gradients, chunking, a real Lightning fit, configs."""

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.data import InteractionDataModule, SyntheticSource
from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.losses import entropy
from rails_lightning.models import MeanPoolEncoder, RetrievalModule, SASRecEncoder
from rails_lightning.retrieval import SearchOptions
from rails_lightning.retrieval.mol_topk import CombinedTopK, MoLExactTopK
from rails_lightning.objectives import SharedNegatives
from rails_lightning.similarity import DotProduct, MixtureOfLogits, MoLItems, MoLQueries

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


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))
        linear.bias.zero_()


def _zero_gate(model: RetrievalModule) -> None:
    """Make every gate logit 0: uniform gates."""
    for module in (model.similarity.query_gate, model.similarity.item_gate, model.similarity.logit_gate):
        last = module[-1] if isinstance(module, nn.Sequential) else module
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    nn.init.zeros_(model.similarity.logit_scale)


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
    _identity(mol.similarity.query_components)
    _identity(mol.similarity.item_components)
    train, query = _batches()
    with torch.no_grad():
        dot_scores, _ = two_tower.similarity.cross_scores(two_tower.encode_queries(query), two_tower.encode_corpus())
        mol_scores, aux = mol.similarity.cross_scores(mol.encode_queries(query), mol.encode_corpus())
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
        scores, _ = mol.similarity.cross_scores(queries, items)
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
    _, aux = mol.similarity.cross_scores(queries, mol.encode_items(torch.arange(1, 31)))
    # The logged statistic is the formula on the gates; the declared loss is the weighted term.
    assert set(aux.losses) == {"load_balancing_loss"}
    torch.testing.assert_close(aux.losses["load_balancing_loss"], mol.similarity.load_balancing_weight * aux.statistics["load_balancing"])
    stats = aux.statistics
    assert 0 < stats["gate_entropy"] < math.log(32) and 0 < stats["gate_effective_components"] <= 32
    assert stats["gate_usage_min"] <= 1 / 32 <= stats["gate_usage_max"]
    assert not any(value.requires_grad for value in stats.values())  # statistics are only logged
    aux.losses["load_balancing_loss"].backward()
    for name in ("similarity.query_gate", "similarity.item_gate", "similarity.logit_gate"):
        grads = [p.grad for p in mol.get_submodule(name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert mol.similarity.logit_scale.grad.abs() > 0
    assert mol.item_embedding.weight.grad is not None  # and on through the gate inputs into the towers


def test_load_balancing_value():
    """-H(mean pi) + mean H(pi), checked on gates made by hand."""
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # each pair commits, the batch uses both: the minimum
    from rails_lightning.losses import load_balancing_loss

    torch.testing.assert_close(load_balancing_loss(gates), torch.tensor(-math.log(2)))
    uniform = torch.full((1, 2, 2), 0.5)  # uncommitted: 0
    torch.testing.assert_close(load_balancing_loss(uniform), torch.tensor(0.0))
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
    at_once, _ = mol.similarity.cross_scores(queries, items)  # (B, N)
    exact = MoLExactTopK(mol.similarity, items, SEARCH)
    chunks = torch.cat([exact.score_block(queries, s, min(s + 9, NUM_ITEMS)) for s in range(0, NUM_ITEMS, 9)], dim=1)
    torch.testing.assert_close(chunks, at_once)
    # Pair scores and gathered-candidate scores agree with the cross scores.
    ids = torch.randint(1, NUM_ITEMS + 1, (5, 11))
    gathered = MoLItems(*(f[ids - 1] for f in items))
    torch.testing.assert_close(mol.similarity.gathered(queries, gathered)[0], at_once.gather(1, ids - 1))
    pairs = mol.similarity.pair_scores(queries, MoLItems(*(f[ids[:, 0] - 1] for f in items)))
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
    torch.testing.assert_close(queries.components[:, -1], F.normalize(mol.similarity.user_component(query.user_ids), dim=-1))
    loss = _quiet(mol).training_step(train, 0)
    loss.backward()
    assert mol.similarity.user_component.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        MoL(num_query_components=1, user_id_component=True)


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


@pytest.mark.parametrize("config", ["configs/synthetic/mol.yaml", "configs/ml-1m/mol.yaml"])
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


@torch.no_grad()
def test_separable_gate_scores_without_the_pair_tensor_equal_the_mixture():
    """gate_sees_logits=False: the two-matmul scores are the softmax(a + b) mixture of the component logits."""
    torch.manual_seed(0)
    mol = MoL(component_dim=8, gate_sees_logits=False).eval()
    assert mol.similarity.logit_gate is None and mol.similarity.logit_scale is None
    _, query = _batches()
    queries, items = mol.encode_queries(query), mol.encode_corpus()
    mixture, gates = mol.similarity.cross(queries, items)  # (B, N), (B, N, P) materialised
    expected_gates = torch.softmax(queries.gate_logits[:, None] + items.gate_logits[None], dim=-1)
    torch.testing.assert_close(gates, expected_gates)
    torch.testing.assert_close(mol.similarity.separable_cross_scores(queries, items), mixture)
    torch.testing.assert_close(mol.similarity.scores(queries, items), mixture)
    bf16 = MoL(component_dim=8, gate_sees_logits=False, bf16_scores=True).eval()
    bf16.load_state_dict(mol.state_dict())
    torch.testing.assert_close(bf16.similarity.separable_cross_scores(queries, items), mixture, atol=2e-2, rtol=0)


def test_separable_gate_trains_and_balances_a_subset_of_negatives():
    torch.manual_seed(0)
    mol = _quiet(MoL(component_dim=8, gate_sees_logits=False, load_balancing_negatives=5, num_negatives=20))
    train, _ = _batches()
    has_target = train.target_ids > 0
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    queries = mol.similarity.query_representation(states, train.user_ids[:, None].expand_as(train.target_ids)[has_target])
    items = mol.encode_items(torch.arange(1, 21))
    _, aux = mol.similarity.cross_scores(queries, items)
    gates = torch.softmax(queries.gate_logits[:, None] + items.gate_logits[None, :5], dim=-1)  # the first 5 negatives
    from rails_lightning.losses import load_balancing_loss

    torch.testing.assert_close(aux.statistics["load_balancing"], load_balancing_loss(gates).detach())
    assert "gate_logit_scale" not in aux.statistics
    loss = mol.training_step(train, 0)
    loss.backward()
    for name in ("similarity.query_gate", "similarity.item_gate", "similarity.query_components", "item_embedding"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mol.get_submodule(name).parameters()), name


def test_separable_options_are_checked():
    from rails_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="separable"):
        MixtureOfLogits(D, NUM_USERS, bf16_scores=True)
    with pytest.raises(ConfigError, match="load_balancing_negatives"):
        MixtureOfLogits(D, NUM_USERS, load_balancing_negatives=-1)
