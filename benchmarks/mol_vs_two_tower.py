"""MoL vs TwoTower at an equal training budget: same data, encoder, epochs; mean ± std over seeds.

Runs ``python -m rails_lightning fit`` once per (model, seed) as a subprocess, each with its
own ``--run_dir``, reads every run's ``metrics.json`` (numbers of the best-on-val checkpoint)
and prints a side-by-side table. The default is the synthetic default: the TwoTower run is the
embedded default config, the MoL run adds ``--config configs/synthetic/mol.yaml`` (which
changes only the model).

    python benchmarks/mol_vs_two_tower.py                        # synthetic default, seeds 0 1 2
    python benchmarks/mol_vs_two_tower.py --seeds 0 --extra --trainer.max_epochs=2
    python benchmarks/mol_vs_two_tower.py --two_tower_config configs/ml-1m/two_tower_sasrec.yaml \\
        --mol_config configs/ml-1m/mol.yaml                      # ML-1M (hours on a CPU)

Runs are sequential by default (they share the machine; ``--jobs N`` runs N at once, for a GPU
machine with cores to spare); a finished run (its metrics.json exists) is reused unless
``--rerun``. W&B is off (``--trainer.logger=false``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("val/hr@10", "val/ndcg@10", "val/mrr", "test/hr@10", "test/ndcg@10", "test/mrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--two_tower_config", default=None, help="--config of the TwoTower runs (default: the embedded default)")
    parser.add_argument("--mol_config", default="configs/synthetic/mol.yaml", help="--config of the MoL runs")
    parser.add_argument("--two_tower_args", nargs="*", default=[], help="extra CLI arguments of the TwoTower runs only")
    parser.add_argument("--mol_args", nargs="*", default=[], help="extra CLI arguments of the MoL runs only")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra CLI arguments of every run (last)")
    parser.add_argument("--out_dir", default="runs/mol_vs_two_tower", help="one sub-directory per run")
    parser.add_argument("--rerun", action="store_true", help="run again even where metrics.json exists")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (1: sequential, for timings that compare)")
    parser.add_argument("--append_results", default=None, help="append the table as a markdown section to this file")
    args = parser.parse_args()

    models = {
        "TwoTower": (["--config", args.two_tower_config] if args.two_tower_config else []) + args.two_tower_args,
        "MoL": (["--config", args.mol_config] if args.mol_config else []) + args.mol_args,
    }
    env = {**os.environ, "WANDB_MODE": "disabled"}
    runs = [(seed, name, model_args) for seed in args.seeds for name, model_args in models.items()]

    def run(seed: int, name: str, model_args: list[str]) -> None:
        run_dir = Path(args.out_dir).resolve() / f"{name}-seed{seed}"
        if args.rerun or not (run_dir / "metrics.json").exists():
            command = [
                sys.executable, "-m", "rails_lightning", "fit", *model_args,
                f"--seed_everything={seed}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                "--run_dir", str(run_dir), *args.extra,
            ]
            print("$", " ".join(command), flush=True)
            started = time.perf_counter()
            run_dir.mkdir(parents=True, exist_ok=True)
            with (run_dir / "stdout.log").open("w") as log:
                subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
            print(f"  {name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run, *spec) for spec in runs]:
            future.result()  # re-raises a failed run's error
    total_seconds = time.perf_counter() - started
    results: dict[str, list[dict]] = {name: [] for name in models}
    for seed, name, _ in runs:
        result = json.loads((Path(args.out_dir).resolve() / f"{name}-seed{seed}" / "metrics.json").read_text())
        results[name].append({**result["val"], **result["test"], "fit_seconds": result["fit_seconds"]})

    width = max(len(k) for k in KEYS + ("fit_seconds",)) + 2
    print(f"\nmean ± std over seeds {args.seeds} (best-on-val checkpoint of each run)")
    print(f"{'':{width}s}" + "".join(f"{name:>22s}" for name in models))
    table = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key in KEYS + ("fit_seconds",):
        cells = []
        for name in models:
            values = [run[key] for run in results[name] if key in run]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}" if values else "n/a")
        print(f"{key:{width}s}" + "".join(f"{cell:>22s}" for cell in cells))
        table.append(f"| {key} | " + " | ".join(cells) + " |")
    per_seed = ", ".join(
        f"seed {s}: " + " vs ".join(f"{results[name][i]['val/hr@10']:.4f}" for name in models) for i, s in enumerate(args.seeds)
    )
    print(f"val/hr@10 per seed ({' vs '.join(models)}): {per_seed}")
    if args.append_results:
        path = Path(args.append_results)
        header = "" if path.exists() else "# Benchmark results\n\nMeasured figures, each with its command, machine and date.\n"
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
        with path.open("a") as f:
            f.write(
                f"{header}\n## MoL vs TwoTower, equal training budget ({date})\n\nCommand: `{command}`\n\n"
                f"Machine: {machine()}; {args.jobs} run(s) at a time, {total_seconds:.0f} s in all. "
                f"Mean ± std over seeds {args.seeds}; best-on-val checkpoint of each run.\n\n"
                + "\n".join(table) + f"\n\nval/hr@10 per seed ({' vs '.join(models)}): {per_seed}\n"
            )


def machine() -> str:
    cpu = f"{os.cpu_count()}-core CPU"
    return f"{torch.cuda.get_device_name()} + {cpu}" if torch.cuda.is_available() else cpu


if __name__ == "__main__":
    main()
