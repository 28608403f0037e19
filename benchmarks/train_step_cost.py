"""Training-step cost of model variants, interleaved step by step: the steady measure on a noisy machine.

Every variant is built by the CLI's own parser (`rails_lightning.cli.main(..., run=False)`) from the
embedded default plus its options, on the same data; the same training batches are fed to each in
turn (one step of variant 1, one of variant 2, ..., then the next batch), so that a change of the
machine's load hits all variants alike. A step is the module's `training_step`, the backward pass and
an AdamW step, the forward under the variant's ``--trainer.precision`` (autocast for ``bf16-mixed``, as
`fit` runs it). The first ``--warmup`` steps are not counted.

Variants are given as ``NAME=OPTIONS`` (options as on the `fit` command line, separated by spaces);
the first variant is the reference of the ratios:

    python benchmarks/train_step_cost.py --steps 8 \\
        "two-tower=" \\
        "MoL=--config configs/synthetic/mol.yaml"

Prints the median forward, backward, optimiser and step milliseconds of each variant and its step
ratio to the first.

``--logit-floor P_Q,P_X,D_P,R`` adds two rows that are not models: the component-logit matmul of a MoL
with those sizes alone, (M * P_Q, D_P) @ (D_P, R * P_X) for the M target positions of each batch, forward
and backward, in float32 and in bfloat16. Every MoL that mixes all P_Q x P_X component logits of every
(position, negative) pair pays at least this, so it is a floor under that MoL's step on this machine.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings

import torch

from rails_lightning.cli import main
from rails_lightning.runtime import keep_freed_memory


def build(options: list[str]):
    cli = main([*options, "--trainer.logger=false"], run=False)
    model, datamodule = cli.model, cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    model.train()
    optimiser = model.build_optimizer()  # AdamW alone: a step is timed, whatever the schedule
    # The trainer's precision (e.g. --trainer.precision=bf16-mixed) wraps the forward as `fit` would: autocast.
    return model, optimiser, datamodule, cli.trainer.precision_plugin.train_step_context


def timed_step(model, optimiser, batch, index: int, step_context, synchronise=lambda: None) -> tuple[float, float, float]:
    """Seconds of the forward (training_step, in the trainer's precision context), backward and optimiser step;
    ``synchronise`` ends each phase (``torch.cuda.synchronize`` on a GPU, whose kernels run asynchronously)."""
    start = time.perf_counter()
    with step_context():
        loss = model.training_step(batch, index)
    synchronise()
    forward = time.perf_counter()
    loss.backward()
    synchronise()
    backward = time.perf_counter()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    synchronise()
    end = time.perf_counter()
    return forward - start, backward - forward, end - backward


def timed_logits(batch, sizes: tuple[int, int, int, int], dtype: torch.dtype) -> tuple[float, float, float]:
    """Seconds of the component-logit matmul alone, forward and backward, at this batch's M target positions."""
    P_Q, P_X, D_P, R = sizes
    M = int((batch.target_ids > 0).sum())
    queries = torch.randn(M * P_Q, D_P, dtype=dtype, requires_grad=True)
    items = torch.randn(R * P_X, D_P, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    logits = queries @ items.T  # (M * P_Q, R * P_X)
    forward = time.perf_counter()
    logits.backward(torch.ones_like(logits))
    backward = time.perf_counter()
    return forward - start, backward - forward, 0.0


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='NAME=OPTIONS, e.g. "MoL=--config configs/synthetic/mol.yaml"')
    parser.add_argument("--steps", type=int, default=8, help="counted steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted first steps per variant")
    parser.add_argument(
        "--logit-floor",
        metavar="P_Q,P_X,D_P,R",
        help="also time a MoL's component-logit matmul alone (forward + backward, float32 and bfloat16) at these sizes",
    )
    args = parser.parse_args()
    floor_sizes = None
    if args.logit_floor:
        try:
            floor_sizes = tuple(int(size) for size in args.logit_floor.split(","))
        except ValueError:
            floor_sizes = ()
        if len(floor_sizes) != 4 or min(floor_sizes) < 1:
            parser.error(f"--logit-floor takes four positive integers P_Q,P_X,D_P,R, got {args.logit_floor!r}")
    variants = {}
    for spec in args.variants:
        name, sep, options = spec.partition("=")
        if not sep or not name:
            parser.error(f"a variant is NAME=OPTIONS, got {spec!r}")
        variants[name] = shlex.split(options)
    sys.argv[1:] = []
    keep_freed_memory()
    warnings.filterwarnings("ignore", message=".*self.log.*")
    built = {name: build(options) for name, options in variants.items()}
    # One batch stream for all variants: the first variant's loader (same data and batch size for all).
    first_datamodule = next(iter(built.values()))[2]
    batches = []
    for batch in first_datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == args.steps + args.warmup:
            break
    floors = {"component logits alone, float32": torch.float32, "component logits alone, bfloat16": torch.bfloat16} if floor_sizes else {}
    times = {name: [] for name in [*built, *floors]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(batches)} batches", flush=True)
    for index, batch in enumerate(batches):
        for name, (model, optimiser, _, step_context) in built.items():
            measured = timed_step(model, optimiser, batch, index, step_context)
            if index >= args.warmup:
                times[name].append(measured)
        for name, dtype in floors.items():
            measured = timed_logits(batch, floor_sizes, dtype)
            if index >= args.warmup:
                times[name].append(measured)
    reference = None
    print("| variant | forward ms | backward ms | optimiser ms | step ms | x first |")
    print("|---|---|---|---|---|---|")
    for name, rows in times.items():
        forward, backward, optimiser_s = (statistics.median(column) * 1e3 for column in zip(*rows))
        step = statistics.median(sum(row) for row in rows) * 1e3
        reference = reference or step
        print(f"| {name} | {forward:.0f} | {backward:.0f} | {optimiser_s:.0f} | {step:.0f} | {step / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main_()
