"""Mixture-of-Logits (MoL): the score is a gated mixture of component dot products.

    s(q, x) = sum_p pi_p(q, x) * <f_i(q), g_j(x)>,   p = (i, j), i < P_Q, j < P_X

Shape legend: M queries, R items (training: M positions with a target, R shared negatives;
retrieval: M = B queries, R = a chunk of the corpus), C candidates per query, D input
dimension, D_P component dimension, P_Q query components, P_X item components,
P = P_Q * P_X mixture components (flattened as p = i * P_X + j), H gate hidden size.

Both heads see their input L2-normalised and scaled by sqrt(D) (unit variance per dimension,
like a LayerNorm output, whatever the encoder): raw item embeddings are small, and an MLP with
biases would map every item to nearly the same components, so that no item could be told
apart at initialisation.

* Query side: the query encoder's state (..., D) -> P_Q L2-normalised component embeddings
  (a small MLP, Linear-SiLU-Linear or a SwiGLU block; optionally the last one is a learned
  user-id embedding, with its own dropout and L2 penalty) and the query's gate logits (..., P).
* Item side: the item tower's vector (..., D) -> P_X L2-normalised component embeddings and
  the item's gate logits (..., P).
* Gate: softmax over P of (query gate logits + item gate logits + an MLP of the P component
  logits + a learned scale times the logits), with dropout on the probabilities while training.
  The query and item parts are computed once per query / item; only the component-logit MLP
  runs per (query, item) pair (with ``logit_gate_hidden_dim=0`` a linear map, folded with the
  scale into one P x P matmul).
* Multiplicative gate (``multiplicative_gate=True``, the RAILS reference's ``glu_silu`` gating):
  softmax over P of SiLU(query gate logits * item gate logits + the component-logit MLP + the
  learned scale times the logits): the query part gates the item part elementwise.
* Separable gate (``gate_sees_logits=False``): softmax over P of (query gate logits a + item
  gate logits b) only. Then, with l_p = <f_i, g_j>,

      s(q, x) = sum_p e^(a_p + b_p) l_p / sum_p e^(a_p + b_p) = <u(q), v(x)> / <e^a, e^b>,
      u(q)_(i,j) = e^(a_ij) f_i(q),   v(x)_(i,j) = e^(b_ij) g_j(x)      ((P * D_P)-vectors)

  so M queries x R items score with two matmuls and no (M, R, P) tensor: on a CPU the per-pair
  gate network and the (M, R, P) temporaries are nearly all of MoL's training cost. Dropout then
  drops (query, component) weights of the numerator, shared by the query's R items.
* Load balancing: ``-H(mean_batch pi) + mean_batch H(pi)`` over the (query, negative) gates
  (optionally over the first ``load_balancing_negatives`` negatives only, a random subset since
  the negatives are drawn at random), weighted and added to the loss as ``load_balancing_loss``;
  logged with the gate entropy and the per-component usage.
* Fused pair gate (``fused_pair_gate=True``, the additive pair gate, linear or MLP): on the CPU, the gate
  arithmetic of the shared-negative training scores and of the exact top-k runs as one compiled kernel
  (``fused_pair_gate.py``) that keeps each pair's P values in registers and recomputes them in the
  backward, instead of a dozen passes over (M, R, P) tensors.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rails_lightning.errors import ConfigError

from rails_lightning.losses import entropy, load_balancing_loss
from rails_lightning.retrieval import SearchOptions, TopKRetriever
from rails_lightning.retrieval.mol_topk import MoLExactTopK
from rails_lightning.similarity.base import Auxiliary, Similarity
from rails_lightning.similarity.fused_pair_gate import fused_gathered_scores, fused_pair_gate, load_kernel


class MoLQueries(NamedTuple):
    components: Tensor  # (..., P_Q, D_P), unit norm
    gate_logits: Tensor  # (..., P)
    # ||user-id embedding||^2 before dropout, zeros without the user-id component; read only by the user-id L2 penalty.
    user_id_squared_norms: Tensor  # (...,)


class MoLItems(NamedTuple):
    components: Tensor  # (..., P_X, D_P), unit norm
    gate_logits: Tensor  # (..., P)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear -> SiLU -> Linear, or a single Linear when ``hidden_dim`` is 0."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


class SwiGLU(nn.Module):
    """(..., 2 H) -> (..., H): SiLU of the first half times the second half (Shazeer, 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)  # (..., H) each
        return F.silu(gate) * value


def _swiglu_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear D -> 2 H, SwiGLU to H, Linear H -> out."""
    return nn.Sequential(nn.Linear(in_dim, 2 * hidden_dim), SwiGLU(), nn.Linear(hidden_dim, out_dim))


ApproximateTopK = Callable[["MixtureOfLogits", MoLItems, SearchOptions], TopKRetriever]


class MixtureOfLogits(Similarity):
    """Mixture-of-Logits over P_Q x P_X component embeddings, with a learned gate.

    Args:
        input_dim: D (passed by the model).
        num_users: number of users (passed by the model; sizes the user-id component).
        num_query_components: P_Q, query component embeddings (including the user-id one).
        num_item_components: P_X, item component embeddings.
        component_dim: D_P, dimension of every component embedding.
        component_hidden_dim: hidden width of the MLPs that map the query state / item vector
            to the component embeddings; 0 for a single linear map.
        item_component_hidden_dim: the item side's hidden width instead, when not None (the
            RAILS reference maps items with a single linear map, 0, and queries through 512).
        swiglu_query_components: the query component MLP is a SwiGLU block (Linear D -> 2 H,
            SiLU(first half) * second half, Linear H -> out, H = ``component_hidden_dim`` > 0)
            instead of Linear-SiLU-Linear, as the RAILS reference's query side.
        item_dropout: dropout on the item vector entering the item component map, while training
            (the item gate sees it undropped; the RAILS reference uses 0.1).
        user_id_component: make the last query component a learned user-id embedding.
        user_id_dropout: elementwise dropout on that user-id embedding while training, before it is
            L2-normalised (the RAILS reference uses 0.5); needs ``user_id_component``.
        user_id_l2: weight of an L2 penalty on the user-id embeddings, added to the training loss
            as ``user_id_l2_loss``: ``user_id_l2 * mean over the queries of ||e_u||^2``, e_u the
            query's user-id embedding before dropout, over the queries the negatives are scored for
            (the M training positions; every position under per-sequence negatives), so a user counts
            once per position (the RAILS reference's ``uid_embedding_l2_norm`` loss, weight 0.1 there). The scores
            see the embedding only L2-normalised; the penalty keeps its norm, which sets how far
            a gradient step turns it, from drifting. Needs ``user_id_component``.
        user_id_init_std: the user-id embeddings start N(0, this^2): 1 is PyTorch's default; the
            RAILS reference's xavier-normal initialisation gives about 0.018 for 6040 users x 64.
            Under Adam's fixed-size steps a small start lets the embedding turn within the few
            updates a user gets (one per epoch), and keeps the L2 penalty small at the start.
            Needs ``user_id_component`` unless 1.
        gate_hidden_dim: hidden width H of the gate MLPs (query part, item part, component-logit part);
            0 for linear maps.
        logit_gate_hidden_dim: the component-logit part's hidden width instead, when not None; 0 for a
            linear P -> P map. That MLP is the one part of the gate run for every (query, item) pair:
            its (M, R, H) hidden layer is the largest part of MoL's training cost on a CPU.
        gate_dropout: dropout on the gate probabilities while training (not renormalised: the
            RAILS reference renormalises the dropped probabilities to sum to 1).
        gate_logit_scale: the component logits also enter the gate directly, times a learned scale
            initialised here: s > 0 starts the mixture leaning towards each pair's largest
            logits (a soft max over components, as multi-interest retrieval does), 0 starts it
            uniform (an average of the component dot products).
        load_balancing_weight: weight of the load-balancing loss, the negative mutual information
            between the component and the (query, item) pair, ``-H(mean pi) + mean H(pi)`` (the
            RAILS reference's ``mi_loss``, weight 1e-3 there).
        gate_sees_logits: the gate also takes each pair's component logits (the MLP ``logit_gate``
            and the learned scale above, run for every (query, item) pair). False: the separable
            gate of the module docstring, query and item parts only; the training scores and the
            exact top-k then need no (M, R, P) tensor (several times cheaper on a CPU), and
            ``gate_logit_scale`` is unused.
        multiplicative_gate: combine the gate's parts as the RAILS reference's ``glu_silu`` does,
            softmax(SiLU(query part * item part + per-pair part)), instead of softmax(query part +
            item part + per-pair part); needs ``gate_sees_logits`` (it is not separable).
        load_balancing_negatives: the load-balancing loss and the gate statistics use the gates of
            the first this-many of the R shared negatives (drawn at random, so a random subset);
            0 for all R. With the separable gate only these (M, this, P) gates are computed.
        bf16_scores: with the separable gate, compute the (P * D_P)-wide score matmul in bfloat16
            (float32 accumulation; the gate weights and the division stay float32).
        fused_pair_gate: compute the pair gate with a fused CPU kernel (C++, compiled on first use with the
            system compiler, ``g++``, for this CPU; ``rails_lightning/similarity/fused_pair_gate.py``): the
            training scores against shared negatives and the exact top-k's scores. Needs the additive pair gate
            (``gate_sees_logits: true``, ``multiplicative_gate: false``), P_Q x P_X and the pair gate's hidden
            width (0 for the linear one) multiples of 8. The gate dropout mask is then drawn by a hash of a seed
            from torch's generator rather than by torch's ``bernoulli`` (the same distribution, other draws).
            Under ``--trainer.precision=bf16-mixed`` on a CPU with AVX512-BF16 the gate's matrix products and
            weight gradients run in bfloat16 with float32 accumulation (cost and quality: benchmarks/RESULTS.md).
            Per-query and per-sequence negatives, CUDA tensors, or a failed build (one warning) use the
            PyTorch ops.
        approximate_topk: a RAILS approximate top-k (``class_path`` of a class in
            ``rails_lightning.retrieval.mol_topk`` with its ``k_prime``), evaluated next to the
            exact top-k; None for exact only.
    """

    model_name = "MoL"

    def __init__(
        self,
        input_dim: int,
        num_users: int,
        num_query_components: int = 8,
        num_item_components: int = 4,
        component_dim: int = 64,
        component_hidden_dim: int = 256,
        user_id_component: bool = False,
        gate_hidden_dim: int = 64,
        logit_gate_hidden_dim: int | None = None,
        gate_dropout: float = 0.2,
        gate_logit_scale: float = 0.0,
        load_balancing_weight: float = 1e-3,
        gate_sees_logits: bool = True,
        load_balancing_negatives: int = 0,
        bf16_scores: bool = False,
        item_component_hidden_dim: int | None = None,
        swiglu_query_components: bool = False,
        item_dropout: float = 0.0,
        user_id_dropout: float = 0.0,
        user_id_l2: float = 0.0,
        user_id_init_std: float = 1.0,
        multiplicative_gate: bool = False,
        fused_pair_gate: bool = False,
        approximate_topk: ApproximateTopK | None = None,
    ) -> None:
        super().__init__(input_dim, num_users)
        if user_id_component and num_query_components < 2:
            raise ConfigError("user_id_component needs num_query_components >= 2 (one from the encoder, one user id)")
        P_Q, P_X, D_P = num_query_components, num_item_components, component_dim
        self.num_query_components, self.num_item_components = P_Q, P_X
        self.num_components = P = P_Q * P_X
        self.num_encoded_components = P_Q - 1 if user_id_component else P_Q
        if load_balancing_negatives < 0:
            raise ConfigError(f"load_balancing_negatives must be >= 0 (0 for all negatives), got {load_balancing_negatives}")
        if bf16_scores and gate_sees_logits:
            raise ConfigError("bf16_scores needs the separable gate (gate_sees_logits: false)")
        for name, rate in (("gate_dropout", gate_dropout), ("item_dropout", item_dropout), ("user_id_dropout", user_id_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {rate}")
        if user_id_l2 < 0.0:
            raise ConfigError(f"user_id_l2 must be >= 0, got {user_id_l2}")
        if user_id_init_std <= 0.0:
            raise ConfigError(f"user_id_init_std must be > 0, got {user_id_init_std}")
        if (user_id_dropout or user_id_l2 or user_id_init_std != 1.0) and not user_id_component:
            raise ConfigError("user_id_dropout, user_id_l2 and user_id_init_std need user_id_component: true")
        if swiglu_query_components and component_hidden_dim <= 0:
            raise ConfigError(f"swiglu_query_components needs component_hidden_dim > 0, got {component_hidden_dim}")
        if multiplicative_gate and not gate_sees_logits:
            raise ConfigError("multiplicative_gate needs gate_sees_logits: true (a product gate is not separable)")
        logit_hidden_dim = gate_hidden_dim if logit_gate_hidden_dim is None else logit_gate_hidden_dim
        if fused_pair_gate and (not gate_sees_logits or multiplicative_gate):
            raise ConfigError("fused_pair_gate needs the additive pair gate: gate_sees_logits: true, multiplicative_gate: false")
        if fused_pair_gate and P % 8:
            raise ConfigError(f"fused_pair_gate needs num_query_components x num_item_components a multiple of 8, got {P_Q} x {P_X}")
        if fused_pair_gate and logit_hidden_dim % 8:
            raise ConfigError(f"fused_pair_gate needs the pair gate's hidden width a multiple of 8 (or 0), got {logit_hidden_dim}")
        self.load_balancing_weight = load_balancing_weight
        self.gate_sees_logits = gate_sees_logits
        self.load_balancing_negatives = load_balancing_negatives
        self.bf16_scores = bf16_scores
        self.user_id_l2 = user_id_l2
        self.multiplicative_gate = multiplicative_gate
        self.fused_pair_gate = fused_pair_gate
        self.approximate_topk = approximate_topk
        query_mlp = _swiglu_mlp if swiglu_query_components else _mlp
        self.query_components = query_mlp(input_dim, component_hidden_dim, self.num_encoded_components * D_P)
        self.user_component = nn.Embedding(num_users, D_P) if user_id_component else None
        if self.user_component is not None:
            with torch.no_grad():  # rescale the N(0, 1) init: no second draw, so later parameters start as before
                self.user_component.weight.mul_(user_id_init_std)
        self.user_id_dropout = nn.Dropout(user_id_dropout)
        item_hidden_dim = component_hidden_dim if item_component_hidden_dim is None else item_component_hidden_dim
        self.item_dropout = nn.Dropout(item_dropout)
        self.item_components = _mlp(input_dim, item_hidden_dim, P_X * D_P)
        self.query_gate = _mlp(input_dim, gate_hidden_dim, P)
        self.item_gate = _mlp(input_dim, gate_hidden_dim, P)
        # The per-pair part of the gate (None with the separable gate).
        self.logit_gate = _mlp(P, logit_hidden_dim, P) if gate_sees_logits else None
        self.logit_gate_hidden_dim = max(logit_hidden_dim, 0)
        self.logit_scale = nn.Parameter(torch.tensor(float(gate_logit_scale))) if gate_sees_logits else None
        self.gate_dropout = nn.Dropout(gate_dropout)

    # ------------------------------------------------------------------ representations
    @staticmethod
    def _head_input(vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5  # (..., D), unit variance per dimension

    def query_representation(self, states: Tensor, user_ids: Tensor) -> MoLQueries:
        """(..., D) encoder states, (...,) user ids -> components (..., P_Q, D_P), gate logits (..., P),
        squared user-id embedding norms (...,)."""
        states = self._head_input(states)
        components = self.query_components(states).unflatten(-1, (self.num_encoded_components, -1))  # (..., P_Q', D_P)
        if self.user_component is None:
            user_id_squared_norms = states.new_zeros(states.shape[:-1])  # (...,)
        else:
            user_embeddings = self.user_component(user_ids)  # (..., D_P)
            user_id_squared_norms = user_embeddings.square().sum(-1)  # (...,), the penalty is on the weights, undropped
            user_embeddings = self.user_id_dropout(user_embeddings)
            components = torch.cat([components, user_embeddings[..., None, :]], dim=-2)  # (..., P_Q, D_P)
        return MoLQueries(F.normalize(components, dim=-1), self.query_gate(states), user_id_squared_norms)

    def item_representation(self, vectors: Tensor) -> MoLItems:
        """Item-tower vectors (..., D) -> components (..., P_X, D_P), gate logits (..., P)."""
        vectors = self._head_input(vectors)
        components = self.item_components(self.item_dropout(vectors)).unflatten(-1, (self.num_item_components, -1))  # (..., P_X, D_P)
        return MoLItems(F.normalize(components, dim=-1), self.item_gate(vectors))

    # ------------------------------------------------------------------ mixture
    def mix(self, logits: Tensor, query_gate_logits: Tensor, item_gate_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Component logits (..., P) and broadcastable gate logits -> scores (...), gate probabilities (..., P)."""
        if not self.gate_sees_logits:
            gates = torch.softmax(query_gate_logits + item_gate_logits, dim=-1)  # (..., P)
            return torch.linalg.vecdot(self.gate_dropout(gates), logits), gates
        if not torch.is_grad_enabled():  # retrieval: the same arithmetic in place, (..., P) buffers are large
            gate_logits = self._pair_gate_logits(logits)  # (..., P), a new tensor
            if self.multiplicative_gate:
                gate_logits = F.silu(gate_logits.addcmul_(query_gate_logits, item_gate_logits), inplace=True)
            else:
                gate_logits.add_(query_gate_logits).add_(item_gate_logits)
            gates = torch.softmax(gate_logits, dim=-1)  # (..., P)
            return torch.linalg.vecdot(self.gate_dropout(gates), logits), gates
        gate_logits = self._pair_gate_logits(logits)  # (..., P)
        if self.multiplicative_gate:
            gate_logits = F.silu(gate_logits + query_gate_logits * item_gate_logits)
        else:
            gate_logits = gate_logits + query_gate_logits + item_gate_logits
        gates = torch.softmax(gate_logits, dim=-1)  # (..., P)
        return (self.gate_dropout(gates) * logits).sum(-1), gates

    def _linear_pair_gate_weight(self) -> Tensor:
        """(P, P) W + s I: the linear pair gate and the learned scale of the logits as one map."""
        return torch.addcmul(self.logit_gate.weight, self.logit_scale, torch.eye(self.num_components, device=self.logit_scale.device))

    def _pair_gate_logits(self, logits: Tensor) -> Tensor:
        """The per-pair part of the gate logits, logit_gate(l) + s * l, of component logits (..., P)."""
        if isinstance(self.logit_gate, nn.Linear):  # linear: one map (W + s I) l + c, one pass over (..., P) instead of three
            return F.linear(logits, self._linear_pair_gate_weight(), self.logit_gate.bias)
        if torch.is_grad_enabled():
            return self.logit_gate(logits) + self.logit_scale * logits
        return self.logit_gate(logits).add_(logits, alpha=float(self.logit_scale))

    def _fused_kernel(self, tensor: Tensor):
        """The fused pair-gate kernel where it applies (``fused_pair_gate``, CPU tensors, built), else None."""
        if not self.fused_pair_gate or tensor.device.type != "cpu":
            return None
        return load_kernel(self.num_query_components, self.num_item_components, self.logit_gate_hidden_dim)

    def fused_cross(self, kernel, queries: MoLQueries, items: MoLItems, stat_items: int) -> tuple[Tensor, Tensor, Tensor]:
        """M queries x R items through the fused kernel -> scores (M, R), and over the pairs of the first
        ``stat_items`` items the sums of the gates (P,) and of their entropies ()."""
        (M, P_Q, D_P), R, P_X = queries.components.shape, items.components.shape[0], self.num_item_components
        # The component matmul's output as it is, (M, P_Q, R, P_X): the kernel reads it without a permute.
        logits = (queries.components.reshape(M * P_Q, D_P) @ items.components.reshape(R * P_X, D_P).T).view(M, P_Q, R, P_X)
        dropout = self.gate_dropout.p if self.gate_dropout.training else 0.0
        weight, bias, hidden = self._fused_gate_weights()
        return fused_pair_gate(kernel, logits, queries.gate_logits, items.gate_logits, weight, bias, stat_items, dropout, hidden)

    def _fused_gate_weights(self) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """The pair gate as the kernel takes it: the (P, P) linear map of the logits, its (P,) bias, and the MLP's
        (H, P) weight, (H,) bias, (P, H) weight (None for the linear gate)."""
        if isinstance(self.logit_gate, nn.Linear):
            return self._linear_pair_gate_weight(), self.logit_gate.bias, None
        hidden, output = self.logit_gate[0], self.logit_gate[2]  # Linear(P, H), SiLU, Linear(H, P)
        scale = self.logit_scale * torch.eye(self.num_components, device=self.logit_scale.device)  # (P, P), s l
        return scale, output.bias, (hidden.weight, hidden.bias, output.weight)

    def cross(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Tensor]:
        """M queries x R items -> scores (M, R), gates (M, R, P)."""
        (M, P_Q, D_P), R, P_X = queries.components.shape, items.components.shape[0], self.num_item_components
        # One matmul for all component pairs: (M * P_Q, D_P) @ (D_P, R * P_X).
        logits = queries.components.reshape(M * P_Q, D_P) @ items.components.reshape(R * P_X, D_P).T
        logits = logits.view(M, P_Q, R, P_X).permute(0, 2, 1, 3).reshape(M, R, P_Q * P_X)  # (M, R, P)
        return self.mix(logits, queries.gate_logits[:, None, :], items.gate_logits[None, :, :])

    # exp(gate logit - its max) is kept >= e^-40, so that a product of a query and an item weight
    # (>= e^-80) stays a normal float32 and the denominator never underflows to 0.
    _MIN_LOG_WEIGHT = -40.0

    def _gate_weights(self, gate_logits: Tensor) -> Tensor:
        """Gate logits (..., P) -> e^(logit - max logit) (..., P), in (e^-40, 1]."""
        return (gate_logits - gate_logits.detach().amax(-1, keepdim=True)).clamp_min(self._MIN_LOG_WEIGHT).exp()

    def separable_cross_scores(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        """M queries x R items -> scores (M, R) under the separable gate, with no (M, R, P) tensor."""
        return self.separable_grouped_scores(MoLQueries(*(f[None] for f in queries)), MoLItems(*(f[None] for f in items)))[0]

    def separable_grouped_scores(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        """G groups of Q queries x their group's C items -> scores (G, Q, C) under the separable gate."""
        (G, Q, P_Q), C, P_X = queries.components.shape[:3], items.components.shape[1], self.num_item_components
        query_weights = self._gate_weights(queries.gate_logits)  # (G, Q, P)
        item_weights = self._gate_weights(items.gate_logits)  # (G, C, P)
        # The numerator's query weights carry the gate dropout (the denominator normalises the undropped gate,
        # as dropout on the probabilities does).
        dropped = self.gate_dropout(query_weights).view(G, Q, P_Q, P_X, 1)
        u = (dropped * queries.components[:, :, :, None, :]).reshape(G, Q, -1)  # (G, Q, P * D_P), u_(i,j) = w_ij f_i
        v = (item_weights.view(G, C, P_Q, P_X, 1) * items.components[:, :, None, :, :]).reshape(G, C, -1)  # (G, C, P * D_P)
        if self.bf16_scores:
            numerator = torch.bmm(u.bfloat16(), v.bfloat16().transpose(1, 2)).float()  # (G, Q, C)
        else:
            numerator = torch.bmm(u, v.transpose(1, 2))  # (G, Q, C)
        return numerator / torch.bmm(query_weights, item_weights.transpose(1, 2))  # (G, Q, C)

    def pairs(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Tensor]:
        """M queries x their own M items -> scores (M,), gates (M, P)."""
        logits = torch.bmm(queries.components, items.components.transpose(1, 2)).flatten(1)  # (M, P)
        return self.mix(logits, queries.gate_logits, items.gate_logits)

    def grouped(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Tensor]:
        """G groups of Q queries x their group's C items -> scores (G, Q, C), gates (G, Q, C, P)."""
        (G, Q, P_Q, D_P), (C, P_X) = queries.components.shape, items.components.shape[1:3]
        # One batched matmul per group for all component pairs: (G, Q * P_Q, D_P) @ (G, D_P, C * P_X).
        logits = torch.bmm(queries.components.reshape(G, Q * P_Q, D_P), items.components.reshape(G, C * P_X, D_P).transpose(1, 2))
        logits = logits.view(G, Q, P_Q, C, P_X).permute(0, 1, 3, 2, 4).reshape(G, Q, C, P_Q * P_X)  # (G, Q, C, P)
        return self.mix(logits, queries.gate_logits[:, :, None, :], items.gate_logits[:, None, :, :])

    def gathered(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Tensor]:
        """M queries x their own C candidates (items with leading (M, C)) -> scores (M, C), gates (M, C, P)."""
        scores, gates = self.grouped(MoLQueries(*(field[:, None] for field in queries)), items)  # M groups of one query
        return scores[:, 0], gates[:, 0]

    def gathered_scores(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        """The same, scores (M, C) only: through the fused kernel where it applies and no gradient is wanted."""
        kernel = self._fused_kernel(queries.components) if not torch.is_grad_enabled() else None
        if kernel is None:
            return self.gathered(queries, items)[0]
        (M, P_Q, D_P), (C, P_X) = queries.components.shape, items.components.shape[1:3]
        # (M, P_Q, D_P) @ (M, D_P, C * P_X): each query against its own candidates, in the kernel's (M, P_Q, C, P_X) layout.
        logits = torch.bmm(queries.components, items.components.reshape(M, C * P_X, D_P).transpose(1, 2)).view(M, P_Q, C, P_X)
        return fused_gathered_scores(kernel, logits, queries.gate_logits, items.gate_logits, *self._fused_gate_weights())

    # ------------------------------------------------------------------ the Similarity contract
    def pair_scores(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        return self.pairs(queries, items)[0]  # (M,)

    def cross_scores(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Auxiliary]:
        balanced = slice(0, self.load_balancing_negatives or None)  # the negatives whose gates are balanced
        kernel = self._fused_kernel(queries.components)
        if kernel is not None:
            M, R = queries.gate_logits.shape[0], items.gate_logits.shape[0]
            balanced_items = min(self.load_balancing_negatives or R, R)
            scores, gate_sum, entropy_sum = self.fused_cross(kernel, queries, items, balanced_items)  # (M, R), (P,), ()
            return scores, self._auxiliary(gate_sum / (M * balanced_items), entropy_sum / (M * balanced_items), queries)
        if self.gate_sees_logits:
            scores, gates = self.cross(queries, items)  # (M, R), (M, R, P)
            gates = gates[:, balanced]  # (M, R_b, P)
        else:
            scores = self.separable_cross_scores(queries, items)  # (M, R)
            gates = torch.softmax(queries.gate_logits[:, None, :] + items.gate_logits[None, balanced, :], dim=-1)  # (M, R_b, P)
        return scores, self.auxiliary(gates, queries)

    def grouped_scores(self, queries: MoLQueries, items: MoLItems) -> tuple[Tensor, Auxiliary]:
        balanced = slice(0, self.load_balancing_negatives or None)  # the items of each group whose gates are balanced
        if self.gate_sees_logits:
            scores, gates = self.grouped(queries, items)  # (G, Q, C), (G, Q, C, P)
            gates = gates[:, :, balanced]
        else:
            scores = self.separable_grouped_scores(queries, items)  # (G, Q, C)
            gates = torch.softmax(queries.gate_logits[:, :, None, :] + items.gate_logits[:, None, balanced, :], dim=-1)  # (G, Q, C_b, P)
        return scores, self.auxiliary(gates, queries)

    def auxiliary(self, gates: Tensor, queries: MoLQueries) -> Auxiliary:
        """The load-balancing loss and gate statistics of training gates (..., P), and the user-id L2 penalty of
        the queries they were scored for."""
        flat = gates.reshape(-1, gates.shape[-1])  # (pairs, P)
        return self._auxiliary(flat.mean(0), entropy(flat).mean(), queries)

    def _auxiliary(self, usage: Tensor, mean_entropy: Tensor, queries: MoLQueries) -> Auxiliary:
        """The same from the mean gate (P,), each component's share of the gate mass, and the mean gate entropy ()."""
        balance = load_balancing_loss(usage, mean_entropy)  # -H(usage) + mean H(pi)
        usage = usage.detach()
        statistics = {
            "load_balancing": balance.detach(),
            "gate_entropy": mean_entropy.detach(),
            # exp(H(usage)): how many components the batch uses, P when perfectly balanced.
            "gate_effective_components": entropy(usage).exp(),
            "gate_usage_max": usage.max(),
            "gate_usage_min": usage.min(),
        }
        if self.logit_scale is not None:
            statistics["gate_logit_scale"] = self.logit_scale.detach()
        losses = {"load_balancing_loss": self.load_balancing_weight * balance}
        if self.user_id_l2:
            losses["user_id_l2_loss"] = self.user_id_l2 * queries.user_id_squared_norms.mean()
        return Auxiliary(losses=losses, statistics=statistics)

    def scores(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        """M queries x R items -> scores (M, R) only, the cheapest way (the exact top-k's scoring)."""
        kernel = self._fused_kernel(queries.components)
        if kernel is not None:
            return self.fused_cross(kernel, queries, items, stat_items=0)[0]
        return self.cross(queries, items)[0] if self.gate_sees_logits else self.separable_cross_scores(queries, items)

    def exact_retriever(self, items: MoLItems, options: SearchOptions) -> TopKRetriever:
        return MoLExactTopK(self, items, options)

    def offers_approximate_retriever(self, options: SearchOptions) -> bool:
        return self.approximate_topk is not None

    def approximate_retriever(self, items: MoLItems, options: SearchOptions) -> TopKRetriever | None:
        return None if self.approximate_topk is None else self.approximate_topk(self, items, options)
