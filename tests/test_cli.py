"""The command line, for real: a subprocess `fit`, every shipped config instantiating, `--help`, the
ready-made models, the run record and a self-describing checkpoint of a CLI run."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, SHARED_DATA
from rails_lightning.cli import DEFAULT_CONFIG, MODEL_PRESETS, main
from rails_lightning.errors import ConfigError
from rails_lightning.models import RetrievalModule
from rails_lightning.runs import RunRecord
from rails_lightning.similarity import DotProduct, MixtureOfLogits

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("logger", [[], ["--trainer.logger=CSVLogger"]], ids=["wandb-disabled", "csv"])
def test_fit_subprocess_writes_run_record_config_and_checkpoint(tmp_path, logger, tiny_cli_args):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *tiny_cli_args, *logger, f"--run_dir={run_dir}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = RunRecord.read(run_dir)
    assert record.ok and record.model == "TwoTower" and record.epochs == 2
    for key in ("val/hr@10", "val/ndcg@10", "val/mrr", "test/hr@10", "test/ndcg@10", "test/mrr", "test/hr@200"):
        assert 0.0 <= record.metrics[key] <= 1.0
        assert 0.0 <= record.baseline[key] <= 1.0
    assert [row["epoch"] for row in record.history] == [0, 1] and all(0 <= row["val/hr@10"] <= 1 for row in record.history)
    assert record.data["users"] == 150 and record.config["data"]["source"]["init_args"]["num_users"] == 150
    assert Path(record.checkpoint).is_file()
    # The best checkpoint alone rebuilds the model (weights_only=True), and it scores as the run measured.
    model = record.load_model()
    assert isinstance(model.similarity, DotProduct) and model.hparams.item_dim == 16
    saved = (run_dir / "config.yaml").read_text()
    assert "num_users: 150" in saved and "rails_lightning.callbacks.CorpusEvaluation" in saved
    # The final report: the model beside the popularity baseline, and where the run is.
    assert "most popular" in result.stdout and "val/hr@10" in result.stdout
    assert str(run_dir) in result.stderr
    if logger:  # the CSVLogger's per-epoch full-corpus metrics land in the run directory too
        rows = list(csv.DictReader((run_dir / "version_0" / "metrics.csv").open()))
        assert len([row for row in rows if row.get("val/hr@10")]) >= 2


@pytest.mark.slow
def test_help_explains_options():
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0
    for option in ("--run_dir", "--data.source", "--model.similarity", "--model.query_encoder", "--model.decay_all_parameters"):
        assert option in result.stdout, option
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--model.similarity.help", "MixtureOfLogits"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert result.returncode == 0 and "--model.similarity.num_query_components" in result.stdout
    assert "approximate_topk" in result.stdout and "gate_dropout" in result.stdout


@pytest.mark.slow
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
    assert isinstance(cli.model, RetrievalModule)
    assert cli.model.num_items == cli.datamodule.num_items > 0
    assert cli.model.hparams.max_seq_len == cli.datamodule.max_seq_len
    assert any(type(c).__name__ == "CorpusEvaluation" for c in cli.trainer.callbacks)
    # Document search (BEIR) selects its checkpoint on nDCG@10, as the field reports it; recommendation on HR@10.
    assert cli.trainer.checkpoint_callback.monitor == ("val/ndcg@10" if cli.datamodule.split_kind == "by_query" else "val/hr@10")



def test_synthetic_mol_config_keeps_the_default_callbacks_but_the_index_schedule():
    """configs/synthetic/mol.yaml restates the embedded default's callbacks to set CorpusEvaluation(index_every_n_epochs):
    otherwise they must stay the default's, so that MoL and the two-tower default are evaluated and checkpointed alike."""
    default = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["trainer"]["callbacks"]
    mol = yaml.safe_load((REPO / "configs" / "synthetic" / "mol.yaml").read_text())["trainer"]["callbacks"]
    assert mol[0]["init_args"].pop("index_every_n_epochs") == 4
    assert mol == default


@pytest.mark.parametrize("name, similarity", [("TwoTower", DotProduct), ("MoL", MixtureOfLogits)])
def test_ready_made_models_by_name(name, similarity, tmp_path, monkeypatch):
    """``--model=TwoTower`` / ``--model=MoL`` pick the ready-made models; other options still apply on top."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert set(MODEL_PRESETS) == {"TwoTower", "MoL"}
    cli = main([f"--model={name}", "--model.objective.init_args.num_negatives=77", f"--run_dir={tmp_path}"], run=False)
    assert isinstance(cli.model.similarity, similarity) and cli.model.model_name == name
    assert cli.model.hparams.objective["init_args"]["num_negatives"] == 77


def test_float32_matmul_precision_option_sets_torch_and_defaults_to_leaving_it(tmp_path, monkeypatch):
    """``--float32_matmul_precision=high`` (TF32 on a GPU) is applied before the model is built; without it the
    process's setting stays as it was."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_float32_matmul_precision("highest")  # conftest restores the session's setting after the test
    main([f"--run_dir={tmp_path / 'a'}"], run=False)
    assert torch.get_float32_matmul_precision() == "highest"
    main(["--float32_matmul_precision=high", f"--run_dir={tmp_path / 'b'}"], run=False)
    assert torch.get_float32_matmul_precision() == "high"
    with pytest.raises(ConfigError, match="float32_matmul_precision"):
        main(["--float32_matmul_precision=fast", f"--run_dir={tmp_path / 'c'}"], run=False)


def test_print_config_shows_the_whole_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit):
        main(["fit", "--model=MoL", "--print_config"])
    printed = capsys.readouterr().out
    for text in ("rails_lightning.similarity.MixtureOfLogits", "num_query_components: 8", "SASRecEncoder",
                 "rails_lightning.callbacks.CorpusEvaluation", "ModelCheckpoint", "WandbLogger", "SyntheticSource"):
        assert text in printed, text


def test_top_level_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "rails_lightning", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m rails_lightning COMMAND")
    listed = [line.split()[0] for line in result.stdout.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == ["fit", "validate", "test", "predict", "sweep", "report", "index", "retrieve"]
    unknown = subprocess.run([sys.executable, "-m", "rails_lightning", "fitt"], capture_output=True, text=True, env=_env(), timeout=120)
    assert unknown.returncode == 1 and unknown.stderr.startswith("rails_lightning: error: unknown command 'fitt'")


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "sweep", "report", "index", "retrieve"])
def test_every_command_help_starts_with_what_it_does_and_an_example(command, capsys, monkeypatch):
    from rails_lightning.__main__ import main as command_main
    from rails_lightning.commands import COMMANDS

    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit) as stop:
        command_main([command, "--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: python -m rails_lightning {command}")
    start = next(i for i, line in enumerate(lines) if not line.strip()) + 1  # the first line after the usage
    summary = COMMANDS[command].summary
    assert lines[start] == f"{summary[0].upper()}{summary[1:]}."
    assert lines[start + 2] == "Example:" and lines[start + 3].strip() == COMMANDS[command].example


@pytest.mark.parametrize("config", [None, "configs/ml-1m/content_tower.yaml"])
def test_the_resolved_config_serialises_every_piece_and_parses_again(tmp_path, config):
    """--print_config (what each run saves as config.yaml) writes every chosen piece as class_path + init_args, no
    'Unable to serialize' in place of a default, and the written config is a valid --config again."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.run([sys.executable, "-m", "rails_lightning", "fit", *(["--config", config] if config else []), "--print_config"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Unable to serialize" not in first.stdout + first.stderr
    assert "class_path: rails_lightning.models.item_towers." in first.stdout
    written = tmp_path / "resolved.yaml"
    written.write_text(first.stdout)
    again = subprocess.run([sys.executable, "-m", "rails_lightning", "fit", "--config", str(written), "--print_config"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-2000:]
