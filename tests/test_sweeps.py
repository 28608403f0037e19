"""W&B sweep files, the local sweep runner, the comparison report and the W&B content of a fit.

* every sweep file passes W&B's sweep-config schema and names a logged metric key;
* every grid point (a sample of random / bayes proposals) expands as ``wandb agent`` expands it
  and parses through the CLI into the model the proposal asked for;
* one trial of ``sweeps/mol_vs_dot.yaml`` runs to completion on tiny data through
  ``python -m rails_lightning sweep`` (W&B offline), whose offline W&B files hold the full config,
  the data facts and the per-epoch full-corpus metrics;
* ``report`` turns a TwoTower and a MoL run into markdown and a PNG; a failing trial is reported, not fatal.

Every test here runs real trials or W&B's search engine: the slow tier.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")]
pytest.importorskip("sweeps", reason="W&B's sweep engine: pip install --no-deps sweeps (see README)")

from conftest import REPO, SHARED_DATA, TINY_CLI_ARGS as TINY  # noqa: E402
from rails_lightning import sweep  # noqa: E402
from rails_lightning.__main__ import main as command_main  # noqa: E402
from rails_lightning.cli import main  # noqa: E402
from rails_lightning.errors import SweepError  # noqa: E402
from rails_lightning.runs import RunRecord  # noqa: E402
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
# Keys the CorpusEvaluation callback logs on validation (default ks 1, 10, 50, 200), also of a cold split's targets.
LOGGED_VAL_KEYS = re.compile(r"val/((cold|warm|cold_only)/)?((hr|ndcg|recall)@(1|10|50|200)|mrr)")


def _ids(path):
    return path.name


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_there_are_the_four_sweeps():
    assert {p.name for p in SWEEP_FILES} >= {"mol_vs_dot.yaml", "mol_vs_dot_ml1m.yaml", "mol_search.yaml", "two_tower_search.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_ids)
def test_sweep_file_passes_wandb_schema(path):
    config = sweep.load_sweep_config(path)
    assert sweep.schema_violations(config) == []
    assert LOGGED_VAL_KEYS.fullmatch(config["metric"]["name"]), config["metric"]
    command = [str(c) for c in config["command"]]
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["rails_lightning", "fit"]
    assert "${args}" in command and "${args_no_hyphens}" not in command


def test_schema_check_catches_a_broken_file():
    broken = {"method": "gird", "metric": {"name": "val/hr@10", "goal": "maximize"}, "parameters": {"x": {"values": [1]}}}
    assert sweep.schema_violations(broken)
    with_bad_distribution = {"method": "random", "parameters": {"x": {"distribution": "log_uniform_values", "min": 1}}}
    assert sweep.schema_violations(with_bad_distribution)


def _assert_same_piece(described, given):
    """A piece chosen by class_path (``describe``'s plain data) has the given class and every given option, nested
    pieces too."""
    assert described["class_path"].rsplit(".", 1)[-1] == given["class_path"].rsplit(".", 1)[-1]  # modules may differ
    for key, value in given.get("init_args", {}).items():
        if isinstance(value, dict) and "class_path" in value:
            _assert_same_piece(described["init_args"][key], value)
        else:
            assert described["init_args"][key] == value, key


def _expected(run_config):
    """What each swept parameter must become in the instantiated CLI."""
    for name, entry in run_config.items():
        yield name, entry["value"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=_ids)
def test_every_proposal_expands_and_parses_through_the_cli(path, tmp_path, monkeypatch):
    config = sweep.load_sweep_config(path)
    if "ml-1m" in yaml.safe_dump(config) and not SHARED_DATA.exists():
        pytest.skip("MovieLens files in ../shared/data are absent")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)  # sweep commands name configs relative to the repository root
    run_configs = sweep.proposals(config, None if config["method"] == "grid" else 3)
    if config["method"] == "grid":
        sizes = [len(p["values"]) for p in config["parameters"].values() if "values" in p]
        assert len(run_configs) == math.prod(sizes)
    assert run_configs
    seen = set()
    for index, run_config in enumerate(run_configs):
        argv = sweep.expand_command(config, run_config)
        assert argv[0] == "/usr/bin/env" and argv[1] == sys.executable
        args = argv[argv.index("fit") + 1 :]
        # ${args} renders like `wandb agent`: --name=value, a dict value as its Python repr.
        for name, value in _expected(run_config):
            assert f"--{name}={value}" in args
        cli = main([*args, f"--run_dir={tmp_path / str(index)}"], run=False)
        hparams = cli.model.hparams
        for name, value in _expected(run_config):
            if name == "seed_everything":
                assert cli.config.seed_everything == value
            elif name == "config":  # a variant's config file, the other parameters applied over it
                assert [str(path) for path in cli.config.config] == [value]
                stated = yaml.safe_load((REPO / value).read_text())
                for option in ("embed_actions", "history_filter"):
                    assert hparams[option] == stated["model"].get(option, hparams[option]), (value, option)
                data = cli.datamodule
                assert (data.split_kind, list(data.target_groups)) == (stated["data"]["split"], stated["data"]["target_groups"])
                for option in ("max_seq_len", "shuffle_history_actions"):
                    assert getattr(data, option) == stated["data"].get(option, getattr(data, option)), (value, option)
            elif name == "model":  # a whole model section: its similarity and any module options
                for key, option in value.items():
                    if key == "similarity":
                        assert type(cli.model.similarity).__name__ == option["class_path"].rsplit(".", 1)[-1]
                        for sim_key, sim_value in option.get("init_args", {}).items():
                            if isinstance(sim_value, dict):  # a nested class: the approximate top-k factory
                                assert cli.model.similarity.approximate_topk is not None, sim_key
                            else:
                                assert hparams.similarity["init_args"][sim_key] == sim_value, sim_key
                    elif isinstance(option, dict) and "class_path" in option:  # another piece (the objective): class + its options
                        assert hparams[key]["class_path"] == option["class_path"], key
                        for piece_key, piece_value in option.get("init_args", {}).items():
                            assert hparams[key]["init_args"][piece_key] == piece_value, (key, piece_key)
                    else:
                        assert hparams[key] == option, key
            elif ".init_args." in name:  # an option of a piece chosen by class_path: model.<piece>.init_args.<option>
                piece, option = name.split(".")[1], name.rsplit(".", 1)[-1]
                assert hparams[piece]["init_args"][option] == pytest.approx(value), name
            elif name.startswith("model.") and isinstance(value, dict) and "class_path" in value:  # a whole piece
                _assert_same_piece(hparams[name.split(".", 1)[1]], value)
            elif name.startswith("model."):
                assert hparams[name.split(".", 1)[1]] == pytest.approx(value), name
            elif name.startswith("data."):
                assert getattr(cli.datamodule, name.split(".", 1)[1]) == value, name
            elif name == "trainer.max_epochs":
                assert cli.trainer.max_epochs == value
            elif name == "trainer.precision":
                assert cli.trainer.precision == value
            else:
                raise AssertionError(f"test does not know how to check parameter {name}")
        if "--model=MoL" in args:
            assert cli.model.model_name == "MoL"
        seen.add(tuple(sorted((k, json.dumps(v["value"], sort_keys=True)) for k, v in run_config.items())))
    assert len(seen) == len(run_configs), "proposals repeat"


def test_bayes_uses_finished_results():
    """The runner hands W&B's bayes search each finished trial's metric; it proposes from them."""
    import sweeps

    config = sweep.load_sweep_config(REPO / "sweeps" / "mol_search.yaml")
    runs = []
    for i in range(4):
        run = sweep.propose(config, runs)
        run.state = sweeps.RunState.finished
        run.summary_metrics = {"val/hr@10": 0.1 + 0.05 * i}
        runs.append(run)
    proposal = sweep.propose(config, runs)
    assert proposal is not None and proposal.search_info is not None
    assert set(proposal.config) == set(config["parameters"])


def test_help_of_sweep_and_report(capsys):
    for command, words in (("sweep", ["--count", "--out", "sweep_file", "--dry_run"]), ("report", ["--out", "runs"])):
        with pytest.raises(SystemExit) as exit_info:
            command_main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"python -m rails_lightning {command}" in out and all(word in out for word in words)


@pytest.fixture(scope="module")
def one_trial(tmp_path_factory):
    """`python -m rails_lightning sweep sweeps/mol_vs_dot.yaml --count 1` on tiny data, W&B offline."""
    out = tmp_path_factory.mktemp("sweep") / "mol_vs_dot"
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "sweep", "sweeps/mol_vs_dot.yaml", "--count", "1", "--out", str(out), "--", *TINY],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600,
    )
    return out, result


def test_one_expanded_trial_runs_to_completion(one_trial):
    out, result = one_trial
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    (trial,) = record["trials"]
    assert trial["name"] == "00-TwoTower-seed0" and trial["status"] == "finished", trial
    assert "--model={'similarity': {'class_path': 'rails_lightning.similarity.DotProduct'}}" in trial["argv"]
    record = RunRecord.read(out / trial["name"])
    assert record.ok and record.model == "TwoTower" and 0.0 <= record.val["val/hr@10"] <= 1.0
    # Progress while it runs, then the comparison table.
    assert "[sweep] trial 1/1 00-TwoTower-seed0" in result.stdout and "finished in" in result.stdout
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout
    assert "TwoTower (dot product)" in summary and "mean ± std" in summary and "most popular" in summary
    assert f"{record.val['val/hr@10']:.4f}" in summary
    assert (out / "hr_at_k.png").stat().st_size > 5000


def test_fit_wandb_offline_files_hold_config_facts_and_per_epoch_metrics(one_trial):
    """The offline W&B run holds the resolved config, the data facts and the metrics (looked up as the
    serialised text in W&B's own run file: wandb 0.31 ships no Python reader for it, and this project
    does not parse it), one HR@K table per validation; the per-epoch history is in the run record."""
    out, result = one_trial
    trial_dir = out / "00-TwoTower-seed0"
    assert "offline" in result.stdout + (trial_dir / "trial.log").read_text()
    (wandb_run,) = (trial_dir / "wandb").glob("offline-run-*")
    raw = next(wandb_run.glob("run-*.wandb")).read_bytes()
    for text in (b"rails_lightning.similarity.DotProduct", b"SyntheticSource", b"num_parameters", b"mean_sequence_length",
                 b"val/hr@10", b"val/ndcg@10", b"train/softmax_loss"):
        assert text in raw, text
    tables = sorted(wandb_run.glob("files/media/table/val/hr_at_k_*.table.json"))
    assert len(tables) >= 2  # one per validation epoch
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["K", "HR@K", "NDCG@K"] and [row[0] for row in table["data"]] == [1, 10, 50, 200]
    record = RunRecord.read(trial_dir)
    saved = yaml.safe_load((trial_dir / "config.yaml").read_text())
    assert record.config["model"] == saved["model"] and record.config["data"] == saved["data"]
    assert [row["epoch"] for row in record.history] == [0, 1]
    assert all(0.0 <= row["val/ndcg@10"] <= 1.0 for row in record.history)


def test_report_compares_two_finished_runs(one_trial, tmp_path):
    out, _ = one_trial
    config = sweep.load_sweep_config(REPO / "sweeps" / "mol_vs_dot.yaml")
    mol_point = next(c for c in sweep.proposals(config) if c["model"]["value"]["similarity"]["class_path"].endswith("MixtureOfLogits"))
    argv = sweep.expand_command(config, mol_point)
    mol_dir = tmp_path / "mol"
    small_mol = [f"--model.similarity.init_args.{name}={value}" for name, value in
                 (("num_query_components", 2), ("num_item_components", 2), ("component_dim", 16))]
    result = subprocess.run(
        [*argv, f"--run_dir={mol_dir}", *TINY, *small_mol], capture_output=True, text=True, cwd=REPO,
        env=_env(WANDB_MODE="disabled"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report_dir = tmp_path / "report"
    assert command_main(["report", str(out / "00-TwoTower-seed0"), str(mol_dir), "--out", str(report_dir)]) == 0
    summary = (report_dir / "summary.md").read_text()
    per_model = summary.split("## Per model")[1]
    assert "TwoTower (dot product)" in per_model and "MoL (mixture of logits)" in per_model
    mol_hr10 = RunRecord.read(mol_dir).val["val/hr@10"]
    assert f"{mol_hr10:.4f} ±—" in per_model
    assert (report_dir / "hr_at_k.png").stat().st_size > 5000


def test_failed_trial_is_reported_not_fatal_and_a_sweep_without_success_fails(tmp_path, monkeypatch, capsys):
    """A trial that fails (here: its loss diverges) is reported and the sweep goes on; a sweep none of
    whose trials succeeded exits non-zero."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)
    diverging = [*TINY, "--model.learning_rate=1e6"]
    out, markdown = sweep.run_sweep("sweeps/mol_vs_dot.yaml", count=1, out_dir=tmp_path / "failing", extra_args=diverging)
    assert "FAILED (exit" in capsys.readouterr().out
    record = json.loads((out / "sweep.json").read_text())
    assert record["trials"][0]["status"].startswith("failed")
    assert "training loss is nan" in (out / record["trials"][0]["name"] / "trial.log").read_text()
    assert markdown == (out / "summary.md").read_text()
    assert "did not finish" in markdown and "0 / 1" in markdown
    args = ["sweep", "sweeps/mol_vs_dot.yaml", "--count", "1", "--out", str(tmp_path / "again"), "--", *diverging]
    assert command_main(args) == 1
    assert "no trial of sweeps/mol_vs_dot.yaml succeeded" in capsys.readouterr().err


def test_sweep_checks_metric_and_options_before_any_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)
    config = sweep.load_sweep_config("sweeps/mol_vs_dot.yaml")
    config["metric"]["name"] = "val/hr@11"
    bad_metric = tmp_path / "bad_metric.yaml"
    bad_metric.write_text(yaml.safe_dump(config))
    assert command_main(["sweep", str(bad_metric), "--out", str(tmp_path / "a"), "--", *TINY]) == 1
    assert "metric.name 'val/hr@11' is not logged" in capsys.readouterr().err
    assert command_main(["sweep", "sweeps/mol_vs_dot.yaml", "--out", str(tmp_path / "b"), "--", "--data.batch_size=many"]) == 1
    assert "data.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing trained, nothing written


def test_two_sweeps_never_share_an_output_folder(tmp_path):
    first = sweep._new_folder(tmp_path / "mol_vs_dot-20261123-120000")
    (first / "sweep.json").write_text("{}")
    second = sweep._new_folder(tmp_path / "mol_vs_dot-20261123-120000")
    assert first != second and second.name == "mol_vs_dot-20261123-120000-2"


def test_unreachable_wandb_server_means_offline(tmp_path, monkeypatch):
    """With credentials but no answer from the server, a run goes offline instead of waiting on it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_MODE")  # restored after the test
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    main([*TINY, f"--run_dir={tmp_path}"], run=False)  # the default config's WandbLogger: the mode is decided
    assert os.environ["WANDB_MODE"] == "offline"
    from wandb.sdk import wandb_setup

    assert wandb_setup.singleton().settings.mode == "offline"  # also where wandb itself reads it


class _FakeRun:
    offline = disabled = False
    id = "abc123"

    def __init__(self):
        self.logged = []

    def log_artifact(self, artifact, aliases=()):
        self.logged.append((artifact, list(aliases)))


def test_best_checkpoint_artifact_only_when_online(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from rails_lightning.callbacks import WandbBestCheckpoint

    best = tmp_path / "best.ckpt"
    best.write_bytes(b"weights")
    logger = WandbLogger(project="test", save_dir=str(tmp_path))
    logger._experiment = run = _FakeRun()
    checkpoint = SimpleNamespace(best_model_path=str(best), monitor="val/hr@10", best_model_score=0.25)
    trainer = SimpleNamespace(loggers=[logger], checkpoint_callback=checkpoint, current_epoch=3)
    WandbBestCheckpoint().on_fit_end(trainer, None)
    ((artifact, aliases),) = run.logged
    assert artifact.type == "model" and artifact.name.startswith("model-abc123") and "best" in aliases
    assert artifact.metadata["monitor"] == "val/hr@10" and artifact.metadata["score"] == 0.25
    assert "model.ckpt" in artifact.manifest.entries
    run.offline, run.logged = True, []
    WandbBestCheckpoint().on_fit_end(trainer, None)
    assert run.logged == []


def _two_point_bayes(path):
    """A bayes sweep over two temperatures of the embedded default: two different settings in all."""
    config = {"name": "two_points", "method": "bayes", "metric": {"name": "val/hr@10", "goal": "maximize"},
              "command": ["${env}", "${interpreter}", "-m", "rails_lightning", "fit", "${args}"],
              "parameters": {"model.temperature": {"values": [0.05, 0.1]}}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_proposals_that_repeat_a_trial_are_passed_over(tmp_path):
    """Bayes over two values proposes the best point again and again; the runner asks on until a new one comes, and
    reports nothing new once both have run."""
    import sweeps

    config = sweep.load_sweep_config(_two_point_bayes(tmp_path / "two.yaml"))
    first = sweep.propose(config, [])
    first.state, first.summary_metrics = sweeps.RunState.finished, {"val/hr@10": 0.9}
    second, _ = sweep.propose_new(config, [first])
    assert second is not None and second.config != first.config
    second.state, second.summary_metrics = sweeps.RunState.finished, {"val/hr@10": 0.1}
    assert sweep.propose_new(config, [first, second]) == (None, sweep.REPEAT_ASKS)
    assert sorted(c["model.temperature"]["value"] for c in sweep.proposals(config, count=5)) == [0.05, 0.1]


def test_a_bayes_sweep_runs_each_setting_once_and_ends_when_nothing_is_new(tmp_path, monkeypatch, capsys):
    """``--count 4`` over two settings: two trials, then the sweep ends, saying why."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)
    out, markdown = sweep.run_sweep(_two_point_bayes(tmp_path / "two.yaml"), count=4, out_dir=tmp_path / "out",
                                    extra_args=[*TINY, "--trainer.max_epochs=1"])
    record = json.loads((out / "sweep.json").read_text())
    temperatures = [trial["config"]["model.temperature"]["value"] for trial in record["trials"]]
    assert sorted(temperatures) == [0.05, 0.1]
    assert [trial["status"] for trial in record["trials"]] == ["finished"] * 2
    assert record["repeats_passed_over"] >= sweep.REPEAT_ASKS
    assert "nothing new to try, the sweep ends here" in capsys.readouterr().out
    assert "2 trials" in markdown
    sweep.run_sweep(_two_point_bayes(tmp_path / "two.yaml"), count=5, resume=out)  # a new --count: nothing new to run
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["trials"]) == 2 and record["count"] == 5  # and a later resume without --count keeps 5


def test_parallel_trials_run_side_by_side_and_each_gets_its_share_of_threads(tmp_path, monkeypatch, capsys):
    """``--parallel 2``: two trials at once (their runs overlap in time), both recorded and summarised, on different
    GPUs of those listed (here two that do not exist: the trials see none and run on the CPU); with no
    OMP_NUM_THREADS set each trial's environment gives it cpu_count // 2 threads."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(REPO)
    out, markdown = sweep.run_sweep("sweeps/mol_vs_dot.yaml", count=2, out_dir=tmp_path / "parallel", extra_args=TINY, parallel=2)
    assert "up to 2 at once" in capsys.readouterr().out
    first, second = json.loads((out / "sweep.json").read_text())["trials"]
    assert first["status"] == second["status"] == "finished", (first, second)
    assert second["started_at"] < first["started_at"] + first["seconds"]  # started before the first had ended
    assert {first["gpu"], second["gpu"]} == {"5", "7"}
    assert "2 / 2" in markdown
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for trial in (first, second):
        assert RunRecord.read(out / trial["name"]).ok
    assert sweep._trial_env("g", "n", sweep._threads_per_trial(2))["OMP_NUM_THREADS"] == threads
    assert sweep._trial_env("g", "n", None, "7")["CUDA_VISIBLE_DEVICES"] == "7"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none listed: nothing to spread over
    assert sweep._visible_gpus() == []
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert sweep._threads_per_trial(2) is None and sweep._threads_per_trial(1) is None
    with pytest.raises(SweepError, match="--parallel"):
        sweep.run_sweep("sweeps/mol_vs_dot.yaml", count=1, out_dir=tmp_path / "zero", parallel=0)


def test_trials_past_the_timeout_are_killed_and_reported(tmp_path, monkeypatch, capsys):
    """``--timeout``: every trial still running after it is killed (here two at once, both well inside start-up),
    counted as failed, its log saying so."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)
    out, markdown = sweep.run_sweep("sweeps/mol_vs_dot.yaml", count=2, out_dir=tmp_path / "slow", extra_args=TINY,
                                    timeout=1.0, parallel=2)
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert [trial["status"] for trial in trials] == ["failed (exit -9)"] * 2
    assert all(trial["seconds"] < 60 for trial in trials)
    for trial in trials:
        assert "[rails_lightning sweep] killed after 1.0 s" in (out / trial["name"] / "trial.log").read_text()
    assert "FAILED (exit -9)" in capsys.readouterr().out and "0 / 2" in markdown


def test_interrupting_a_parallel_sweep_stops_every_trial(tmp_path):
    """Ctrl-C (SIGINT to the sweep process alone) while two trials run: both are killed, recorded as interrupted,
    and the summary is still written."""
    import signal
    import time

    out = tmp_path / "interrupted"
    sweep_process = subprocess.Popen(
        [sys.executable, "-m", "rails_lightning", "sweep", "sweeps/mol_vs_dot.yaml", "--count", "2", "--parallel", "2",
         "--out", str(out), "--", *TINY, "--trainer.max_epochs=50"],
        cwd=REPO, env=_env(WANDB_MODE="disabled"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both trials started
        trials = json.loads((out / "sweep.json").read_text())["trials"] if (out / "sweep.json").is_file() else []
        if len(trials) == 2:
            break
        time.sleep(0.2)
    time.sleep(2)
    sweep_process.send_signal(signal.SIGINT)
    output, _ = sweep_process.communicate(timeout=120)
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert [trial["status"] for trial in trials] == ["interrupted", "interrupted"], output[-2000:]
    assert (out / "summary.md").is_file()
    still_running = subprocess.run(["pgrep", "-f", f"run_dir={out}"], capture_output=True, text=True).stdout
    assert still_running == "", still_running


def test_a_terminated_sweep_resumes_its_unfinished_trial_from_its_checkpoint_and_runs_the_rest(tmp_path):
    """SIGTERM (a job scheduler, a machine going down) while the first of two trials runs: it is stopped and recorded
    as interrupted. ``--resume OUT`` runs it again from its last checkpoint (not from the start), then the second
    grid point, with the fit arguments the sweep was started with; resuming a finished sweep runs nothing."""
    import signal
    import time

    out = tmp_path / "cut"
    sweep_process = subprocess.Popen(
        [sys.executable, "-m", "rails_lightning", "sweep", "sweeps/mol_vs_dot.yaml", "--count", "2",
         "--out", str(out), "--", *TINY, "--trainer.max_epochs=4"],
        cwd=REPO, env=_env(WANDB_MODE="disabled"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    first_last = None
    while time.monotonic() < deadline and first_last is None:  # the first trial has written its epoch-0 checkpoint
        trials = json.loads((out / "sweep.json").read_text())["trials"] if (out / "sweep.json").is_file() else []
        if trials and (out / trials[0]["name"] / "checkpoints" / "last.ckpt").is_file():
            first_last = out / trials[0]["name"] / "checkpoints" / "last.ckpt"
        time.sleep(0.1)
    sweep_process.send_signal(signal.SIGTERM)
    output, _ = sweep_process.communicate(timeout=120)
    (first,) = json.loads((out / "sweep.json").read_text())["trials"]
    assert first["status"] == "interrupted", output[-2000:]
    assert RunRecord.read(out / first["name"]).epochs != 4  # cut off before its end

    resumed = subprocess.run([sys.executable, "-m", "rails_lightning", "sweep", "sweeps/mol_vs_dot.yaml", "--resume", str(out)],
                             cwd=REPO, env=_env(WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed: 0 finished, 1 to run again" in resumed.stdout
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert [trial["status"] for trial in trials] == ["finished", "finished"]
    assert trials[0]["name"] == first["name"] and trials[1]["name"] != first["name"]
    assert f"--ckpt_path={first_last}" in trials[0]["argv"] and not any(a.startswith("--ckpt_path") for a in trials[1]["argv"])
    assert "--trainer.max_epochs=4" in trials[1]["argv"]  # the fit arguments it was started with
    log = (out / first["name"] / "trial.log").read_text()
    assert "Restoring states from the checkpoint" in log  # went on from its checkpoint, its first part kept in the log
    for trial in trials:
        assert RunRecord.read(out / trial["name"]).epochs == 4

    again = subprocess.run([sys.executable, "-m", "rails_lightning", "sweep", "sweeps/mol_vs_dot.yaml", "--resume", str(out)],
                           cwd=REPO, env=_env(WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed: 2 finished, 0 to run again" in again.stdout, again.stdout[-2000:]
    assert [t["started_at"] for t in json.loads((out / "sweep.json").read_text())["trials"]] == [t["started_at"] for t in trials]


def test_resume_refuses_another_sweep_file_a_folder_without_a_sweep_and_new_fit_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "grid"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"sweep_file": "sweeps/mol_vs_dot.yaml", "trials": [],
                                                "config": sweep.load_sweep_config("sweeps/mol_vs_dot.yaml")}))
    with pytest.raises(SweepError, match="is not that sweep file"):
        sweep.run_sweep("sweeps/two_tower_search.yaml", resume=out)
    with pytest.raises(SweepError, match="no sweep.json there"):
        sweep.run_sweep("sweeps/mol_vs_dot.yaml", resume=tmp_path)
    with pytest.raises(SweepError, match="leave out --out and the arguments after --"):
        sweep.main(["sweeps/mol_vs_dot.yaml", "--resume", str(out), "--", "--trainer.max_epochs=2"])


def test_trial_names_carry_a_swept_config_files_stem():
    config = sweep.load_sweep_config(REPO / "sweeps" / "actions_ablation_ml1m.yaml")
    names = [sweep.trial_name(index, config, run_config) for index, run_config in enumerate(sweep.proposals(config))]
    assert names[:4] == ["00-actions_ids-TwoTower-seed0", "01-actions_ids-TwoTower-seed1", "02-actions_ids-TwoTower-seed2", "03-actions_ids-MoL-seed0"]
    assert len(set(names)) == 24 and names[-1] == "23-actions_liked_history-MoL-seed2"


def test_trial_names_carry_the_class_of_a_swept_piece():
    config = sweep.load_sweep_config(REPO / "sweeps" / "cold_start_ml1m.yaml")
    names = [sweep.trial_name(index, config, run_config) for index, run_config in enumerate(sweep.proposals(config))]
    assert len(set(names)) == 18
    assert {name.split("-", 1)[1] for name in names} == {
        f"{tower}-{model}-seed{seed}" for tower in ("ContentTower", "IdAndContent", "IdEmbedding") for model in ("TwoTower", "MoL") for seed in range(3)
    }
