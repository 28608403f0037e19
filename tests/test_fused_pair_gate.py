"""The fused pair-gate kernel (``MixtureOfLogits(fused_pair_gate=True)``): the same scores, load-balancing loss and
gradients as the PyTorch ops, a gate dropout of the right rate that the backward reproduces, bfloat16 logits, the
fallback without a compiler, the config checks, and a real fit under bf16-mixed."""

import functools

import pytest
import torch

from conftest import LossRecorder, cpu_trainer, make_tiny_data
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.errors import ConfigError
from rails_lightning.models import MeanPoolEncoder, RetrievalModule
from rails_lightning.objectives import SharedNegatives
from rails_lightning.retrieval import SearchOptions
from rails_lightning.retrieval.mol_topk import CombinedTopK, select_items
from rails_lightning.similarity import MixtureOfLogits
from rails_lightning.similarity import fused_pair_gate as fused

D, NUM_USERS = 16, 10


def _pair(P_Q=4, P_X=2, perturb=True, **options):
    """The same MoL twice, PyTorch ops and fused kernel, with identical weights (the pair gate's drawn N(0, 1)
    unless not ``perturb``)."""
    torch.manual_seed(0)
    options = {"component_dim": 8, "gate_hidden_dim": 5, "logit_gate_hidden_dim": 0, "gate_logit_scale": 0.5, **options}
    reference = MixtureOfLogits(D, NUM_USERS, P_Q, P_X, **options)
    kernel = MixtureOfLogits(D, NUM_USERS, P_Q, P_X, fused_pair_gate=True, **options)
    with torch.no_grad():  # a pair gate far from its initialisation: every weight and bias matters
        generator = torch.Generator().manual_seed(1)
        for parameter in reference.logit_gate.parameters() if perturb else ():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    kernel.load_state_dict(reference.state_dict())
    return reference, kernel


def _inputs(M=7, R=13, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, D, generator=g).requires_grad_(), torch.randn(R, D, generator=g).requires_grad_(), torch.zeros(M, dtype=torch.long)


def _training_outputs(similarity, states, vectors, users, upstream):
    """Scores, load-balancing loss and every gradient of a weighted sum of them."""
    scores, auxiliary = similarity.cross_scores(similarity.query_representation(states, users), similarity.item_representation(vectors))
    loss = (scores * upstream).sum() + 10 * auxiliary.losses["load_balancing_loss"]
    parameters = dict(similarity.named_parameters())
    grads = torch.autograd.grad(loss, [states, vectors, *parameters.values()])
    return scores, auxiliary, dict(zip(["states", "vectors", *parameters], grads))


def test_kernel_builds_on_this_machine():
    """CI and these machines have g++: the kernel must build here, or every test below would test the fallback."""
    assert fused.load_kernel(4, 2) is not None


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
@pytest.mark.parametrize("balanced_negatives", [0, 5])
@pytest.mark.parametrize("sizes", [(4, 2), (8, 4)])
def test_training_scores_loss_and_gradients_equal_the_pytorch_ops(sizes, balanced_negatives, pair_gate_hidden):
    """Linear (hidden 0) and MLP pair gates; the gate statistics of all negatives or of the first 5."""
    reference, kernel = _pair(*sizes, gate_dropout=0.0, load_balancing_negatives=balanced_negatives, logit_gate_hidden_dim=pair_gate_hidden)
    states, vectors, users = _inputs()
    upstream = torch.randn(7, 13, generator=torch.Generator().manual_seed(3))
    scores, auxiliary, grads = _training_outputs(reference, states, vectors, users, upstream)
    fused_scores, fused_auxiliary, fused_grads = _training_outputs(kernel, states, vectors, users, upstream)
    torch.testing.assert_close(fused_scores, scores)
    for name in ("load_balancing", "gate_entropy", "gate_usage_max", "gate_usage_min", "gate_effective_components"):
        torch.testing.assert_close(fused_auxiliary.statistics[name], auxiliary.statistics[name], msg=name)
    torch.testing.assert_close(fused_auxiliary.losses["load_balancing_loss"], auxiliary.losses["load_balancing_loss"])
    for name, grad in grads.items():
        assert grad.abs().max() > 0 or name.startswith("user_component"), name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_retrieval_scores_equal_the_pytorch_ops(pair_gate_hidden):
    """The exact top-k's scoring (no gradient, no dropout) goes through the kernel too."""
    reference, kernel = _pair(8, 4, logit_gate_hidden_dim=pair_gate_hidden)
    reference.eval(), kernel.eval()
    states, vectors, users = _inputs(M=5, R=301)
    with torch.inference_mode():
        queries, items = reference.query_representation(states, users), reference.item_representation(vectors)
        torch.testing.assert_close(kernel.scores(queries, items), reference.scores(queries, items))


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_gathered_scores_equal_the_pytorch_ops_and_rerank_alike(pair_gate_hidden):
    """Each query against its own candidates (the RAILS re-ranking): the kernel's scores equal the PyTorch ops', and a
    CombinedTopK over a corpus returns the same ids through either."""
    reference, kernel = _pair(8, 4, logit_gate_hidden_dim=pair_gate_hidden)
    reference.eval(), kernel.eval()
    states, vectors, users = _inputs(M=6, R=120)
    with torch.inference_mode():
        queries, items = reference.query_representation(states, users), reference.item_representation(vectors)
        candidates = torch.randint(0, 120, (6, 17), generator=torch.Generator().manual_seed(4))
        gathered = select_items(items, candidates)  # (6, 17, ...)
        expected = reference.gathered(queries, gathered)[0]
        torch.testing.assert_close(kernel.gathered_scores(queries, gathered), expected)
        torch.testing.assert_close(reference.gathered_scores(queries, gathered), expected)  # without the kernel: the same method
        found = [CombinedTopK(similarity, items, SearchOptions(), k_prime=4, averaged_k_prime=16).fetch(queries, 10)
                 for similarity in (reference, kernel)]
        torch.testing.assert_close(found[1][0], found[0][0])
        assert torch.equal(found[1][1], found[0][1])


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_bfloat16_logits_match_float32_to_bfloat16_precision(pair_gate_hidden):
    """Under bf16-mixed the component matmul gives bfloat16 logits: the kernel reads and writes them as such (the
    initialised weights: N(0, 1) pair-gate weights turn bfloat16 rounding of the heads into large gate changes)."""
    _, kernel = _pair(8, 4, perturb=False, gate_dropout=0.0, logit_gate_hidden_dim=pair_gate_hidden)
    states, vectors, users = _inputs(M=9, R=40)
    upstream = torch.randn(9, 40)
    scores, _, grads = _training_outputs(kernel, states, vectors, users, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_scores, _, bf16_grads = _training_outputs(kernel, states, vectors, users, upstream)
    assert bf16_scores.dtype == torch.float32
    torch.testing.assert_close(bf16_scores, scores, rtol=0.05, atol=0.02)
    torch.testing.assert_close(bf16_grads["states"].float(), grads["states"], rtol=0.1, atol=0.05)


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_bfloat16_gate_products_stay_within_bfloat16_precision(pair_gate_hidden):
    """With bfloat16 logits the kernel's matrix-vector products run in bfloat16 (float32 accumulation) where the CPU
    has AVX512-BF16: on the same logit values, once bfloat16 and once float32, the scores, gate statistics and every
    gradient agree to bfloat16 precision (N(0, 1)-scaled gate weights, so every product counts)."""
    P_Q, P_X, M, R, H = 8, 4, 9, 40, pair_gate_hidden
    P = P_Q * P_X
    kernel = fused.load_kernel(P_Q, P_X, H)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(M, P_Q, R, P_X, generator=g).bfloat16()
    query, item, bias = torch.randn(M, P, generator=g), torch.randn(R, P, generator=g), torch.randn(P, generator=g)
    weight = torch.randn(P, P, generator=g) / P**0.5 if H == 0 else 0.5 * torch.eye(P)  # the MLP gate reads W's diagonal
    hidden = None if H == 0 else (torch.randn(H, P, generator=g) / P**0.5, torch.randn(H, generator=g), torch.randn(P, H, generator=g) / H**0.5)
    upstream, usage_weights = torch.randn(M, R, generator=g), torch.randn(P, generator=g)

    def outputs(logit_dtype):
        leaves = [t.clone().requires_grad_() for t in (logits.to(logit_dtype), query, item, weight, bias, *(hidden or ()))]
        scores, usage, entropy = fused.fused_pair_gate(kernel, *leaves[:5], R, 0.0, hidden=tuple(leaves[5:]) or None)
        grads = torch.autograd.grad((scores * upstream).sum() + usage @ usage_weights + entropy, leaves)
        return [scores.detach(), usage.detach(), entropy.detach()], [grad.float() for grad in grads]

    (values_bf16, grads_bf16), (values_fp32, grads_fp32) = outputs(torch.bfloat16), outputs(torch.float32)
    for name, got, expected in zip(["scores", "usage", "entropy"], values_bf16, values_fp32):
        assert float((got - expected).norm() / expected.norm()) < 0.01, name  # measured <= 0.0011
    names = ["logits", "query", "item", "weight", "bias", "hidden weight", "hidden bias", "output weight"]
    for name, got, expected in zip(names, grads_bf16, grads_fp32):
        if H > 0 and name == "weight":  # only the diagonal is a gradient there
            got, expected = got.diagonal(), expected.diagonal()
        assert float((got - expected).norm() / expected.norm()) < 0.01, name  # measured <= 0.0036


def test_gate_dropout_rate_and_scale():
    """Uniform gates over P logits all equal to 1: a pair's score is (kept components / P) / (1 - p), so the
    kept share is read off each score; it must be a whole number of components, about 1 - p of them, and
    the mean score about 1 (dropout without renormalising keeps the expectation)."""
    P_Q, P_X, M, R, p = 4, 2, 64, 500, 0.25
    kernel = fused.load_kernel(P_Q, P_X)
    logits = torch.ones(M, P_Q, R, P_X)
    torch.manual_seed(0)
    scores, _, _ = fused.fused_pair_gate(kernel, logits, torch.zeros(M, 8), torch.zeros(R, 8), torch.zeros(8, 8), torch.zeros(8), 0, p)
    kept = scores * (1 - p) * 8  # (M, R) kept components per pair
    torch.testing.assert_close(kept, kept.round(), atol=1e-4, rtol=0)
    assert abs(float(kept.mean()) / 8 - (1 - p)) < 0.01
    assert abs(float(scores.mean()) - 1.0) < 0.015
    assert kept.min() < 8 and kept.max() == 8  # some pairs lose components, some none
    assert (scores[0] != scores[1]).any()  # different pairs, different masks


def test_backward_reproduces_the_forward_dropout_mask():
    """The directional derivative by finite differences (same torch seed, so the same mask) equals the analytic one:
    the backward recomputes the forward's mask from its hash instead of drawing another."""
    P_Q, P_X, M, R = 4, 2, 6, 50
    kernel = fused.load_kernel(P_Q, P_X)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(M, P_Q, R, P_X, generator=g, dtype=torch.float32)
    direction = torch.randn(logits.shape, generator=g)
    query, item, weight, bias = torch.randn(M, 8, generator=g), torch.randn(R, 8, generator=g), torch.randn(8, 8, generator=g), torch.zeros(8)

    def total(values):
        torch.manual_seed(5)
        return fused.fused_pair_gate(kernel, values, query, item, weight, bias, R, 0.5)[0].sum()

    point = logits.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(total(point), point)
    eps = 1e-2
    numeric = (total(logits + eps * direction) - total(logits - eps * direction)) / (2 * eps)
    analytic = (gradient * direction).sum()
    assert abs(float(numeric - analytic)) < 0.02 * abs(float(analytic)) + 0.05
    # and the mask really drops something: without dropout the derivative is another
    torch.manual_seed(5)
    undropped = fused.fused_pair_gate(kernel, point, query, item, weight, bias, R, 0.0)[0].sum()
    (plain,) = torch.autograd.grad(undropped, point)
    assert abs(float((plain * direction).sum() - analytic)) > 0.1


def test_without_a_compiler_it_warns_once_and_uses_the_pytorch_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RAILS_LIGHTNING_CACHE", str(tmp_path))
    fused.load_kernel.cache_clear()
    try:
        reference, kernel = _pair(gate_dropout=0.0)
        states, vectors, users = _inputs()
        with pytest.warns(UserWarning, match="cannot run the compiler"):
            fused_scores, _ = kernel.cross_scores(kernel.query_representation(states, users), kernel.item_representation(vectors))
        scores, _ = reference.cross_scores(reference.query_representation(states, users), reference.item_representation(vectors))
        torch.testing.assert_close(fused_scores, scores)
    finally:
        fused.load_kernel.cache_clear()


def test_a_failing_build_warns_with_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RAILS_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(fused, "FLAGS", (*fused.FLAGS, "-DNO_SUCH_MACRO", "--no-such-flag"))
    fused.load_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiling pair_gate.cpp failed"):
            assert fused.load_kernel(4, 2) is None
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left to be loaded later
    finally:
        fused.load_kernel.cache_clear()


def test_an_unusable_cache_warns_and_falls_back(monkeypatch, tmp_path):
    """The cache path is a file: the kernel cannot be stored; MoL warns and runs the PyTorch ops."""
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("RAILS_LIGHTNING_CACHE", str(tmp_path / "not-a-directory"))
    fused.load_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="cannot build or load"):
            assert fused.load_kernel(4, 2) is None
    finally:
        fused.load_kernel.cache_clear()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logit_gate_hidden_dim": 12}, "hidden width a multiple of 8"),
        ({"multiplicative_gate": True}, "additive pair gate"),
        ({"gate_sees_logits": False}, "additive pair gate"),
        ({"num_query_components": 3, "num_item_components": 2}, "multiple of 8"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        MixtureOfLogits(D, NUM_USERS, **{"num_query_components": 4, "num_item_components": 2, **options}, fused_pair_gate=True)


@pytest.mark.parametrize("pair_gate_hidden", [0, 16])
def test_bf16_mixed_fit_with_the_fused_gate_learns_and_evaluates(tmp_path, pair_gate_hidden):
    """A real Trainer fit: loss falls over the epochs and the full-corpus metrics come out (exact top-k through the kernel)."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=16, query_encoder=MeanPoolEncoder,
        objective=functools.partial(SharedNegatives, num_negatives=32),
        similarity=functools.partial(MixtureOfLogits, num_query_components=4, num_item_components=2, component_dim=8,
                                     logit_gate_hidden_dim=pair_gate_hidden, fused_pair_gate=True),
    )  # fmt: skip
    losses = LossRecorder()
    trainer = cpu_trainer(tmp_path, 3, [CorpusEvaluation(ks=(1, 10)), losses], enable_checkpointing=False, precision="bf16-mixed")
    trainer.fit(module, datamodule=data)
    assert losses.losses[-1] < losses.losses[0]
    assert 0 < float(trainer.callback_metrics["val/hr@10"]) <= 1
    assert torch.isfinite(trainer.callback_metrics["train/load_balancing_loss"])
