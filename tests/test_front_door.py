"""The front door: ``python -m rails_lightning fit`` exactly as a newcomer runs it.

No ``WANDB_*`` variable, an empty ``HOME`` (so no W&B credentials, no netrc, no W&B settings file), no
terminal on stdin, and then the same under a pseudo-terminal, where a login prompt would wait for an
answer. The rest of the suite runs with ``WANDB_MODE=disabled`` and cannot see what happens here.
"""

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CLI_ARGS


@pytest.fixture
def newcomer(tmp_path) -> tuple[dict[str, str], Path]:
    """A newcomer's environment (no WANDB_*, an empty HOME) and an empty folder to run in."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    return _newcomer_env(tmp_path / "home"), tmp_path / "work"


def _newcomer_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("XDG_CACHE_HOME", None)
    return env


def _check_run(cwd: Path, output: str) -> None:
    runs = sorted((cwd / "runs").glob("*"))
    assert len(runs) == 1, f"expected one run directory under {cwd / 'runs'}, found {runs}\n{output[-3000:]}"
    run_dir = runs[0]
    assert (run_dir / "run.json").is_file() and (run_dir / "config.yaml").is_file(), output[-3000:]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, f"no offline W&B run in {run_dir}\n{output[-3000:]}"
    assert any(offline_runs[0].glob("*.wandb")), "the offline W&B run holds no data"
    # One line of ours says why W&B is offline, where the run is and how to upload it.
    ours = [line for line in output.splitlines() if line.startswith("[rails_lightning] W&B is offline")]
    assert len(ours) == 1 and f"wandb sync {offline_runs[0]}" in ours[0], output[-3000:]
    assert "API key" not in output and "Enter your choice" not in output, output[-3000:]


@pytest.mark.slow
def test_fit_without_credentials_or_terminal_runs_offline(newcomer):
    env, work = newcomer
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=work, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    _check_run(work, output)


@pytest.mark.slow
def test_fit_in_a_terminal_without_credentials_never_prompts(newcomer):
    """Under a pseudo-terminal a login prompt would block: the run must finish on its own, offline."""
    env, work = newcomer
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS],
        stdin=follower, stdout=follower, stderr=follower, env=env, cwd=work, close_fds=True,
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has ended
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    else:
        process.kill()
    os.close(leader)
    output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    assert process.wait(timeout=60) == 0, output[-3000:]
    _check_run(work, output)


@pytest.mark.slow
def test_wandb_mode_online_without_credentials_is_a_one_line_error(newcomer):
    """An explicit ``WANDB_MODE`` is respected; ``online`` with nothing to log in with would prompt, so it is refused."""
    env, work = newcomer
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env={**env, "WANDB_MODE": "online"}, cwd=work, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("rails_lightning: error: WANDB_MODE=online but W&B has no credentials")
    assert not (work / "runs").exists()


@pytest.mark.slow
def test_no_logger_means_no_wandb(newcomer):
    env, work = newcomer
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *TINY_CLI_ARGS, "--trainer.logger=false"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=work, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    assert (run_dir / "run.json").is_file() and not (run_dir / "wandb").exists()
    assert "W&B" not in result.stderr
