"""Mixture-of-Logits (MoL): the score is a gated mixture of component dot products.

    s(q, x) = sum_p pi_p(q, x) * <f_i(q), g_j(x)>,   p = (i, j), i < P_Q, j < P_X

Shape legend: ``gate.py``. The parts, top to bottom:

* heads (``heads.py``): the query encoder's state -> P_Q unit-norm component embeddings f_i (an MLP, optionally with a
  learned user-id embedding as the last one); the item tower's vector -> P_X component embeddings g_j;
* the gate (``gate.py``): pi from a query part a(q), an item part b(x) and, unless separable, a part computed from
  each pair's P component logits; its arithmetic written once in ``gate.pair_gate``;
* scoring (``scoring.py``): one function for every (queries, items) layout that training and retrieval use;
* load balancing: ``-H(mean_batch pi) + mean_batch H(pi)`` over the (query, negative) gates (optionally over the
  first ``load_balancing_negatives`` negatives only, a random subset since the negatives are drawn at random),
  weighted and added to the loss as ``load_balancing_loss``; logged with the gate entropy and the component usage;
* retrieval: exact chunked top-k and the RAILS approximate ones (``topk.py``).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

import rails_lightning.similarity.mol.scoring as scoring
from rails_lightning.errors import ConfigError
from rails_lightning.losses import entropy, load_balancing_loss
from rails_lightning.retrieval import SearchOptions, TopKRetriever
from rails_lightning.similarity.base import Auxiliary, Similarity, with_group_dim
from rails_lightning.similarity.mol.gate import GateForm, MoLGate, gate_probabilities
from rails_lightning.similarity.mol.heads import ItemHead, MoLItems, MoLQueries, QueryHead, head_input
from rails_lightning.similarity.mol.kernel import GateImplementation
from rails_lightning.similarity.mol.topk import MoLExactTopK

ApproximateTopK = Callable[["MixtureOfLogits", MoLItems, SearchOptions], TopKRetriever]


class MixtureOfLogits(Similarity):
    """Mixture-of-Logits over P_Q x P_X component embeddings, with a learned gate.

    Args:
        input_dim: D (passed by the model).
        num_users: number of users (passed by the model; sizes the user-id component).
        num_query_components: P_Q, query component embeddings (including the user-id one).
        num_item_components: P_X, item component embeddings.
        component_dim: D_P, dimension of every component embedding.
        component_hidden_dim: hidden width of the MLPs that map the query state / item vector to the component
            embeddings; 0 for a single linear map.
        item_component_hidden_dim: the item side's hidden width instead, when not None (the RAILS reference maps
            items with a single linear map, 0, and queries through 512).
        swiglu_query_components: the query component MLP is a SwiGLU block (Linear D -> 2 H, SiLU(first half) *
            second half, Linear H -> out, H = ``component_hidden_dim``) instead of Linear-SiLU-Linear, as the RAILS
            reference's query side (with ``component_hidden_dim`` 0 both are one linear map).
        item_dropout: dropout on the item vector entering the item component map, while training (the item gate
            sees it undropped; the RAILS reference uses 0.1).
        user_id_component: make the last query component a learned user-id embedding (with P_Q = 1 it is the only
            one). The three options below shape it and are unused without it.
        user_id_dropout: elementwise dropout on that user-id embedding while training, before it is L2-normalised
            (the RAILS reference uses 0.5).
        user_id_l2: weight of an L2 penalty on the user-id embeddings, added to the training loss as
            ``user_id_l2_loss``: ``user_id_l2 * mean over the queries of ||e_u||^2``, e_u the query's user-id
            embedding before dropout, over the queries the negatives are scored for (the M training positions;
            every position under per-sequence negatives), so a user counts once per position (the RAILS
            reference's ``uid_embedding_l2_norm`` loss, weight 0.1 there). The scores see the embedding only
            L2-normalised; the penalty keeps its norm, which sets how far a gradient step turns it, from drifting.
        user_id_init_std: the user-id embeddings start N(0, this^2): 1 is PyTorch's default; the RAILS reference's
            xavier-normal initialisation gives about 0.018 for 6040 users x 64. Under Adam's fixed-size steps a
            small start lets the embedding turn within the few updates a user gets (one per epoch), and keeps the
            L2 penalty small at the start.
        gate: how the gate combines its query part a, item part b and pair part (``gate.py``):
            ``additive`` softmax(a + b + pair(l)); ``multiplicative`` softmax(SiLU(a * b + pair(l))), the RAILS
            reference's ``glu_silu`` gating; ``separable`` softmax(a + b), no pair part: the scores then take two
            matmuls and no (queries, items, P) tensor (several times cheaper on a CPU; ``scoring.separable_score``).
        gate_hidden_dim: hidden width H of the gate's query and item parts, and of its pair part unless
            ``logit_gate_hidden_dim`` is set; 0 for linear maps.
        logit_gate_hidden_dim: the pair part's hidden width instead, when not None; 0 for a linear P -> P map. The
            pair part is the one part of the gate run for every (query, item) pair: its hidden layer is the largest
            part of MoL's training cost on a CPU.
        gate_dropout: dropout on the gate probabilities while training (not renormalised: the RAILS reference
            renormalises the dropped probabilities to sum to 1).
        gate_logit_scale: the pair part also takes the component logits directly, times a learned scale
            initialised here: s > 0 starts the mixture leaning towards each pair's largest logits (a soft max over
            components, as multi-interest retrieval does), 0 starts it uniform (an average of the component dot
            products). Unused by the separable gate.
        load_balancing_weight: weight of the load-balancing loss, the negative mutual information between the
            component and the (query, item) pair, ``-H(mean pi) + mean H(pi)`` (the RAILS reference's ``mi_loss``,
            weight 1e-3 there).
        load_balancing_negatives: the load-balancing loss and the gate statistics use the gates of the first
            this-many negatives of each query (drawn at random, so a random subset); 0 for all. With the separable
            gate only these gates are computed.
        gate_implementation: how the pair gate is computed (``kernel.py``; the same function each way):
            ``eager``, the PyTorch reference as it is; ``compiled``, the reference under ``torch.compile``;
            ``kernel``, the fused CPU kernel (C++, compiled on first use) where it applies -- the additive gate, CPU
            tensors, P_Q x P_X and the pair part's hidden width multiples of 8 -- and the eager reference elsewhere
            (and, with one warning, where it cannot be built). The kernel draws the gate dropout mask by a hash of a
            seed from torch's generator rather than by torch's ``bernoulli`` (the same distribution, other draws);
            under ``--trainer.precision=bf16-mixed`` on a CPU with AVX512-BF16 its matrix products and weight
            gradients run in bfloat16 with float32 accumulation. The separable gate has no pair gate to compute.
        approximate_topk: a RAILS approximate top-k (``class_path`` of a class in
            ``rails_lightning.similarity.mol.topk`` with its ``k_prime``), evaluated next to the exact top-k; None
            for exact only.
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
        item_component_hidden_dim: int | None = None,
        swiglu_query_components: bool = False,
        item_dropout: float = 0.0,
        user_id_component: bool = False,
        user_id_dropout: float = 0.0,
        user_id_l2: float = 0.0,
        user_id_init_std: float = 1.0,
        gate: GateForm = "additive",
        gate_hidden_dim: int = 64,
        logit_gate_hidden_dim: int | None = None,
        gate_dropout: float = 0.2,
        gate_logit_scale: float = 0.0,
        load_balancing_weight: float = 1e-3,
        load_balancing_negatives: int = 0,
        gate_implementation: GateImplementation = "eager",
        approximate_topk: ApproximateTopK | None = None,
    ) -> None:
        super().__init__(input_dim, num_users)
        for name, count in (("num_query_components", num_query_components), ("num_item_components", num_item_components),
                            ("component_dim", component_dim)):  # fmt: skip
            if count < 1:
                raise ConfigError(f"{name} must be >= 1, got {count}")
        for name, rate in (("gate_dropout", gate_dropout), ("item_dropout", item_dropout), ("user_id_dropout", user_id_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {rate}")
        if load_balancing_negatives < 0:
            raise ConfigError(f"load_balancing_negatives must be >= 0 (0 for all negatives), got {load_balancing_negatives}")
        if user_id_l2 < 0.0:
            raise ConfigError(f"user_id_l2 must be >= 0, got {user_id_l2}")
        if user_id_init_std <= 0.0:
            raise ConfigError(f"user_id_init_std must be > 0, got {user_id_init_std}")
        P_Q, P_X = num_query_components, num_item_components
        self.num_query_components, self.num_item_components, self.num_components = P_Q, P_X, P_Q * P_X
        self.load_balancing_weight, self.load_balancing_negatives = load_balancing_weight, load_balancing_negatives
        self.user_id_l2 = user_id_l2 if user_id_component else 0.0
        self.gate_implementation = gate_implementation
        self.approximate_topk = approximate_topk
        self.query_head = QueryHead(input_dim, P_Q, component_dim, component_hidden_dim, swiglu_query_components,
                                    num_users if user_id_component else 0, user_id_dropout, user_id_init_std)  # fmt: skip
        item_hidden_dim = component_hidden_dim if item_component_hidden_dim is None else item_component_hidden_dim
        self.item_head = ItemHead(input_dim, P_X, component_dim, item_hidden_dim, item_dropout)
        pair_hidden_dim = gate_hidden_dim if logit_gate_hidden_dim is None else logit_gate_hidden_dim
        self.gate = MoLGate(input_dim, self.num_components, gate, gate_hidden_dim, pair_hidden_dim, gate_dropout, gate_logit_scale)

    # ------------------------------------------------------------------ representations
    def query_representation(self, states: Tensor, user_ids: Tensor) -> MoLQueries:
        """(..., D) encoder states, (...,) user ids -> components (..., P_Q, D_P), gate logits (..., P), squared user-id
        embedding norms (...,)."""
        states = head_input(states)
        components, user_id_squared_norms = self.query_head(states, user_ids)
        return MoLQueries(components, self.gate.query_part(states), user_id_squared_norms)

    def item_representation(self, vectors: Tensor) -> MoLItems:
        """Item-tower vectors (..., D) -> components (..., P_X, D_P), gate logits (..., P)."""
        vectors = head_input(vectors)
        return MoLItems(self.item_head(vectors), self.gate.item_part(vectors))

    # ------------------------------------------------------------------ scores
    def score(self, queries: MoLQueries, items: MoLItems, auxiliary: bool = False) -> tuple[Tensor, Auxiliary]:
        (G, Q), C = queries.gate_logits.shape[:2], items.gate_logits.shape[1]
        counted_items = min(self.load_balancing_negatives or C, C) if auxiliary else 0
        scores, usage, entropy_sum = scoring.score(queries, items, self.gate, counted_items, self.gate_implementation)  # (G, Q, C), (P,), ()
        if not auxiliary:
            return scores, Auxiliary()
        pairs = G * Q * counted_items
        return scores, self._auxiliary(usage / pairs, entropy_sum / pairs, queries)

    def gates(self, queries: MoLQueries, items: MoLItems) -> Tensor:
        """For analysis: the gate probabilities (M, R, P) of M queries (fields (M, ...)) x R items (fields (R, ...)),
        before dropout, the pairs flattened as p = i * P_X + j."""
        queries, items = with_group_dim(queries, 0), with_group_dim(items, 0)
        logits = scoring.component_logits(queries.components, items.components)  # (1, M, P_Q, R, P_X)
        return gate_probabilities(logits, queries.gate_logits, items.gate_logits, self.gate.pair_weights(), self.gate.form)[1][0]

    def _auxiliary(self, usage: Tensor, mean_entropy: Tensor, queries: MoLQueries) -> Auxiliary:
        """The load-balancing loss and gate statistics from the mean gate (P,), each component's share of the gate
        mass, and the mean gate entropy (); the user-id L2 penalty of the queries."""
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
        if self.gate.logit_scale is not None:
            statistics["gate_logit_scale"] = self.gate.logit_scale.detach()
        losses = {"load_balancing_loss": self.load_balancing_weight * balance}
        if self.user_id_l2:
            losses["user_id_l2_loss"] = self.user_id_l2 * queries.user_id_squared_norms.mean()
        return Auxiliary(losses=losses, statistics=statistics)

    # ------------------------------------------------------------------ retrieval
    def exact_retriever(self, items: MoLItems, options: SearchOptions) -> TopKRetriever:
        return MoLExactTopK(self, items, options)

    def offers_approximate_retriever(self, options: SearchOptions) -> bool:
        return self.approximate_topk is not None

    def approximate_retriever(self, items: MoLItems, options: SearchOptions) -> TopKRetriever | None:
        return None if self.approximate_topk is None else self.approximate_topk(self, items, options)
