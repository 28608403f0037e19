"""MoL's gate: which mixture of the P component logits a (query, item) pair's score is.

Shape legend (the whole MoL package): G groups of Q queries, each group scored against C items (the items shared by
every group, a leading 1, or each group's own, a leading G); P_Q query / P_X item components, P = P_Q * P_X mixture
components (flattened as p = i * P_X + j), D input dimension, D_P component dimension, H gate hidden width.

The gate of a pair with component logits l (P,), query gate logits a (P,) and item gate logits b (P,):

* ``separable``:       pi = softmax(a + b)
* ``additive``:        pi = softmax(a + b + pair(l))
* ``multiplicative``:  pi = softmax(SiLU(a * b + pair(l)))   (the RAILS reference's ``glu_silu`` gating)

with ``pair(l) = W l + c`` (a linear P -> P map; the learned scale s of the logits is folded into W) or
``pair(l) = s l + c + V2 SiLU(V1 l + e1)`` (an H-wide MLP). The score is ``sum_p dropout(pi)_p l_p``: dropout on the
probabilities while training, not renormalised. ``pair_gate`` below is this arithmetic, written once: the reference
that the fused kernel (``kernel.py``) and the separable shortcut (``scoring.py``) are tested against.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rails_lightning.losses import entropy

GateForm = Literal["separable", "additive", "multiplicative"]


class PairGateWeights(NamedTuple):
    """The per-pair part of the gate, ``pair(l)``."""

    weight: Tensor  # (P, P): W + s I for the linear pair gate; s I with the MLP (only its diagonal is read)
    bias: Tensor  # (P,) c
    hidden_weight: Tensor | None = None  # (H, P) V1, None for the linear pair gate
    hidden_bias: Tensor | None = None  # (H,) e1
    output_weight: Tensor | None = None  # (P, H) V2


class GateOutput(NamedTuple):
    scores: Tensor  # (G, Q, C)
    usage: Tensor  # (P,) the sum of the gates over the counted pairs (those with the first stat_items items)
    entropy: Tensor  # () the sum of the gates' entropies over the counted pairs


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear -> SiLU -> Linear, or a single Linear when ``hidden_dim`` is 0."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def pair_gate(
    logits: Tensor, query_gate_logits: Tensor, item_gate_logits: Tensor, weights: PairGateWeights | None, form: GateForm,
    dropout: float, training: bool, stat_items: int,
) -> GateOutput:  # fmt: skip
    """The reference: scores and gate statistics of G groups of Q queries x C items.

    Args:
        logits: (G, Q, P_Q, C, P_X) component logits, as the component matmul gives them.
        query_gate_logits: (G, Q, P) a.
        item_gate_logits: (1 | G, C, P) b.
        weights: the pair part (None for the separable gate).
        form: how a, b and the pair part combine.
        dropout: the probability of dropping a gate probability while ``training``.
        training: whether dropout applies.
        stat_items: the gate statistics count the pairs of the first this-many items of each group.
    """
    logits, gates = gate_probabilities(logits, query_gate_logits, item_gate_logits, weights, form)  # (G, Q, C, P) each
    scores = (F.dropout(gates, dropout, training) * logits).sum(-1)  # (G, Q, C)
    counted = gates[:, :, :stat_items].reshape(-1, gates.shape[-1])  # (pairs, P)
    return GateOutput(scores, counted.sum(0), entropy(counted).sum())


def gate_probabilities(
    logits: Tensor, query_gate_logits: Tensor, item_gate_logits: Tensor, weights: PairGateWeights | None, form: GateForm
) -> tuple[Tensor, Tensor]:
    """Component logits (G, Q, P_Q, C, P_X) -> the pairs' logits (G, Q, C, P) and their gate probabilities
    (G, Q, C, P), before dropout; arguments as ``pair_gate``'s."""
    G, Q, P_Q, C, P_X = logits.shape
    logits = logits.permute(0, 1, 3, 2, 4).reshape(G, Q, C, P_Q * P_X)  # (G, Q, C, P)
    a, b = query_gate_logits[:, :, None, :], item_gate_logits[:, None, :, :]  # (G, Q, 1, P), (1 | G, 1, C, P)
    if form == "separable":
        gate_logits = a + b
    elif form == "additive":
        gate_logits = pair_logits(logits, weights) + a + b
    else:
        gate_logits = F.silu(pair_logits(logits, weights) + a * b)
    return logits, torch.softmax(gate_logits, dim=-1)


def pair_logits(logits: Tensor, weights: PairGateWeights) -> Tensor:
    """pair(l) of component logits (..., P)."""
    if weights.hidden_weight is None:
        return F.linear(logits, weights.weight, weights.bias)  # (W + s I) l + c
    hidden = F.silu(F.linear(logits, weights.hidden_weight, weights.hidden_bias))  # (..., H)
    return F.linear(hidden, weights.output_weight, weights.bias) + weights.weight.diagonal() * logits  # V2 h + c + s l


class MoLGate(nn.Module):
    """The gate's parameters: the query part a = MLP(query state), the item part b = MLP(item vector), and the pair
    part (none for the separable gate).

    Args:
        input_dim: D.
        num_components: P.
        form: how the parts combine (module docstring).
        hidden_dim: hidden width of the query and item parts' MLPs; 0 for linear maps.
        pair_hidden_dim: hidden width of the pair part's MLP; 0 for a linear P -> P map.
        dropout: dropout on the gate probabilities while training.
        logit_scale: the learned scale s of the logits in the pair part, initialised here.
    """

    def __init__(self, input_dim: int, num_components: int, form: GateForm, hidden_dim: int, pair_hidden_dim: int, dropout: float,
                 logit_scale: float) -> None:  # fmt: skip
        super().__init__()
        self.form, self.num_components, self.dropout = form, num_components, dropout
        self.query_part = mlp(input_dim, hidden_dim, num_components)
        self.item_part = mlp(input_dim, hidden_dim, num_components)
        self.pair_part = mlp(num_components, pair_hidden_dim, num_components) if form != "separable" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale))) if form != "separable" else None

    def pair_weights(self) -> PairGateWeights | None:
        """The pair part as ``pair_gate`` takes it (None for the separable gate)."""
        if self.pair_part is None:
            return None
        scale = self.logit_scale * torch.eye(self.num_components, device=self.logit_scale.device)  # (P, P) s I
        if isinstance(self.pair_part, nn.Linear):
            return PairGateWeights(self.pair_part.weight + scale, self.pair_part.bias)
        hidden, output = self.pair_part[0], self.pair_part[2]  # Linear(P, H), SiLU, Linear(H, P)
        return PairGateWeights(scale, output.bias, hidden.weight, hidden.bias, output.weight)
