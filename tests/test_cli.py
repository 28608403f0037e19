"""The command line, for real: a subprocess `fit`, every shipped config instantiating, `--help`."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rails_lightning.cli import DEFAULT_CONFIG, main
from tiny_run import TINY

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("logger", [[], ["--trainer.logger=CSVLogger"]], ids=["wandb-disabled", "csv"])
def test_fit_subprocess_writes_metrics_config_and_checkpoint(tmp_path, logger):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *TINY, *logger, f"--run_dir={run_dir}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/hr@10", "val/ndcg@10", "val/mrr", "test/hr@10", "test/ndcg@10", "test/mrr", "test/hr@200"):
        section = key.split("/")[0]
        assert 0.0 <= metrics[section][key] <= 1.0
        assert 0.0 <= metrics["baseline_popularity"][key] <= 1.0
    assert metrics["epochs"] == 2 and metrics["model"] == "TwoTower"
    assert Path(metrics["best_checkpoint"]).is_file()
    saved = (run_dir / "config.yaml").read_text()
    assert "num_users: 150" in saved and "rails_lightning.callbacks.CorpusEvaluation" in saved
    # The final report: the model beside the popularity baseline, and where the run is.
    assert "most popular" in result.stdout and "val/hr@10" in result.stdout
    assert str(run_dir) in result.stderr
    if logger:  # the CSVLogger's per-epoch full-corpus metrics land in the run directory too
        rows = list(csv.DictReader((run_dir / "version_0" / "metrics.csv").open()))
        assert len([row for row in rows if row.get("val/hr@10")]) >= 2


def test_help_explains_options():
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0
    assert "--run_dir" in result.stdout and "--data.source" in result.stdout and "--model" in result.stdout


def test_bad_option_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--data.batch_size=many"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )
    assert result.returncode != 0 and "batch_size" in result.stderr


@pytest.mark.parametrize("config", [DEFAULT_CONFIG, *CONFIGS], ids=lambda p: str(Path(p).relative_to(REPO)))
def test_every_config_instantiates(config, tmp_path, monkeypatch):
    text = Path(config).read_text()
    if "shared/data" in text and not SHARED_DATA.exists():
        pytest.skip("MovieLens files in ../shared/data are absent")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(REPO)  # configs name ../shared/data relative to the repository root
    cli = main(["--config", str(config), f"--run_dir={tmp_path}"], run=False)
    assert cli.model.num_items == cli.datamodule.num_items > 0
    assert cli.model.hparams.max_seq_len == cli.datamodule.max_seq_len
    assert any(type(c).__name__ == "CorpusEvaluation" for c in cli.trainer.callbacks)
    assert cli.trainer.checkpoint_callback.monitor == "val/hr@10"
