"""MoL's pair gate alone: the fused kernel against the PyTorch ops, forward and backward.

For M queries x R items with P_Q x P_X component logits (random, in [-1, 1]) and a pair gate (linear, or an MLP
with ``--hidden`` units), times ``MixtureOfLogits``' gate arithmetic both ways on the same inputs: the PyTorch ops
(``similarity.mol.gate.pair_gate``, the reference: the (M, R, P) passes and the load-balancing statistics) and the
kernel (``similarity.mol.kernel.run_pair_gate("kernel", ...)``); the component matmul is not included (it is the same for both). Gate dropout 0.2, every item's gates balanced, as in
``configs/synthetic/mol.yaml``. Prints the best of ``--repeats`` forward and backward milliseconds and the ratio.

    python benchmarks/pair_gate_kernel.py [--queries 2900] [--items 512] [--components 8,4] [--hidden 0] [--bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

from rails_lightning.runtime import keep_freed_memory
from rails_lightning.similarity.mol.gate import PairGateWeights, pair_gate
from rails_lightning.similarity.mol.kernel import gate_path, run_pair_gate


def best_times(function, inputs, upstream, repeats: int) -> tuple[float, float]:
    """Best (forward, backward) seconds over ``repeats`` calls."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        for tensor in inputs:
            tensor.grad = None
        start = time.perf_counter()
        scores, gate_sum, entropy_sum = function(*inputs)
        middle = time.perf_counter()
        ((scores * upstream).sum() + gate_sum.sum() + entropy_sum).backward()
        end = time.perf_counter()
        best = min(best, (middle - start, end - middle), key=sum)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2900, help="M (the synthetic default's target positions a batch)")
    parser.add_argument("--items", type=int, default=512, help="R (shared negatives)")
    parser.add_argument("--components", default="8,4", help="P_Q,P_X")
    parser.add_argument("--hidden", type=int, default=0, help="the MLP pair gate's hidden width; 0 for the linear gate")
    parser.add_argument("--bfloat16", action="store_true", help="bfloat16 logits, as under bf16-mixed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    P_Q, P_X = (int(n) for n in args.components.split(","))
    P, M, R, H, dropout = P_Q * P_X, args.queries, args.items, args.hidden, 0.2
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.bfloat16 else torch.float32
    logits = torch.rand(1, M, P_Q, R, P_X, generator=generator).mul(2).sub(1).to(dtype).requires_grad_()  # one group
    query, item = torch.randn(1, M, P, generator=generator), torch.randn(1, R, P, generator=generator)
    weight = (torch.randn(P, P, generator=generator) / P**0.5) if H == 0 else 0.5 * torch.eye(P)  # MLP: s I, its diagonal read
    bias = torch.zeros(P)
    hidden = () if H == 0 else (torch.randn(H, P, generator=generator) / P**0.5, torch.zeros(H), torch.randn(P, H, generator=generator) / H**0.5)
    parameters = [t.requires_grad_() for t in (query, item, weight, bias, *hidden)]
    upstream = torch.randn(1, M, R, generator=generator)
    if gate_path("kernel", logits, "additive", PairGateWeights(weight, bias, *hidden)) != "kernel":
        raise SystemExit("the kernel could not be built or does not apply to these sizes (see the warning above)")

    def pytorch(logits, query, item, weight, bias, *rest):  # the reference: the gate arithmetic as PyTorch ops
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bfloat16):  # bfloat16 logits come from bf16-mixed
            return pair_gate(logits, query, item, PairGateWeights(weight, bias, *rest), "additive", dropout, True, R)

    def fused(logits, query, item, weight, bias, *rest):
        return run_pair_gate("kernel", logits, query, item, PairGateWeights(weight, bias, *rest), "additive", dropout, True, R)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; M={M} R={R} P={P_Q}x{P_X} "
          f"{'MLP gate H=' + str(H) if H else 'linear gate'}, {dtype}")  # fmt: skip
    print("| gate | forward ms | backward ms | total ms | x fused |")
    print("|---|---|---|---|---|")
    for function in (fused, pytorch):  # one untimed call each: the kernel's first call loads its library
        best_times(function, [logits, *parameters], upstream, 1)
    times = {name: best_times(function, [logits, *parameters], upstream, args.repeats) for name, function in (("fused", fused), ("PyTorch ops", pytorch))}
    for name, (forward, backward) in times.items():
        print(f"| {name} | {forward * 1e3:.1f} | {backward * 1e3:.1f} | {(forward + backward) * 1e3:.1f} | {sum(times[name]) / sum(times['fused']):.2f} |")


if __name__ == "__main__":
    main()
