"""Learning curves: a per-epoch metric of finished runs, one colour per model: the mean over its seeds and a band.

    python benchmarks/plot_curves.py RUN_DIR[=LABEL] ... [--metric val/hr@10] [--band minmax|std|none] --out curves.png

Runs with the same LABEL are the seeds of one model: they are drawn as one line, the mean over the
seeds at each epoch, in one colour, with a band around it (the seeds' minimum to maximum by default,
``--band std`` for mean ± sample standard deviation, ``--band none`` for the mean alone); the legend
gives each model's number of seeds. A run given without ``=LABEL`` is grouped with the other runs of
its config, as ``python -m rails_lightning report --table`` groups them (runs that differ only by seed
and paths; labelled ``ml-1m SASRec TwoTower`` and the like). At an epoch that only some seeds reached,
the mean is over those.

A finished ``python -m rails_lightning fit`` keeps its per-epoch full-corpus metrics in its run
record, ``<run_dir>/run.json`` (``RunRecord.history``), whatever the logger.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rails_lightning.reports import ReportedRun, group_by_config  # noqa: E402
from rails_lightning.runs import RECORD_FILE, RunRecord  # noqa: E402

BANDS = ("minmax", "std", "none")


def read_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``metric`` in a run's record, for the epochs that trained.

    (The final evaluation of the best checkpoint after ``fit`` is recorded one epoch past the last.)
    """
    record = RunRecord.read(run_dir)
    if record.status == "missing":
        raise SystemExit(f"{run_dir}: no {RECORD_FILE} (did the run finish a `fit`?)")
    if not record.history:
        raise SystemExit(f"{run_dir}: {RECORD_FILE} has no per-epoch history (status {record.status})")
    by_epoch: dict[int, float] = {}
    for row in record.history:
        if row.get(metric) is not None:
            by_epoch.setdefault(int(row["epoch"]), float(row[metric]))  # the first: the epoch's own validation
    epochs = sorted(epoch for epoch in by_epoch if record.epochs is None or epoch < record.epochs)
    return epochs, [by_epoch[e] for e in epochs]


def group_runs(specs: list[str]) -> dict[str, list[Path]]:
    """``RUN_DIR[=LABEL]`` arguments -> {label: run directories}, in the order the labels first appear.

    Labelled runs group by their label; unlabelled ones by config (``reports.group_by_config``)."""
    labelled: list[tuple[str | None, Path]] = []
    for spec in specs:
        path, _, label = spec.partition("=")
        labelled.append((label or None, Path(path)))
    unlabelled = [path for label, path in labelled if label is None]
    config_label: dict[Path, str] = {}
    if unlabelled:
        runs = [ReportedRun(RunRecord.read(path), str(path)) for path in unlabelled]
        for row in group_by_config(runs):
            for run in row.runs:
                config_label[Path(run.name)] = row.label
    groups: dict[str, list[Path]] = {}
    for label, path in labelled:
        groups.setdefault(label or config_label.get(path, path.name), []).append(path)
    return groups


def mean_and_band(curves: list[tuple[list[int], list[float]]], band: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Seeds' curves -> (epochs, mean, band low, band high) at every epoch any seed reached."""
    values: dict[int, list[float]] = {}
    for epochs, ys in curves:
        for epoch, y in zip(epochs, ys):
            values.setdefault(epoch, []).append(y)
    epochs = sorted(values)
    means = [statistics.fmean(values[e]) for e in epochs]
    if band == "minmax":
        low, high = [min(values[e]) for e in epochs], [max(values[e]) for e in epochs]
    elif band == "std":
        stds = [statistics.stdev(values[e]) if len(values[e]) > 1 else 0.0 for e in epochs]
        low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
    else:
        low, high = means, means
    return epochs, means, low, high


def draw(groups: dict[str, list[Path]], metric: str, band: str = "minmax", title: str | None = None):
    """The figure: one line (the mean over seeds) and one band per group, each group its own colour."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    band_name = {"minmax": "min-max over seeds", "std": "± std over seeds", "none": ""}[band]
    for index, (label, paths) in enumerate(groups.items()):
        colour = colours[index % len(colours)]
        epochs, means, low, high = mean_and_band([read_curve(path, metric) for path in paths], band)
        x = [e + 1 for e in epochs]
        seeds = f"{len(paths)} seed{'s' if len(paths) > 1 else ''}"
        ax.plot(x, means, color=colour, linewidth=1.6, label=f"{label} (mean of {seeds})" if len(paths) > 1 else f"{label} ({seeds})")
        if band != "none" and len(paths) > 1:
            ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per epoch" + (f" (band: {band_name})" if band_name else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(groups: dict[str, list[Path]], metric: str, out: str | Path, band: str = "minmax", title: str | None = None) -> Path:
    """``draw``, saved as a PNG; returns its path."""
    fig = draw(groups, metric, band, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, each optionally =LABEL (the same label: seeds of one model)")
    parser.add_argument("--metric", default="val/hr@10")
    parser.add_argument("--band", choices=BANDS, default="minmax", help="band around each model's mean over its seeds")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args()
    groups = group_runs(args.runs)
    out = plot(groups, args.metric, args.out, args.band, args.title)
    for label, paths in groups.items():
        print(f"{label}: {len(paths)} run(s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
