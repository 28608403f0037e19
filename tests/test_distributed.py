"""Distributed runs for real: a 2-process DDP fit on the CPU (gloo) through the CLI (the MoL one mining hard
negatives from the corpus index the evaluation shares), and its checkpoint validated with 1 and with 2
processes giving the same full-corpus metrics; the samplers that shard training batches and evaluation
queries across processes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_CLI_ARGS
from rails_lightning.data.datamodule import _ShardedBatches
from rails_lightning.runs import RunRecord

# The MoL of the tiny models (tests/conftest.py), from the command line.
TINY_MOL = ["--model=MoL", *(f"--model.similarity.init_args.{k}={v}" for k, v in
            {"num_query_components": 4, "num_item_components": 2, "component_dim": 16, "component_hidden_dim": 32}.items())]
DDP_CPU = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
# Hard negatives mined from epoch 1 on: each process encodes half the corpus once per epoch (at validation), for both.
MINED = ["--model.objective=rails_lightning.objectives.MinedNegatives", "--model.objective.init_args.num_mined=8",
         "--model.objective.init_args.mining_depth=30"]


def _cli(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], [*TINY_MOL, *MINED]], ids=["TwoTower", "MoL-mined"])
def test_ddp_fit_then_validate_with_one_or_two_processes_agrees(tmp_path, model):
    run_dir = tmp_path / "run"
    # Odd query counts (151 users, 32 per batch) leave the two processes unequal shares.
    args = [*TINY_CLI_ARGS, "--data.source.init_args.num_users=151", "--data.eval_batch_size=32", *model]
    _cli("fit", *args, *DDP_CPU, "--trainer.devices=2", f"--run_dir={run_dir}", cwd=tmp_path)
    record = RunRecord.read(run_dir)
    assert record.status == "finished" and record.epochs == 2 and len(record.history) == 2
    assert record.model == ("MoL" if model else "TwoTower")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"

    metrics = {}
    for devices in (1, 2):
        _cli("validate", *args, *DDP_CPU, f"--trainer.devices={devices}", f"--run_dir={run_dir}", f"--ckpt_path={checkpoint}",
             cwd=tmp_path)
        metrics[devices] = json.loads((run_dir / "validate.json").read_text())["val"]
    quality = [key for key in metrics[1] if not key.endswith("_seconds")]
    assert len(quality) >= 13 and set(quality) <= set(metrics[2])
    for key in quality:
        assert metrics[2][key] == pytest.approx(metrics[1][key], abs=1e-6), key
    assert 0 < metrics[1]["val/hr@200"] <= 1


def _sampled(dataset_size, batch_size, world, shuffle, epoch=0, seed=0):
    dataset = list(range(dataset_size))
    shards = []
    for rank in range(world):
        sampler = _ShardedBatches(dataset, batch_size, world, rank, shuffle, seed)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    return shards


def test_training_batches_are_dealt_evenly_and_cover_every_sequence():
    shards = _sampled(103, 10, 2, shuffle=True)  # 11 batches -> padded to 12, 6 each
    assert [len(s) for s in shards] == [6, 6]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(103)) and len(seen) <= 103 + 10
    assert shards == _sampled(103, 10, 2, shuffle=True)  # reproducible
    assert shards != _sampled(103, 10, 2, shuffle=True, epoch=1)  # a new order each epoch


def test_evaluation_queries_are_split_without_padding():
    shards = _sampled(151, 32, 2, shuffle=False)
    flat = [[i for batch in shard for i in batch] for shard in shards]
    assert flat[0] + flat[1] == list(range(151))  # every query exactly once, in order
    assert max(len(batch) for shard in shards for batch in shard) <= 32
