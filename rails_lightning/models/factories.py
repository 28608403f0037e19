"""Pieces of a model given as factories, and their plain-data description for checkpoints.

A model receives its query encoder and similarity as *factories* (a class, or a class with some
options bound: what jsonargparse builds from ``class_path`` + ``init_args``, or a
``functools.partial`` in Python) and calls them with the data-dependent sizes. A checkpoint must
rebuild the model without unpickling code, so each factory is also stored as plain data,
``{"class_path": "package.module.Class", "init_args": {...}}``, nested factories included, and
turned back into a factory when the model is loaded (a spec of a former layout in today's form:
``former_layouts.py``).

Only classes from this package (or from modules already imported) are ever resolved, and only
subclasses of the expected base: a checkpoint cannot make the loader import arbitrary modules.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable

from rails_lightning.errors import CheckpointError
from rails_lightning.models.former_layouts import current_spec

FactorySpec = dict[str, Any]


def _bound_class(factory: Callable) -> tuple[type, dict[str, Any]]:
    """(class, bound keyword options) of a class or a partial of one (jsonargparse's wraps the class too)."""
    if isinstance(factory, type):
        return factory, {}
    if isinstance(factory, functools.partial):
        if isinstance(factory.func, type):
            return factory.func, dict(factory.keywords)
        classes = [arg for arg in factory.args if isinstance(arg, type)]
        if classes:
            return classes[-1], dict(factory.keywords)
    raise TypeError(f"cannot describe {factory!r}: give a class, a functools.partial of a class, or a class_path spec")


def _plain(value: Any) -> Any:
    """Options as plain data: nested factories become specs, tuples lists."""
    if isinstance(value, (type, functools.partial)):
        return describe(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"option value {value!r} is not plain data (str, number, bool, None, list, dict or a factory)")


def describe(factory: Callable | FactorySpec) -> FactorySpec:
    """A factory (or a spec already) -> ``{"class_path", "init_args"}`` of plain data."""
    if isinstance(factory, dict):
        spec = current_spec(factory)
        return {"class_path": spec["class_path"], "init_args": _plain(spec["init_args"])}
    cls, options = _bound_class(factory)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(options)}


def _resolve_class(class_path: str, base: type | None) -> type:
    module_name, _, name = class_path.rpartition(".")
    if module_name not in sys.modules and not module_name.split(".")[0] == "rails_lightning":
        raise CheckpointError(f"{class_path}: only classes of rails_lightning or of modules already imported are loaded")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        raise CheckpointError(f"{class_path} is not a {base.__name__ if base else 'class'}")
    return cls


def _factory_values(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return build_factory(value)
    if isinstance(value, list):
        return [_factory_values(v) for v in value]
    return value


def build_factory(spec: Callable | FactorySpec, base: type | None = None) -> Callable:
    """A spec -> ``functools.partial(class, **init_args)`` (nested specs become factories too); factories pass through."""
    if not isinstance(spec, dict):
        return spec
    spec = current_spec(spec)
    cls = _resolve_class(spec["class_path"], base)
    return functools.partial(cls, **{k: _factory_values(v) for k, v in (spec.get("init_args") or {}).items()})
