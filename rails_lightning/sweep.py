"""Local W&B sweeps: run a sweep file's trials here, without a W&B server, and compare them.

    python -m rails_lightning sweep sweeps/mol_vs_dot.yaml                   # all 6 grid points
    python -m rails_lightning sweep sweeps/mol_search.yaml --count 20        # bayes: 20 trials
    python -m rails_lightning sweep sweeps/mol_vs_dot.yaml --dry_run         # print the trial commands
    python -m rails_lightning sweep sweeps/mol_vs_dot.yaml --count 2 -- --trainer.max_epochs=1   # extra fit args

What ``wandb sweep`` + ``wandb agent`` do with a server, done locally with W&B's own pieces:

* the sweep file is checked against W&B's sweep-config schema and the trials are proposed by
  W&B's search engine (the ``sweeps`` package: grid, random, bayes), which sees the metric of
  every finished trial (bayes fits on it);
* each trial's command is expanded from the file's ``command:`` with the agent's own
  functions (``${args}`` -> ``--model.temperature=0.05``; a whole-dict value renders as
  ``--model={'similarity': {'class_path': ...}}``, which LightningCLI parses as a config string), with one difference: ``${interpreter}``
  (and a bare ``python``) is this Python, so that trials run in the same environment;
* trials run one after another (or ``--parallel N`` at once) as subprocesses, each with ``--run_dir=<out>/<trial>`` and W&B
  offline (``wandb sync <out>/*/wandb/offline-run-*`` uploads them later, grouped by sweep);
* a failed trial is reported as failed and the sweep goes on; progress is printed as trials go;
* a proposal that repeats an earlier trial's settings (bayes and random do, over a few discrete values) is
  passed over and the engine asked again: the same settings and seed would train the same model again;
* a sweep cut off (Ctrl-C, SIGTERM, SIGHUP, a lost machine) goes on with ``--resume OUT``: its finished trials are
  kept, the others run again from their last checkpoint (``--ckpt_path``), then the remaining proposals run.

At the end (or on Ctrl-C) ``<out>/summary.md`` (the metric per trial, mean ± std per model) and
``<out>/hr_at_k.png`` (HR@K against K per model) are written and the table is printed.
``<out>/sweep.json`` records the proposals, commands and outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from rails_lightning.commands import argument_parser
from rails_lightning.models.factories import build_factory
from rails_lightning.errors import SweepError
from rails_lightning.reports import DEFAULT_METRIC, format_cell, sweep_results, write_report
from rails_lightning.runs import RunRecord
from rails_lightning.similarity import Similarity

SWEEPS_PIN = "sweeps==0.3.0"
INSTALL_HINT = (
    f"the local sweep needs W&B's search engine: pip install --no-deps {SWEEPS_PIN} jsonref==1.1.0 "
    "(plus scikit-learn and scipy); see README.md"
)


def _sweeps():
    """The ``sweeps`` package (W&B's sweep engine; installed without its numpy<2 pin)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic v1-style config keys in sweeps.run
            import sweeps
    except ImportError as error:
        raise SweepError(f"{INSTALL_HINT} ({error})") from error
    return sweeps


# ---------------------------------------------------------------------------------------- config
def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """A sweep file as a mapping; a missing file or bad YAML is a ``SweepError`` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found (e.g. sweeps/mol_vs_dot.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from error
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping (method, metric, parameters, command)")
    return config


def schema_violations(config: dict[str, Any]) -> list[str]:
    """W&B's sweep-config JSON-schema violations of ``config`` (empty when valid)."""
    return list(_sweeps().schema_violations_from_proposed_config(config))


def propose(config: dict[str, Any], runs: list) -> Any:
    """W&B's next proposal (a ``sweeps.SweepRun``) given the trials so far; None when a grid is exhausted."""
    sweeps = _sweeps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn GP convergence chatter on tiny bayes histories
        return sweeps.next_run(config, runs, validate=True)


# How many times the runner asks W&B's engine again when it proposes settings an earlier trial ran. Bayes and random
# search over a few discrete values propose such repeats (bayes: most often the best point so far); with the
# seed among the settings a repeat would retrain the same model to the same result, so it is not run.
REPEAT_ASKS = 25


def propose_new(config: dict[str, Any], runs: list) -> tuple[Any, int]:
    """W&B's next proposal whose settings no trial in ``runs`` has, and how many repeats were passed over; the
    proposal is None when the engine has nothing new: a grid exhausted, or only repeats in ``REPEAT_ASKS`` asks."""
    tried = [run.config for run in runs]
    for repeats in range(REPEAT_ASKS):
        proposal = propose(config, runs)
        if proposal is None or proposal.config not in tried:
            return proposal, repeats
    return None, REPEAT_ASKS


def proposals(config: dict[str, Any], count: int | None = None) -> list[dict[str, Any]]:
    """The run configs (``{param: {"value": v}}``) W&B proposes without results: every grid point, or ``count``
    different ones (fewer when the space has fewer)."""
    sweeps = _sweeps()
    limit = _trial_limit(config, count)
    runs: list = []
    while limit is None or len(runs) < limit:
        run, _ = propose_new(config, runs)
        if run is None:
            break
        run.state = sweeps.RunState.running
        runs.append(run)
    return [run.config for run in runs]


def _trial_limit(config: dict[str, Any], count: int | None) -> int | None:
    if count is not None:
        return count
    if config.get("method") == "grid":
        return None
    if config.get("run_cap"):
        return int(config["run_cap"])
    raise SweepError(f"a {config.get('method')} sweep never ends by itself: pass --count N (or set run_cap in the file)")


# ---------------------------------------------------------------------------------------- commands
def expand_command(
    config: dict[str, Any], run_config: dict[str, Any], interpreter: str = sys.executable, args_json_file: str | Path | None = None
) -> list[str]:
    """A trial's argv from the sweep's ``command:``, expanded as ``wandb agent`` expands it.

    ``run_config`` is W&B's ``{param: {"value": v}}``. The macro values come from the agent's own
    ``create_sweep_command`` / ``create_sweep_command_args``; ``${interpreter}`` and a bare
    ``python`` become ``interpreter``.
    """
    from wandb.sdk.launch.sweeps.utils import DEFAULT_SWEEP_COMMAND, create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(config.get("command") or DEFAULT_SWEEP_COMMAND))  # ${envvar:...}
    macros: dict[str, list[str]] = dict(create_sweep_command_args({"args": run_config}))
    macros["interpreter"] = [interpreter]
    macros["program"] = [config["program"]] if config.get("program") else []
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    if args_json_file is not None:
        Path(args_json_file).write_text(macros["args_json"][0])
        macros["args_json_file"] = [str(args_json_file)]
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += macros.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return [interpreter if a in ("python", "python3") and i == _first_program(argv) else a for i, a in enumerate(argv)]


def _first_program(argv: list[str]) -> int:
    return 1 if argv and argv[0].endswith("/env") else 0


def short_params(run_config: dict[str, Any]) -> dict[str, Any]:
    """``{"model.temperature": {"value": 0.05}}`` -> ``{"temperature": 0.05}`` (the seed and the model
    have their own columns)."""
    params = {}
    for name, entry in run_config.items():
        if name in ("seed_everything", "model", "model.similarity"):
            continue
        value = entry.get("value") if isinstance(entry, dict) else entry
        params[name.rsplit(".", 1)[-1]] = format_cell(value) if isinstance(value, dict) else value
    return params


def _model_of(config: dict[str, Any], run_config: dict[str, Any]) -> str:
    """``TwoTower`` / ``MoL`` of a trial: from a swept ``model`` or ``model.similarity`` value, else from a
    ``--model=PRESET`` in the command; ``?`` when the sweep does not say."""
    model = (run_config.get("model") or {}).get("value")
    similarity = model.get("similarity") if isinstance(model, dict) else (run_config.get("model.similarity") or {}).get("value")
    if isinstance(similarity, dict) and "class_path" in similarity:
        return build_factory({"class_path": similarity["class_path"]}, Similarity).func.model_name
    for chunk in map(str, config.get("command") or []):
        if chunk.startswith("--model=") and chunk.split("=", 1)[1] in ("TwoTower", "MoL"):
            return chunk.split("=", 1)[1]
    return "?"


def trial_name(index: int, config: dict[str, Any], run_config: dict[str, Any]) -> str:
    """``03-actions_ids-MoL-seed1``: the index, a swept config file's stem, the class of each other swept piece
    (``05-IdAndContent-MoL-seed2`` for a swept ``model.item_tower``), the model, the seed (those swept or known)."""
    parts = [f"{index:02d}"]
    if "config" in run_config:  # one variant of an experiment per config file
        parts.append(Path(str(run_config["config"]["value"])).stem)
    for name, entry in run_config.items():  # a swept class_path says which variant this trial is
        value = entry.get("value") if isinstance(entry, dict) else None
        if name not in ("model", "model.similarity") and isinstance(value, dict) and "class_path" in value:
            parts.append(str(value["class_path"]).rsplit(".", 1)[-1])
    model = _model_of(config, run_config)
    if model != "?":
        parts.append(model)
    if "seed_everything" in run_config:
        parts.append(f"seed{run_config['seed_everything']['value']}")
    return "-".join(parts)


# ---------------------------------------------------------------------------------------- running
def _trial_env(group: str, name: str, threads: int | None = None, gpu: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # W&B offline (a disabled W&B, e.g. in tests, stays disabled): nothing waits for a server.
    env["WANDB_MODE"] = "disabled" if os.environ.get("WANDB_MODE") == "disabled" else "offline"
    env["WANDB_RUN_GROUP"] = group
    env["WANDB_NAME"] = name
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _summary_metrics(run_dir: Path) -> dict[str, float]:
    """The val/test metrics of a finished trial's run record (empty when it wrote none)."""
    record = RunRecord.read(run_dir)
    return record.metrics if record.ok else {}


def run_sweep(
    sweep_file: str | Path,
    count: int | None = None,
    out_dir: str | Path | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    parallel: int = 1,
    resume: str | Path | None = None,
) -> tuple[Path, str]:
    """Run a sweep's trials locally, up to ``parallel`` at once; returns the output folder and the markdown summary."""
    if parallel < 1:
        raise SweepError(f"--parallel takes a number of trials at once (1 or more), got {parallel}")
    sweeps = _sweeps()
    config = load_sweep_config(sweep_file)
    violations = schema_violations(config)
    if violations:
        raise SweepError(f"{sweep_file} is not a valid W&B sweep config: " + "; ".join(violations))
    name = str(config.get("name") or Path(sweep_file).stem)
    metric = config.get("metric", {}).get("name", DEFAULT_METRIC)
    if resume is not None:
        out = Path(resume).resolve()
        record, runs, pending = _resumed(out, sweep_file, config)
        extra_args = record.get("extra_args", [])
        count = record.get("count") if count is None else count
        record["count"] = count  # a --count given to the resume holds for later resumes too
    limit = _trial_limit(config, count)
    check_metric_is_logged(config, metric, extra_args)
    if resume is None:
        out = _new_folder(Path(out_dir) if out_dir else Path(f"sweeps_out/{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        record = {"sweep_file": str(Path(sweep_file).resolve()), "config": config, "out": str(out),
                  "count": count, "extra_args": list(extra_args), "trials": []}
        runs, pending = [], []  # runs: W&B's proposals, finished or not (the search sees every trial proposed so far)
    total = limit
    if config["method"] == "grid":  # a grid ends by itself
        grid_size = len(proposals(config))
        total = grid_size if limit is None else min(limit, grid_size)
    running: list[_Trial] = []
    threads = _threads_per_trial(parallel)
    gpus = _visible_gpus() if parallel > 1 else []  # with several, trials side by side go to different GPUs
    _say(f"sweep {name} ({config['method']}, metric {metric}), {total} trials"
         + (f", up to {parallel} at once" if parallel > 1 else "") + f", output: {out}"
         + (f" (resumed: {len(runs) - len(pending)} finished, {len(pending)} to run again)" if resume is not None else ""))
    try:
        exhausted = False
        while True:
            while len(running) < parallel and (pending or (not exhausted and (limit is None or len(runs) < limit))):
                if pending:  # a trial of the cut-off sweep: the same command, from its last checkpoint if it wrote one
                    index, entry, proposal = pending.pop(0)
                    trial = entry["name"]
                    run_dir = out / trial
                    argv = [a for a in entry["argv"] if not a.startswith("--ckpt_path=")]
                    last = run_dir / "checkpoints" / "last.ckpt"
                    if last.is_file():
                        argv.append(f"--ckpt_path={last}")
                    entry.update(argv=argv, status="running", resumed=True)
                    _say(f"trial {index + 1}/{total} {trial} again"
                         + (f", from {last}" if last.is_file() else ", from the start (no checkpoint)"))
                else:
                    proposal, repeats = propose_new(config, runs)
                    record["repeats_passed_over"] = record.get("repeats_passed_over", 0) + repeats
                    if proposal is None:
                        if repeats:
                            _say(f"the search proposed only settings already run ({repeats} times in a row): "
                                 "nothing new to try, the sweep ends here")
                            _write(out / "sweep.json", record)
                        exhausted = True
                        continue
                    if repeats:
                        _say(f"passed over {repeats} proposal(s) repeating an earlier trial's settings "
                             "(same settings, same seed: the same result)")
                    proposal.state = sweeps.RunState.running
                    index = len(runs)
                    trial = trial_name(index, config, proposal.config)
                    run_dir = out / trial
                    run_dir.mkdir(parents=True, exist_ok=True)
                    argv = expand_command(config, proposal.config, args_json_file=run_dir / "args.json")
                    argv += [f"--run_dir={run_dir}", *extra_args]
                    entry = {
                        "name": trial, "params": short_params(proposal.config), "model": _model_of(config, proposal.config),
                        "config": proposal.config, "argv": argv, "status": "running",
                    }
                    record["trials"].append(entry)
                    runs.append(proposal)
                    _say(f"trial {index + 1}/{total} {trial}: {' '.join(argv[1:] if argv[0].endswith('/env') else argv)}")
                _write(out / "sweep.json", record)
                slot = min(set(range(parallel)) - {t.slot for t in running})
                gpu = gpus[slot % len(gpus)] if len(gpus) > 1 else None
                if gpu is not None:
                    entry["gpu"] = gpu
                env = _trial_env(out.name, trial, threads, gpu)
                running.append(_Trial.start(index, slot, proposal, entry, argv, run_dir, env))
            if not running:
                break
            done = _wait_for_one(running, timeout)
            running.remove(done)
            entry, proposal = done.entry, done.proposal
            entry["seconds"] = round(time.perf_counter() - done.started, 1)
            metrics = _summary_metrics(done.run_dir) if done.returncode == 0 else {}
            if done.returncode == 0 and metric in metrics:
                entry["status"], proposal.state = "finished", sweeps.RunState.finished
                proposal.summary_metrics = metrics
                entry["metric"] = metrics[metric]
                _say(f"trial {done.index + 1} {entry['name']} finished in {entry['seconds']:.0f} s: {metric} = {metrics[metric]:.4f}")
            else:
                why = f"exit {done.returncode}" if done.returncode != 0 else f"no {metric} in run.json"
                entry["status"], proposal.state = f"failed ({why})", sweeps.RunState.failed
                _say(f"trial {done.index + 1} {entry['name']} FAILED ({why}) after {entry['seconds']:.0f} s; "
                     f"log: {done.run_dir / 'trial.log'}")
            _write(out / "sweep.json", record)
    finally:
        for trial in running:  # interrupted (Ctrl-C) or failed here: no trial outlives the sweep
            trial.stop()
            trial.log.close()
            trial.entry["status"] = "interrupted"
        if running:
            _write(out / "sweep.json", record)
        markdown = ""
        if record["trials"]:
            title = f"Sweep {name} ({config['method']}, {len(record['trials'])} trials): {metric}"
            markdown = write_report(sweep_results(out), out, metric, title)
            print("\n" + markdown, flush=True)
            _say(f"summary: {out / 'summary.md'}, plot: {out / 'hr_at_k.png'}")
    return out, markdown


def _resumed(out: Path, sweep_file: str | Path, config: dict[str, Any]) -> tuple[dict[str, Any], list, list]:
    """The record of the cut-off sweep in ``out``, W&B's view of its trials (finished ones with their metrics,
    the rest as running, so that no grid point is proposed twice) and the trials to run again."""
    sweeps = _sweeps()
    path = out / "sweep.json"
    if not path.is_file():
        raise SweepError(f"{out}: no sweep.json there; --resume takes the output folder of an earlier sweep")
    record = json.loads(path.read_text())
    if record.get("config") != config:
        raise SweepError(f"{out} holds a sweep of {record.get('sweep_file')}, and {sweep_file} is not that sweep file "
                         "(or it has changed since): its trials would not be comparable; start a new sweep")
    runs, pending = [], []
    for index, entry in enumerate(record["trials"]):
        metrics = _summary_metrics(out / entry["name"])
        state = sweeps.RunState.finished if metrics else sweeps.RunState.running
        runs.append(sweeps.SweepRun(name=entry["name"], config=entry["config"], state=state, summary_metrics=metrics))
        if metrics:
            entry["status"] = "finished"
        else:
            pending.append((index, entry, runs[-1]))
    return record, runs, pending


def _new_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : a folder no other sweep uses (created here, atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ["", *(f"-{i}" for i in range(2, 1000))]:
        candidate = path.with_name(path.name + suffix)
        try:
            candidate.mkdir()
            return candidate.resolve()
        except FileExistsError:
            if candidate == path and not any(candidate.iterdir()):  # an empty folder given with --out: use it
                return candidate.resolve()
    raise SweepError(f"{path}: no free output folder name")


def check_metric_is_logged(config: dict[str, Any], metric: str, extra_args: Sequence[str] = ()) -> None:
    """Before any trial trains: the sweep's ``metric.name`` must be a key its runs log (the first proposal's
    run is built, not trained, to ask its evaluation callback)."""
    import tempfile

    from rails_lightning.callbacks import CorpusEvaluation
    from rails_lightning.cli import main as cli_main

    first = propose(config, [])
    argv = expand_command(config, first.config)
    args = argv[argv.index("fit") + 1 :] if "fit" in argv else []
    with tempfile.TemporaryDirectory() as run_dir:
        cli = cli_main([*args, *extra_args, "--trainer.logger=false", f"--run_dir={run_dir}/trial"], run=False)
    keys = {key for c in cli.trainer.callbacks if isinstance(c, CorpusEvaluation) for key in c.metric_keys(cli.model, datamodule=cli.datamodule)}
    if metric not in keys:
        shown = ", ".join(sorted(k for k in keys if k.startswith("val/"))[:12])
        raise SweepError(f"metric.name {metric!r} is not logged by these runs; they log e.g. {shown}")


class _Trial:
    """One trial's subprocess (its output in ``run_dir/trial.log``)."""

    def __init__(self, index: int, slot: int, proposal: Any, entry: dict[str, Any], run_dir: Path, process, log) -> None:
        self.index, self.slot, self.proposal, self.entry, self.run_dir = index, slot, proposal, entry, run_dir
        self.process, self.log, self.started = process, log, time.perf_counter()
        self.returncode: int | None = None

    @classmethod
    def start(cls, index: int, slot: int, proposal: Any, entry: dict[str, Any], argv: list[str], run_dir: Path,
              env: dict[str, str]) -> "_Trial":
        """Trial ``index`` started in ``slot`` (0 .. parallel - 1: which of the trials running at once it is)."""
        import subprocess

        log = open(run_dir / "trial.log", "a" if entry.get("resumed") else "w")  # a resumed trial's log goes on
        entry["started_at"] = round(time.time(), 3)  # Unix time: which trials ran side by side
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(index, slot, proposal, entry, run_dir, process, log)

    def poll(self, timeout: float | None) -> bool:
        """Whether the trial has ended (killed, returncode -9, once it has run ``timeout`` seconds)."""
        returncode = self.process.poll()
        if returncode is None and timeout is not None and time.perf_counter() - self.started > timeout:
            self.stop()
            self.log.write(f"\n[rails_lightning sweep] killed after {timeout} s\n")
            returncode = -9
        if returncode is None:
            return False
        self.returncode = returncode
        self.log.close()
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.flush()


def _wait_for_one(running: list[_Trial], timeout: float | None) -> _Trial:
    """The first of the running trials to end (polled: each may have its own timeout clock)."""
    while True:
        for trial in running:
            if trial.poll(timeout):
                return trial
        time.sleep(0.2)


def _visible_gpus() -> list[str]:
    """The GPUs trials may use: the entries of CUDA_VISIBLE_DEVICES when set, else every device torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    return [str(device) for device in range(torch.cuda.device_count())]


def _threads_per_trial(parallel: int) -> int | None:
    """With several trials at once and no OMP_NUM_THREADS set, each gets its share of the cores (else PyTorch
    starts one thread per core in every trial and they fight over them)."""
    if parallel == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // parallel)


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal, a job scheduler, a machine going down) end the sweep as Ctrl-C does:
    its trials are stopped and recorded as interrupted, the summary is written, and ``--resume`` goes on from there."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, interrupt)


def _write(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=str))


def _say(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


# ---------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "sweep",
        "Run a W&B sweep file locally (no W&B server): W&B's own search engine proposes the trials "
        "(grid, random, bayes), each runs `python -m rails_lightning fit ${args} --run_dir=OUT/TRIAL` as a "
        "subprocess with W&B offline, and a comparison table (metric per trial, mean ± std per model) and a plot "
        "of HR@K against K are written to OUT/summary.md and OUT/hr_at_k.png. Arguments after `--` are added "
        "to every trial's fit command (e.g. -- --trainer.max_epochs=2).",
        epilog="Also: python -m rails_lightning report RUN_DIR... [--out DIR] compares finished runs.",
    )
    parser.add_argument("sweep_file", help="a W&B sweep YAML (sweeps/*.yaml)")
    parser.add_argument("--count", type=int, default=None, help="number of trials (default: every grid point; run_cap for random/bayes)")
    parser.add_argument("--out", default=None, help="output folder (default: sweeps_out/<sweep name>-<date-time>)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a trial is killed and counted as failed")
    parser.add_argument("--parallel", type=int, default=1, help="trials run at once (default 1), e.g. 3 seeds sharing one "
                        "GPU; bayes proposes the next trials from those finished so far. With several GPUs visible, the "
                        "trials running at once go to different ones (CUDA_VISIBLE_DEVICES, round robin); without "
                        "OMP_NUM_THREADS set, each trial gets cpu_count // N threads")
    parser.add_argument("--resume", default=None, metavar="OUT",
                        help="go on with the cut-off sweep in OUT (the same sweep file): its finished trials are kept, "
                        "each unfinished one runs again from its last checkpoint (checkpoints/last.ckpt, the same "
                        "batches and negatives as without the cut), then the remaining proposals run; its fit arguments "
                        "(after --) are those it was started with")
    parser.add_argument("--dry_run", action="store_true", help="print the trial commands W&B proposes and stop")
    return parser


def main(argv: Sequence[str]) -> int:
    """``python -m rails_lightning sweep ARGS``."""
    rest, extra = list(argv), []
    if "--" in rest:
        cut = rest.index("--")
        rest, extra = rest[:cut], rest[cut + 1 :]
    args = build_parser().parse_args(rest)
    if args.dry_run:
        config = load_sweep_config(args.sweep_file)
        violations = schema_violations(config)
        if violations:
            raise SweepError(f"{args.sweep_file} is not a valid W&B sweep config: " + "; ".join(violations))
        for index, run_config in enumerate(proposals(config, args.count)):
            argv_ = expand_command(config, run_config) + [f"--run_dir=<out>/{trial_name(index, config, run_config)}", *extra]
            print(" ".join(argv_))
        return 0
    if args.resume is not None and (args.out is not None or extra):
        raise SweepError("--resume goes on in its own folder with the fit arguments the sweep was started with: "
                         "leave out --out and the arguments after --")
    _interrupt_on_termination()
    out, _ = run_sweep(args.sweep_file, args.count, args.out, extra, args.timeout, args.parallel, resume=args.resume)
    record = json.loads((out / "sweep.json").read_text())
    if not any(trial["status"] == "finished" for trial in record["trials"]):
        raise SweepError(f"no trial of {args.sweep_file} succeeded; each trial's log is in {out}/<trial>/trial.log")
    return 0
