"""benchmarks/pair_gate_step.py --tiny: the three pair-gate implementations train side by side and the table says
which one is faster per step (a real run of the script; no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_times_every_gate_implementation_per_training_step():
    result = subprocess.run(
        [sys.executable, "benchmarks/pair_gate_step.py", "--tiny"], capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    rows = [line.strip().strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| configs/")]
    assert len(rows) == 1, result.stdout
    config, precision, eager, compiled, fused, compiled_ratio, kernel_ratio, kept = (cell.strip() for cell in rows[0])
    assert config == "configs/synthetic/mol.yaml" and precision == "32-true"
    assert all(float(ms) > 0 for ms in (eager, compiled, fused))
    assert compiled_ratio.endswith("x") and kernel_ratio.endswith("x") and kept in ("yes", "no")
    assert (kept == "yes") == (float(kernel_ratio[:-1]) >= 1.5)
