"""Reliability at the user-facing edges (issue 9): each test names the point it covers; every one of
them failed on the code before the fix (see the issue note)."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CLI_ARGS, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.baseline import PopularityTopK, popularity_baseline
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.data import DataError, InteractionDataModule, InteractionLogSource
from rails_lightning.data.sequences import InteractionLog
from rails_lightning.data.source import InteractionSource
from rails_lightning.models import MeanPoolEncoder, RetrievalModule
from rails_lightning.objectives import SharedNegatives
from rails_lightning.plugins import AtomicCheckpointIO
from rails_lightning.runs import RunRecord


def _env(**extra):
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def _cli(args, cwd, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True,
                          env=_env(**env), cwd=cwd, timeout=timeout)


def _one_error_line(result) -> str:
    """The run failed with status 1 and one `rails_lightning: error:` line, no traceback."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("rails_lightning: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


class ListSource(InteractionSource):
    """A log given as (user, item, order) rows, for hand-made cases."""

    def __init__(self, rows: list[tuple]) -> None:
        self.rows = rows

    def load(self) -> InteractionLog:
        users, items, order = (np.array(column) for column in zip(*self.rows))
        return InteractionLog(users, items, order, name="rows", timestamps=order.astype(np.int64))


def reconsumption_rows(num_users=40, num_items=20, seed=0) -> list[tuple]:
    """Histories of 6 distinct items; every second user's last item repeats their second one."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        sequence = list(rng.choice(np.arange(1, num_items + 1), 6, replace=False))
        if user % 2 == 0:
            sequence[-1] = sequence[1]
        rows += [(user, int(item), t) for t, item in enumerate(sequence)]
    return rows


# ---------------------------------------------------------------------------------------------- point 1
class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/served: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_1_a_crafted_checkpoint_never_runs_code_local_or_by_url(tmp_path, served):
    folder, url = served
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, folder / "model.ckpt")
    cache = tmp_path / "cache"
    for ckpt in (f"{url}/model.ckpt", str(folder / "model.ckpt")):
        result = _cli(["validate", f"--ckpt_path={ckpt}", f"--run_dir={tmp_path / 'run'}", *TINY_CLI_ARGS], tmp_path,
                      RAILS_LIGHTNING_CACHE=str(cache))
        assert "refused to load the checkpoint: it holds objects other than weights" in _one_error_line(result)
        assert not marker.exists()
        assert not (tmp_path / "run").exists()  # a failed evaluation leaves no run directory
    result = _cli(["validate", f"--ckpt_path={url}/model.ckpt", "--weights_only=false", *TINY_CLI_ARGS], tmp_path,
                  RAILS_LIGHTNING_CACHE=str(cache))
    assert "--weights_only=false" in _one_error_line(result) and not marker.exists()


def test_1_a_checkpoint_url_is_cached_by_the_whole_url(tmp_path, served, monkeypatch):
    from rails_lightning import cli

    folder, url = served
    monkeypatch.setattr(cli, "CHECKPOINT_CACHE", tmp_path / "cache")
    (folder / "a").mkdir(), (folder / "b").mkdir()
    (folder / "a" / "model.ckpt").write_bytes(b"first")
    (folder / "b" / "model.ckpt").write_bytes(b"second")
    first, second = cli.download_checkpoint(f"{url}/a/model.ckpt"), cli.download_checkpoint(f"{url}/b/model.ckpt")
    assert first != second and first.read_bytes() == b"first" and second.read_bytes() == b"second"


# ---------------------------------------------------------------------------------------------- point 2
@pytest.mark.slow
def test_2_a_diverging_loss_stops_training_with_one_message(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(["fit", *TINY_CLI_ARGS, "--model.learning_rate=1e6", f"--run_dir={run_dir}"], tmp_path)
    line = _one_error_line(result)
    assert "training loss is nan" in line and "learning_rate" in line
    assert not (run_dir / "run.json").exists()
    assert not list(run_dir.rglob("*.ckpt"))  # nothing non-finite was saved, as best or otherwise


def test_2_non_finite_loss_raises_in_process(tmp_path):
    from rails_lightning.errors import TrainingDiverged

    data = make_tiny_data()
    module = make_tiny_model(data, learning_rate=1e6)
    with pytest.raises(TrainingDiverged, match=r"training loss is (nan|inf) at step \d+"):
        cpu_trainer(tmp_path, 2, enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)


# ---------------------------------------------------------------------------------------------- points 3 and 4
def test_3_duplicated_rows_are_dropped_with_a_count(caplog):
    rows = reconsumption_rows()
    caplog.set_level(logging.WARNING)
    single = InteractionDataModule(ListSource(rows), max_seq_len=8, min_interactions=3)
    doubled = InteractionDataModule(ListSource([r for r in rows for _ in range(2)]), max_seq_len=8, min_interactions=3)
    assert doubled.store.num_interactions == single.store.num_interactions == len(rows)
    assert f"dropped {len(rows)} duplicate (user, item, order) rows" in caplog.text
    np.testing.assert_array_equal(doubled.store.items, single.store.items)
    assert popularity_baseline(doubled, "test", ks=(10, 20))["test/hr@20"] == 1.0


def test_4_a_reconsumed_target_is_never_excluded(tmp_path):
    """40 users, 20 items, half re-consume their second item last: with 20 items, HR@20 must be 1."""
    data = InteractionDataModule(ListSource(reconsumption_rows()), max_seq_len=8, batch_size=8, min_interactions=3)
    batch = data.val_dataloader().dataset[list(range(40))]
    for row in range(40):  # no query excludes its own target
        excluded = batch.exclude_items[batch.exclude_offsets[row] : batch.exclude_offsets[row + 1]]
        assert int(batch.targets[row, 0]) not in excluded.tolist()
    test_batch = data.test_dataloader().dataset[[0]]
    assert int(test_batch.targets[0, 0]) in data.store.items[data.store.offsets[0] : data.store.offsets[0] + 4].tolist()
    module = RetrievalModule(data.num_items, data.num_users, 8, item_dim=8, query_encoder=MeanPoolEncoder, objective=functools.partial(SharedNegatives, num_negatives=5))
    result = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=(10, 20))]).test(module, datamodule=data, verbose=False)[0]
    assert result["test/hr@20"] == 1.0
    assert popularity_baseline(data, "test", ks=(10, 20))["test/hr@20"] == 1.0


def test_4_consecutive_repeats_can_be_collapsed():
    rows = [(0, 5, 0), (0, 5, 1), (0, 7, 2), (0, 7, 3), (0, 5, 4), (0, 9, 5)]
    kept = InteractionDataModule(ListSource(rows), min_interactions=1)
    collapsed = InteractionDataModule(ListSource(rows), min_interactions=1, drop_consecutive_repeats=True)
    assert kept.store.num_interactions == 6
    assert [kept.store.item_raw_ids[i] for i in collapsed.store.items] == [5, 7, 5, 9]


# ---------------------------------------------------------------------------------------------- point 5
@pytest.mark.parametrize("ks", [(1, 10, 50, 200), (10, 10_000)])
def test_5_a_corpus_smaller_than_k_evaluates(tmp_path, ks):
    data = InteractionDataModule(ListSource(reconsumption_rows()), max_seq_len=8, batch_size=8, min_interactions=3)
    assert data.num_items == 20
    module = RetrievalModule(data.num_items, data.num_users, 8, item_dim=8, query_encoder=MeanPoolEncoder, objective=functools.partial(SharedNegatives, num_negatives=5))
    with pytest.warns(UserWarning, match="go beyond the corpus"):
        cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=ks)], enable_checkpointing=False).fit(module, datamodule=data)
    result = cpu_trainer(tmp_path, 1, [CorpusEvaluation(ks=ks)]).validate(module, datamodule=data, verbose=False)[0]
    assert result[f"val/hr@{max(ks)}"] == 1.0  # every item is retrieved
    assert 0.0 <= result["val/hr@10"] <= 1.0


# ---------------------------------------------------------------------------------------------- point 6
def test_6_empty_splits_are_refused_before_training(tmp_path):
    rows = [(user, item, user * 10 + item) for user in range(20) for item in range(1, 8)]
    data = InteractionDataModule(ListSource(rows), split="temporal", val_fraction=0.0, min_interactions=1)
    with pytest.raises(DataError, match=r"the validation split is empty \(split=temporal, val_fraction=0.0.*raise --data.val_fraction"):
        data.setup("fit")
    short = [(user, item, item) for user in range(10) for item in range(1, 4)]  # 3 events: 1 to train on
    with pytest.raises(DataError, match="the training split is empty"):
        InteractionDataModule(ListSource(short), min_interactions=1).setup("fit")


# ---------------------------------------------------------------------------------------------- point 7
_KILL_DURING_SECOND_LAST_SAVE = """
import os, signal, sys, torch
import rails_lightning.plugins.checkpoint_io as io
last_saves = []
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    if ".last.ckpt." in getattr(f, "name", ""):
        last_saves.append(1)
        if len(last_saves) == 2:  # overwriting last.ckpt of epoch 0: write part of it, then die as a kill would
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
io.torch.save = dying_save
from rails_lightning.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_7_a_kill_during_a_checkpoint_save_leaves_the_previous_one_and_resumes(tmp_path):
    other_fs_tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "tmp"  # tmpfs: another filesystem
    run_dir = tmp_path / "run"
    args = ["fit", *TINY_CLI_ARGS, "--trainer.max_epochs=3", f"--run_dir={run_dir}"]
    killed = subprocess.run([sys.executable, "-c", _KILL_DURING_SECOND_LAST_SAVE, *args], capture_output=True, text=True,
                            env=_env(TMPDIR=str(other_fs_tmp)), cwd=tmp_path, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0  # the previous good one, whole
    for path in run_dir.rglob("*.ckpt"):  # every checkpoint on disk loads
        torch.load(path, map_location="cpu", weights_only=True)
    leftovers = list(run_dir.rglob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half a checkpoint"  # the dead write, hidden
    resumed = _cli([*args, f"--ckpt_path={last}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunRecord.read(run_dir).epochs == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the next save to the folder removed it


def test_7_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("rails_lightning.plugins.checkpoint_io.torch.save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------- point 9
_HAS_CREDENTIALS = (
    "from rails_lightning.cli import _wandb_has_credentials, _wandb_settings; "
    "print(_wandb_has_credentials(_wandb_settings()))"
)


@pytest.mark.slow
def test_9_wandb_credentials_for_the_host_wandb_uses(tmp_path):
    """A netrc entry for the host wandb logs in to counts (before, only one for api.wandb.ai did)."""
    from rails_lightning import cli

    host = cli._wandb_settings().base_url.split("://", 1)[1].split("/")[0]
    assert host != "api.wandb.ai"  # current wandb's default host
    netrc = tmp_path / "netrc"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(NETRC=str(netrc), HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    answers = []
    for machine in (host, "elsewhere.example"):
        netrc.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
        netrc.chmod(0o600)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _HAS_CREDENTIALS], capture_output=True, text=True, env=env, timeout=120)
        assert time.perf_counter() - started < 60  # no network wait (a fresh interpreter imports torch and wandb)
        answers.append(result.stdout.strip().splitlines()[-1])
    assert answers == ["True", "False"]


# ---------------------------------------------------------------------------------------------- point 10
@pytest.mark.slow
def test_10_errors_are_one_line_and_leave_no_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    missing = ["fit", "--data.source=InteractionLogSource", f"--data.source.path={tmp_path / 'nope.csv'}", f"--run_dir={run_dir}"]
    assert f"{tmp_path / 'nope.csv'}: file not found" in _one_error_line(_cli(missing, tmp_path))
    assert not run_dir.exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  item_dim: [1\n")
    assert f"{bad_yaml}, line 3" in _one_error_line(_cli(["fit", "--config", str(bad_yaml)], tmp_path))
    debug = _cli(["fit", *missing[1:], "--debug"], tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr


# ---------------------------------------------------------------------------------------------- point 11
@pytest.mark.slow
def test_11_an_existing_run_is_not_overwritten_and_validate_says_what_it_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    assert _cli(["fit", *TINY_CLI_ARGS, f"--run_dir={run_dir}"], tmp_path).returncode == 0
    before = (run_dir / "run.json").read_text()
    again = _cli(["fit", *TINY_CLI_ARGS, f"--run_dir={run_dir}"], tmp_path)
    assert "already holds a run" in _one_error_line(again) and (run_dir / "run.json").read_text() == before
    untrained = _cli(["validate", *TINY_CLI_ARGS, f"--run_dir={tmp_path / 'v'}"], tmp_path)
    assert untrained.returncode == 0 and "evaluates a freshly initialised (untrained) model" in untrained.stderr
    evaluated = _cli(["validate", *TINY_CLI_ARGS, f"--run_dir={run_dir}", f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    assert evaluated.returncode == 0 and (run_dir / "run.json").read_text() == before  # beside it, not over it
    assert RunRecord.read(run_dir).status == "finished" and (run_dir / "validate.json").is_file()


def test_11_fit_seconds_and_history_add_up_over_a_resume(tmp_path):
    def fit(epochs, ckpt_path=None):
        torch.manual_seed(0)
        data = make_tiny_data()
        evaluation = CorpusEvaluation(ks=(1, 10))
        trainer = cpu_trainer(tmp_path, epochs, [evaluation])
        trainer.fit(make_tiny_model(data), datamodule=data, ckpt_path=ckpt_path)
        return evaluation, trainer

    first, trainer = fit(1)
    resumed, _ = fit(2, trainer.checkpoint_callback.best_model_path)
    assert [row["epoch"] for row in resumed.history] == [0, 1]
    assert resumed.fit_seconds > first.fit_seconds > 0
    # Each epoch's row holds the run's fit time when it was evaluated, counted on over the resume.
    assert resumed.history[0]["fit_seconds"] == first.history[0]["fit_seconds"]
    assert 0 < resumed.history[0]["fit_seconds"] <= first.fit_seconds < resumed.history[1]["fit_seconds"] <= resumed.fit_seconds


def test_11_a_rewritten_log_is_never_read_from_a_stale_cache(tmp_path, hf_cache):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,10,1\n1,11,2\n")
    stat = path.stat()
    assert InteractionLogSource(str(path)).load().item_ids.tolist() == [10, 11]
    path.write_text("user_id,item_id,timestamp\n1,12,1\n1,13,2\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same modification time
    assert InteractionLogSource(str(path)).load().item_ids.tolist() == [12, 13]


# ---------------------------------------------------------------------------------------------- point 12
def test_12_popularity_ties_count_against_the_baseline():
    counts = np.array([0, 5, 5, 5, 1])  # items 1-3 tied
    targets = torch.tensor([[1], [3]])
    _, ids = PopularityTopK(counts).search(targets, 4)
    assert ids[0].tolist().index(1) == 2 and ids[1].tolist().index(3) == 2  # the target last among its equals


def test_12_the_baseline_sees_what_the_model_sees():
    """At test time (leave-one-out) the validation item is part of the model's input: the counts include it."""
    data = make_tiny_data()
    train, at_test = data.train_item_counts, data.visible_item_counts("test")
    assert at_test.sum() - train.sum() == data.num_users  # one validation item per user
    np.testing.assert_array_equal(data.visible_item_counts("val"), train)
