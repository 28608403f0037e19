"""Compare finished runs: a markdown table and a PNG of HR@K against K per model (MoL vs dot product).

    python -m rails_lightning report runs/A runs/B ... [--out DIR] [--metric val/hr@10]
    python -m rails_lightning report sweeps_out/mol_vs_dot-20260101-120000     # a local sweep
    python -m rails_lightning report --table RUNS... [--readme README.md]     # the reproduction table

A run is a run directory of ``python -m rails_lightning fit`` (its run record, ``run.json``);
a local sweep directory (``sweep.json``) stands for all of its trials. Numbers are those of the
run records: the best-on-validation checkpoint on val and test, and the most-popular baseline on
the same split. Runs are grouped by model (``TwoTower``, ``MoL``); each group reports mean ± std
over its runs (seeds).

``--table`` writes the reproduction table instead (``results_table.md``): one row per config, that is
the runs that differ only by seed and by their own paths, labelled by dataset, query encoder and
similarity model (``ml-1m SASRec TwoTower``); test HR@1/10/50/200, NDCG@10 and MRR as mean ± std
over the seeds, epochs, mean fit time, the hardware of the run records, and the published figure
for that dataset and model where one is known. ``--readme README.md`` also puts the table between
the file's ``<!-- results-table:start -->`` and ``<!-- results-table:end -->`` lines.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import inspect
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rails_lightning.commands import help_description
from rails_lightning.errors import UserError
from rails_lightning.runs import RECORD_FILE, RunRecord

DEFAULT_METRIC = "val/hr@10"
TABLE_KEYS = ("val/hr@10", "val/ndcg@10", "test/hr@10", "test/ndcg@10", "test/mrr")
MODEL_LABELS = {"TwoTower": "TwoTower (dot product)", "MoL": "MoL (mixture of logits)"}


# ---------------------------------------------------------------------------------------- runs
@dataclass
class ReportedRun:
    """A run as a report shows it: its record, a name, and (for a sweep trial) the swept parameters."""

    record: RunRecord
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # overrides the record's status (a sweep's failed trial)

    @property
    def model(self) -> str:
        return self.record.model

    @property
    def ok(self) -> bool:
        return not self.status and self.record.ok

    @property
    def shown_status(self) -> str:
        return self.status or self.record.status


def collect_runs(paths: Iterable[str | Path]) -> list[ReportedRun]:
    """Run directories, local sweep directories (all their trials), folders of runs -> runs, in order."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such run directory or sweep folder")
        if (path / "sweep.json").exists():
            runs += sweep_results(path)
        elif (path / RECORD_FILE).exists() or (path / "config.yaml").exists():
            runs.append(ReportedRun(RunRecord.read(path), path.name))
        else:  # a folder of run directories
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / RECORD_FILE).exists()) if path.is_dir() else []
            if not children:
                raise UserError(f"{path}: no {RECORD_FILE}, config.yaml or sweep.json here or one level down: not a run of `fit`")
            runs += [ReportedRun(RunRecord.read(child), child.name) for child in children]
    return runs


def sweep_results(sweep_dir: Path) -> list[ReportedRun]:
    """The trials of a local sweep (``sweep.json`` written by ``rails_lightning.sweep``)."""
    record = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    runs = []
    for trial in record["trials"]:
        run = RunRecord.read(Path(sweep_dir) / trial["name"])
        if run.model == "?":
            run.model = trial.get("model", "?")
        status = "" if trial.get("status") == "finished" else trial.get("status", "failed")
        runs.append(ReportedRun(run, trial["name"], trial.get("params", {}), status))
    return runs


# ---------------------------------------------------------------------------------------- tables
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, dict):  # a whole {class_path, init_args} parameter
        return str(value.get("class_path", value)).rsplit(".", 1)[-1]
    return str(value)


def _param(value: Any) -> Any:
    return f"{value:.3g}" if isinstance(value, float) else value


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def group_by_model(results: Sequence[ReportedRun]) -> dict[str, list[ReportedRun]]:
    """Model class -> its runs; the dot-product baseline first, then MoL, then the rest."""
    order = {"TwoTower": 0, "MoL": 1}
    groups: dict[str, list[ReportedRun]] = {}
    for result in sorted(results, key=lambda r: order.get(r.model, 2)):
        groups.setdefault(result.model, []).append(result)
    return groups


def comparison_markdown(results: Sequence[ReportedRun], metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """Per-run table (metric per run) and per-model table (mean ± std over runs), with the popularity baseline."""
    keys = [metric] + [k for k in TABLE_KEYS if k != metric]
    param_names = [n for n in dict.fromkeys(name for r in results for name in r.params) if n not in ("model", "seed")]
    header = ["run", "model", *param_names, "seed", "status", *keys, "fit s"]
    rows = [
        [r.name, r.model, *(_param(r.params.get(p, "")) for p in param_names), "" if r.record.seed is None else r.record.seed,
         r.shown_status, *(r.record.metrics.get(k, math.nan) for k in keys),
         "" if r.record.fit_seconds is None else f"{float(r.record.fit_seconds):.0f}"]
        for r in results
    ]
    parts = [f"## {title}" if title else "## Runs", "", _markdown(header, rows), ""]

    header = ["model", "runs ok / all", *(f"{k} (mean ± std)" for k in keys)]
    rows = []
    for model, runs in group_by_model(results).items():
        ok = [r for r in runs if r.ok]
        cells = []
        for key in keys:
            mean, std = _mean_std([r.record.metrics[key] for r in ok if key in r.record.metrics])
            cells.append("—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        rows.append([MODEL_LABELS.get(model, model), f"{len(ok)} / {len(runs)}", *cells])
    baselines = [r.record.baseline for r in results if r.ok and r.record.baseline]
    if baselines:
        cells = []
        for key in keys:
            mean, std = _mean_std([b[key] for b in baselines if key in b])
            cells.append("—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        rows.append(["most popular items (baseline)", f"{len(baselines)} / {len(baselines)}", *cells])
    parts += ["## Per model: mean ± std over runs (seeds)", "", _markdown(header, rows), ""]
    failed = [r for r in results if not r.ok]
    if failed:
        parts += [f"{len(failed)} run(s) did not finish: " + ", ".join(f"{r.name} ({r.shown_status}; log: {r.record.run_dir}/trial.log)" for r in failed), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------- plot
def _ks(results: Sequence[ReportedRun], stage: str) -> list[int]:
    found = {int(k.split("@")[1]) for r in results for k in r.record.metrics if k.startswith(f"{stage}/hr@")}
    return sorted(found)


def plot_hr_at_k(results: Sequence[ReportedRun], path: str | Path, stages: Sequence[str] = ("val", "test")) -> Path:
    """PNG of HR@K against K per model (mean ± std over its runs) beside the popularity baseline, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ks = _ks(ok, stage)
        for model, runs in group_by_model(ok).items():
            curves = [[r.record.metrics.get(f"{stage}/hr@{k}", math.nan) for k in ks] for r in runs]
            stats = [_mean_std([c[i] for c in curves if not math.isnan(c[i])]) for i in range(len(ks))]
            means, stds = [s[0] for s in stats], [s[1] for s in stats]
            label = f"{MODEL_LABELS.get(model, model)}, n={len(runs)}"
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=4, label=label)
        baseline = [r.record.baseline for r in ok if r.record.baseline]
        if baseline and ks:
            ax.plot(ks, [statistics.fmean(b.get(f"{stage}/hr@{k}", math.nan) for b in baseline) for k in ks],
                    "k--", marker="x", label="most popular items")
        ax.set_xscale("log")
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (log scale)")
        ax.set_ylabel(f"{stage} HR@K")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{stage}: HR@K against K per model")
        ax.legend(fontsize=8)
    fig.suptitle("Full-corpus HR@K against K, MoL vs dot product (mean ± std over seeds)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Sequence[ReportedRun], out_dir: str | Path, metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """``summary.md`` and ``hr_at_k.png`` in ``out_dir``; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(results, metric, title)
    if any(r.ok for r in results):
        plot_hr_at_k(results, out_dir / "hr_at_k.png")
        markdown += "\n![HR@K against K per model](hr_at_k.png)\n"
    (out_dir / "summary.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------- leaderboard
LEADERBOARD_KEYS = ("hr@1", "hr@10", "ndcg@10", "mrr")
HYPERPARAMETERS = ("learning_rate", "temperature", "objective", "item_dim")


def _hyperparameter(value: Any) -> Any:
    """A config value for a table cell: a ``class_path`` spec as ``Class(option=value, ...)``."""
    if isinstance(value, dict) and "class_path" in value:
        options = ", ".join(f"{k}={v}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rpartition('.')[2]}({options})"
    return value


def _checkpoint_mb(record: RunRecord) -> str:
    path = Path(record.checkpoint) if record.checkpoint else None
    return f"{path.stat().st_size / 2**20:.1f}" if path is not None and path.is_file() else ""


def leaderboard_rows(runs: Sequence[ReportedRun], metric: str = DEFAULT_METRIC) -> tuple[list[str], list[list[Any]]]:
    """Finished runs ranked by ``metric`` (best first): model, key hyperparameters, the metric, val and test
    HR@1 / HR@10 / NDCG@10 / MRR of the best checkpoint, its size and date. Runs without the metric are left out."""
    ranked = sorted((r for r in runs if r.ok and metric in r.record.metrics), key=lambda r: -r.record.metrics[metric])
    stages = [stage for stage in ("val", "test") if any(f"{stage}/hr@10" in r.record.metrics for r in ranked)]
    header = ["rank", "run", "model", *HYPERPARAMETERS, metric, *(f"{s}/{k}" for s in stages for k in LEADERBOARD_KEYS), "ckpt MB", "date"]
    rows = []
    for rank, run in enumerate(ranked, start=1):
        model_config = run.record.config.get("model") or {}
        params = [_hyperparameter(model_config.get(name, "")) for name in HYPERPARAMETERS]
        metrics = run.record.metrics
        rows.append([rank, run.name, run.model, *params, metrics[metric],
                     *(metrics.get(f"{s}/{k}", math.nan) for s in stages for k in LEADERBOARD_KEYS),
                     _checkpoint_mb(run.record), run.record.created[:10]])
    return header, rows


def write_leaderboard(runs: Sequence[ReportedRun], out_dir: str | Path, metric: str = DEFAULT_METRIC) -> str:
    """``leaderboard.md`` in ``out_dir``; returns the markdown."""
    header, rows = leaderboard_rows(runs, metric)
    markdown = f"## Leaderboard by {metric} ({len(rows)} of {len(runs)} runs finished with it)\n\n" + _markdown(header, rows) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "leaderboard.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------- reproduction table
TABLE_TEST_METRICS = {"HR@1": "test/hr@1", "HR@10": "test/hr@10", "HR@50": "test/hr@50", "HR@200": "test/hr@200",
                      "NDCG@10": "test/ndcg@10", "MRR": "test/mrr"}
RESULTS_TABLE_START = "<!-- results-table:start -->"
RESULTS_TABLE_END = "<!-- results-table:end -->"
RESULTS_TABLE_FILE = "results_table.md"


@dataclass(frozen=True)
class PublishedFigure:
    """A published test HR@10 (and NDCG@10) for one dataset, query encoder and similarity model."""

    dataset: str
    encoder: str
    model: str
    hr10: float
    ndcg10: float | None
    source: str
    encoder_layers: int | None = None  # the figure is only about encoders of this depth (None: any depth)


# Full-corpus leave-one-out test figures on MovieLens-1M, as published.
PUBLISHED_FIGURES = (
    # The ML-1M table of the generative-recommenders README (github.com/meta-recsys/generative-recommenders):
    # its HSTU row uses SASRec's settings (2 blocks), HSTU-large 8 blocks (configs/ml-1m/hstu.yaml here).
    PublishedFigure("ml-1m", "SASRec", "TwoTower", 0.2853, 0.1603, "SASRec, generative-recommenders README"),
    PublishedFigure("ml-1m", "HSTU", "TwoTower", 0.3097, 0.1720, "HSTU, generative-recommenders README", encoder_layers=2),
    PublishedFigure("ml-1m", "HSTU", "TwoTower", 0.3294, 0.1893, "HSTU-large, generative-recommenders README", encoder_layers=8),
    # The RAILS repository (Retrieval with Learned Similarities, Ding et al.): its hstu-mol ML-1M result.
    PublishedFigure("ml-1m", "HSTU", "MoL", 0.3474, 0.2000, "hstu-mol, RAILS repository"),
    # Zhai et al., Revisiting Neural Retrieval on Accelerators, KDD'23 (arXiv 2306.04039): SASRec with MoL.
    PublishedFigure("ml-1m", "SASRec", "MoL", 0.3079, None, "SASRec + MoL, KDD'23"),
)


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
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


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
    """A run's config less what differs between the seeds of one experiment: the seed and the run's own
    paths (run directory, default root, logger save_dir, checkpoint dirpath, ckpt_path)."""
    config = copy.deepcopy(config)
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

    def published(self) -> PublishedFigure | None:
        dataset, encoder, layers = dataset_name(self.config), encoder_name(self.config), _encoder_layers(self.config)
        return next((figure for figure in PUBLISHED_FIGURES if (figure.dataset, figure.encoder, figure.model) == (dataset, encoder, self.model)
                     and figure.encoder_layers in (None, layers)), None)


def _differing_settings(differing: list[str], flat: dict[str, Any]) -> list[str]:
    """``key=value`` of the differing settings of one config; a piece whose class differs (``model.objective``)
    is one entry, ``objective=Class(its differing options)``, without the options its class does not have."""
    pieces = [k[: -len(".class_path")] for k in differing if k.endswith(".class_path")]
    settings = []
    for piece in pieces:
        if flat.get(piece + ".class_path") is None:  # this config has no such piece
            settings.append(f"{piece.rsplit('.', 1)[-1]}=None")
            continue
        own = [k for k in differing if k.startswith(piece + ".init_args.") and flat.get(k) is not None]
        options = ", ".join(f"{k.rsplit('.', 1)[1]}={_param(flat[k])}" for k in own)
        settings.append(f"{piece.rsplit('.', 1)[-1]}={str(flat.get(piece + '.class_path')).rsplit('.', 1)[-1]}({options})")
    settings += [f"{k}={_param(_value_or_default(k, flat))}" for k in differing if not any(k.startswith(piece + ".") for piece in pieces)]
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
    model_order = {"TwoTower": 0, "MoL": 1}
    return sorted(rows.values(), key=lambda row: (dataset_name(row.config), encoder_name(row.config),
                                                  model_order.get(row.model, 2), row.label))


def _mean_pm_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std over seeds), ``mean ±—`` for a single run, ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f} ±—"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _epochs(runs: Sequence[ReportedRun]) -> str:
    epochs = sorted({r.record.epochs for r in runs if r.record.epochs is not None})
    return "?" if not epochs else str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}"


def _published_cell(figure: PublishedFigure | None) -> str:
    if figure is None:
        return "—"
    ndcg = "—" if figure.ndcg10 is None else f"{figure.ndcg10:.4f}"
    return f"{figure.hr10:.4f} / {ndcg} ({figure.source})"


def results_table(runs: Sequence[ReportedRun], command: str | None = None) -> str:
    """The reproduction table: per config, test HR@1/10/50/200, NDCG@10 and MRR of the best-on-validation
    checkpoint as mean ± std over its seeds, epochs, mean fit time, hardware and the published figure."""
    header = ["config", "seeds", *(f"test {name}" for name in TABLE_TEST_METRICS), "epochs", "fit time", "hardware",
              "published test HR@10 / NDCG@10"]
    rows = []
    for row in group_by_config(runs):
        metrics = [_mean_pm_std([r.record.metrics[key] for r in row.runs if r.record.metrics.get(key) is not None])
                   for key in TABLE_TEST_METRICS.values()]
        seconds = [float(r.record.fit_seconds) for r in row.runs if r.record.fit_seconds is not None]
        hardware = "; ".join(sorted({r.record.hardware for r in row.runs}))
        rows.append([row.label, len(row.runs), *metrics, _epochs(row.runs), _duration(statistics.fmean(seconds)) if seconds else "?",
                     hardware, _published_cell(row.published())])
    explanation = ("Test metrics of the best-on-validation checkpoint, full corpus; mean ± sample std over seeds (±— for one run). "
                   "Fit time: mean wall time of `fit` (training and per-epoch evaluation).")
    lines = [explanation, "", _markdown(header, rows)]
    left_out = [r for r in runs if not r.ok]
    if left_out:
        lines += ["", f"Left out, not finished: {', '.join(f'{r.name} ({r.shown_status})' for r in left_out)}."]
    if command:
        lines += ["", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"


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
                        command: str | None = None) -> str:
    """``results_table.md`` in ``out_dir`` and, with ``readme``, the same table between that file's markers."""
    markdown = results_table(runs, command)
    if readme is not None:
        replace_marked_region(readme, markdown)  # before anything is written: a README without markers changes nothing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_TABLE_FILE).write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rails_lightning report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=help_description(
            "report",
            "Turn finished runs (run directories of `fit`, or local sweep directories) into a markdown "
            "comparison table (summary.md: the metric per run, mean ± std per model beside the most-popular baseline) "
            "and a PNG of HR@K against K per model (hr_at_k.png); --leaderboard ranks the runs, --table writes the "
            "reproduction table (one row per config, mean ± std over seeds, next to the published figure).",
        ),
    )
    parser.add_argument("runs", nargs="+", help="run directories (with run.json), folders of them, or local sweep directories")
    parser.add_argument("--out", default=None, help="output folder (default: sweeps_out/report-<date-time>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"headline metric of the tables (default {DEFAULT_METRIC})")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--leaderboard", action="store_true", help="rank every run by --metric instead (leaderboard.md)")
    kind.add_argument("--table", action="store_true", help="the reproduction table instead (results_table.md): one row per "
                      "config (its seeds together), test HR@1/10/50/200, NDCG@10, MRR as mean ± std, epochs, fit time, "
                      "hardware, the published figure")
    parser.add_argument("--readme", default=None, help=f"with --table: also put the table between the {RESULTS_TABLE_START} "
                        f"and {RESULTS_TABLE_END} lines of this file (e.g. README.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readme and not args.table:
        raise UserError("--readme needs --table (it puts the reproduction table into the file)")
    results = collect_runs(args.runs)
    out = Path(args.out or f"sweeps_out/report-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.table:
        command = shlex.join(["python", "-m", "rails_lightning", "report", "--table", *args.runs, *(["--readme", args.readme] if args.readme else [])])
        print(write_results_table(results, out, args.readme, command))
        print(f"[rails_lightning] results table: {out / RESULTS_TABLE_FILE}" + (f", {args.readme}" if args.readme else ""), flush=True)
        return 0
    if args.leaderboard:
        print(write_leaderboard(results, out, args.metric))
        print(f"[rails_lightning] leaderboard: {out / 'leaderboard.md'}", flush=True)
        return 0
    print(write_report(results, out, args.metric, title=f"{len(results)} runs"))
    print(f"[rails_lightning] report: {out / 'summary.md'}, {out / 'hr_at_k.png'}", flush=True)
    return 0
