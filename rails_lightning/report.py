"""Compare finished runs: a markdown table and a PNG of HR@K against K per model (MoL vs dot product).

    python -m rails_lightning report runs/A runs/B ... [--out DIR] [--metric val/hr@10]
    python -m rails_lightning report sweeps_out/mol_vs_dot-20260101-120000     # a local sweep

A run is a run directory of ``python -m rails_lightning fit`` (``metrics.json``, ``config.yaml``);
a local sweep directory (``sweep.json``) stands for all of its trials. Numbers are those of
``metrics.json``: the best-on-validation checkpoint on val and test, and the most-popular
baseline on the same split. Models are grouped by class; each group reports mean ± std over
its runs (seeds). ``read_wandb_run`` reads a run's offline W&B files (config and per-step
history) without a W&B server.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

DEFAULT_METRIC = "val/hr@10"
TABLE_KEYS = ("val/hr@10", "val/ndcg@10", "test/hr@10", "test/ndcg@10", "test/mrr")
MODEL_LABELS = {"TwoTower": "TwoTower (dot product)", "MoL": "MoL (mixture of logits)"}


# ---------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    """One finished (or failed) run: where it is, what it was, what it measured."""

    name: str
    run_dir: Path
    model: str = "?"
    seed: int | None = None
    status: str = "finished"
    params: dict[str, Any] = field(default_factory=dict)  # swept parameters (short names) of a sweep trial
    metrics: dict[str, float] = field(default_factory=dict)  # val/... and test/... of the best checkpoint
    baseline: dict[str, float] = field(default_factory=dict)  # most popular items, same keys
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished" and bool(self.metrics)


def load_run(run_dir: str | Path, name: str | None = None) -> RunResult:
    """A run directory -> ``RunResult`` (status ``missing metrics.json`` when the run did not finish)."""
    run_dir = Path(run_dir)
    result = RunResult(name=name or run_dir.name, run_dir=run_dir)
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        config = yaml.safe_load(config_path.read_text()) or {}
        result.seed = config.get("seed_everything")
        class_path = str((config.get("model") or {}).get("class_path", "?"))
        result.model = class_path.rsplit(".", 1)[-1]
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        result.status = "missing metrics.json"
        return result
    data = json.loads(metrics_path.read_text())
    if "baseline_popularity" not in data:  # written by a validate/test run or an interrupted fit
        result.status = "unfinished fit"
    result.model = data.get("model", result.model)
    result.metrics = {k: float(v) for section in ("val", "test") for k, v in (data.get(section) or {}).items()}
    result.baseline = {k: float(v) for k, v in (data.get("baseline_popularity") or {}).items()}
    result.seconds = data.get("fit_seconds")
    return result


def collect_runs(paths: Iterable[str | Path]) -> list[RunResult]:
    """Run directories, local sweep directories (all their trials) -> results, in order."""
    results = []
    for path in map(Path, paths):
        if (path / "sweep.json").exists():
            results += sweep_results(path)
        elif (path / "metrics.json").exists() or (path / "config.yaml").exists():
            results.append(load_run(path))
        else:  # a folder of run directories
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.json").exists()) if path.is_dir() else []
            if not children:
                raise FileNotFoundError(f"{path}: no metrics.json, config.yaml or sweep.json here or one level down")
            results += [load_run(child) for child in children]
    return results


def sweep_results(sweep_dir: Path) -> list[RunResult]:
    """The trials of a local sweep (``sweep.json`` written by ``rails_lightning.sweep``)."""
    record = json.loads((sweep_dir / "sweep.json").read_text())
    results = []
    for trial in record["trials"]:
        result = load_run(sweep_dir / trial["name"], name=trial["name"])
        result.params = trial.get("params", {})
        if trial.get("status") != "finished":
            result.status = trial.get("status", "failed")
        if result.model == "?" and trial.get("model"):
            result.model = trial["model"]
        results.append(result)
    return results


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


def group_by_model(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Model class -> its runs; the dot-product baseline first, then MoL, then the rest."""
    order = {"TwoTower": 0, "MoL": 1}
    groups: dict[str, list[RunResult]] = {}
    for result in sorted(results, key=lambda r: order.get(r.model, 2)):
        groups.setdefault(result.model, []).append(result)
    return groups


def comparison_markdown(results: Sequence[RunResult], metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """Per-run table (metric per run) and per-model table (mean ± std over runs), with the popularity baseline."""
    keys = [metric] + [k for k in TABLE_KEYS if k != metric]
    param_names = [n for n in dict.fromkeys(name for r in results for name in r.params) if n not in ("model", "seed")]
    header = ["run", "model", *param_names, "seed", "status", *keys, "fit s"]
    rows = [
        [r.name, r.model, *(_param(r.params.get(p, "")) for p in param_names), "" if r.seed is None else r.seed, r.status,
         *(r.metrics.get(k, math.nan) for k in keys), "" if r.seconds is None else f"{float(r.seconds):.0f}"]
        for r in results
    ]
    parts = [f"## {title}" if title else "## Runs", "", _markdown(header, rows), ""]

    header = ["model", "runs ok / all", *(f"{k} (mean ± std)" for k in keys)]
    rows = []
    for model, runs in group_by_model(results).items():
        ok = [r for r in runs if r.ok]
        cells = []
        for key in keys:
            mean, std = _mean_std([r.metrics[key] for r in ok if key in r.metrics])
            cells.append("—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        rows.append([MODEL_LABELS.get(model, model), f"{len(ok)} / {len(runs)}", *cells])
    baselines = [r.baseline for r in results if r.ok and r.baseline]
    if baselines:
        cells = []
        for key in keys:
            mean, std = _mean_std([b[key] for b in baselines if key in b])
            cells.append("—" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        rows.append(["most popular items (baseline)", f"{len(baselines)} / {len(baselines)}", *cells])
    parts += ["## Per model: mean ± std over runs (seeds)", "", _markdown(header, rows), ""]
    failed = [r for r in results if not r.ok]
    if failed:
        parts += [f"{len(failed)} run(s) did not finish: " + ", ".join(f"{r.name} ({r.status}; log: {r.run_dir}/trial.log)" for r in failed), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------- plot
def _ks(results: Sequence[RunResult], stage: str) -> list[int]:
    found = {int(k.split("@")[1]) for r in results for k in r.metrics if k.startswith(f"{stage}/hr@")}
    return sorted(found)


def plot_hr_at_k(results: Sequence[RunResult], path: str | Path, stages: Sequence[str] = ("val", "test")) -> Path:
    """PNG of HR@K against K per model (mean ± std over its runs) beside the popularity baseline, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ks = _ks(ok, stage)
        for model, runs in group_by_model(ok).items():
            curves = [[r.metrics.get(f"{stage}/hr@{k}", math.nan) for k in ks] for r in runs]
            stats = [_mean_std([c[i] for c in curves if not math.isnan(c[i])]) for i in range(len(ks))]
            means, stds = [s[0] for s in stats], [s[1] for s in stats]
            label = f"{MODEL_LABELS.get(model, model)}, n={len(runs)}"
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=4, label=label)
        baseline = [r.baseline for r in ok if r.baseline]
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


def write_report(results: Sequence[RunResult], out_dir: str | Path, metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """``summary.md`` and ``hr_at_k.png`` in ``out_dir``; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(results, metric, title)
    if any(r.ok for r in results):
        plot_hr_at_k(results, out_dir / "hr_at_k.png")
        markdown += "\n![HR@K against K per model](hr_at_k.png)\n"
    (out_dir / "summary.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------- models of runs
def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None):
    """(model in eval mode, DataModule) of a finished run: rebuilt from its ``config.yaml``, weights from
    ``checkpoint`` (default: the best checkpoint named in ``metrics.json``, else ``checkpoints/last.ckpt``)."""
    import tempfile

    import torch

    from rails_lightning.cli import main

    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Only the run's pieces: subcommand options (ckpt_path, weights_only, ...) are not the model's.
    config = {k: v for k, v in config.items() if k in ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")}
    if checkpoint is None:
        metrics = run_dir / "metrics.json"
        best = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.exists() else None
        checkpoint = best or run_dir / "checkpoints" / "last.ckpt"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file)
    try:
        cli = main(["--config", file.name, f"--run_dir={run_dir}", "--trainer.logger=false"], run=False)
    finally:
        Path(file.name).unlink(missing_ok=True)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    cli.model.load_state_dict(state)
    return cli.model.eval(), cli.datamodule


# ---------------------------------------------------------------------------------------- W&B offline files
_BLOCK, _HEADER = 32768, 7  # the LevelDB log layout of W&B's .wandb transaction files
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _HEADER:  # block trailer
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0:  # zero padding up to the end of the block
            position += room
            continue
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


@dataclass
class WandbRunFiles:
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]

    def series(self, key: str, step: str = "epoch") -> list[tuple[Any, float]]:
        """(step, value) of every history row holding ``key``."""
        return [(row.get(step), row[key]) for row in self.history if key in row]


def read_wandb_run(path: str | Path) -> WandbRunFiles:
    """Config, history rows and summary of a W&B run from its local files (offline or synced).

    ``path``: a ``.wandb`` file, a W&B run folder, a ``wandb/`` folder or a run directory
    (the latest W&B run under it is read).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"no W&B run file (run-*.wandb) under {path}")
        path = files[-1]
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return WandbRunFiles(path, config, history, summary)


# ---------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rails_lightning report",
        description="Turn finished runs (run directories of `fit`, or local sweep directories) into a markdown "
        "comparison table (summary.md: the metric per run, mean ± std per model beside the most-popular baseline) "
        "and a PNG of HR@K against K per model (hr_at_k.png).",
    )
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.json), folders of them, or local sweep directories")
    parser.add_argument("--out", default=None, help="output folder (default: sweeps_out/report-<date-time>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"headline metric of the tables (default {DEFAULT_METRIC})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = collect_runs(args.runs)
    out = Path(args.out or f"sweeps_out/report-{time.strftime('%Y%m%d-%H%M%S')}")
    print(write_report(results, out, args.metric, title=f"{len(results)} runs"))
    print(f"[rails_lightning] report: {out / 'summary.md'}, {out / 'hr_at_k.png'}", flush=True)
    return 0
