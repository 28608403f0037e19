"""Benchmarks run for real, shrunk: they must keep working, whatever their figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CLI_ARGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_cost_reports_every_variant_against_the_first():
    tiny = " ".join(arg for arg in TINY_CLI_ARGS if not arg.startswith("--trainer."))
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step_cost.py", "--steps", "2", "--warmup", "1",
         "--logit-floor", "2,2,8,16",
         f"two-tower={tiny}", f"MoL={tiny} --model=MoL --model.similarity.init_args.logit_gate_hidden_dim=0"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines() if line.startswith("| ")}
    floors = {"component logits alone, float32", "component logits alone, bfloat16"}
    assert set(rows) == {"variant", "two-tower", "MoL", *floors}
    for name in floors:  # timed forward and backward, no optimiser
        forward, backward, optimiser, step, ratio = (float(cell) for cell in rows[name])
        assert optimiser == 0 and ratio > 0 and forward + backward == pytest.approx(step, abs=3)
    assert rows["two-tower"][-1].strip() == "1.00"
    forward, backward, optimiser, step, ratio = (float(cell) for cell in rows["MoL"])
    assert step > 0 and ratio > 0 and forward + backward + optimiser == pytest.approx(step, abs=3)


def test_train_step_cost_rejects_a_malformed_logit_floor():
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step_cost.py", "--logit-floor", "8,4,64", "two-tower="],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and "four positive integers P_Q,P_X,D_P,R, got '8,4,64'" in result.stderr


@pytest.mark.parametrize("options", [[], ["--hidden", "16", "--bfloat16"]])
def test_pair_gate_kernel_times_the_fused_and_the_pytorch_gate(options):
    result = subprocess.run(
        [sys.executable, "benchmarks/pair_gate_kernel.py", "--queries", "50", "--items", "40", "--components", "4,2",
         "--repeats", "1", *options],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"gate", "fused", "PyTorch ops"}
    assert float(rows["fused"][-1]) == 1.0 and float(rows["PyTorch ops"][-1]) > 0
    forward, backward, total = (float(cell) for cell in rows["PyTorch ops"][:3])
    assert forward >= 0 and backward >= 0 and total == pytest.approx(forward + backward, abs=0.2)


@pytest.mark.slow
def test_step_profile_times_the_phases_and_profiles():
    tiny = [arg for arg in TINY_CLI_ARGS if not arg.startswith("--trainer.")]
    result = subprocess.run(
        [sys.executable, "benchmarks/step_profile.py", *tiny, "--model=MoL", "--data.batch_size=8"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 2", "step 3", "step 4", "step 5"]
    assert all(float(line.split("forward ")[1].split()[0]) > 0 for line in steps)
    assert "aten::" in result.stdout and "Self CPU time total" in result.stdout
