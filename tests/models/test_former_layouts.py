"""Checkpoints of a former layout load in today's (``models/former_layouts.py``): a checkpoint as the code before MoL
became a package wrote it -- rebuilt from a freshly trained model by renaming it backwards through that code's names --
loads and scores exactly as the model it came from, through ``load_from_checkpoint``, the CLI and a served index."""

import functools
import inspect
import json

import pytest
import torch

from conftest import TINY_CLI_ARGS, cpu_trainer, make_tiny_model
from rails_lightning.data import InteractionDataModule, SyntheticSource
from rails_lightning.models import RetrievalModule
from rails_lightning.models.factories import build_factory
from rails_lightning.models.former_layouts import current_spec
from rails_lightning.similarity import MixtureOfLogits, with_group_dim

# The former layout, written from the code before MoL became a package (similarity/mixture_of_logits.py) and before
# the item tower was a pluggable part (the module's own item_embedding and item_features).
FORMER_CLASS_PATH = "rails_lightning.similarity.mixture_of_logits.MixtureOfLogits"
FORMER_WEIGHT_NAMES = {  # today's -> former
    "item_tower.embedding": "item_embedding",
    "item_tower.item_features": "item_features",
    "similarity.query_head.components": "similarity.query_components",
    "similarity.query_head.user_component": "similarity.user_component",
    "similarity.item_head.components": "similarity.item_components",
    "similarity.gate.query_part": "similarity.query_gate",
    "similarity.gate.item_part": "similarity.item_gate",
    "similarity.gate.pair_part": "similarity.logit_gate",
    "similarity.gate.logit_scale": "similarity.logit_scale",
}
FORMER_GATE_OPTIONS = {  # the gate's form was two booleans (a separable multiplicative gate was refused)
    "separable": {"gate_sees_logits": False, "multiplicative_gate": False},
    "additive": {"gate_sees_logits": True, "multiplicative_gate": False},
    "multiplicative": {"gate_sees_logits": True, "multiplicative_gate": True},
}
# Every option of the former MixtureOfLogits with its default (jsonargparse stored them all in a checkpoint).
FORMER_DEFAULTS = {
    "num_query_components": 8, "num_item_components": 4, "component_dim": 64, "component_hidden_dim": 256,
    "user_id_component": False, "gate_hidden_dim": 64, "logit_gate_hidden_dim": None, "gate_dropout": 0.2,
    "gate_logit_scale": 0.0, "load_balancing_weight": 1e-3, "gate_sees_logits": True, "load_balancing_negatives": 0,
    "bf16_scores": False, "item_component_hidden_dim": None, "swiglu_query_components": False, "item_dropout": 0.0,
    "user_id_dropout": 0.0, "user_id_l2": 0.0, "user_id_init_std": 1.0, "multiplicative_gate": False,
    "fused_pair_gate": False, "approximate_topk": None,
}
# The data of TINY_CLI_ARGS, so that the CLI can test these checkpoints too.
CLI_SIZES = {"num_users": 150, "num_items": 200, "num_clusters": 8, "mean_sequence_length": 12}
TINY_MOL = {"num_query_components": 4, "num_item_components": 2, "component_dim": 16, "component_hidden_dim": 32, "user_id_component": True}


def former_name(name: str) -> str:
    for today, former in FORMER_WEIGHT_NAMES.items():
        if name == today or name.startswith(today + "."):
            return former + name[len(today):]
    return name


def former_checkpoint(checkpoint: dict) -> dict:
    """Today's checkpoint of a MoL model -> the one the former code wrote for the same model."""
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k not in ("item_tower", "action_names")}  # later options
    options = dict(hparams["similarity"]["init_args"])
    form, implementation = options.pop("gate"), options.pop("gate_implementation", "eager")
    options.update(FORMER_GATE_OPTIONS[form], fused_pair_gate=implementation == "kernel", bf16_scores=False)
    hparams["similarity"] = {"class_path": FORMER_CLASS_PATH, "init_args": options}
    weights = {former_name(name): value for name, value in checkpoint["state_dict"].items()}
    return {**checkpoint, "hyper_parameters": hparams, "state_dict": weights}


@pytest.mark.parametrize(("sees_logits", "multiplicative", "form"), [(False, False, "separable"), (True, False, "additive"), (True, True, "multiplicative")])
def test_former_mol_options_become_todays(sees_logits, multiplicative, form):
    former = {**FORMER_DEFAULTS, "gate_sees_logits": sees_logits, "multiplicative_gate": multiplicative, "bf16_scores": not sees_logits,
              "approximate_topk": {"class_path": "rails_lightning.retrieval.mol_topk.CombinedTopK", "init_args": {"k_prime": 8}}}  # fmt: skip
    spec = current_spec({"class_path": FORMER_CLASS_PATH, "init_args": former})
    assert spec["class_path"] == "rails_lightning.similarity.MixtureOfLogits"
    assert spec["init_args"]["gate"] == form and "gate_implementation" not in spec["init_args"]
    assert spec["init_args"]["approximate_topk"] == {"class_path": "rails_lightning.similarity.mol.topk.CombinedTopK", "init_args": {"k_prime": 8}}
    assert set(spec["init_args"]) <= set(inspect.signature(MixtureOfLogits).parameters)  # every removed option dropped
    similarity = build_factory({"class_path": FORMER_CLASS_PATH, "init_args": former})(16, 10)
    assert isinstance(similarity, MixtureOfLogits) and similarity.gate.form == form


def test_the_fused_kernel_becomes_the_kernel_gate_implementation_in_either_former_layout():
    before_package = current_spec({"class_path": FORMER_CLASS_PATH, "init_args": {**FORMER_DEFAULTS, "fused_pair_gate": True}})
    # Between the package and gate_implementation, MoL had ``gate`` and still ``fused_pair_gate``.
    in_package = current_spec({"class_path": "rails_lightning.similarity.mol.model.MixtureOfLogits", "init_args": {"gate": "additive", "fused_pair_gate": True}})
    for spec in (before_package, in_package):
        assert spec["init_args"]["gate_implementation"] == "kernel" and spec["init_args"]["gate"] == "additive"
        assert "fused_pair_gate" not in spec["init_args"]
    today = {"class_path": "rails_lightning.similarity.MixtureOfLogits", "init_args": {"gate": "multiplicative", "gate_implementation": "compiled"}}
    assert current_spec(today) == today


@pytest.fixture(scope="module", params=["separable", "additive", "multiplicative"])
def trained(request, tmp_path_factory):
    """A freshly trained tiny MoL model of one gate form, and its checkpoint in today's layout and in the former
    one, each in a run directory of its own (``RUN/checkpoints/model.ckpt``)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    data = InteractionDataModule(SyntheticSource(**CLI_SIZES), max_seq_len=12, batch_size=32)
    module = make_tiny_model(data, "MoL", similarity=functools.partial(MixtureOfLogits, **TINY_MOL, gate=request.param))
    fit = cpu_trainer(root, 1, limit_train_batches=3, limit_val_batches=0, enable_checkpointing=False)
    fit.fit(module, datamodule=data)
    checkpoints = {name: root / name / "checkpoints" / "model.ckpt" for name in ("today", "former")}
    checkpoints["today"].parent.mkdir(parents=True)
    fit.save_checkpoint(checkpoints["today"])
    former = former_checkpoint(torch.load(checkpoints["today"], weights_only=True))
    assert not any(name.startswith(tuple(FORMER_WEIGHT_NAMES)) for name in former["state_dict"])  # all renamed backwards
    checkpoints["former"].parent.mkdir(parents=True)
    torch.save(former, checkpoints["former"])
    return request.param, data, module.eval(), checkpoints


def test_a_former_checkpoint_loads_and_scores_as_the_model_it_came_from(trained):
    form, data, module, checkpoints = trained
    loaded = RetrievalModule.load_from_checkpoint(checkpoints["former"], weights_only=True).eval()
    assert loaded.similarity.gate.form == form
    assert loaded.hparams["similarity"]["init_args"] == module.hparams["similarity"]["init_args"]  # stored in today's form
    expected_weights = module.state_dict()
    assert list(loaded.state_dict()) == list(expected_weights)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected_weights[name]), name
    batch = data.test_dataloader().dataset[list(range(20))]
    with torch.no_grad():
        expected = module.similarity.score(with_group_dim(module.encode_queries(batch), 0), with_group_dim(module.encode_corpus(), 0))[0]
        got = loaded.similarity.score(with_group_dim(loaded.encode_queries(batch), 0), with_group_dim(loaded.encode_corpus(), 0))[0]
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_the_cli_tests_and_serves_a_former_checkpoint_as_the_model_it_came_from(trained, monkeypatch):
    from rails_lightning.cli import main
    from rails_lightning.serving import ServingIndex
    from rails_lightning.serving.index import export_index

    checkpoints = trained[3]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    metrics, answers = {}, {}
    for name, checkpoint in checkpoints.items():
        run_dir = checkpoint.parent.parent
        main(["test", f"--ckpt_path={checkpoint}", *TINY_CLI_ARGS, "--trainer.logger=false", f"--run_dir={run_dir}"])
        metrics[name] = {k: v for k, v in json.loads((run_dir / "run.json").read_text())["test"].items() if "seconds" not in k}
        serving = ServingIndex(export_index(checkpoint, run_dir / "index"))
        answer = serving.retrieve(serving.query(serving.user_history("3")), 10)
        answers[name] = (answer.item_ids, answer.scores)
    assert metrics["former"] == metrics["today"] and "test/hr@10" in metrics["today"]
    assert answers["former"] == answers["today"]
