"""The reproduction table (``results_table.md``): one row per config, that is the finished runs that differ
only by seed and by their own paths, labelled by dataset, query encoder and similarity model
(``ml-1m SASRec TwoTower``); test HR@1/10/50/200, NDCG@10 and MRR as mean ± std over the seeds, epochs,
mean fit time, the hardware of the run records, the split and checkpoint selection of the runs (read from
their config), and the published figure for that dataset and model where one is known. Below it, every
published or recomputed figure of the table's datasets (``published.yaml`` beside this module), each with its
split, checkpoint selection and source, and the rows it stands beside. ``write_results_table(...,
readme=...)`` also puts both between a README's ``<!-- results-table:start -->`` and
``<!-- results-table:end -->`` lines.

Runs recorded before an option existed (the option absent) and after (stated at its default) are one
config: options equal to their class's ``__init__`` default are dropped before configs are compared.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from rails_lightning.errors import UserError
from rails_lightning.reports.collect import MODEL_ORDER, ReportedRun
from rails_lightning.reports.table import format_duration, markdown_table, mean_pm_std, short_number

TABLE_TEST_METRICS = {"HR@1": "test/hr@1", "HR@10": "test/hr@10", "HR@50": "test/hr@50", "HR@200": "test/hr@200",
                      "NDCG@10": "test/ndcg@10", "MRR": "test/mrr"}
RESULTS_TABLE_START = "<!-- results-table:start -->"
RESULTS_TABLE_END = "<!-- results-table:end -->"
RESULTS_TABLE_FILE = "results_table.md"
PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


@dataclass(frozen=True)
class PublishedFigure:
    """A published test figure for one dataset, query encoder and similarity model, with where it comes from.

    Args:
        figure: what the source calls the model (``HSTU-large``).
        dataset: the dataset name a run's config resolves to (``ml-1m``; see ``dataset_name``).
        encoder: the query encoder's class without ``Encoder`` (``SASRec``, ``HSTU``).
        encoder_layers: the encoder depth the figure is about; None for any depth.
        model: ``TwoTower`` (dot product) or ``MoL``.
        metrics: the figure under this project's metric names; ``test/hr@10`` always, ``test/ndcg@10`` where published.
        split: the evaluation protocol (leave-one-out, full corpus, how ties in time were ordered).
        selection: how the source chose the checkpoint it reports (on test, without a validation split, for most).
        source: the publication, short (``generative-recommenders README``).
        url: where to read it.
    """

    figure: str
    dataset: str
    encoder: str
    encoder_layers: int | None
    model: str
    metrics: dict[str, float]
    split: str
    selection: str
    source: str
    url: str


@functools.lru_cache(maxsize=None)
def published_figures(path: Path = PUBLISHED_FILE) -> tuple[PublishedFigure, ...]:
    """The figures of ``published.yaml`` (read once); a figure without ``test/hr@10`` is refused."""
    figures = tuple(PublishedFigure(**entry) for entry in yaml.safe_load(Path(path).read_text())["figures"])
    for figure in figures:
        if "test/hr@10" not in figure.metrics:
            raise ValueError(f"{path}: the figure {figure.figure!r} ({figure.source}) has no test/hr@10")
    return figures


def _short_class_name(entry: Any) -> str:
    class_path = entry.get("class_path", "") if isinstance(entry, dict) else ""
    return str(class_path).rsplit(".", 1)[-1] or "?"


def dataset_name(config: dict[str, Any]) -> str:
    """A short name of a run's data: the MovieLens variant, ``synthetic``, a log file's stem, else the source's class."""
    source = (config.get("data") or {}).get("source") or {}
    class_name, options = _short_class_name(source), source.get("init_args") or {}
    if class_name == "MovieLensSource":
        return str(options.get("variant", "ml-1m"))
    if class_name == "SyntheticSource":
        return "synthetic"
    if options.get("path"):
        name = Path(str(options["path"])).name
        return Path(name.removesuffix(".gz").removesuffix(".bz2")).stem
    return class_name


def encoder_name(config: dict[str, Any]) -> str:
    """The query encoder's class without its ``Encoder`` suffix: ``SASRec``, ``HSTU``, ``MeanPool``."""
    return _short_class_name((config.get("model") or {}).get("query_encoder")).removesuffix("Encoder")


def _encoder_layers(config: dict[str, Any]) -> int | None:
    encoder = (config.get("model") or {}).get("query_encoder") or {}
    return (encoder.get("init_args") or {}).get("num_layers") if isinstance(encoder, dict) else None


@functools.lru_cache(maxsize=None)  # one import and signature per class, not per run
def _class_defaults(class_path: str) -> dict[str, Any]:
    """The ``__init__`` defaults of the class at ``class_path``; none when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    # A class whose __init__ passes **kwargs on (IdAndContent -> ContentTower) takes its base's options too.
    for klass in cls.__mro__ if isinstance(cls, type) else [cls]:
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (ValueError, TypeError):
            break
        for p in parameters:
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) or klass is object:
            break
    return defaults


def _without_defaults(value: Any) -> Any:
    """A config with every ``init_args`` option that equals its class's default removed, so that a run recorded
    before an option existed (the option absent) and one recorded after (stated at its default) are one experiment."""
    if isinstance(value, list):
        return [_without_defaults(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _without_defaults(item) for key, item in value.items()}
    if isinstance(value.get("class_path"), str) and isinstance(value.get("init_args"), dict):
        defaults = _class_defaults(value["class_path"])
        value["init_args"] = {key: item for key, item in value["init_args"].items()
                              if not (key in defaults and _is_default(item, defaults[key]))}
        if not value["init_args"]:
            del value["init_args"]  # nothing but defaults: as if none were given
    return value


def _is_default(item: Any, default: Any) -> bool:
    if isinstance(default, (bool, int, float, str, type(None))):
        return type(item) is type(default) and item == default
    return False  # containers, callables, partials: kept, compared as written


def experiment_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config less what differs between the seeds of one experiment: the seed (and a cold split's seed
    that is the run's, ``data.cold_item_seed``) and the run's own paths (run directory, default root, logger
    save_dir, checkpoint dirpath, ckpt_path)."""
    config = copy.deepcopy(config)
    data = config.get("data") or {}
    if "cold_item_seed" in data and data["cold_item_seed"] == config.get("seed_everything"):
        data.pop("cold_item_seed")
    for key in ("seed_everything", "run_dir", "ckpt_path"):
        config.pop(key, None)
    trainer = config.get("trainer") or {}
    trainer.pop("default_root_dir", None)
    loggers = trainer.get("logger")
    for entry in [*(loggers if isinstance(loggers, list) else [loggers]), *(trainer.get("callbacks") or [])]:
        if isinstance(entry, dict) and isinstance(entry.get("init_args"), dict):
            entry["init_args"].pop("save_dir", None)
            entry["init_args"].pop("dirpath", None)
    return config


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"model.similarity.init_args.x": value}`` (list items by index)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass
class ConfigRow:
    """The finished runs of one config (they differ only by seed and paths): one row of the reproduction table."""

    label: str
    config: dict[str, Any]
    runs: list[ReportedRun] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.runs[0].model

    def matching_figures(self) -> list[PublishedFigure]:
        """The published figures for this config's dataset, encoder (and its depth) and model, in published.yaml's order;
        none for a run on another protocol than leave-one-out over every item (every published figure is a leave-one-out
        one, no item held out of training)."""
        data = self.config.get("data", {})
        if data.get("split", "leave_one_out") != "leave_one_out" or data.get("cold_item_fraction"):
            return []
        dataset, encoder, layers = dataset_name(self.config), encoder_name(self.config), _encoder_layers(self.config)
        return [figure for figure in published_figures() if (figure.dataset, figure.encoder, figure.model) == (dataset, encoder, self.model)
                and figure.encoder_layers in (None, layers)]

    def published(self) -> PublishedFigure | None:
        """The first of ``matching_figures``, if one is known: the figure the table's row shows."""
        return next(iter(self.matching_figures()), None)


def _differing_settings(differing: list[str], flat: dict[str, Any]) -> list[str]:
    """``key=value`` of the differing settings of one config; a piece whose class differs (``model.objective``)
    is one entry, ``objective=Class(its differing options)``, without the options its class does not have."""
    pieces = [k[: -len(".class_path")] for k in differing if k.endswith(".class_path")]
    # A piece inside a piece whose class differs (the text featuriser of a swapped item tower) is part of that class.
    pieces = [piece for piece in pieces if not any(piece.startswith(outer + ".init_args.") for outer in pieces)]
    settings = []
    for piece in pieces:
        if flat.get(piece + ".class_path") is None:  # this config has no such piece
            settings.append(f"{piece.rsplit('.', 1)[-1]}=None")
            continue
        # Its own scalar options only: not list elements (``text_columns.0``) nor options of pieces inside it.
        own = [k for k in differing if k.startswith(piece + ".init_args.") and "." not in k[len(piece + ".init_args."):]
               and flat.get(k) is not None]
        options = ", ".join(f"{k.rsplit('.', 1)[1]}={short_number(flat[k])}" for k in own)
        settings.append(f"{piece.rsplit('.', 1)[-1]}={str(flat.get(piece + '.class_path')).rsplit('.', 1)[-1]}({options})")
    settings += [f"{k}={short_number(_value_or_default(k, flat))}" for k in differing if not any(k.startswith(piece + ".") for piece in pieces)]
    return settings


def _value_or_default(key: str, flat: dict[str, Any]) -> Any:
    """A flat config's value at ``key``; where it is absent (unstated, or stripped as its class's default), the default
    of the class that takes it (``model.query_encoder.init_args.x`` -> the default of ``x`` in the encoder's class)."""
    if key in flat:
        return flat[key]
    piece, sep, option = key.rpartition(".init_args.")
    class_path = flat.get(piece + ".class_path") if sep else None
    return _class_defaults(class_path).get(option) if isinstance(class_path, str) else None


def group_by_config(runs: Sequence[ReportedRun]) -> list[ConfigRow]:
    """Finished runs -> one row per config (seeds together), by dataset and encoder, the dot product before MoL.
    Rows that share a label (configs that differ elsewhere, e.g. in the learning rate) have the differing
    settings appended to it."""
    rows: dict[str, ConfigRow] = {}
    for run in runs:
        if not run.ok:
            continue
        config = experiment_config(run.record.config)
        # Options stated at their class's default count as unstated: runs recorded before and after an option was added group together.
        key = json.dumps([run.model, _without_defaults(config)], sort_keys=True, default=str)
        label = f"{dataset_name(config)} {encoder_name(config)} {run.model}"
        rows.setdefault(key, ConfigRow(label, config)).runs.append(run)
    by_label: dict[str, list[ConfigRow]] = {}
    for row in rows.values():
        by_label.setdefault(row.label, []).append(row)
    for namesakes in by_label.values():
        if len(namesakes) > 1:
            flats = [_flat(_without_defaults(row.config)) for row in namesakes]
            differing = sorted(k for k in set().union(*flats) if len({json.dumps(f.get(k), default=str) for f in flats}) > 1)
            for row, flat in zip(namesakes, flats):
                settings = _differing_settings(differing, flat)
                row.label += " (" + ", ".join(settings[:3]) + (", ..." if len(settings) > 3 else "") + ")"
    return sorted(rows.values(), key=lambda row: (dataset_name(row.config), encoder_name(row.config),
                                                  MODEL_ORDER.get(row.model, len(MODEL_ORDER)), row.label))


def _epochs(runs: Sequence[ReportedRun]) -> str:
    epochs = sorted({r.record.epochs for r in runs if r.record.epochs is not None})
    return "?" if not epochs else str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}"


def split_label(config: dict[str, Any]) -> str:
    """How a run's config splits the data, for a table cell: each user's events in the data's own (fixed) order."""
    data = config.get("data") or {}
    cold = f"; {data['cold_item_fraction']:.0%} of items held out of training (cold)" if data.get("cold_item_fraction") else ""
    if data.get("split", "leave_one_out") == "leave_one_out":
        return "leave-one-out + validation item; the data's fixed order" + cold
    return f"temporal: last {data.get('test_fraction', 0.1):.0%} of events test, {data.get('val_fraction', 0.1):.0%} before validate" + cold


def selection_label(config: dict[str, Any]) -> str:
    """Which checkpoint a run's test metrics come from: the best one on the monitored metric of its ModelCheckpoint,
    else the last epoch's weights."""
    callbacks = ((config.get("trainer") or {}).get("callbacks")) or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            options = callback.get("init_args") or {}
            if options.get("monitor"):
                return f"best {options['monitor']}" + (" (lowest)" if options.get("mode") == "min" else "")
    return "last epoch"


def _published_cell(figure: PublishedFigure | None) -> str:
    if figure is None:
        return "—"
    ndcg = figure.metrics.get("test/ndcg@10")
    return f"{figure.metrics['test/hr@10']:.4f} / {'—' if ndcg is None else f'{ndcg:.4f}'} ({figure.figure}, {figure.source})"


def results_table(runs: Sequence[ReportedRun], command: str | None = None, metrics: Sequence[str] = (),
                  all_figures: bool = False) -> str:
    """The reproduction table: per config, test HR@1/10/50/200, NDCG@10 and MRR (or the metric keys ``metrics``,
    e.g. ``test/liked/hr@10``) of the selected checkpoint as mean ± std over its seeds, epochs, mean fit time,
    hardware, split, selection and the published figure; ``all_figures``: also the list of every published figure
    of the table's datasets (``figures_table``)."""
    columns = {key: key for key in metrics} or {f"test {name}": key for name, key in TABLE_TEST_METRICS.items()}
    header = ["config", "seeds", *columns, "epochs", "fit time", "hardware", "split", "selection", "published test HR@10 / NDCG@10"]
    rows = []
    config_rows = group_by_config(runs)
    for row in config_rows:
        metrics = [mean_pm_std([r.record.metrics[key] for r in row.runs if r.record.metrics.get(key) is not None])
                   for key in columns.values()]
        seconds = [float(r.record.fit_seconds) for r in row.runs if r.record.fit_seconds is not None]
        hardware = "; ".join(sorted({r.record.hardware for r in row.runs}))
        rows.append([row.label, len(row.runs), *metrics, _epochs(row.runs), format_duration(statistics.fmean(seconds)) if seconds else "?",
                     hardware, split_label(row.config), selection_label(row.config), _published_cell(row.published())])
    explanation = ("Test metrics of the selected checkpoint, full corpus; mean ± sample std over seeds (±— for one run). "
                   "Fit time: mean wall time of `fit` (training and per-epoch evaluation). Split and selection: ours, read "
                   "from the runs' config; a published figure's are in the list below the table (`report --table`).")
    lines = [explanation, "", markdown_table(header, rows)]
    if all_figures:
        figures = figures_table(config_rows)
        if figures:
            lines += ["", figures]
    left_out = [r for r in runs if not r.ok]
    if left_out:
        lines += ["", f"Left out, not finished: {', '.join(f'{r.name} ({r.shown_status})' for r in left_out)}."]
    if command:
        lines += ["", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"


def figures_table(rows: Sequence[ConfigRow]) -> str:
    """Every published or recomputed figure of the rows' datasets, with its split, checkpoint selection and source,
    and the labels of the rows it stands beside ("" when the rows' datasets have none, or no row is on their protocol)."""
    if not any(row.matching_figures() for row in rows):
        return ""
    datasets = {dataset_name(row.config) for row in rows}
    figures = [figure for figure in published_figures() if figure.dataset in datasets]
    if not figures:
        return ""
    table = []
    for figure in figures:
        beside = [row.label for row in rows if figure in row.matching_figures()]
        ndcg = figure.metrics.get("test/ndcg@10")
        table.append([f"{figure.figure} ({figure.dataset})", figure.metrics["test/hr@10"], "—" if ndcg is None else ndcg,
                      figure.split, figure.selection, f"[{figure.source}]({figure.url})", "; ".join(beside) or "—"])
    header = ["published figure", "test HR@10", "test NDCG@10", "split", "selection", "source", "beside our row"]
    return "Published and recomputed figures on these data, each with its split and checkpoint selection:\n\n" + markdown_table(header, table)


def replace_marked_region(path: str | Path, content: str) -> Path:
    """Put ``content`` between the results-table markers of ``path`` (a README), leaving the rest of the file as it was."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file to put the results table in")
    text = path.read_text()
    if text.count(RESULTS_TABLE_START) != 1 or text.count(RESULTS_TABLE_END) != 1 or text.index(RESULTS_TABLE_END) < text.index(RESULTS_TABLE_START):
        raise UserError(f"{path}: needs one '{RESULTS_TABLE_START}' line and, after it, one '{RESULTS_TABLE_END}' line to put the table between")
    before, rest = text.split(RESULTS_TABLE_START)
    after = rest.split(RESULTS_TABLE_END)[1]
    path.write_text(f"{before}{RESULTS_TABLE_START}\n{content.strip()}\n{RESULTS_TABLE_END}{after}")
    return path


def write_results_table(runs: Sequence[ReportedRun], out_dir: str | Path, readme: str | Path | None = None,
                        command: str | None = None, metrics: Sequence[str] = ()) -> str:
    """``results_table.md`` in ``out_dir`` and, with ``readme``, the same table between that file's markers."""
    markdown = results_table(runs, command, metrics, all_figures=True)
    if readme is not None:
        replace_marked_region(readme, markdown)  # before anything is written: a README without markers changes nothing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_TABLE_FILE).write_text(markdown)
    return markdown
