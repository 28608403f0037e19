"""Training through a real Lightning Trainer on tiny synthetic data, for both similarities: a full fit
with the corpus callback, seeded first-loss regressions, resume equivalence, self-describing
checkpoints, optimiser parameter groups."""

import functools
import json
import math

import lightning.pytorch as pl
import pytest
import torch

from conftest import TEST_DATA, LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.errors import ConfigError
from rails_lightning.models import MeanPoolEncoder, RetrievalModule, SASRecEncoder, UserIdEncoder
from rails_lightning.objectives import SharedNegatives
from rails_lightning.similarity import DotProduct, MixtureOfLogits, with_group_dim

MODELS = ["TwoTower", "MoL"]
FIRST_LOSSES = {"TwoTower": TEST_DATA / "two_tower_first_losses.json", "MoL": TEST_DATA / "mol_first_losses.json"}


@pytest.mark.parametrize(
    "model, encoder",
    [("TwoTower", SASRecEncoder), ("TwoTower", MeanPoolEncoder), ("TwoTower", UserIdEncoder), ("MoL", SASRecEncoder)],
)
def test_fit_logs_full_corpus_metrics_and_learns(tmp_path, model, encoder):
    torch.manual_seed(0)
    data = make_tiny_data()
    options = {} if encoder is SASRecEncoder else {"query_encoder": encoder}
    module = make_tiny_model(data, model, **options)
    evaluation, recorder = CorpusEvaluation(ks=(1, 10, 50)), LossRecorder()
    fit = cpu_trainer(tmp_path, 4, [evaluation, recorder], enable_checkpointing=False)
    fit.fit(module, datamodule=data)
    metrics = fit.callback_metrics
    for key in ("val/hr@1", "val/hr@10", "val/ndcg@10", "val/recall@50", "val/mrr"):
        assert key in metrics and 0.0 <= float(metrics[key]) <= 1.0
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not go down: {first:.3f} -> {last:.3f}"
    if encoder is SASRecEncoder:
        # The default encoder learns what a random ranking (HR@10 = 10/400) does not (MoL's gates
        # start uniform and need more than 4 tiny epochs to pull ahead).
        assert float(metrics["val/hr@10"]) > (3 if model == "TwoTower" else 2) * 10 / 400
    assert [row["epoch"] for row in evaluation.history] == [0, 1, 2, 3]
    result = fit.test(module, datamodule=data, verbose=False)[0]
    assert set(result) >= {"test/hr@10", "test/ndcg@10", "test/mrr"}


def test_item_features_reach_the_item_tower():
    featured = RetrievalModule(num_items=5, num_item_features=3, item_dim=8, query_encoder=MeanPoolEncoder)
    featured.item_tower.item_features[2] = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        before = featured.item_vectors(torch.tensor([2])).clone()
        featured.item_tower.feature_projection.weight.add_(1.0)
        after = featured.item_vectors(torch.tensor([2]))
    assert not torch.allclose(before, after)
    assert RetrievalModule(num_items=5).item_tower.feature_projection is None


def test_item_features_of_another_width_are_refused(tmp_path):
    """A model built for other item features than the data's (a checkpoint of other data, a width set by hand) stops
    before training, naming both shapes, rather than training without the data's features."""
    data = make_tiny_data()
    data.__dict__["item_features"] = torch.ones(data.num_items + 1, 3)  # what a source with 3 genres gives
    module = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, num_item_features=2, item_dim=8, query_encoder=MeanPoolEncoder)
    with pytest.raises(ConfigError, match=r"item features are \(401, 3\) but the model was built for \(401, 2\)"):
        cpu_trainer(tmp_path, 1).fit(module, datamodule=data)


def test_in_batch_negatives_with_logq(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, objective=functools.partial(SharedNegatives, num_negatives=0, num_in_batch_negatives=64))
    recorder = LossRecorder()
    cpu_trainer(tmp_path, 1, [recorder], enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)
    assert all(math.isfinite(x) for x in recorder.losses)
    with pytest.raises(ValueError, match="at least one negative"):
        make_tiny_model(data, objective=functools.partial(SharedNegatives, num_negatives=0, num_in_batch_negatives=0))


def test_target_fraction_scores_a_random_share_of_the_positions():
    torch.manual_seed(0)
    data = make_tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    has_target = batch.target_ids > 0
    module = make_tiny_model(data, target_fraction=0.25)
    kept = module.training_positions(batch.target_ids)
    assert not (kept & ~has_target).any()  # only positions with a target
    assert int(kept.sum()) == round(0.25 * int(has_target.sum()))
    assert torch.equal(make_tiny_model(data).training_positions(batch.target_ids), has_target)  # the default: all
    module.log = lambda *args, **kwargs: None
    assert torch.isfinite(module.training_step(batch, 0))
    with pytest.raises(ValueError, match="target_fraction"):
        make_tiny_model(data, target_fraction=0.0)


def first_losses(tmp_path, model: str, **options) -> list[float]:
    torch.manual_seed(123)
    data = make_tiny_data()
    module = make_tiny_model(data, model, **options)
    recorder = LossRecorder()
    cpu_trainer(tmp_path, 1, [recorder], enable_checkpointing=False, limit_val_batches=0, max_steps=5).fit(module, datamodule=data)
    return recorder.losses


@pytest.mark.parametrize("model", MODELS)
def test_seeded_loss_curve_regression(tmp_path, model):
    """The first losses of a seeded run are pinned: a change to data order, init, sampling, the loss or
    the optimiser shows up here. Regenerate tests/data/*_first_losses.json on purpose only."""
    losses = first_losses(tmp_path, model)
    assert losses == pytest.approx(first_losses(tmp_path / "again", model), abs=0), "a seeded run is not deterministic"
    expected = json.loads(FIRST_LOSSES[model].read_text())
    assert losses == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, model):
    def run(epochs, ckpt_path=None, directory="a"):
        torch.manual_seed(7)
        data = make_tiny_data()
        module = make_tiny_model(data, model)
        recorder = LossRecorder()
        fit = cpu_trainer(tmp_path / directory, epochs, [recorder], limit_val_batches=0)
        fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, recorder.losses, fit

    straight, straight_losses, _ = run(3, directory="straight")
    _, first, interrupted = run(2, directory="first")
    checkpoint = interrupted.checkpoint_callback.best_model_path or interrupted.checkpoint_callback.last_model_path
    resumed, resumed_losses, _ = run(3, ckpt_path=checkpoint, directory="resumed")
    assert first + resumed_losses == pytest.approx(straight_losses, rel=1e-5)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_rebuilds_the_model_without_config(tmp_path, model):
    """``load_from_checkpoint`` with ``weights_only=True``: the same classes, options and scores."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, model, learn_temperature=True)
    fit = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=(1, 10))], limit_train_batches=3)
    fit.fit(module, datamodule=data)
    loaded = RetrievalModule.load_from_checkpoint(fit.checkpoint_callback.best_model_path, weights_only=True)
    assert type(loaded.similarity) is type(module.similarity) and type(loaded.query_encoder) is SASRecEncoder
    assert loaded.model_name == model and dict(loaded.hparams) == dict(module.hparams)
    assert len(loaded.query_encoder.blocks) == 1 and loaded.similarity.input_dim == 16
    module.eval(), loaded.eval()
    batch = data.val_dataloader().dataset[list(range(20))]
    with torch.no_grad():
        expected = module.similarity.score(with_group_dim(module.encode_queries(batch), 0), with_group_dim(module.encode_corpus(), 0))[0]
        got = loaded.similarity.score(with_group_dim(loaded.encode_queries(batch), 0), with_group_dim(loaded.encode_corpus(), 0))[0]
    torch.testing.assert_close(got, expected)


def test_checkpoint_specs_only_resolve_package_components():
    from rails_lightning.errors import CheckpointError
    from rails_lightning.models.factories import build_factory

    with pytest.raises(CheckpointError, match="only classes of rails_lightning"):
        build_factory({"class_path": "some_unimported_module.Evil"})
    with pytest.raises(CheckpointError, match="is not a Similarity"):
        from rails_lightning.similarity import Similarity

        build_factory({"class_path": "rails_lightning.models.SASRecEncoder"}, Similarity)


def test_optimiser_does_not_decay_biases_norms_and_scalars():
    module = RetrievalModule(num_items=20, item_dim=8, similarity=MixtureOfLogits, learn_temperature=True, weight_decay=0.1)
    decayed, kept = module.configure_optimizers().param_groups
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in kept["params"])
    names = {id(p): n for n, p in module.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert {"log_temperature", "similarity.gate.logit_scale"} <= kept_names
    assert any("norm" in n for n in kept_names) and any(n.endswith("bias") for n in kept_names)
    assert len(decayed["params"]) + len(kept["params"]) == sum(1 for p in module.parameters() if p.requires_grad)
    (everything,) = RetrievalModule(num_items=20, decay_all_parameters=True, weight_decay=0.1).configure_optimizers().param_groups
    assert everything["weight_decay"] == 0.1


def test_learning_rate_factor_warms_up_linearly_then_follows_a_half_cosine_to_the_final_fraction():
    from rails_lightning.models.retrieval_module import learning_rate_factor

    warm = [learning_rate_factor(step, 4, 20, 0.1) for step in range(4)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    decay = [learning_rate_factor(step, 4, 20, 0.1) for step in range(4, 21)]
    assert decay[0] == 1.0 and decay[8] == pytest.approx(0.1 + 0.9 * 0.5) and decay[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert learning_rate_factor(30, 4, 20, 0.1) == pytest.approx(0.1)  # past the last step: the final rate
    assert [learning_rate_factor(step, 2, 20, None) for step in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]  # no decay


class _LearningRates(pl.Callback):
    """The optimizer's learning rate at every training step."""

    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_fit_follows_the_warmup_and_cosine_schedule_and_the_default_rate_stays_constant(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_data()
    steps_per_epoch = len(data.train_dataloader())
    scheduled = make_tiny_model(data, learning_rate=4e-3, warmup_steps=4, final_learning_rate=4e-4)
    rates = _LearningRates()
    cpu_trainer(tmp_path / "scheduled", 2, [rates], enable_checkpointing=False, limit_val_batches=0).fit(scheduled, datamodule=data)
    total = 2 * steps_per_epoch
    assert len(rates.rates) == total and rates.rates[:4] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    after = rates.rates[4:]
    assert all(a > b for a, b in zip(after, after[1:])) and 4e-4 < after[-1] < 4e-4 + 3.6e-3 * 0.05
    constant = _LearningRates()
    default = make_tiny_model(data, learning_rate=4e-3)
    assert isinstance(default.configure_optimizers(), torch.optim.AdamW)  # no schedule object: the rate runs as before
    cpu_trainer(tmp_path / "constant", 1, [constant], enable_checkpointing=False, limit_val_batches=0).fit(default, datamodule=data)
    assert constant.rates == [4e-3] * steps_per_epoch


def test_a_final_learning_rate_above_the_rate_is_refused():
    with pytest.raises(ConfigError, match="final_learning_rate between 0 and learning_rate"):
        RetrievalModule(num_items=20, learning_rate=1e-3, final_learning_rate=1e-2)


def test_dot_product_is_the_default_similarity():
    module = RetrievalModule(num_items=20)
    assert isinstance(module.similarity, DotProduct) and module.model_name == "TwoTower"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("model", MODELS)
def test_a_fit_on_a_gpu_learns_and_evaluates_as_the_cpu_does(tmp_path, model, precision):
    """On CUDA, in float32 and under bf16-mixed: the loss goes down, the corpus evaluation runs on the GPU (the exact
    top-k there, MoL's included), and validating the trained model on the CPU gives about the GPU's metrics."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, model)
    recorder = LossRecorder()
    fit = pl.Trainer(
        max_epochs=4, accelerator="gpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[CorpusEvaluation(ks=(1, 10)), recorder],
    )
    fit.fit(module, datamodule=data)
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not go down: {first:.3f} -> {last:.3f}"
    on_gpu = float(fit.callback_metrics["val/hr@10"])
    on_cpu = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=(1, 10))]).validate(module.cpu(), datamodule=data, verbose=False)[0]
    assert abs(on_cpu["val/hr@10"] - on_gpu) < 0.05  # the same weights: only float rounding (or bf16 queries) differs
