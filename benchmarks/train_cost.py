"""Training cost per epoch: MoL (`configs/synthetic/mol.yaml`) against the default two-tower fit.

Both models are built by the CLI's own parser (`rails_lightning.cli.main(..., run=False)`) from
the embedded default, MoL with `--config configs/synthetic/mol.yaml` on top: the same synthetic
data, SASRec encoder, batch size, negatives and optimiser, only the similarity differs. Each is
fitted for a few epochs with its config's full-corpus evaluation (``CorpusEvaluation`` as configured,
e.g. MoL's approximate top-k at every 4th validation and the last; no logger, no checkpoints), in the
precision its options ask for (``--trainer.precision``); the two alternate in rounds, so that the
machine's noise hits both alike. Glibc's malloc is set as `python -m rails_lightning
fit` sets it.

Reported per round and as medians over rounds: the mean seconds per epoch of each fit (training steps
+ the epoch's validation), of which training, and the ratio MoL / two-tower. The first epoch of every
fit is a warm-up and is not counted.

    python benchmarks/train_cost.py [--epochs 3] [--rounds 3] [--mol-args --model.similarity.init_args.X=Y ...]
    python benchmarks/train_cost.py --tiny   # seconds: both fits on 150 users and 200 items, 2 epochs, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.cli import main
from rails_lightning.runtime import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
MOL_CONFIG = REPO / "configs" / "synthetic" / "mol.yaml"
# --tiny: the synthetic default shrunk to seconds, for both models (before --mol-args).
TINY_ARGS = [
    "--data.source.init_args.num_users=150", "--data.source.init_args.num_items=200", "--data.source.init_args.num_clusters=8",
    "--data.source.init_args.mean_sequence_length=12", "--data.max_seq_len=12", "--data.batch_size=32", "--model.item_dim=16",
]


class EpochTimer(pl.Callback):
    """Wall seconds of every training epoch, split into the training steps and the validation."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, float]] = []  # (epoch seconds, validation seconds)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start, self._validation = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validation += time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((time.perf_counter() - self._epoch_start, self._validation))


def epoch_seconds(cli_args: list[str], epochs: int) -> tuple[float, float]:
    """Mean (epoch seconds, training seconds) over epochs 2..``epochs`` of one fit."""
    with tempfile.TemporaryDirectory() as run_dir:
        cli = main([*cli_args, f"--run_dir={run_dir}"], run=False)
        timer = EpochTimer()
        evaluation = next(callback for callback in cli.trainer.callbacks if isinstance(callback, CorpusEvaluation))  # the config's
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[evaluation, timer],
            precision=cli.trainer.precision,  # e.g. --trainer.precision=bf16-mixed among the MoL options
        )
        trainer.fit(cli.model, datamodule=cli.datamodule)
    counted = timer.epochs[1:]
    return statistics.mean(e for e, _ in counted), statistics.mean(e - v for e, v in counted)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is not counted")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of two-tower / MoL")
    parser.add_argument("--mol-config", default=str(MOL_CONFIG), help="the MoL config file")
    parser.add_argument("--tiny", action="store_true", help="both fits on tiny synthetic data, 2 epochs, 1 round: checks that it "
                        "runs, measures nothing")
    parser.add_argument("--mol-args", nargs=argparse.REMAINDER, default=[], help="more CLI options for MoL only (last)")
    args = parser.parse_args()
    if args.tiny:
        args.epochs, args.rounds = 2, 1
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is a warm-up)")
    sys.argv[1:] = []  # the CLI below parses only the options given to it
    keep_freed_memory()
    runs = {"TwoTower": [], "MoL": []}
    common = TINY_ARGS if args.tiny else []
    command = {"TwoTower": [*common], "MoL": ["--config", args.mol_config, *common, *args.mol_args]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MoL options: {' '.join(command['MoL'])}", flush=True)
    for round_ in range(args.rounds):
        for name in runs:
            runs[name].append(epoch_seconds(command[name], args.epochs))
        (dot_epoch, dot_train), (mol_epoch, mol_train) = runs["TwoTower"][-1], runs["MoL"][-1]
        print(
            f"round {round_}: two-tower {dot_epoch:.2f} s/epoch (training {dot_train:.2f}), "
            f"MoL {mol_epoch:.2f} s/epoch (training {mol_train:.2f}); ratio {mol_epoch / dot_epoch:.2f} "
            f"(training only {mol_train / dot_train:.2f})",
            flush=True,
        )
    ratios = [m[0] / d[0] for d, m in zip(runs["TwoTower"], runs["MoL"])]
    train_ratios = [m[1] / d[1] for d, m in zip(runs["TwoTower"], runs["MoL"])]
    dot, mol = ([statistics.median(x) for x in zip(*runs[name])] for name in runs)
    print(
        f"median: two-tower {dot[0]:.2f} s/epoch (training {dot[1]:.2f}), MoL {mol[0]:.2f} s/epoch (training {mol[1]:.2f}); "
        f"ratio {statistics.median(ratios):.2f} (training only {statistics.median(train_ratios):.2f}; "
        f"per round: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main_()
