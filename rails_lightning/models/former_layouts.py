"""Checkpoints written in a former layout, read in today's: the one table of what was renamed.

A checkpoint holds its model's parts as ``{"class_path", "init_args"}`` specs (``factories.py``) and its weights
by module name. When a class moves, an option changes form or a submodule is renamed, checkpoints written before
still load, translated here when they are read:

* ``current_spec`` translates a stored spec (``build_factory`` and ``describe`` call it, so a model rebuilt from a
  former checkpoint stores today's spec; the CLI calls it through ``current_hyperparameters`` before it parses a
  checkpoint's hyperparameters as options);
* ``rename_former_weights`` renames stored weights (``RetrievalModule.on_load_checkpoint``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

#: Former class paths -> today's.
FORMER_CLASS_PATHS = {
    # MoL became a package (rails_lightning/similarity/mol/), its top-k routines part of it.
    "rails_lightning.similarity.mixture_of_logits.MixtureOfLogits": "rails_lightning.similarity.MixtureOfLogits",
    **{
        f"rails_lightning.retrieval.mol_topk.{name}": f"rails_lightning.similarity.mol.topk.{name}"
        for name in ("MoLExactTopK", "PerEmbeddingTopK", "AveragedEmbeddingTopK", "CombinedTopK")
    },
}

#: Former weight names -> today's: a whole name, or its leading part up to a dot (a submodule's weights).
FORMER_WEIGHT_NAMES = {
    # The item tower became a pluggable part.
    "item_embedding": "item_tower.embedding",
    "item_feature_projection": "item_tower.feature_projection",
    "item_features": "item_tower.item_features",
    # MoL became a package: its heads and its gate are submodules.
    "similarity.query_components": "similarity.query_head.components",
    "similarity.user_component": "similarity.query_head.user_component",
    "similarity.item_components": "similarity.item_head.components",
    "similarity.query_gate": "similarity.gate.query_part",
    "similarity.item_gate": "similarity.gate.item_part",
    "similarity.logit_gate": "similarity.gate.pair_part",
    "similarity.logit_scale": "similarity.gate.logit_scale",
}


def _mixture_of_logits_options(options: dict[str, Any]) -> dict[str, Any]:
    """MoL's options from before the gate's form was one option and the fused kernel one gate implementation."""
    options = dict(options)
    sees_logits = options.pop("gate_sees_logits", None)
    multiplicative = options.pop("multiplicative_gate", None)
    if sees_logits is not None or multiplicative is not None:
        # gate_sees_logits false was softmax(a + b) (multiplicative_gate was refused with it); true added the pair
        # part, as softmax(SiLU(a * b + pair(l))) with multiplicative_gate, softmax(a + b + pair(l)) without.
        options["gate"] = "separable" if sees_logits is False else "multiplicative" if multiplicative else "additive"
    if options.pop("fused_pair_gate", False):
        options["gate_implementation"] = "kernel"
    # bf16_scores only chose bfloat16 inputs for the separable gate's score matmul: no weight depends on it, and the
    # same weights score in float32 now (the scores differ by bfloat16 rounding at most).
    options.pop("bf16_scores", None)
    return options


#: Today's classes (by their defining module) -> a translation of their former options.
FORMER_OPTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "rails_lightning.similarity.mol.model.MixtureOfLogits": _mixture_of_logits_options,
}


def _defining_path(class_path: str) -> str:
    """``module.Class`` where the class is defined, for a path of this package that may name a re-export; other
    paths (and ones that do not resolve, which loading reports) as they are."""
    module_name, _, name = class_path.rpartition(".")
    if module_name.split(".")[0] != "rails_lightning":
        return class_path
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else class_path


def is_spec(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def current_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored ``{"class_path", "init_args"}`` spec (nested specs included) in today's class paths and options."""
    class_path = FORMER_CLASS_PATHS.get(str(spec["class_path"]), str(spec["class_path"]))
    init_args = {k: _current_value(v) for k, v in (spec.get("init_args") or {}).items()}
    translate = FORMER_OPTIONS.get(_defining_path(class_path))
    return {"class_path": class_path, "init_args": translate(init_args) if translate else init_args}


def _current_value(value: Any) -> Any:
    if is_spec(value):
        return current_spec(value)
    if isinstance(value, list):
        return [_current_value(v) for v in value]
    return value


def current_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters with every spec in today's form."""
    return {key: _current_value(value) for key, value in hparams.items()}


def current_weight_name(name: str) -> str:
    for former, current in FORMER_WEIGHT_NAMES.items():
        if name == former or name.startswith(former + "."):
            return current + name[len(former):]
    return name


def rename_former_weights(state_dict: dict[str, Any]) -> None:
    """Rename a checkpoint's weights of a former layout to today's names, in place (order kept)."""
    renamed = {current_weight_name(name): value for name, value in state_dict.items()}
    state_dict.clear()
    state_dict.update(renamed)
