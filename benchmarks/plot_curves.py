"""Learning curves: a per-epoch metric of finished runs (CSVLogger ``version_*/metrics.csv``), one line per run.

    python benchmarks/plot_curves.py RUN_DIR[=LABEL] ... --metric val/hr@10 --out curves.png

Runs logged with ``--trainer.logger=CSVLogger`` keep their per-epoch full-corpus metrics in
``<run_dir>/version_N/metrics.csv``; W&B runs keep them in the W&B run (and its offline files).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``metric`` in a run's CSVLogger files, for the epochs that trained.

    (The final evaluation of the best checkpoint after ``fit`` is logged one epoch past the last.)
    """
    by_epoch: dict[int, float] = {}
    trained: set[int] = set()
    files = sorted(run_dir.glob("version_*/metrics.csv"))
    if not files:
        raise SystemExit(f"{run_dir}: no version_*/metrics.csv (was the run logged with --trainer.logger=CSVLogger?)")
    for path in files:
        for row in csv.DictReader(path.open()):
            if any(value and key.startswith("train/") for key, value in row.items()):
                trained.add(int(row["epoch"]))
            if row.get(metric):
                by_epoch.setdefault(int(row["epoch"]), float(row[metric]))  # the first: the epoch's own validation
    epochs = sorted(epoch for epoch in by_epoch if epoch in trained or not trained)
    return epochs, [by_epoch[e] for e in epochs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, each optionally =LABEL")
    parser.add_argument("--metric", default="val/hr@10")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec in args.runs:
        path, _, label = spec.partition("=")
        epochs, values = read_curve(Path(path), args.metric)
        ax.plot([e + 1 for e in epochs], values, label=label or Path(path).name, linewidth=1.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel(args.metric)
    ax.set_title(args.title or f"{args.metric} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
