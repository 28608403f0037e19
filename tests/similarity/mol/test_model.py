"""The MoL similarity (``similarity/mol/model.py``) in a model: parity with the dot product, real Lightning fits with the
exact and approximate metrics (also with the RAILS reference's options and under bf16-mixed), the configs, the user-id L2
penalty, option checks, and no combination of options refused."""

import functools
import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from conftest import REPO, LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from mol_helpers import D, L, NUM_ITEMS, NUM_USERS, REFERENCE_OPTIONS, SEARCH, MoL, batches, logged_values, make_identity, quiet, score_shared
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.data import InteractionDataModule, SyntheticSource
from rails_lightning.errors import ConfigError
from rails_lightning.models import MeanPoolEncoder, RetrievalModule, SASRecEncoder
from rails_lightning.objectives import PerQueryNegatives, SharedNegatives
from rails_lightning.similarity import DotProduct, MixtureOfLogits
from rails_lightning.similarity.mol.topk import CombinedTopK


def test_one_component_equals_two_tower():
    """P_Q = P_X = 1, identity component maps: MoL's scores, top-k and training loss are the dot product's."""
    torch.manual_seed(0)
    common = dict(num_items=NUM_ITEMS, num_users=NUM_USERS, max_seq_len=L, item_dim=D, query_encoder=MeanPoolEncoder)
    two_tower = quiet(RetrievalModule(**common, similarity=DotProduct, objective=functools.partial(SharedNegatives, num_negatives=20)))
    mol = quiet(MoL(**common, num_negatives=20, num_query_components=1, num_item_components=1, component_dim=D, component_hidden_dim=0, gate_dropout=0.0))
    mol.load_state_dict(two_tower.state_dict(), strict=False)  # item tower, query encoder, temperature
    make_identity(mol.similarity.query_head.components)
    make_identity(mol.similarity.item_head.components)
    train, query = batches()
    with torch.no_grad():
        dot_scores, _ = score_shared(two_tower.similarity, two_tower.encode_queries(query), two_tower.encode_corpus())
        mol_scores, aux = score_shared(mol.similarity, mol.encode_queries(query), mol.encode_corpus())
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

    if "ml-1m" in config and not (REPO / "../shared/data/ml-1m").exists():
        pytest.skip("ML-1M files not present")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["--config", str(REPO / config), "--trainer.logger=false", "--run_dir", str(tmp_path)]
    if "ml-1m" in config:
        args.append(f"--data.source.init_args.data_dir={REPO / '../shared/data/ml-1m'}")
    cli = main(args, run=False)
    similarity = cli.model.similarity
    assert isinstance(similarity, MixtureOfLogits) and cli.model.model_name == "MoL"
    assert similarity.num_components == 32 and cli.model.hparams.similarity["init_args"]["num_query_components"] == 8
    assert similarity.approximate_topk is not None
    if "hstu_mol" in config:  # the RAILS reference's MoL options reached the similarity
        assert similarity.gate.form == "multiplicative" and similarity.query_head.user_component is not None and similarity.user_id_l2 == 0.1
        assert isinstance(similarity.item_head.components, nn.Linear) and cli.model.hparams.decay_all_parameters
        assert cli.model.query_encoder.time_bias_buckets == 64  # the reference's HSTU has a relative time bias


def test_user_id_l2_loss_is_the_weighted_mean_squared_norm():
    torch.manual_seed(0)
    mol = MoL(num_query_components=3, component_dim=8, user_id_component=True, user_id_dropout=0.5, user_id_l2=0.1)
    train, _ = batches()
    has_target = train.target_ids > 0
    user_ids = train.user_ids[:, None].expand_as(train.target_ids)[has_target]  # (M,), a user once per position
    states = mol.encode_sequence(train.user_ids, train.input_ids)[has_target]
    queries = mol.similarity.query_representation(states, user_ids)
    _, aux = score_shared(mol.similarity, queries, mol.encode_items(torch.arange(1, 21)))
    weights = mol.similarity.query_head.user_component.weight.detach()
    expected = 0.1 * (weights[user_ids] ** 2).sum(-1).mean()  # before dropout, mean over the M queries
    torch.testing.assert_close(aux.losses["user_id_l2_loss"], expected)
    aux.losses["user_id_l2_loss"].backward()
    grad = mol.similarity.query_head.user_component.weight.grad
    counts = torch.bincount(user_ids, minlength=NUM_USERS).float()
    torch.testing.assert_close(grad, 0.1 * 2 * weights * counts[:, None] / user_ids.numel())
    # Through the training step: added to the loss and logged.
    logged = logged_values(mol)
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
    logged = logged_values(per_query)
    per_query.training_step(train, 0)
    torch.testing.assert_close(logged["train/user_id_l2_loss"], expected)


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
    train, _ = batches()
    for implementation in ("eager", "kernel"):
        for user_id in (False, True):
            for swiglu, hidden in ((False, 0), (True, 0), (True, 12)):
                torch.manual_seed(0)
                mol = quiet(MoL(num_query_components=2, num_item_components=4, component_dim=8, component_hidden_dim=hidden, gate=form,
                                 gate_implementation=implementation, user_id_component=user_id, user_id_dropout=0.5, user_id_l2=0.1,
                                 swiglu_query_components=swiglu, logit_gate_hidden_dim=8, gate_logit_scale=0.5))  # fmt: skip
                assert torch.isfinite(mol.training_step(train, 0)), (implementation, user_id, swiglu, hidden)


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
