"""The fused pair-gate kernel, the operator ``rails_lightning::pair_gate``: it builds wherever a C++ compiler exists
(every parity test below fails, not skips, when it does not build there), it passes ``torch.library.opcheck``, and
through ``MixtureOfLogits(gate_implementation="kernel")`` it gives the reference's scores, load-balancing loss and gradients for
items shared by every group and for each group's own; a gate dropout of the right rate that the backward reproduces;
bfloat16 logits; the fallback to the reference where it cannot build; and a real fit under bf16-mixed.

The build variant under test follows the environment (``RAILS_LIGHTNING_KERNEL_MARCH``, ``RAILS_LIGHTNING_KERNEL_OPENMP``):
CI runs this file at ``-march=native``, at ``x86-64-v2`` and without OpenMP."""

import functools

import pytest
import torch

from conftest import LossRecorder, cpu_trainer, make_tiny_data
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.models import MeanPoolEncoder, RetrievalModule
from rails_lightning.objectives import SharedNegatives
from rails_lightning.retrieval import SearchOptions
from rails_lightning.similarity import MixtureOfLogits, MoLItems, with_group_dim
from rails_lightning.similarity.mol import kernel
from rails_lightning.similarity.mol.gate import PairGateWeights, pair_gate
from rails_lightning.similarity.mol.topk import CombinedTopK, select_items

D, NUM_USERS = 16, 10


@pytest.fixture
def compiler_present():
    """Skips a test only where there is no C++ compiler: with one, the kernel must build."""
    if kernel.compiler() is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")


@pytest.fixture
def kernel_runs(compiler_present):
    """Asserts, around a test, that the dispatcher ran the kernel (not the reference) during it."""
    before = kernel.path_counts["kernel"]
    yield
    assert kernel.path_counts["kernel"] > before, "the kernel did not run (see the build warning)"


def _pair(P_Q=4, P_X=2, perturb=True, **options):
    """The same MoL twice, reference and fused kernel, with identical weights (the pair gate's drawn N(0, 1) unless not
    ``perturb``)."""
    torch.manual_seed(0)
    options = {"component_dim": 8, "gate_hidden_dim": 5, "logit_gate_hidden_dim": 0, "gate_logit_scale": 0.5, **options}
    reference = MixtureOfLogits(D, NUM_USERS, P_Q, P_X, **options)
    fused = MixtureOfLogits(D, NUM_USERS, P_Q, P_X, gate_implementation="kernel", **options)
    with torch.no_grad():  # a pair gate far from its initialisation: every weight and bias matters
        generator = torch.Generator().manual_seed(1)
        for parameter in reference.gate.pair_part.parameters() if perturb else ():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _inputs(G=1, Q=7, C=13, own_items=False, seed=2):
    """Query states (G, Q, D), item vectors ((G | 1), C, D), user ids (G, Q)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(G, Q, D, generator=g).requires_grad_()
    vectors = torch.randn(G if own_items else 1, C, D, generator=g).requires_grad_()
    return states, vectors, torch.zeros(G, Q, dtype=torch.long)


def _training_outputs(similarity, states, vectors, users, upstream):
    """Scores, auxiliary outputs and every gradient of a weighted sum of the scores and the load-balancing loss."""
    scores, auxiliary = similarity.score(similarity.query_representation(states, users), similarity.item_representation(vectors), auxiliary=True)
    loss = (scores * upstream).sum() + 10 * auxiliary.losses["load_balancing_loss"]
    parameters = dict(similarity.named_parameters())
    grads = torch.autograd.grad(loss, [states, vectors, *parameters.values()])
    return scores, auxiliary, dict(zip(["states", "vectors", *parameters], grads))


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
@pytest.mark.parametrize("balanced_negatives", [0, 5])
@pytest.mark.parametrize(
    "sizes, layout",
    [((4, 2), (1, 7, False)), ((8, 4), (1, 7, False)), ((8, 4), (7, 1, True)), ((8, 4), (3, 4, True))],
    ids=["4x2-shared", "8x4-shared", "8x4-per-query", "8x4-per-sequence"],
)
def test_training_scores_loss_and_gradients_equal_the_reference(kernel_runs, sizes, layout, balanced_negatives, pair_gate_hidden):
    """Linear (hidden 0) and MLP pair gates; items shared by one group of 7 queries, 7 groups of one query with their
    own items (per-query negatives), 3 groups of 4 queries with their own items (per-sequence negatives); the gate
    statistics of all negatives or of the first 5."""
    reference, fused = _pair(*sizes, gate_dropout=0.0, load_balancing_negatives=balanced_negatives, logit_gate_hidden_dim=pair_gate_hidden)
    G, Q, own_items = layout
    states, vectors, users = _inputs(G, Q, own_items=own_items)
    upstream = torch.randn(G, Q, 13, generator=torch.Generator().manual_seed(3))
    scores, auxiliary, grads = _training_outputs(reference, states, vectors, users, upstream)
    fused_scores, fused_auxiliary, fused_grads = _training_outputs(fused, states, vectors, users, upstream)
    torch.testing.assert_close(fused_scores, scores)
    for name in ("load_balancing", "gate_entropy", "gate_usage_max", "gate_usage_min", "gate_effective_components"):
        torch.testing.assert_close(fused_auxiliary.statistics[name], auxiliary.statistics[name], msg=name)
    torch.testing.assert_close(fused_auxiliary.losses["load_balancing_loss"], auxiliary.losses["load_balancing_loss"])
    for name, grad in grads.items():  # summation orders differ (FMA or not, vector widths): 1e-4 of the largest entry
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_retrieval_scores_and_rerankings_equal_the_reference(kernel_runs, pair_gate_hidden):
    """The exact top-k's blocks (one group of queries x corpus rows) and the RAILS re-ranking (each query against its
    own candidates) go through the kernel, without gradients or dropout: the reference's scores, the same ids."""
    reference, fused = _pair(8, 4, logit_gate_hidden_dim=pair_gate_hidden)
    reference.eval(), fused.eval()
    states, vectors, users = _inputs(Q=6, C=301)
    with torch.inference_mode():
        queries, items = reference.query_representation(states[0], users[0]), reference.item_representation(vectors[0])  # (6,), (301,)
        shared = with_group_dim(queries, 0), with_group_dim(items, 0)
        torch.testing.assert_close(fused.score(*shared)[0], reference.score(*shared)[0])
        candidates = torch.randint(0, 301, (6, 17), generator=torch.Generator().manual_seed(4))
        own = with_group_dim(queries, 1), select_items(items, candidates)  # (6, 1), (6, 17)
        torch.testing.assert_close(fused.score(*own)[0], reference.score(*own)[0])
        found = [CombinedTopK(similarity, items, SearchOptions(), k_prime=4, averaged_k_prime=16).fetch(queries, 10)
                 for similarity in (reference, fused)]  # fmt: skip
        torch.testing.assert_close(found[1][0], found[0][0])
        assert torch.equal(found[1][1], found[0][1])


def _operator_inputs(G, Q, C, P_Q, P_X, H, own_items=False, seed=3, logit_dtype=torch.float32):
    """Random arguments of ``rails_lightning::pair_gate``: logits, a, b, c, W, V1, e1, V2 (N(0, 1)-scaled weights)."""
    g = torch.Generator().manual_seed(seed)
    P = P_Q * P_X
    logits = torch.randn(G, Q, P_Q, C, P_X, generator=g).to(logit_dtype)
    a, b, c = torch.randn(G, Q, P, generator=g), torch.randn(G if own_items else 1, C, P, generator=g), torch.randn(P, generator=g)
    W = torch.randn(P, P, generator=g) / P**0.5 if H == 0 else 0.5 * torch.eye(P)  # the MLP gate reads W's diagonal
    hidden = [None] * 3 if H == 0 else [torch.randn(H, P, generator=g) / P**0.5, torch.randn(H, generator=g), torch.randn(P, H, generator=g) / H**0.5]
    return [logits, a, b, c, W, *hidden]


@pytest.mark.parametrize("own_items", [False, True])
@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_opcheck(compiler_present, pair_gate_hidden, own_items):
    """torch.library's own checks of the operator (called directly: it raises where the kernel did not build): schema,
    fake (meta) implementation, autograd registration, and tracing (aot dispatch) with static and dynamic shapes."""
    inputs = _operator_inputs(2, 3, 10, 4, 2, pair_gate_hidden, own_items)
    leaves = [None if t is None else t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.rails_lightning.pair_gate.default, (*leaves, 6, 0.0, 0))
    torch.library.opcheck(torch.ops.rails_lightning.pair_gate.default, (*leaves, 10, 0.3, 12345))


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_bfloat16_gate_products_stay_within_bfloat16_precision(kernel_runs, pair_gate_hidden):
    """With bfloat16 logits the kernel's matrix-vector products run in bfloat16 (float32 accumulation) where the CPU
    has AVX512-BF16: on the same logit values, once bfloat16 and once float32, the scores, gate statistics and every
    gradient agree to bfloat16 precision."""
    P_Q, P_X, H = 8, 4, pair_gate_hidden
    inputs = _operator_inputs(1, 9, 40, P_Q, P_X, H, logit_dtype=torch.bfloat16)
    weights = lambda t: PairGateWeights(t[4], t[3], *t[5:])  # noqa: E731
    upstream, usage_weights = torch.randn(1, 9, 40), torch.randn(P_Q * P_X)

    def outputs(logit_dtype):
        leaves = [None if t is None else t.clone().requires_grad_() for t in [inputs[0].to(logit_dtype), *inputs[1:]]]
        scores, usage, entropy = kernel.run_pair_gate("kernel", leaves[0], leaves[1], leaves[2], weights(leaves), "additive", 0.0, False, 40)
        present = [leaf for leaf in leaves if leaf is not None]
        grads = torch.autograd.grad((scores * upstream).sum() + usage @ usage_weights + entropy, present)
        return [scores.detach(), usage.detach(), entropy.detach()], [grad.float() for grad in grads]

    (values_bf16, grads_bf16), (values_fp32, grads_fp32) = outputs(torch.bfloat16), outputs(torch.float32)
    for name, got, expected in zip(["scores", "usage", "entropy"], values_bf16, values_fp32):
        assert float((got - expected).norm() / expected.norm()) < 0.01, name
    names = ["logits", "query", "item", "bias", "weight", "hidden weight", "hidden bias", "output weight"]
    for name, got, expected in zip(names, grads_bf16, grads_fp32):
        if H > 0 and name == "weight":  # only the diagonal is a gradient there
            got, expected = got.diagonal(), expected.diagonal()
        assert float((got - expected).norm() / expected.norm()) < 0.01, name


def test_bfloat16_logits_under_autocast_match_float32(kernel_runs):
    """Under bf16-mixed the component matmul gives bfloat16 logits: the kernel reads and writes them as such."""
    _, fused = _pair(8, 4, perturb=False, gate_dropout=0.0, logit_gate_hidden_dim=16)
    states, vectors, users = _inputs(Q=9, C=40)
    upstream = torch.randn(1, 9, 40)
    scores, _, grads = _training_outputs(fused, states, vectors, users, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_scores, _, bf16_grads = _training_outputs(fused, states, vectors, users, upstream)
    assert bf16_scores.dtype == torch.float32
    torch.testing.assert_close(bf16_scores, scores, rtol=0.05, atol=0.02)
    torch.testing.assert_close(bf16_grads["states"].float(), grads["states"], rtol=0.1, atol=0.05)


def _uniform_gate(M, R, P_Q=4, P_X=2):
    """Operator inputs of M queries x R items with every logit 1 and every gate logit 0."""
    P = P_Q * P_X
    return torch.ones(1, M, P_Q, R, P_X), torch.zeros(1, M, P), torch.zeros(1, R, P), PairGateWeights(torch.zeros(P, P), torch.zeros(P))


def test_gate_dropout_rate_and_scale(kernel_runs):
    """Uniform gates over P logits all equal to 1: a pair's score is (kept components / P) / (1 - p), so the kept share
    is read off each score; it must be a whole number of components, about 1 - p of them, and the mean score about 1
    (dropout without renormalising keeps the expectation)."""
    M, R, p = 64, 500, 0.25
    logits, a, b, weights = _uniform_gate(M, R)
    torch.manual_seed(0)
    scores = kernel.run_pair_gate("kernel", logits, a, b, weights, "additive", p, True, 0).scores[0]
    kept = scores * (1 - p) * 8  # (M, R) kept components per pair
    torch.testing.assert_close(kept, kept.round(), atol=1e-4, rtol=0)
    assert abs(float(kept.mean()) / 8 - (1 - p)) < 0.01
    assert abs(float(scores.mean()) - 1.0) < 0.015
    assert kept.min() < 8 and kept.max() == 8  # some pairs lose components, some none
    assert (scores[0] != scores[1]).any()  # different pairs, different masks
    torch.testing.assert_close(kernel.run_pair_gate("kernel", logits, a, b, weights, "additive", p, False, 0).scores[0], torch.ones(M, R))  # eval


def test_backward_reproduces_the_forward_dropout_mask(kernel_runs):
    """The directional derivative by finite differences (same torch seed, so the same mask) equals the analytic one:
    the backward recomputes the forward's mask from its hash instead of drawing another."""
    logits, a, b, _, W, *_ = _operator_inputs(1, 6, 50, 4, 2, 0)
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    weights = PairGateWeights(W, torch.zeros(8))

    def total(values, dropout=0.5):
        torch.manual_seed(5)
        return kernel.run_pair_gate("kernel", values, a, b, weights, "additive", dropout, True, 50).scores.sum()

    point = logits.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(total(point), point)
    eps = 1e-2
    numeric = (total(logits + eps * direction) - total(logits - eps * direction)) / (2 * eps)
    analytic = (gradient * direction).sum()
    assert abs(float(numeric - analytic)) < 0.02 * abs(float(analytic)) + 0.05
    (plain,) = torch.autograd.grad(total(point, dropout=0.0), point)  # the mask really drops something
    assert abs(float((plain * direction).sum() - analytic)) > 0.1


def test_where_it_does_not_apply_the_reference_runs():
    """Multiplicative and separable gates, P or H not multiples of 8: the dispatcher takes the eager reference."""
    logits, a, b, *rest = _operator_inputs(1, 3, 5, 3, 2, 0)  # P = 6
    weights = PairGateWeights(rest[1], rest[0])
    assert kernel.gate_path("kernel", logits, "additive", weights) == "eager"
    logits, a, b, *rest = _operator_inputs(1, 3, 5, 4, 2, 0)
    weights = PairGateWeights(rest[1], rest[0])
    assert kernel.gate_path("kernel", logits, "multiplicative", weights) == "eager"
    assert kernel.gate_path("kernel", logits, "separable", None) == "eager"
    expected = pair_gate(logits, a, b, weights, "multiplicative", 0.0, False, 5)
    for got, want in zip(kernel.run_pair_gate("kernel", logits, a, b, weights, "multiplicative", 0.0, False, 5), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["additive", "multiplicative"])
def test_compiled_reference_equals_the_eager_one(compiler_present, form):
    """``gate_implementation: compiled`` is the reference under torch.compile: the same scores, statistics and
    gradients (no dropout), for items shared by every group and for each group's own."""
    for own_items in (False, True):
        inputs = _operator_inputs(3, 2, 10, 4, 2, 16, own_items)
        leaves = [None if t is None else t.requires_grad_() for t in inputs]
        weights = PairGateWeights(leaves[4], leaves[3], *leaves[5:])
        results = []
        for implementation in ("eager", "compiled"):
            output = kernel.run_pair_gate(implementation, leaves[0], leaves[1], leaves[2], weights, form, 0.0, True, 6)
            total = output.scores.square().sum() + output.usage @ torch.arange(8.0) + output.entropy
            results.append([*output, *torch.autograd.grad(total, [leaf for leaf in leaves if leaf is not None])])
        for got, expected in zip(*results, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no build remembered, for the tests that make the build fail."""
    monkeypatch.setenv("RAILS_LIGHTNING_CACHE", str(tmp_path))
    kernel.load.cache_clear(), kernel.openmp_flags.cache_clear()
    yield tmp_path
    kernel.load.cache_clear(), kernel.openmp_flags.cache_clear()


def test_without_a_compiler_it_warns_once_and_uses_the_reference(monkeypatch, fresh_build):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    reference, fused = _pair(gate_dropout=0.0)
    states, vectors, users = _inputs()
    queries, items = reference.query_representation(states, users), reference.item_representation(vectors)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        fused_scores, _ = fused.score(queries, items)
    torch.testing.assert_close(fused_scores, reference.score(queries, items)[0])
    logits, *_ = _operator_inputs(1, 2, 3, 4, 2, 0)
    assert kernel.gate_path("kernel", logits, "additive", PairGateWeights(torch.zeros(8, 8), torch.zeros(8))) == "eager"  # no second warning


@pytest.mark.slow
def test_a_failing_build_warns_with_the_compiler_error(monkeypatch, fresh_build):
    broken = fresh_build / "pair_gate.cpp"
    broken.write_text(kernel.SOURCE.read_text() + "\nthis is not C++;\n")
    monkeypatch.setattr(kernel, "SOURCE", broken)
    with pytest.warns(UserWarning, match="building pair_gate.cpp failed"):  # sizes no other test builds: torch registers a
        assert kernel.load(1, 8, 0) is None  # library's operators once per process, and this one must not be the first


def test_an_unusable_cache_warns_and_falls_back(monkeypatch, fresh_build):
    """The cache path is a file: the kernel cannot be stored; the reference runs."""
    (fresh_build / "not-a-directory").write_text("")
    monkeypatch.setenv("RAILS_LIGHTNING_CACHE", str(fresh_build / "not-a-directory"))
    with pytest.warns(UserWarning, match="failed"):
        assert kernel.load(4, 2, 0) is None


@pytest.mark.parametrize("pair_gate_hidden", [pytest.param(0, marks=pytest.mark.slow), 16])
def test_bf16_mixed_fit_with_the_fused_gate_learns_and_evaluates(kernel_runs, tmp_path, pair_gate_hidden):
    """A real Trainer fit: loss falls over the epochs and the full-corpus metrics come out (exact top-k through the kernel)."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=16, query_encoder=MeanPoolEncoder,
        objective=functools.partial(SharedNegatives, num_negatives=32),
        similarity=functools.partial(MixtureOfLogits, num_query_components=4, num_item_components=2, component_dim=8,
                                     logit_gate_hidden_dim=pair_gate_hidden, gate_implementation="kernel"),
    )  # fmt: skip
    losses = LossRecorder()
    trainer = cpu_trainer(tmp_path, 3, [CorpusEvaluation(ks=(1, 10)), losses], enable_checkpointing=False, precision="bf16-mixed")
    trainer.fit(module, datamodule=data)
    assert losses.losses[-1] < losses.losses[0]
    assert 0 < float(trainer.callback_metrics["val/hr@10"]) <= 1
    assert torch.isfinite(trainer.callback_metrics["train/load_balancing_loss"])
