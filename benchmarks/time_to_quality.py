"""Time to quality: test HR@10 against the wall time of fitting, one line per seed, read from every epoch's checkpoint.

    python benchmarks/time_to_quality.py --config configs/ml-1m/fast.yaml --seeds 0 1 2 --out OUT [--target 0.28]
    python benchmarks/time_to_quality.py RUN_DIR ... --out OUT          # fits that kept every epoch (KEEP_EVERY_EPOCH)

With ``--config`` each seed is one ``python -m rails_lightning fit`` (a subprocess, one at a time, so that each has
the machine to itself: its wall time is the figure) that keeps a checkpoint of every epoch beside the best one
(``KEEP_EVERY_EPOCH``, a second ``ModelCheckpoint``: checkpoints/every/epochNNN.ckpt). Then each epoch's checkpoint
is evaluated on the test split, in this process, once the fit is over: the fit never sees a test figure, its own
checkpoint selection stays on validation, and the evaluation's time is not in the fit's clock. Each point is
(the run's ``fit_seconds`` when that epoch's validation ended, from ``run.json``'s history; the test HR@10 of that
epoch's weights).

Writes OUT/time_to_quality.json (every point, and per run: the first time its test HR@10 reached the target, the
test HR@10 of its validation-selected checkpoint and the fit's wall time), OUT/time_to_quality.md (that table)
and OUT/time_to_quality.png (the curves, the target as a dashed line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rails_lightning.reports import format_duration  # noqa: E402
from rails_lightning.runs import RunRecord  # noqa: E402

KEEP_EVERY_EPOCH = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename=every/epoch{epoch:03d}",
    "--trainer.callbacks.auto_insert_metric_name=false",
]
METRIC = "test/hr@10"


def fit(config: str | None, seed: int, run_dir: Path, extra: list[str]) -> None:
    """One fit that keeps every epoch's checkpoint; W&B off (a benchmark, not a run to compare online)."""
    command = [sys.executable, "-m", "rails_lightning", "fit", *(["--config", config] if config else []), f"--seed_everything={seed}",
               f"--run_dir={run_dir}", "--trainer.logger=false", *KEEP_EVERY_EPOCH, *extra]
    print("[time_to_quality] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "WANDB_MODE": "disabled"})


def epoch_checkpoints(run_dir: Path) -> dict[int, Path]:
    folder = run_dir / "checkpoints" / "every"
    found = {int(path.stem.removeprefix("epoch")): path for path in folder.glob("epoch*.ckpt")}
    if not found:
        raise SystemExit(f"{run_dir}: no checkpoints/every/epochNNN.ckpt; fit it with this script (--config) or with {' '.join(KEEP_EVERY_EPOCH)}")
    return dict(sorted(found.items()))


def test_every_epoch(run_dir: Path, every: int = 1) -> list[dict[str, float]]:
    """The run's history points, each with the test metrics of that epoch's checkpoint; with ``every`` > 1 only every
    ``every``-th epoch's, the last one's and the validation-selected one's (a test pass costs about what an epoch's
    validation does)."""
    from rails_lightning.cli import main

    record = RunRecord.read(run_dir)
    if not record.ok or not record.history:
        raise SystemExit(f"{run_dir}: not a finished fit with a history (run.json)")
    checkpoints = epoch_checkpoints(run_dir)
    selected = next((row["epoch"] for row in record.history if record.checkpoint and Path(record.checkpoint).name.startswith(f"epoch{int(row['epoch']):03d}")), None)
    last = max(checkpoints)
    checkpoints = {epoch: path for epoch, path in checkpoints.items() if (epoch + 1) % every == 0 or epoch in (last, selected)}
    # The run's own model, data and trainer (not the fit's own options), the data prepared once; each checkpoint's
    # weights tested in turn.
    config = {key: value for key, value in yaml.safe_load((run_dir / "config.yaml").read_text()).items()
              if key in ("seed_everything", "trainer", "model", "data")}
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        cli = main(["--config", str(config_file), f"--run_dir={scratch}/run", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false"], run=False)
    points = []
    for row in record.history:
        epoch = int(row["epoch"])
        if epoch not in checkpoints:
            continue
        (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoints[epoch]), verbose=False)
        points.append({"epoch": epoch, "fit_seconds": row["fit_seconds"], "val/hr@10": row.get("val/hr@10"),
                       **{k: float(v) for k, v in metrics.items() if k.startswith("test/")}})
    return points


def summarise(runs: dict[str, list[dict]], records: dict[str, RunRecord], target: float) -> dict:
    summary = {}
    for name, points in runs.items():
        reached = next((p for p in points if p[METRIC] >= target), None)
        record = records[name]
        summary[name] = {
            "seed": record.config.get("seed_everything"),
            "epochs": record.epochs,
            "fit_seconds": record.fit_seconds,
            "selected_test_hr@10": record.test.get(METRIC),
            "first_reached_seconds": reached["fit_seconds"] if reached else None,
            "first_reached_epoch": reached["epoch"] if reached else None,
            "hardware": record.hardware,
        }
    return summary


def markdown(summary: dict, target: float) -> str:
    lines = [f"| run | seed | epochs | fit wall time | test HR@10 (validation-selected) | first tested epoch with test HR@10 >= {target} |",
             "|---|---|---|---|---|---|"]
    for name, row in summary.items():
        reached = "not reached" if row["first_reached_seconds"] is None else f"epoch {row['first_reached_epoch']}, {format_duration(row['first_reached_seconds'])}"
        lines.append(f"| {name} | {row['seed']} | {row['epochs']} | {format_duration(row['fit_seconds'])} | {row['selected_test_hr@10']:.4f} | {reached} |")
    selected = [row["selected_test_hr@10"] for row in summary.values()]
    seconds = [row["fit_seconds"] for row in summary.values()]
    if len(selected) > 1:
        lines.append(f"| mean ± std | | | {format_duration(statistics.mean(seconds))} ± {format_duration(statistics.stdev(seconds))} | "
                     f"{statistics.mean(selected):.4f} ± {statistics.stdev(selected):.4f} | |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], target: float, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in runs.items():
        ax.plot([p["fit_seconds"] / 60 for p in points], [p[METRIC] for p in points], marker=".", label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("wall time of fit (minutes)")
    ax.set_ylabel("test HR@10 of that epoch's weights")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", type=Path, help="finished fits that kept every epoch's checkpoint")
    parser.add_argument("--config", help="fit this config once per seed first (the runs go to OUT/seedS); with no RUN_DIR "
                        "and no --config, the embedded default is fitted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the fits with --config (default 0 1 2)")
    parser.add_argument("--target", type=float, default=0.28, help="the test HR@10 to reach (default 0.28)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--title", default="time to quality", help="the plot's title")
    parser.add_argument("--every", type=int, default=1, help="test every N-th epoch's weights only (and the last and the "
                        "validation-selected epoch's); default 1, every epoch")
    parser.epilog = "Arguments after -- are added to every fit (e.g. -- --trainer.max_epochs=2)."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    run_dirs = list(args.run_dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.config or not run_dirs:
        for seed in args.seeds:
            run_dir = args.out / f"seed{seed}"
            if not RunRecord.read(run_dir).ok:
                fit(args.config, seed, run_dir, extra)
            run_dirs.append(run_dir)
    runs = {run_dir.name: test_every_epoch(run_dir, args.every) for run_dir in run_dirs}
    records = {run_dir.name: RunRecord.read(run_dir) for run_dir in run_dirs}
    summary = summarise(runs, records, args.target)
    (args.out / "time_to_quality.json").write_text(json.dumps({"target": args.target, "runs": summary, "points": runs}, indent=1))
    table = markdown(summary, args.target)
    (args.out / "time_to_quality.md").write_text(table)
    plot(runs, args.target, args.out / "time_to_quality.png", args.title)
    print(table + f"written: {args.out / 'time_to_quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
