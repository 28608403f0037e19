"""MoL's heads: the query encoder's state and the item tower's vector -> unit-norm component embeddings.

Shape legend: ``gate.py``. Both heads see their input L2-normalised and scaled by sqrt(D) (unit variance per
dimension, like a LayerNorm output, whatever the encoder): raw item embeddings are small, and an MLP with biases
would map every item to nearly the same components, so that no item could be told apart at initialisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rails_lightning.similarity.mol.gate import mlp


class MoLQueries(NamedTuple):
    components: Tensor  # (..., P_Q, D_P), unit norm
    gate_logits: Tensor  # (..., P)
    # ||user-id embedding||^2 before dropout, zeros without the user-id component; read only by the user-id L2 penalty.
    user_id_squared_norms: Tensor  # (...,)


class MoLItems(NamedTuple):
    components: Tensor  # (..., P_X, D_P), unit norm
    gate_logits: Tensor  # (..., P)


def head_input(vectors: Tensor) -> Tensor:
    return F.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5  # (..., D), unit variance per dimension


class SwiGLU(nn.Module):
    """(..., 2 H) -> (..., H): SiLU of the first half times the second half (Shazeer, 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)  # (..., H) each
        return F.silu(gate) * value


def swiglu_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear D -> 2 H, SwiGLU to H, Linear H -> out; a single Linear when ``hidden_dim`` is 0."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, 2 * hidden_dim), SwiGLU(), nn.Linear(hidden_dim, out_dim))


class QueryHead(nn.Module):
    """Query state (..., D) -> P_Q component embeddings (..., P_Q, D_P): an MLP's, and optionally, as the last one, a
    learned user-id embedding (with its own dropout; its squared norm is returned for an L2 penalty).

    Args: as ``MixtureOfLogits``'s of the same names; ``num_users`` 0 for no user-id component.
    """

    def __init__(self, input_dim: int, num_components: int, component_dim: int, hidden_dim: int, swiglu: bool, num_users: int,
                 user_id_dropout: float, user_id_init_std: float) -> None:  # fmt: skip
        super().__init__()
        self.num_encoded = num_components - 1 if num_users else num_components  # from the MLP
        self.components = (swiglu_mlp if swiglu else mlp)(input_dim, hidden_dim, self.num_encoded * component_dim) if self.num_encoded else None
        self.user_component = nn.Embedding(num_users, component_dim) if num_users else None
        if self.user_component is not None:
            with torch.no_grad():  # rescale the N(0, 1) init: no second draw, so later parameters start as before
                self.user_component.weight.mul_(user_id_init_std)
        self.user_id_dropout = nn.Dropout(user_id_dropout)

    def forward(self, states: Tensor, user_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(..., D) head inputs, (...,) user ids -> components (..., P_Q, D_P), squared user-id embedding norms (...,)."""
        parts = [] if self.components is None else [self.components(states).unflatten(-1, (self.num_encoded, -1))]  # (..., P_Q', D_P)
        if self.user_component is None:
            return F.normalize(parts[0], dim=-1), states.new_zeros(states.shape[:-1])
        user_embeddings = self.user_component(user_ids)  # (..., D_P)
        squared_norms = user_embeddings.square().sum(-1)  # (...,), the penalty is on the weights, undropped
        parts.append(self.user_id_dropout(user_embeddings)[..., None, :])
        return F.normalize(torch.cat(parts, dim=-2), dim=-1), squared_norms  # (..., P_Q, D_P)


class ItemHead(nn.Module):
    """Item vector (..., D) -> P_X component embeddings (..., P_X, D_P): an MLP of the (dropped-out) input.

    Args: as ``MixtureOfLogits``'s of the same names.
    """

    def __init__(self, input_dim: int, num_components: int, component_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_components = num_components
        self.dropout = nn.Dropout(dropout)
        self.components = mlp(input_dim, hidden_dim, num_components * component_dim)

    def forward(self, vectors: Tensor) -> Tensor:
        """(..., D) head inputs -> components (..., P_X, D_P)."""
        return F.normalize(self.components(self.dropout(vectors)).unflatten(-1, (self.num_components, -1)), dim=-1)
