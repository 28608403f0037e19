"""What a lent GPU must measure, as one command that ends inside 9 minutes on one H100: the MoL training-step cost
users meet there, exact top-k over a million items against FAISS, and what the full RAILS ML-1M reproduction costs.

Three parts run one after another inside a hard time budget (``--budget_s``). Each has its own deadline, stops
cleanly when it passes (between steps, searches or epochs) and records how far it got:

a. **Training-step ratio.** For each of ``--step_configs`` (by default the RAILS shape, configs/ml-1m/hstu_mol.yaml,
   and SASRec + MoL, configs/ml-1m/mol.yaml) the config as it is (MoL) and the same config with the dot product
   (``--model.similarity=rails_lightning.similarity.DotProduct``: the two-tower model, nothing else changed) are
   built by the CLI's own parser (``train_step_cost.build``), moved to the device and fed the same training
   batches in turn, with the same negatives (the generator is seeded per batch). A step is
   ``train_step_cost.timed_step``: forward in the trainer's precision, backward, AdamW step, each phase ended by a
   device synchronisation; matrix products in TF32 where the config asks for it (hstu_mol.yaml), else float32. The first ``--warmup`` steps are not counted. Records the median forward, backward,
   optimiser and step milliseconds of each and the MoL / two-tower step ratio.
b. **Exact top-k at scale.** ``--topk_items`` random item vectors and ``--topk_queries`` queries of dimension
   ``--topk_dim``, top ``--topk_k``: the framework's exact chunked torch top-k on the device
   (``inner_product_retriever`` with ``backend="torch"``, at each ``--topk_block_elements``) against its FAISS flat
   index (``backend="faiss"``), on the GPU where ``faiss.get_num_gpus() > 0`` (``faiss.StandardGpuResources``),
   otherwise "FAISS-GPU not available" and the same index on the CPU. Median search seconds after one untimed
   search, the index's build seconds, and how many of torch's top-k ids FAISS finds (ties aside, all).
c. **The reproduction's cost.** configs/ml-1m/hstu_mol.yaml, one process per seed of sweeps/hstu_mol_ml1m.yaml side
   by side on the one device, through the framework's own ``python -m rails_lightning sweep
   sweeps/hstu_mol_ml1m.yaml --parallel 3`` (or, where the sweep engine -- the ``sweeps`` and ``wandb`` packages --
   is not installed, three ``fit`` processes), each stopped by Lightning's timer (``--trainer.max_time``) early
   enough to test its best-on-validation checkpoint inside the budget. Records per seed the epochs done, the first
   epoch's and the later epochs' seconds (from each epoch's fit time in the run record), val and test HR@10, and
   extrapolates the config's full epochs x 3 seeds.

All figures go to one JSON file (``--out``) and a markdown rendering beside it (the same name, ``.md``: command,
device, torch and faiss versions, date and the three tables), ready to paste into benchmarks/RESULTS.md. The exit
status is 1 when a part failed (its error is in the file) and 0 otherwise.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json                   # on the GPU
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json       # CPU, tiny shapes, seconds

On a lent GPU machine the checkout travels without the ``../shared`` folder beside it: copy ``../shared/data/ml-1m``
into a folder of the checkout that git ignores (say ``.gpu_data/ml-1m``, never committed: the MovieLens licence
forbids redistribution), send that folder along, and run there, from the repository root, with its output folder
OUT:

    PYTHONPATH=. python benchmarks/gpu_check.py --data_dir .gpu_data/ml-1m --out OUT/gpu_check.json

The machine needs this project's dependencies (jsonargparse, datasets; faiss for part b's FAISS row) beside the
PyTorch and Lightning it has; the run folders of part c go to a temporary folder (``--work_dir``), not OUT.
``--tiny`` runs every part on the CPU at tiny sizes (a synthetic data set instead of ML-1M, 2 + 1 steps, 5,000
items, 2 epochs per seed): it checks that the command works, and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAILS_CONFIG = "configs/ml-1m/hstu_mol.yaml"
RAILS_SWEEP = "sweeps/hstu_mol_ml1m.yaml"
DOT_PRODUCT = "--model.similarity=rails_lightning.similarity.DotProduct"
#: --tiny: the configs' model shrunk and the data made synthetic (150 users, 200 items), for seconds on a CPU.
TINY_DATA = [
    "--data.source=rails_lightning.data.SyntheticSource", "--data.source.init_args.num_users=150",
    "--data.source.init_args.num_items=200", "--data.source.init_args.num_clusters=8",
    "--data.source.init_args.mean_sequence_length=12", "--data.max_seq_len=12", "--data.batch_size=32",
]  # fmt: skip
TINY_MODEL = [
    "--model.item_dim=16", "--model.query_encoder.init_args.num_layers=1",
    "--model.query_encoder.init_args.time_bias_buckets=0",  # synthetic events have no times
    "--model.similarity.init_args.component_dim=8", "--model.similarity.init_args.component_hidden_dim=16",
    "--model.similarity.init_args.gate_hidden_dim=16", "--model.similarity.init_args.approximate_topk=null",
]  # fmt: skip
TINY_OBJECTIVE = ["--model.objective.init_args.num_negatives=16"]
#: --tiny: the defaults it changes (options given on the command line still win).
TINY = {"step_configs": [RAILS_CONFIG], "steps": 2, "warmup": 1, "topk_items": 5_000, "topk_queries": 64, "topk_dim": 16,
        "topk_block_elements": [1 << 16], "topk_repeats": 2, "budget_s": 240.0, "step_seconds": 60.0, "topk_seconds": 30.0,
        "fit_reserve_s": 45.0, "device": "cpu"}  # fmt: skip
PARTS = ("a", "b", "c")


# ---------------------------------------------------------------------------------------------------- a. step ratio
def measure_step_ratio(configs: list[str], options: list[str], steps: int, warmup: int, device, deadline: float) -> dict:
    """MoL against the same config with the dot product, on the same batches and negatives, interleaved step by step."""
    import torch

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no trainer is attached here
    rows = []
    for config in configs:
        if time.monotonic() > deadline:
            rows.append({"config": config, "status": "not started: the part's deadline had passed"})
            continue
        rows.append(_step_ratio_of(config, options, steps, warmup, device, deadline))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next config's models start from a free device
    return {"rows": rows}


def _step_ratio_of(config: str, options: list[str], steps: int, warmup: int, device, deadline: float) -> dict:
    """One config's row: median phase milliseconds of its MoL and of its dot-product twin, and their step ratio."""
    import torch

    from train_step_cost import build, timed_step  # benchmarks/ is this script's folder, hence on sys.path

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Full float32 matrix products unless the config asks otherwise (hstu_mol.yaml: TF32), as `fit` would run it.
    torch.set_float32_matmul_precision("highest")
    base = ["--config", config, *options]
    variants = {"MoL": base, "two-tower": [*base, DOT_PRODUCT]}  # the similarity switch last: it drops MoL's options
    built = {}
    for name, variant in variants.items():
        model, _, datamodule, step_context = build(variant)
        model.to(device)
        built[name] = (model, model.build_optimizer(), step_context)  # over the parameters as they now are
    batches = []
    for batch in datamodule.train_dataloader():  # the same data for both (only the similarity differs)
        batches.append(batch)
        if len(batches) == steps + warmup:
            break
    times = {name: [] for name in built}
    for index, batch in enumerate(batches):
        if time.monotonic() > deadline:
            break
        for name, (model, optimiser, step_context) in built.items():
            moved = model.transfer_batch_to_device(batch, device, 0)
            torch.manual_seed(index)  # the same negatives and dropout draws for both
            measured = timed_step(model, optimiser, moved, index, step_context, synchronise)
            if index >= warmup:
                times[name].append(measured)
    counted = min(len(values) for values in times.values())
    row = {"config": config, "options": options, "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "counted_steps": counted, "warmup_steps": warmup, "batch_size": batches[0].input_ids.shape[0] if batches else None,
           "max_seq_len": batches[0].input_ids.shape[1] if batches else None,
           "status": "done" if counted == steps else f"stopped at the deadline after {counted} of {steps} counted steps"}
    if counted:
        for name, measured in times.items():
            forward, backward, optimiser_s = (statistics.median(column) * 1e3 for column in zip(*measured))
            row[name] = {"forward_ms": forward, "backward_ms": backward, "optimiser_ms": optimiser_s,
                         "step_ms": statistics.median(sum(step) for step in measured) * 1e3}
        row["ratio"] = row["MoL"]["step_ms"] / row["two-tower"]["step_ms"]
    if device.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return row


# ---------------------------------------------------------------------------------------------------- b. top-k
def measure_topk(num_items: int, num_queries: int, dim: int, k: int, block_elements: list[int], repeats: int, device,
                 deadline: float) -> dict:
    """Exact torch top-k (each block size) and FAISS's flat index over the same random vectors."""
    import torch

    from rails_lightning.retrieval import SearchOptions, inner_product_retriever

    torch.set_float32_matmul_precision("highest")  # exact float32 scores, as FAISS's: no TF32 rounding between them
    generator = torch.Generator().manual_seed(0)
    items_cpu = torch.randn(num_items, dim, generator=generator)  # (N, D)
    queries_cpu = torch.randn(num_queries, dim, generator=generator)  # (Q, D)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_searches(retriever, queries) -> tuple[list[float], torch.Tensor]:
        """One untimed search, then up to ``repeats`` timed ones while the deadline allows."""
        _, ids = retriever.search(queries, k)
        synchronise()
        seconds = []
        while len(seconds) < repeats and time.monotonic() < deadline:
            started = time.perf_counter()
            retriever.search(queries, k)
            synchronise()
            seconds.append(time.perf_counter() - started)
        return seconds, ids.cpu()

    result = {"items": num_items, "queries": num_queries, "dim": dim, "k": k, "rows": []}
    items, queries = items_cpu.to(device), queries_cpu.to(device)
    exact_ids = None
    for block in block_elements:
        if time.monotonic() > deadline:
            result["rows"].append({"search": f"torch, blocks of {block:,} scores", "status": "not run: the part's deadline had passed"})
            continue
        retriever = inner_product_retriever(items, SearchOptions(backend="torch", score_block_elements=block))
        seconds, ids = timed_searches(retriever, queries)
        exact_ids = ids if exact_ids is None else exact_ids
        result["rows"].append(_search_row(f"torch on {device.type}, blocks of {block:,} scores", seconds, repeats, None, None))
    try:
        import faiss
    except ImportError:
        result["faiss"] = "faiss not installed"
        return result
    gpus = faiss.get_num_gpus()
    on_gpu = device.type == "cuda" and gpus > 0
    result["faiss"] = "FAISS-GPU" if on_gpu else "FAISS-GPU not available" if device.type == "cuda" else "FAISS-CPU"
    if time.monotonic() > deadline:
        result["rows"].append({"search": "FAISS flat", "status": "not run: the part's deadline had passed"})
        return result
    # FAISS on the device's vectors where it has a GPU (the framework then builds a GPU index), else on the CPU's.
    vectors, searched = (items, queries) if on_gpu else (items_cpu, queries_cpu)
    started = time.perf_counter()
    retriever = inner_product_retriever(vectors, SearchOptions(backend="faiss"))
    synchronise()
    build = time.perf_counter() - started
    seconds, ids = timed_searches(retriever, searched)
    where = "GPU" if on_gpu else f"CPU, {faiss.omp_get_max_threads()} threads"
    recall = _overlap(ids, exact_ids) if exact_ids is not None else None
    result["rows"].append(_search_row(f"FAISS IndexFlatIP ({where})", seconds, repeats, build, recall))
    return result


def _search_row(name: str, seconds: list[float], repeats: int, build: float | None, recall: float | None) -> dict:
    return {"search": name, "timed_searches": len(seconds), "median_s": statistics.median(seconds) if seconds else None,
            "build_s": build, "recall_vs_torch": recall,
            "status": "done" if len(seconds) == repeats else f"stopped at the deadline after {len(seconds)} of {repeats} timed searches"}


def _overlap(found, exact) -> float:
    """Share of the exact top-k ids (Q, k) that ``found`` (Q, k) also holds."""
    return float((found[:, :, None] == exact[:, None, :]).any(-1).float().mean())


# ---------------------------------------------------------------------------------------------------- c. the fits
def run_fits(args, deadline: float, work_dir: Path) -> dict:
    """The sweep's seeds side by side, each stopped by Lightning's timer; what each got through, and the extrapolation."""
    import yaml

    sweep_config = yaml.safe_load((REPO / RAILS_SWEEP).read_text())
    seeds = list(sweep_config["parameters"]["seed_everything"]["values"])
    full_epochs = int(yaml.safe_load((REPO / RAILS_CONFIG).read_text())["trainer"]["max_epochs"])
    fit_seconds = deadline - time.monotonic() - args.fit_reserve_s
    result = {"config": RAILS_CONFIG, "seeds": seeds, "full_epochs": full_epochs}
    if fit_seconds < 10:
        return {**result, "status": f"not started: {fit_seconds + args.fit_reserve_s:.0f} s left, the fits need more than "
                f"--fit_reserve_s ({args.fit_reserve_s:.0f} s) + 10 s"}
    runner = args.runner
    if runner == "auto":
        import importlib.util

        runner = "sweep" if all(importlib.util.find_spec(name) for name in ("sweeps", "wandb")) else "fit"
    extra = [f"--trainer.max_time={_dhms(fit_seconds)}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             *([*TINY_DATA, *TINY_MODEL, *TINY_OBJECTIVE, f"--trainer.max_epochs={args.tiny_epochs}"] if args.tiny
               else [f"--data.source.init_args.data_dir={args.data_dir}"])]
    result.update(runner=runner, max_time_s=int(fit_seconds), extra_args=extra)
    log_path = work_dir / "fits.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    started = time.monotonic()
    with open(log_path, "w") as log:
        if runner == "sweep":
            out = work_dir / "sweep"
            command = [sys.executable, "-m", "rails_lightning", "sweep", RAILS_SWEEP, "--parallel", str(len(seeds)), "--out", str(out), "--", *extra]
            processes = [subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)]
        else:
            out = work_dir / "fits"
            threads = str(max(1, (os.cpu_count() or 1) // len(seeds)))
            processes = [
                subprocess.Popen([sys.executable, "-m", "rails_lightning", "fit", "--config", RAILS_CONFIG, f"--seed_everything={seed}",
                                  f"--run_dir={out / f'seed{seed}'}", *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 env={**env, "OMP_NUM_THREADS": threads}, start_new_session=True)
                for seed in seeds
            ]  # fmt: skip
        result["command"] = shlex.join(["python", *processes[0].args[1:]]) if runner == "sweep" else \
            f"python -m rails_lightning fit --config {RAILS_CONFIG} --seed_everything=S --run_dir=DIR/seedS " + shlex.join(extra)
        stopped = wait_or_stop(processes, deadline - 5)
    result["wall_s"] = time.monotonic() - started
    result["status"] = "stopped at the part's deadline (a run without run.json is read from its last.ckpt)" if stopped else "done"
    runs = _sweep_runs(out, seeds) if runner == "sweep" else {seed: out / f"seed{seed}" for seed in seeds}
    result["runs"] = [run_progress(seed, run_dir) for seed, run_dir in runs.items()]
    result["extrapolation"] = _extrapolate(result["runs"], full_epochs)
    if not any(run["epochs"] for run in result["runs"]):
        result["status"] = "failed: no seed finished an epoch"
        result["log_tail"] = log_path.read_text()[-3000:]
    return result


def _dhms(seconds: float) -> str:
    """Lightning's ``max_time`` string, DD:HH:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def wait_or_stop(processes: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for the processes; past ``deadline``, interrupt them (a sweep stops its trials on Ctrl-C), then kill their
    process groups. Returns whether they had to be stopped."""
    while time.monotonic() < deadline:
        if all(process.poll() is not None for process in processes):
            return False
        time.sleep(0.5)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):  # it may end between the check and the signal
            os.killpg(process.pid, signal.SIGINT)
    grace = time.monotonic() + 10
    while time.monotonic() < grace and any(process.poll() is None for process in processes):
        time.sleep(0.5)
    for process in processes:  # whatever is left of each group (each process started its own session)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return True


def _sweep_runs(out: Path, seeds: list) -> dict:
    """seed -> run directory of a local sweep's trials (from its sweep.json)."""
    record = out / "sweep.json"
    if not record.is_file():
        return {seed: out / f"missing-seed{seed}" for seed in seeds}
    trials = json.loads(record.read_text())["trials"]
    return {trial["config"]["seed_everything"]["value"]: out / trial["name"] for trial in trials}


def run_progress(seed, run_dir: Path) -> dict:
    """What one seed's run got through: from its run record when it finished, else from its last checkpoint."""
    from rails_lightning.runs import RunRecord

    record = RunRecord.read(run_dir)
    history, fit_seconds, source = record.history, record.fit_seconds, "run.json"
    if not record.ok:
        history, fit_seconds, source = *_checkpoint_progress(run_dir), "checkpoints/last.ckpt"
    times = [row["fit_seconds"] for row in history if row.get("fit_seconds") is not None]
    later = [b - a for a, b in zip(times, times[1:])]
    val = [row.get("val/hr@10") for row in history]
    best = max(range(len(val)), key=lambda i: val[i]) if val else None
    return {
        "seed": seed, "status": record.status, "read_from": source, "epochs": len(history),
        "fit_s": fit_seconds, "first_epoch_s": times[0] if times else None,
        "later_epoch_s": statistics.median(later) if later else None,
        "best_epoch": history[best]["epoch"] if best is not None else None,
        "best_val_hr@10": val[best] if best is not None else None,
        "val_hr@10": record.val.get("val/hr@10") if record.ok else None,
        "test_hr@10": record.test.get("test/hr@10") if record.ok else None,
        "test_ndcg@10": record.test.get("test/ndcg@10") if record.ok else None,
        "curve": [{"epoch": row["epoch"], "fit_s": row.get("fit_seconds"), "val_hr@10": row.get("val/hr@10")} for row in history],
    }


def _checkpoint_progress(run_dir: Path) -> tuple[list[dict], float | None]:
    """The evaluation callback's history and fit time from a stopped run's last checkpoint (none without one)."""
    import torch

    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return [], None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in (state.get("callbacks") or {}).items():
        if key.startswith("CorpusEvaluation") and isinstance(value, dict) and "history" in value:
            return list(value["history"]), value.get("fit_seconds")
    return [], None


def _extrapolate(runs: list[dict], full_epochs: int) -> dict:
    """The config's full epochs per seed, at the first epoch's seconds plus the later epochs' median, side by side as measured."""
    from rails_lightning.reports import format_duration

    per_seed = [run["first_epoch_s"] + (full_epochs - 1) * (run["later_epoch_s"] or run["first_epoch_s"])
                for run in runs if run["first_epoch_s"] is not None]
    if not per_seed:
        return {"status": "nothing to extrapolate from: no epoch finished"}
    side_by_side = max(per_seed)
    return {
        "full_epochs": full_epochs, "seeds_measured": len(per_seed), "fit_s_per_seed": per_seed,
        "side_by_side_s": side_by_side,
        "text": f"{full_epochs} epochs x {len(runs)} seeds side by side on this device, as measured here: about "
                f"{format_duration(side_by_side)} of fitting (each seed's first epoch plus {full_epochs - 1} x the median of its "
                f"later epochs, training and per-epoch evaluation, with {len(runs)} runs sharing the device), plus each run's "
                "start-up and final validation and test",
    }


# ---------------------------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    """The JSON's figures as the RESULTS.md section they are meant for."""
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {result['device']}; torch {result['torch']}, faiss {result['faiss'] or 'not installed'}, "
             f"{result['cpu_count']} CPU cores; {result['date']}; {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget."
             + (" **--tiny: CPU, tiny shapes; these numbers measure nothing.**" if result["tiny"] else ""), ""]  # fmt: skip
    part = result["step_ratio"]
    lines += ["### a. Training step, MoL against the same config with the dot product", "", f"Status: {part['status']}.", "",
              "| config | batch x length | counted steps | two-tower step ms (fwd / bwd / opt) | MoL step ms (fwd / bwd / opt) | MoL / two-tower |",
              "|---|---|---|---|---|---|"]
    for row in part.get("rows", []):
        if "ratio" not in row:
            lines.append(f"| {row['config']} | | | {row['status']} | | |")
            continue
        cells = [f"{row[name]['step_ms']:.1f} ({row[name]['forward_ms']:.1f} / {row[name]['backward_ms']:.1f} / {row[name]['optimiser_ms']:.1f})"
                 for name in ("two-tower", "MoL")]
        matmul = "TF32" if row["float32_matmul_precision"] == "high" else row["float32_matmul_precision"]
        lines.append(f"| {row['config']} ({matmul} products) | {row['batch_size']} x {row['max_seq_len']} | {row['counted_steps']} | {cells[0]} | {cells[1]} | "
                     f"**{row['ratio']:.2f}** |")
    part = result["topk"]
    lines += ["", f"### b. Exact top-{part.get('k', '?')} over {part.get('items', 0):,} items ({part.get('queries', 0):,} queries, "
              f"dimension {part.get('dim', '?')})", "", f"Status: {part['status']}. FAISS: {part.get('faiss', '?')}.", "",
              "| search | median s | build s | recall vs torch | timed searches |", "|---|---|---|---|---|"]
    for row in part.get("rows", []):
        if row.get("median_s") is None:
            lines.append(f"| {row['search']} | {row['status']} | | | |")
            continue
        build = "" if row["build_s"] is None else f"{row['build_s']:.2f}"
        recall = "" if row["recall_vs_torch"] is None else f"{row['recall_vs_torch']:.4f}"
        lines.append(f"| {row['search']} | {row['median_s']:.4f} | {build} | {recall} | {row['timed_searches']} |")
    part = result["fits"]
    lines += ["", f"### c. {part.get('config', RAILS_CONFIG)}, seeds side by side, stopped by the timer", "",
              f"Status: {part['status']}." + (f" Runner: {part['runner']}, `--trainer.max_time` {part['max_time_s']} s." if "runner" in part else ""),
              "", "| seed | epochs | first epoch s | later epochs s (median) | best val HR@10 (epoch) | test HR@10 | test NDCG@10 |",
              "|---|---|---|---|---|---|---|"]
    for run in part.get("runs", []):
        lines.append(f"| {run['seed']} | {run['epochs']} | {_number(run['first_epoch_s'], 1)} | {_number(run['later_epoch_s'], 1)} | "
                     f"{_number(run['best_val_hr@10'], 4)} ({run['best_epoch']}) | {_number(run['test_hr@10'], 4)} | "
                     f"{_number(run['test_ndcg@10'], 4)} |")
    extrapolation = part.get("extrapolation", {})
    if "text" in extrapolation:
        lines += ["", f"Extrapolation: {extrapolation['text']}."]
    return "\n".join(lines) + "\n"


def _number(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _finite(value):
    """NaN and infinities as None, so that the file is valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _part(name: str, function, *args) -> dict:
    """A part's result with its status and seconds; an error is recorded (one line) and the next part runs."""
    started = time.monotonic()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        result = function(*args)
        statuses = [row.get("status", "done") for row in result.get("rows", [])]
        result.setdefault("status", "done" if all(status == "done" for status in statuses) else "; ".join(
            sorted({status for status in statuses if status != "done"})))
    except Exception as error:  # noqa: BLE001 - the other parts still run; the error goes into the file
        result = {"status": f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"}
    result["seconds"] = time.monotonic() - started
    print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file of all figures; its markdown rendering goes "
                        "beside it with the suffix .md (default: gpu_check.json)")
    parser.add_argument("--data_dir", default="../shared/data/ml-1m", help="the ML-1M files of the configs (movies.dat, "
                        "ratings_ordered.csv.gz or ratings.dat), relative to the repository root or absolute (default: "
                        "../shared/data/ml-1m, as the configs)")
    parser.add_argument("--budget_s", type=float, default=510.0, help="hard time budget of the whole command in seconds "
                        "(default 510: 8.5 minutes, inside 9); part c gets what parts a and b leave")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where parts a and b run (auto: "
                        "cuda when torch sees a GPU); the fits of part c use Lightning's accelerator: auto")
    parser.add_argument("--step_configs", nargs="+", default=[RAILS_CONFIG, "configs/ml-1m/mol.yaml"],
                        help="part a: MoL configs whose step is timed against the same config with the dot product")
    parser.add_argument("--step_options", nargs="*", default=[], help="part a: more options for every variant, as on the "
                        "fit command line (e.g. --trainer.precision=bf16-mixed)")
    parser.add_argument("--steps", type=int, default=20, help="part a: counted steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="part a: uncounted first steps per variant (default 3)")
    parser.add_argument("--step_seconds", type=float, default=75.0, help="part a's deadline, seconds after it starts (default 75)")
    parser.add_argument("--topk_items", type=int, default=1_000_000, help="part b: corpus size (default 1,000,000)")
    parser.add_argument("--topk_queries", type=int, default=4096, help="part b: queries per search (default 4096)")
    parser.add_argument("--topk_dim", type=int, default=64, help="part b: vector dimension (default 64)")
    parser.add_argument("--topk_k", type=int, default=100, help="part b: results per query (default 100)")
    parser.add_argument("--topk_block_elements", type=int, nargs="+", default=[1 << 22, 1 << 28],
                        help="part b: score_block_elements of the torch search, one row each (default: the framework's "
                        "default 4,194,304, and 268,435,456)")
    parser.add_argument("--topk_repeats", type=int, default=5, help="part b: timed searches per row after an untimed one (default 5)")
    parser.add_argument("--topk_seconds", type=float, default=60.0, help="part b's deadline, seconds after it starts (default 60)")
    parser.add_argument("--runner", choices=["auto", "sweep", "fit"], default="auto", help="part c: `sweep` runs "
                        f"{RAILS_SWEEP} with --parallel (needs the sweeps and wandb packages), `fit` one fit process per "
                        "seed; auto: sweep where those packages are installed")
    parser.add_argument("--fit_reserve_s", type=float, default=75.0, help="part c: seconds of the budget kept for the fits' "
                        "start-up and their final validation and test (Lightning's max_time is what is left minus this; "
                        "default 75)")
    parser.add_argument("--work_dir", default=None, help="part c: folder of the run directories and the fits' log "
                        "(default: a new temporary folder)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run (default: a b c); "
                        "a part left out is recorded as not run")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, synthetic data: checks that every part runs "
                        "(in seconds) and measures nothing; changes the defaults of " + ", ".join(f"--{name}" for name in TINY))
    parser.add_argument("--tiny_epochs", type=int, default=2, help="with --tiny: part c's epochs per seed (default 2)")
    return parser


def main() -> int:
    parser = build_parser()
    if "--tiny" in sys.argv[1:]:
        parser.set_defaults(**TINY)
    args = parser.parse_args()
    args.out = Path(args.out).resolve()  # before moving to the repository root
    args.work_dir = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    began = time.monotonic()
    budget_end = began + args.budget_s
    sys.path.insert(0, str(REPO))  # rails_lightning from this checkout, also without PYTHONPATH
    os.chdir(REPO)  # the configs' relative paths (and --data_dir's) are the repository's
    import torch

    from rails_lightning.runs import hardware_description

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    work_dir = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    options = [*TINY_DATA, *TINY_MODEL, *TINY_OBJECTIVE] if args.tiny else [f"--data.source.init_args.data_dir={args.data_dir}"]
    result = {
        "command": shlex.join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": hardware_description(device),
        "torch": torch.__version__, "faiss": faiss_version, "cpu_count": os.cpu_count(), "budget_s": args.budget_s,
        "work_dir": str(work_dir),
    }
    not_run = {"status": "not run (--parts)"}
    if "a" in args.parts:
        step_deadline = min(time.monotonic() + args.step_seconds, budget_end)
        result["step_ratio"] = _part("a. step ratio", measure_step_ratio, args.step_configs, [*options, *args.step_options],
                                     args.steps, args.warmup, device, step_deadline)
    if "b" in args.parts:
        topk_deadline = min(time.monotonic() + args.topk_seconds, budget_end)
        result["topk"] = _part("b. exact top-k", measure_topk, args.topk_items, args.topk_queries, args.topk_dim, args.topk_k,
                               args.topk_block_elements, args.topk_repeats, device, topk_deadline)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fits are other processes on the same device
    if "c" in args.parts:
        result["fits"] = _part("c. fits", run_fits, args, budget_end - 10, work_dir)  # 10 s to write the files
    for part in ("step_ratio", "topk", "fits"):
        result.setdefault(part, dict(not_run))
    result["seconds"] = time.monotonic() - began
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)
    print(f"[gpu_check] {out} and {out.with_suffix('.md')}", flush=True)
    return 1 if any(result[part]["status"].startswith("failed") for part in ("step_ratio", "topk", "fits")) else 0


if __name__ == "__main__":
    sys.exit(main())
