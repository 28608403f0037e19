"""MoL's pair gate as one fused CPU kernel (``pair_gate.cpp``), built on first use.

``MixtureOfLogits(fused_pair_gate=True)`` scores M queries x R items through ``fused_pair_gate``: for each
(query, item) pair, the gate logits from its P component logits l (W l + c + a + b with the linear pair gate,
plus V2 silu(V1 l + e1) with the MLP one), softmax, gate dropout and the mixture, in registers, instead of a
dozen PyTorch passes over (M, R, P) tensors; the backward recomputes them. Shape legend as in
``mixture_of_logits``: M queries, R items, P_Q / P_X query / item components, P = P_Q * P_X, H the MLP pair
gate's hidden width. Under bf16-mixed (bfloat16 logits) on a CPU with AVX512-BF16 the gate's matrix-vector
products and its weight gradients take bfloat16 operands and accumulate in float32, as autocast's bfloat16 linear
layers would.

The kernel is compiled once per (P_Q, P_X, H) with the system C++ compiler (``$CXX`` or ``g++``, with OpenMP)
for this machine's CPU into ``$RAILS_LIGHTNING_CACHE`` (default ``~/.cache/rails_lightning``) and loaded
with ctypes; ``load_kernel`` returns None, with one warning, where that fails, and the similarity falls
back to the PyTorch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("pair_gate.cpp")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17")


def _cpu_signature() -> str:
    """The CPU model and flags: a kernel built with -march=native is only reused on the same kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def cache_dir() -> Path:
    return Path(os.environ.get("RAILS_LIGHTNING_CACHE", Path.home() / ".cache" / "rails_lightning")) / "kernels"


@functools.lru_cache(maxsize=None)
def load_kernel(num_query_components: int, num_item_components: int, hidden_dim: int = 0) -> ctypes.CDLL | None:
    """The compiled kernel for P_Q x P_X components and an H-wide MLP pair gate (0: linear), built on first use;
    None (and a warning) if it cannot be."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("fused_pair_gate: no C++ compiler (set CXX or install g++); using the PyTorch ops", stacklevel=2)
        return None
    defines = (f"-DNQ={num_query_components}", f"-DNX={num_item_components}", f"-DNH={hidden_dim}")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"fused_pair_gate: cannot run the compiler {compiler!r} ({error}); using the PyTorch ops", stacklevel=2)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *defines, version, _cpu_signature()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"pair_gate_{num_query_components}x{num_item_components}h{hidden_dim}_{key}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, then renamed: safe for parallel processes
                built = Path(scratch) / library.name
                result = subprocess.run([compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
                if result.returncode != 0:
                    warnings.warn(
                        f"fused_pair_gate: compiling {SOURCE.name} failed, using the PyTorch ops:\n{result.stderr[-2000:]}", stacklevel=2
                    )
                    return None
                os.replace(built, library)
        kernel = ctypes.CDLL(str(library))
    except OSError as error:  # an unwritable cache, a library that does not load
        warnings.warn(f"fused_pair_gate: cannot build or load {library} ({error}); using the PyTorch ops", stacklevel=2)
        return None
    i64, u32, f32, ptr, i32 = ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    for dtype in ("float32", "bfloat16"):
        forward = getattr(kernel, f"pair_gate_forward_{dtype}")
        forward.argtypes = [i64, i64, i64, *[ptr] * 11, u32, u32, f32, ptr, ptr, ptr, i32]
        forward.restype = None
        backward = getattr(kernel, f"pair_gate_backward_{dtype}")
        backward.argtypes = [i64, i64, i64, *[ptr] * 11, u32, u32, f32, ptr, ptr, f32, *[ptr] * 7, i32]
        backward.restype = None
    kernel.pair_gate_gathered_scores_float32.argtypes = [i64, i64, *[ptr] * 11, ptr, i32]
    kernel.pair_gate_gathered_scores_float32.restype = None
    return kernel


def _dropout_threshold(dropout: float) -> int:
    """A component is dropped when its 32-bit hash is below this: probability ``dropout``."""
    return min(round(dropout * 2**32), 2**32 - 1)


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _gate_weights(bias: Tensor, weight: Tensor, hidden_weight: Tensor | None, hidden_bias: Tensor | None,
                  output_weight: Tensor | None) -> list[Tensor | None]:  # fmt: skip
    """The gate's weights in the kernel's argument order: c, W, W^T, V1, V1^T, e1, V2, V2^T (None without the MLP)."""
    transpose = lambda w: None if w is None else w.t().contiguous()  # noqa: E731
    return [bias, weight, transpose(weight), hidden_weight, transpose(hidden_weight), hidden_bias, output_weight, transpose(output_weight)]


class _PairGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, query_gate_logits, item_gate_logits, weight, bias, hidden_weight, hidden_bias, output_weight,
                kernel, stat_items, dropout, seed):  # fmt: skip
        M, P_Q, R, P_X = logits.shape
        P = P_Q * P_X
        weights = _gate_weights(bias, weight, hidden_weight, hidden_bias, output_weight)
        scores = logits.new_empty((M, R), dtype=torch.float32)
        usage = torch.zeros(P, dtype=torch.float64)
        entropy = torch.zeros((), dtype=torch.float64)
        dtype = "bfloat16" if logits.dtype == torch.bfloat16 else "float32"
        gate = [M, R, stat_items, *map(_address, (logits, query_gate_logits, item_gate_logits, *weights)),
                seed, _dropout_threshold(dropout), 1.0 / (1.0 - dropout)]  # fmt: skip
        getattr(kernel, f"pair_gate_forward_{dtype}")(*gate, scores.data_ptr(), usage.data_ptr(), entropy.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(logits, query_gate_logits, item_gate_logits)
        ctx.weights, ctx.gate, ctx.kernel, ctx.dtype = weights, gate, kernel, dtype  # the weights' addresses are in gate
        return scores, usage.float(), entropy.float()

    @staticmethod
    def backward(ctx, dscores, dusage, dentropy):
        logits, query_gate_logits, item_gate_logits = ctx.saved_tensors
        _, weight, _, _, hidden_t, hidden_bias, _, output_t = ctx.weights
        zeros = lambda like: None if like is None else torch.zeros_like(like)  # noqa: E731
        dscores, dusage = dscores.float().contiguous(), dusage.float().contiguous()
        dlogits = torch.empty_like(logits)
        dquery = torch.empty_like(query_gate_logits)
        ditem = torch.zeros_like(item_gate_logits)
        dweight_t, dhidden_t, doutput_t, dhidden_bias = zeros(weight), zeros(hidden_t), zeros(output_t), zeros(hidden_bias)  # W^T, V1^T, V2^T, e1
        getattr(ctx.kernel, f"pair_gate_backward_{ctx.dtype}")(
            *ctx.gate, dscores.data_ptr(), dusage.data_ptr(), float(dentropy),
            *map(_address, (dlogits, dquery, ditem, dweight_t, dhidden_t, doutput_t, dhidden_bias)), torch.get_num_threads(),
        )  # fmt: skip
        transpose = lambda gradient: None if gradient is None else gradient.t()  # noqa: E731
        return (dlogits, dquery, ditem, dweight_t.t(), dquery.sum(0), transpose(dhidden_t), dhidden_bias, transpose(doutput_t),
                None, None, None, None)  # fmt: skip


def fused_pair_gate(
    kernel: ctypes.CDLL,
    logits: Tensor,
    query_gate_logits: Tensor,
    item_gate_logits: Tensor,
    weight: Tensor,
    bias: Tensor,
    stat_items: int,
    dropout: float,
    hidden: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MoL scores of M queries x R items, and the gate statistics the load-balancing loss needs.

    Args:
        kernel: ``load_kernel(P_Q, P_X, H)``, H the width of ``hidden`` (0 without).
        logits: (M, P_Q, R, P_X) component logits, float32 or bfloat16 (the component matmul's output as it is).
        query_gate_logits: (M, P); item_gate_logits: (R, P).
        weight: (P, P), the linear map of the logits into the gate logits (the linear pair gate with the learned
            scale on its diagonal; with the MLP pair gate the scale times the identity); bias: (P,).
        stat_items: the gate statistics cover the pairs of the first this-many items.
        dropout: gate dropout probability (0 outside training).
        hidden: the MLP pair gate's (H, P) first weight, (H,) first bias and (P, H) second weight (its second bias
            is ``bias``); None for the linear pair gate.

    Returns: scores (M, R); the sum over the counted pairs of the gates (P,) and of their entropies ().
    The dropout mask is a hash of (a seed drawn from torch's generator, pair, component).
    """
    seed = int(torch.randint(0, 2**32, (), dtype=torch.int64)) if dropout > 0 else 0
    hidden_weight, hidden_bias, output_weight = (None, None, None) if hidden is None else (h.float().contiguous() for h in hidden)
    return _PairGate.apply(
        logits.contiguous(), query_gate_logits.float().contiguous(), item_gate_logits.float().contiguous(),
        weight.float().contiguous(), bias.float().contiguous(), hidden_weight, hidden_bias, output_weight,
        kernel, stat_items, dropout, seed,
    )  # fmt: skip


def fused_gathered_scores(
    kernel: ctypes.CDLL,
    logits: Tensor,
    query_gate_logits: Tensor,
    item_gate_logits: Tensor,
    weight: Tensor,
    bias: Tensor,
    hidden: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Scores (M, C) of M queries x their own C candidates, without gradients or dropout (the re-ranking of a
    RAILS approximate top-k): logits (M, P_Q, C, P_X) float32, item gate logits (M, C, P); the rest as
    ``fused_pair_gate``."""
    M, P_Q, C, P_X = logits.shape
    with torch.no_grad():
        hidden_weight, hidden_bias, output_weight = (None, None, None) if hidden is None else (h.float().contiguous() for h in hidden)
        tensors = [t.float().contiguous() for t in (logits, query_gate_logits, item_gate_logits)]
        tensors += _gate_weights(bias.float().contiguous(), weight.float().contiguous(), hidden_weight, hidden_bias, output_weight)
        scores = torch.empty(M, C, dtype=torch.float32)
        kernel.pair_gate_gathered_scores_float32(M, C, *map(_address, tensors), scores.data_ptr(), torch.get_num_threads())
    return scores
