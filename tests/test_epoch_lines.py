"""A fit whose stdout is a file prints one line per validation epoch (Lightning's progress bar shows nothing there
until the fit ends); in a terminal it leaves that to the bar."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import TINY_CLI_ARGS
from rails_lightning.callbacks import EpochLines

LINE = re.compile(r"^\[rails_lightning\] epoch (\d+) \((\d+)/3\) · val/hr@10 (\d\.\d{4}) \(best (\d\.\d{4}), epoch (\d+)\) · "
                  r"val/ndcg@10 (\d\.\d{4}) · train/\w*loss \d+\.\d{4} · \d+\.\d s/epoch, \d+ s left$", re.M)


def test_a_fit_written_to_a_file_prints_a_line_per_epoch_with_the_run_records_figures(tmp_path):
    run_dir = tmp_path / "run"
    fit = subprocess.run([sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS, "--trainer.max_epochs=3",
                          "--trainer.logger=false", f"--run_dir={run_dir}"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert fit.returncode == 0, fit.stderr[-2000:]
    lines = LINE.findall(fit.stdout)
    history = json.loads((run_dir / "run.json").read_text())["history"]
    assert [int(line[0]) for line in lines] == [row["epoch"] for row in history] == [0, 1, 2]
    best = 0.0
    for (epoch, _, hr, best_hr, best_epoch, ndcg), row in zip(lines, history):
        assert hr == f"{row['val/hr@10']:.4f}" and ndcg == f"{row['val/ndcg@10']:.4f}"
        best = max(best, row["val/hr@10"])
        assert best_hr == f"{best:.4f}"
        assert history[int(best_epoch)]["val/hr@10"] == best


@pytest.mark.parametrize(("when", "tty", "prints"), [("auto", False, True), ("auto", True, False), ("always", True, True), ("never", False, False)])
def test_it_prints_where_no_progress_bar_shows(when, tty, prints, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    assert EpochLines(when=when)._enabled() is prints
