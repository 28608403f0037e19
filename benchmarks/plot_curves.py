"""Learning curves: a per-epoch metric of finished runs (the history in their ``run.json``), one line per run.

    python benchmarks/plot_curves.py RUN_DIR[=LABEL] ... --metric val/hr@10 --out curves.png

A finished ``python -m rails_lightning fit`` keeps its per-epoch full-corpus metrics in its run
record, ``<run_dir>/run.json`` (``RunRecord.history``), whatever the logger.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rails_lightning.runs import RECORD_FILE, RunRecord  # noqa: E402


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
