"""Per-training-step cost of MoL's pair-gate implementations, side by side: which one is the fast path.

For each MoL config (the synthetic default's, configs/synthetic/mol.yaml, and ML-100K's, configs/ml-100k/mol.yaml) and
each precision (float32 and ``bf16-mixed``), the three ``gate_implementation``s of ``MixtureOfLogits`` -- ``eager``
(the PyTorch reference ``gate.pair_gate`` as it is), ``compiled`` (that function under ``torch.compile``: Inductor
fuses its softmax, dropout, combination and entropy passes) and ``kernel`` (the fused C++ operator
``rails_lightning::pair_gate``) -- are built by the CLI from the config and fed the same training batches in turn
(``train_step_cost.timed_step``: ``training_step``, backward, AdamW step, the forward in the precision's context). The
first ``--warmup`` steps, which include torch.compile's compilations, are not counted. Prints, per config and
precision, the median step milliseconds of each implementation and the ratios; the C++ kernel is worth keeping where
it is at least 1.5x faster per step than the compiled path.

    python benchmarks/pair_gate_step.py                # both configs, float32 and bf16-mixed
    python benchmarks/pair_gate_step.py --steps 12 --configs configs/ml-100k/mol.yaml
    python benchmarks/pair_gate_step.py --tiny         # seconds: a tiny MoL on tiny synthetic data, float32 only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import torch

from train_step_cost import build, timed_step  # benchmarks/ is the script's own folder, hence on sys.path

IMPLEMENTATIONS = ("eager", "compiled", "kernel")
PRECISIONS = ("32-true", "bf16-mixed")
#: A MoL small enough for seconds (P = 8 and a 16-wide pair MLP, so that the kernel applies), on tiny synthetic data.
TINY = [
    "--data.source.init_args.num_users=64", "--data.source.init_args.num_items=200", "--data.batch_size=8",
    "--data.max_seq_len=12", "--model.item_dim=16", "--model.objective.init_args.num_negatives=24",
    "--model.query_encoder.init_args.num_layers=1", "--model.similarity.init_args.num_query_components=4",
    "--model.similarity.init_args.num_item_components=2", "--model.similarity.init_args.component_dim=8",
    "--model.similarity.init_args.component_hidden_dim=16", "--model.similarity.init_args.gate_hidden_dim=16",
]  # fmt: skip


def measure(config: str, precision: str, extra: list[str], steps: int, warmup: int) -> dict[str, float]:
    """Median step seconds of each implementation on the same batches, interleaved step by step."""
    built = {
        name: build(["--config", config, f"--trainer.precision={precision}", *extra, f"--model.similarity.init_args.gate_implementation={name}"])
        for name in IMPLEMENTATIONS
    }
    batches = []
    for batch in built["eager"][2].train_dataloader():
        batches.append(batch)
        if len(batches) == steps + warmup:
            break
    times = {name: [] for name in built}
    for index, batch in enumerate(batches):
        for name, (model, optimiser, _, step_context) in built.items():
            torch.manual_seed(index)  # the same negatives for every implementation
            seconds = sum(timed_step(model, optimiser, batch, index, step_context))
            if index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/synthetic/mol.yaml", "configs/ml-100k/mol.yaml"])
    parser.add_argument("--steps", type=int, default=8, help="counted steps per implementation")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted first steps (torch.compile compiles in them)")
    parser.add_argument("--tiny", action="store_true", help="a tiny MoL on tiny synthetic data, float32, 3 + 2 steps")
    args = parser.parse_args()
    configs, precisions, extra = args.configs, PRECISIONS, []
    if args.tiny:
        configs, precisions, extra, args.steps, args.warmup = ["configs/synthetic/mol.yaml"], ("32-true",), TINY, 3, 2
    sys.argv[1:] = []
    warnings.filterwarnings("ignore", message=".*self.log.*")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} counted steps after {args.warmup}", flush=True)
    print("| config | precision | eager ms | compiled ms | kernel ms | compiled vs eager | kernel vs compiled | kernel kept (>= 1.5x) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs:
        for precision in precisions:
            ms = {name: seconds * 1e3 for name, seconds in measure(config, precision, extra, args.steps, args.warmup).items()}
            speedup = ms["compiled"] / ms["kernel"]
            print(f"| {config} | {precision} | {ms['eager']:.0f} | {ms['compiled']:.0f} | {ms['kernel']:.0f} | "
                  f"{ms['eager'] / ms['compiled']:.2f}x | {speedup:.2f}x | {'yes' if speedup >= 1.5 else 'no'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
