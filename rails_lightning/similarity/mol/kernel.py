"""The pair gate's fast implementations and the dispatcher between them and the PyTorch reference (``gate.pair_gate``):

* ``eager``: the reference as it is;
* ``compiled``: the reference under ``torch.compile`` (Inductor fuses its elementwise passes: softmax, dropout, the
  combination, the entropy; any gate form, any device);
* ``kernel``: the fused CPU kernel (``pair_gate.cpp``) as the PyTorch operator ``rails_lightning::pair_gate``, for
  the additive gate, P and H multiples of 8; the reference where it does not apply.

The operator computes what ``gate.pair_gate`` computes for the additive pair gate (shapes and arguments as there), with
the gate dropout mask drawn by a hash of ``seed`` rather than by torch's ``bernoulli`` (the same distribution, other
draws); its backward (``rails_lightning::pair_gate_backward``, also an operator) recomputes the gates and the mask. It
has a fake (meta) implementation, so it traces under ``torch.compile``, and an autograd formula, so it trains.

The C++ is compiled on first use, once per (P_Q, P_X, H), by ``torch.utils.cpp_extension`` with the system compiler
(``$CXX`` or ``c++``) into ``$RAILS_LIGHTNING_CACHE`` (default ``~/.cache/rails_lightning``):

* for this machine's CPU (``-march=native``) or the x86-64 level in ``$RAILS_LIGHTNING_KERNEL_MARCH`` (e.g.
  ``x86-64-v2``: a build that runs on any CPU of that level);
* with OpenMP threads where the compiler accepts ``-fopenmp`` and ``$RAILS_LIGHTNING_KERNEL_OPENMP`` is not ``0``,
  serially otherwise.

Each variant has its own build directory and library name. Where the build fails (no compiler, a compiler error) the
dispatcher warns once and uses the reference; so does ``compiled`` without a C++ compiler (Inductor needs one on a
CPU). ``path_counts`` counts the calls each path took, so that a test can tell that the kernel ran.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rails_lightning.similarity.mol.gate import GateForm, GateOutput, PairGateWeights, pair_gate

SOURCE = Path(__file__).with_name("pair_gate.cpp")

GateImplementation = Literal["eager", "compiled", "kernel"]

path_counts: Counter[GateImplementation] = Counter()  # calls of ``run_pair_gate`` by the path they took


def cache_dir() -> Path:
    return Path(os.environ.get("RAILS_LIGHTNING_CACHE", Path.home() / ".cache" / "rails_lightning")) / "kernels"


def compiler() -> str | None:
    """The C++ compiler ``torch.utils.cpp_extension`` builds with (``$CXX``, else ``c++``), if it exists."""
    return shutil.which(os.environ.get("CXX", "c++"))


def target_flags() -> list[str]:
    """The target flag: ``-march=$RAILS_LIGHTNING_KERNEL_MARCH`` on x86-64, ``-mcpu=`` it elsewhere (default
    ``native``: this CPU's instruction set)."""
    march = os.environ.get("RAILS_LIGHTNING_KERNEL_MARCH")
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [f"-march={march or 'native'}"]
    return [f"-mcpu={march}"] if march else ["-mcpu=native"]


@functools.cache
def openmp_flags() -> tuple[str, ...]:
    """``("-fopenmp",)`` where the compiler accepts it (and ``$RAILS_LIGHTNING_KERNEL_OPENMP`` is not ``0``), else ()."""
    cxx = compiler()
    if os.environ.get("RAILS_LIGHTNING_KERNEL_OPENMP", "1") == "0" or cxx is None:
        return ()
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe.cpp"
        probe.write_text("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n n = omp_get_num_threads();\n return n < 1; }\n")
        try:
            accepted = subprocess.run([cxx, "-fopenmp", str(probe), "-o", str(Path(scratch) / "probe")], capture_output=True).returncode == 0
        except OSError:
            accepted = False
    return ("-fopenmp",) if accepted else ()


def library_name(num_query_components: int, num_item_components: int, hidden_dim: int) -> str:
    """The build's library (and torch operator namespace) name: the sizes, the target and OpenMP or not."""
    target = "".join(ch if ch.isalnum() else "_" for ch in target_flags()[0].split("=", 1)[1])
    threads = "omp" if openmp_flags() else "serial"
    return f"rails_lightning_pair_gate_{num_query_components}x{num_item_components}h{hidden_dim}_{target}_{threads}"


@functools.cache
def load(num_query_components: int, num_item_components: int, hidden_dim: int) -> str | None:
    """The operator namespace of the kernel for P_Q x P_X components and an H-wide MLP pair gate (0: linear), built on
    first use; None (and one warning) where it cannot be built."""
    from torch.utils import cpp_extension

    if compiler() is None:
        warnings.warn(f"pair gate kernel: no C++ compiler ({os.environ.get('CXX', 'c++')}; set CXX); using the PyTorch reference", stacklevel=2)
        return None
    name = library_name(num_query_components, num_item_components, hidden_dim)
    defines = [f"-DNQ={num_query_components}", f"-DNX={num_item_components}", f"-DNH={hidden_dim}", f"-DPAIR_GATE_LIBRARY={name}"]
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", *target_flags(), *openmp_flags(), *defines]
    build = cache_dir() / name
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=list(openmp_flags()),
                           build_directory=str(build), is_python_module=False)  # fmt: skip
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"pair gate kernel: building {SOURCE.name} failed ({error}); using the PyTorch reference", stacklevel=2)
        return None
    return name


def applies(logits: Tensor, form: GateForm, weights: PairGateWeights | None) -> bool:
    """Whether the kernel computes this gate: the additive pair gate on CPU tensors, P and H multiples of 8."""
    if form != "additive" or weights is None or logits.device.type != "cpu":
        return False
    P, H = weights.weight.shape[0], 0 if weights.hidden_weight is None else weights.hidden_weight.shape[0]
    return P % 8 == 0 and H % 8 == 0


def gate_path(implementation: GateImplementation, logits: Tensor, form: GateForm, weights: PairGateWeights | None) -> GateImplementation:
    """What ``run_pair_gate`` runs for ``implementation`` and these inputs: the kernel where it applies and is built,
    the compiled reference where a C++ compiler exists, else the eager reference."""
    if implementation == "kernel":
        if not applies(logits, form, weights):
            return "eager"
        P_Q, P_X, H = logits.shape[2], logits.shape[4], 0 if weights.hidden_weight is None else weights.hidden_weight.shape[0]
        return "kernel" if load(P_Q, P_X, H) is not None else "eager"
    if implementation == "compiled" and compiler() is None:
        warnings.warn("compiled pair gate: no C++ compiler for torch.compile; using the eager reference", stacklevel=2)
        return "eager"
    return implementation


@functools.cache
def compiled_pair_gate():
    """``gate.pair_gate`` under ``torch.compile`` (compiled on first call, again for new shapes until they are marked
    dynamic)."""
    return torch.compile(pair_gate)


def run_pair_gate(
    implementation: GateImplementation, logits: Tensor, query_gate_logits: Tensor, item_gate_logits: Tensor,
    weights: PairGateWeights | None, form: GateForm, dropout: float, training: bool, stat_items: int,
) -> GateOutput:  # fmt: skip
    """``gate.pair_gate`` (the same arguments after the first), through ``gate_path(implementation, ...)``."""
    path = gate_path(implementation, logits, form, weights)
    path_counts[path] += 1
    arguments = (logits, query_gate_logits, item_gate_logits, weights, form, dropout, training, stat_items)
    if path == "eager":
        return pair_gate(*arguments)
    if path == "compiled":
        return compiled_pair_gate()(*arguments)
    dropout = dropout if training else 0.0
    seed = int(torch.randint(0, 2**32, (), dtype=torch.int64)) if dropout > 0 else 0
    hidden = [None if w is None else w.float().contiguous() for w in (weights.hidden_weight, weights.hidden_bias, weights.output_weight)]
    return GateOutput(*torch.ops.rails_lightning.pair_gate(
        logits.contiguous(), query_gate_logits.float().contiguous(), item_gate_logits.float().contiguous(),
        weights.bias.float().contiguous(), weights.weight.float().contiguous(), *hidden, stat_items, dropout, seed,
    ))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the operators
# Arguments: logits (G, Q, P_Q, C, P_X) float32 or bfloat16; query gate logits a (G, Q, P); item gate logits b
# (1 | G, C, P); the pair gate's bias c (P,), weight W (P, P) and MLP (V1 (H, P), e1 (H,), V2 (P, H), or None);
# stat_items, dropout, seed (a 32-bit value). Returns scores (G, Q, C), usage sum (P,), entropy sum ().


def _namespace(logits: Tensor, hidden_weight: Tensor | None):
    name = load(logits.shape[2], logits.shape[4], 0 if hidden_weight is None else hidden_weight.shape[0])
    if name is None:
        raise RuntimeError("rails_lightning::pair_gate: the kernel for these sizes could not be built (see the warning)")
    return getattr(torch.ops, name)


@torch.library.custom_op("rails_lightning::pair_gate", mutates_args=())
def pair_gate_op(
    logits: Tensor, a: Tensor, b: Tensor, c: Tensor, W: Tensor, V1: Tensor | None, e1: Tensor | None, V2: Tensor | None,
    stat_items: int, dropout: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _namespace(logits, V1).forward(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed, torch.get_num_threads())


@pair_gate_op.register_fake
def _(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed):
    G, Q, _, C, _ = logits.shape
    return a.new_empty((G, Q, C)), a.new_empty(a.shape[-1:]), a.new_empty(())


@torch.library.custom_op("rails_lightning::pair_gate_backward", mutates_args=())
def pair_gate_backward_op(
    logits: Tensor, a: Tensor, b: Tensor, c: Tensor, W: Tensor, V1: Tensor | None, e1: Tensor | None, V2: Tensor | None,
    stat_items: int, dropout: float, seed: int, dscores: Tensor, dusage: Tensor, dentropy: Tensor,
) -> list[Tensor]:  # fmt: skip
    return _namespace(logits, V1).backward(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed, dscores, dusage, dentropy,
                                           torch.get_num_threads())  # fmt: skip


@pair_gate_backward_op.register_fake
def _(logits, a, b, c, W, V1, e1, V2, stat_items, dropout, seed, dscores, dusage, dentropy):
    H = 0 if V1 is None else V1.shape[0]
    P = W.shape[0]
    return [torch.empty_like(logits), torch.empty_like(a), torch.empty_like(b), torch.empty_like(c), torch.empty_like(W),
            W.new_empty((H, P)), W.new_empty((H,)), W.new_empty((P, H))]  # fmt: skip


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:8] if t is not None))
    ctx.has_hidden = inputs[5] is not None
    ctx.stat_items, ctx.dropout, ctx.seed = inputs[8:]


def _backward(ctx, dscores, dusage, dentropy):
    logits, a, b, c, W, *hidden = ctx.saved_tensors
    V1, e1, V2 = hidden if ctx.has_hidden else (None, None, None)
    G, Q, _, C, _ = logits.shape
    upstream = [torch.zeros(shape) if grad is None else grad.float().contiguous() for grad, shape in ((dscores, (G, Q, C)), (dusage, c.shape), (dentropy, ()))]
    grads = pair_gate_backward_op(logits, a, b, c, W, V1, e1, V2, ctx.stat_items, ctx.dropout, ctx.seed, *upstream)
    dlogits, da, db, dc, dW, dV1, de1, dV2 = grads
    hidden_grads = (dV1, de1, dV2) if ctx.has_hidden else (None, None, None)
    return dlogits, da, db, dc, dW, *hidden_grads, None, None, None


pair_gate_op.register_autograd(_backward, setup_context=_setup_context)
