"""MoL's one scoring function: G groups of Q queries x C items per group, the items shared by every group or each
group's own -- generative-recommenders' ``(1 | G, X, D)`` item side, with Q queries per group so that the positions
of a training sequence share its items. Every MoL score goes through ``score``:

    training, shared negatives       queries (1, M)   items (1, R)
    training, per-query negatives    queries (M, 1)   items (M, R_Q)
    training, per-sequence negatives queries (B, L)   items (B, R_B)
    training, positives              queries (M, 1)   items (M, 1)
    exact top-k, a corpus block      queries (1, B)   items (1, n)
    RAILS re-ranking                 queries (B, 1)   items (B, C)

Shape legend: ``gate.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rails_lightning.losses import entropy
from rails_lightning.similarity.mol.gate import GateOutput, MoLGate
from rails_lightning.similarity.mol.heads import MoLItems, MoLQueries
from rails_lightning.similarity.mol.kernel import GateImplementation, run_pair_gate


def score(queries: MoLQueries, items: MoLItems, gate: MoLGate, stat_items: int, implementation: GateImplementation = "eager") -> GateOutput:
    """Scores (G, Q, C) of queries with leading dims (G, Q) against items with leading dims (1 | G, C), and the gate
    statistics over the pairs of the first ``stat_items`` items of each group.

    The separable gate scores with two matmuls and no (G, Q, C, P) tensor (``separable_score``); the others compute
    the component logits and run the pair gate as ``implementation`` says (``kernel.run_pair_gate``).
    """
    if gate.form == "separable":
        return separable_score(queries, items, gate, stat_items)
    logits = component_logits(queries.components, items.components)  # (G, Q, P_Q, C, P_X)
    weights = gate.pair_weights()
    return run_pair_gate(implementation, logits, queries.gate_logits, items.gate_logits, weights, gate.form, gate.dropout, gate.training, stat_items)


def component_logits(queries: Tensor, items: Tensor) -> Tensor:
    """Query components (G, Q, P_Q, D_P) x item components (1 | G, C, P_X, D_P) -> logits (G, Q, P_Q, C, P_X): one
    matmul for every component pair (a batched one for each group's own items)."""
    (G, Q, P_Q, D_P), (C, P_X) = queries.shape, items.shape[1:3]
    if items.shape[0] == 1:  # (G * Q * P_Q, D_P) @ (D_P, C * P_X)
        return (queries.reshape(G * Q * P_Q, D_P) @ items.reshape(C * P_X, D_P).T).view(G, Q, P_Q, C, P_X)
    return torch.bmm(queries.reshape(G, Q * P_Q, D_P), items.reshape(G, C * P_X, D_P).transpose(1, 2)).view(G, Q, P_Q, C, P_X)


# exp(gate logit - its max) is kept >= e^-40, so that a product of a query and an item weight (>= e^-80) stays a
# normal float32 and the denominator never underflows to 0.
_MIN_LOG_WEIGHT = -40.0


def _exp_weights(gate_logits: Tensor) -> Tensor:
    """Gate logits (..., P) -> e^(logit - max logit) (..., P), in (e^-40, 1]."""
    return (gate_logits - gate_logits.detach().amax(-1, keepdim=True)).clamp_min(_MIN_LOG_WEIGHT).exp()


def separable_score(queries: MoLQueries, items: MoLItems, gate: MoLGate, stat_items: int) -> GateOutput:
    """``score`` under the separable gate pi = softmax(a + b). With l_p = <f_i, g_j>, p = (i, j),

        s(q, x) = sum_p e^(a_p + b_p) l_p / sum_p e^(a_p + b_p) = <u(q), v(x)> / <e^a, e^b>,
        u(q)_(i,j) = e^(a_ij) f_i(q),   v(x)_(i,j) = e^(b_ij) g_j(x)      ((P * D_P)-vectors)

    so the scores take two matmuls and no (G, Q, C, P) tensor. Dropout drops (query, component) weights of the
    numerator, shared by the query's C items (the denominator normalises the undropped gate, as dropout on the
    probabilities does); only the counted pairs' gates are computed, for the statistics.
    """
    (G, Q, P_Q, D_P), (C, P_X) = queries.components.shape, items.components.shape[1:3]
    query_weights = _exp_weights(queries.gate_logits)  # (G, Q, P)
    item_weights = _exp_weights(items.gate_logits)  # (1 | G, C, P)
    dropped = F.dropout(query_weights, gate.dropout, gate.training).view(G, Q, P_Q, P_X, 1)
    u = (dropped * queries.components[:, :, :, None, :]).reshape(G, Q, -1)  # (G, Q, P * D_P), u_(i,j) = w_ij f_i
    v = (item_weights.unflatten(-1, (P_Q, P_X))[..., None] * items.components[:, :, None, :, :]).flatten(2)  # (1 | G, C, P * D_P)
    scores = torch.matmul(u, v.transpose(1, 2)) / torch.matmul(query_weights, item_weights.transpose(1, 2))  # (G, Q, C)
    gates = torch.softmax(queries.gate_logits[:, :, None, :] + items.gate_logits[:, None, :stat_items, :], dim=-1)  # (G, Q, C_b, P)
    counted = gates.reshape(-1, gates.shape[-1])  # (pairs, P)
    return GateOutput(scores, counted.sum(0), entropy(counted).sum())
