"""Training objectives: the negatives each draws, the loss they give, and real fits with each."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.cli import main
from rails_lightning.errors import ConfigError
from rails_lightning.objectives import FullSoftmax, MinedNegatives, PerQueryNegatives, SharedNegatives, TrainingStep
from rails_lightning.retrieval import SearchOptions
from rails_lightning.similarity import MixtureOfLogits

MODELS = ["TwoTower", "MoL"]


def _first_batch(data):
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _step(module, batch) -> TrainingStep:
    states = module.encode_sequence(batch.user_ids, batch.input_ids)
    has_target = batch.target_ids > 0
    return TrainingStep(module, batch, states, has_target, batch.target_ids[has_target])


def _quiet(module):
    module.log = lambda *args, **kwargs: None
    return module


def test_full_softmax_is_cross_entropy_over_the_corpus():
    """FullSoftmax's loss is the plain cross-entropy of the positive among all N items' scores."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = _quiet(make_tiny_model(data, objective=FullSoftmax)).eval()  # eval: no dropout, so both passes agree
    batch = _first_batch(data)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        states = module.encode_sequence(batch.user_ids, batch.input_ids)
        has_target = batch.target_ids > 0
        queries = module.similarity.query_representation(states[has_target], None)  # (M, D)
        corpus = module.encode_corpus()  # (N, D), row r = item r + 1
        logits = queries @ corpus.T / math.exp(float(module.log_temperature))  # (M, N)
        expected = F.cross_entropy(logits, batch.target_ids[has_target] - 1)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("model, separable", [("TwoTower", False), ("MoL", False), ("MoL", True)])
def test_each_groups_own_items_score_as_shared_items(model, separable):
    """Each group's queries against its own items (items (G, C)) score exactly as the same pairs with the items shared
    by one group (items (1, C))."""
    torch.manual_seed(0)
    data = make_tiny_data()
    options = {"similarity": functools.partial(MixtureOfLogits, component_dim=8, gate="separable")} if separable else {}
    module = make_tiny_model(data, model, **options).eval()
    batch = _first_batch(data)
    with torch.no_grad():
        states = module.encode_sequence(batch.user_ids, batch.input_ids)  # (B, L, D)
        queries = module.similarity.query_representation(states, batch.user_ids[:, None].expand(-1, states.shape[1]))  # (B, L)
        ids = torch.randint(1, data.num_items + 1, (len(states), 7))  # (B, 7): each sequence its own items
        grouped, _ = module.similarity.score(queries, module.encode_items(ids))  # (B, L, 7)
        for row in (0, 5):
            one = type(queries)(*(f[row : row + 1] for f in queries)) if isinstance(queries, tuple) else queries[row : row + 1]  # (1, L)
            shared, _ = module.similarity.score(one, module.encode_items(ids[row : row + 1]))  # (1, L, 7)
            torch.testing.assert_close(grouped[row], shared[0], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("model", MODELS)
def test_repeated_items_encode_as_each_alone_with_the_same_gradients(model):
    """Per-query negatives (many repeats) are encoded once per distinct id and gathered: the same values as encoding
    every id, and the same gradients for every parameter."""
    data = make_tiny_data()
    module = make_tiny_model(data, model).eval()  # no dropout: both paths see the same function
    ids = torch.randint(1, data.num_items + 1, (7, 30))  # (M, R_Q), many repeats

    def values_and_gradients(encode):
        module.zero_grad()
        fields = encode(ids)
        fields = fields if isinstance(fields, tuple) else (fields,)
        sum(field.square().sum() for field in fields if field.is_floating_point()).backward()
        return fields, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}

    gathered, gathered_grads = values_and_gradients(module.encode_repeated_items)
    direct, direct_grads = values_and_gradients(module.encode_items)
    for a, b in zip(gathered, direct, strict=True):
        torch.testing.assert_close(a, b)
    assert gathered_grads.keys() == direct_grads.keys() and gathered_grads
    for name in direct_grads:
        torch.testing.assert_close(gathered_grads[name], direct_grads[name], msg=name)


def test_shared_and_per_query_negatives_have_their_shapes_and_logq():
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data)
    step = _step(module, _first_batch(data))
    M, N = step.positive_ids.numel(), data.num_items
    shared = SharedNegatives(N, num_negatives=40, num_in_batch_negatives=8).negatives(step)
    assert shared.shared.shape == (48,) and shared.per_query is None and shared.per_sequence is None
    assert int(shared.shared.min()) >= 1 and int(shared.shared.max()) <= N
    assert torch.allclose(shared.shared_log_q[:40], torch.full((40,), math.log(40 / N)))
    assert set(shared.shared[40:].tolist()) <= set(step.positive_ids.tolist())  # in-batch: drawn from the positives
    per_query = PerQueryNegatives(N, num_negatives=16).negatives(step)
    assert per_query.shared is None and per_query.per_query.shape == (M, 16)
    assert not torch.equal(per_query.per_query[0], per_query.per_query[1])  # drawn per query
    assert torch.count_nonzero(per_query.per_query_log_q) == 0  # no logQ by default
    full = FullSoftmax(N).negatives(step)
    assert torch.equal(full.shared, torch.arange(1, N + 1))
    mined_only = MinedNegatives(N, num_negatives=0, num_mined=4, mining_depth=8).negatives(step)  # before mining: uniform fill
    assert mined_only.shared is None and mined_only.per_sequence.shape == (len(step.batch.input_ids), 4)


@pytest.mark.parametrize("model", MODELS)
def test_mined_negatives_come_from_the_top_of_the_models_ranking(model):
    """After an epoch start, every mined negative of a sequence is among the top ``mining_depth`` items of that
    sequence's query under the model's exact retriever, and never an item of its own history."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, model).eval()
    objective = MinedNegatives(data.num_items, num_negatives=20, num_mined=8, mining_depth=15, start_epoch=0)
    batch = _first_batch(data)
    with torch.no_grad():
        step = _step(module, batch)
        before = objective.negatives(step)  # not refreshed yet: uniform fill
        assert before.per_sequence.shape == (len(batch.input_ids), 8) and before.shared.shape == (20,)
        objective.on_train_epoch_start(module)
        mined = objective.mine(step)  # (B, 8)
        queries = module.similarity.query_representation(step.states[:, -1], batch.user_ids)
        ranking = module.exact_retriever(module.encode_corpus(), SearchOptions())
        _, top = ranking.search(queries, data.num_items)  # (B, N), no exclusion: the full ranking
        negatives = objective.negatives(step)
    allowed = []
    for row in range(len(mined)):
        history = set(batch.input_ids[row][batch.input_ids[row] > 0].tolist())
        allowed.append(set([i for i in top[row].tolist() if i not in history][:15]))
        assert set(mined[row].tolist()) <= allowed[row], row
        assert len(set(mined[row].tolist())) == 8  # distinct picks
    for row in range(len(mined)):  # what the step gets: a fresh draw from the same lists
        assert set(negatives.per_sequence[row].tolist()) <= allowed[row]
    assert torch.count_nonzero(negatives.per_sequence_log_q) == 0


def test_objectives_see_the_model_through_a_protocol():
    """objectives.py imports nothing of the models package that builds objectives (type-only imports included), and
    RetrievalModule offers every member of the protocol objectives see it through."""
    import ast
    import inspect

    import rails_lightning.objectives as objectives

    tree = ast.parse(inspect.getsource(objectives))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert "rails_lightning.retrieval" in imported and not [name for name in imported if name.startswith("rails_lightning.models")]
    members = [name for name in vars(objectives.ObjectiveModel) if not name.startswith("_")]
    module = make_tiny_model(make_tiny_data())
    assert members and all(hasattr(module, name) for name in members), members


def test_objective_options_are_checked():
    with pytest.raises(ConfigError, match="at least one negative"):
        SharedNegatives(10, num_negatives=0)
    with pytest.raises(ConfigError, match="num_negatives > 0"):
        PerQueryNegatives(10, num_negatives=0)
    with pytest.raises(ConfigError, match="mining_depth >= num_mined"):
        MinedNegatives(10, num_mined=32, mining_depth=8)


OBJECTIVES = {
    "per_query": functools.partial(PerQueryNegatives, num_negatives=24),
    "full": FullSoftmax,
    "mined": functools.partial(MinedNegatives, num_negatives=24, num_mined=8, mining_depth=30, start_epoch=1),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_trains(tmp_path, model, objective):
    """Two real epochs with each objective: finite losses that go down, and the mined objective mines in epoch 1."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data, model, objective=OBJECTIVES[objective])
    recorder = LossRecorder()
    cpu_trainer(tmp_path, 2, [recorder], enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)
    assert all(math.isfinite(x) for x in recorder.losses)
    half = len(recorder.losses) // 2
    assert sum(recorder.losses[half:]) < sum(recorder.losses[:half])
    if objective == "mined":
        assert module.objective.retriever is not None


@pytest.mark.parametrize("validation", [False, True], ids=["mining-encodes", "validation-encodes"])
def test_resume_with_mined_negatives_equals_uninterrupted_run(tmp_path, validation):
    """The mined negatives come from the weights at the epoch start, so a resumed run mines what an uninterrupted one
    does: also when the uninterrupted run mines from the encoding its validation made and the resumed one encodes anew."""
    def run(epochs, ckpt_path=None, directory="a"):
        torch.manual_seed(7)
        data = make_tiny_data()
        module = make_tiny_model(data, objective=OBJECTIVES["mined"])
        recorder = LossRecorder()
        callbacks = [recorder, CorpusEvaluation(ks=(1, 10))] if validation else [recorder]
        fit = cpu_trainer(tmp_path / directory, epochs, callbacks, limit_val_batches=1.0 if validation else 0)
        fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return recorder.losses, fit

    straight, _ = run(3, directory="straight")
    first, interrupted = run(2, directory="first")
    resumed, _ = run(3, ckpt_path=interrupted.checkpoint_callback.best_model_path, directory="resumed")
    assert first + resumed == pytest.approx(straight, rel=1e-5)


def test_objective_is_picked_by_class_path(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(
        ["--model.objective=rails_lightning.objectives.MinedNegatives", "--model.objective.init_args.num_mined=16", f"--run_dir={tmp_path}"],
        run=False,
    )
    assert isinstance(cli.model.objective, MinedNegatives) and cli.model.objective.num_mined == 16
    assert cli.model.hparams.objective["class_path"] == "rails_lightning.objectives.MinedNegatives"
