"""Query encoders: a user's history -> one query state per position.

Shape legend: B batch, L sequence length, D model dimension.

Every encoder is causal: the state at position t sees only items at positions <= t,
so one forward pass trains on every next item of a history (autoregressive
training) and the last position is the query at evaluation time. Sequences are
left-padded with item id 0, so the last position is always ``L - 1``.

``timestamps`` (B, L), the seconds of each history item (0 at padding), is passed when the data
has them and None otherwise; an encoder that does not use time ignores it.

Encoders are built by the model, which passes the three data-dependent sizes
(``dim``, ``num_users``, ``max_seq_len``); in YAML only their own options appear:

    query_encoder:
      class_path: rails_lightning.models.encoders.SASRecEncoder
      init_args: {num_layers: 2, dropout: 0.2}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rails_lightning.errors import ConfigError


class QueryEncoder(nn.Module):
    """Base class: ``forward(user_ids (B,), history (B, L, D), is_item (B, L), timestamps (B, L) or None) -> (B, L, D)``.

    ``reads_query_text``: the encoder reads each query's text, not a history (``rails_lightning.models.text_queries``):
    the model hands it the DataModule's query texts, aligned with the user indices, through ``load_query_texts``
    before training or evaluation, and it encodes a new text with ``encode_texts``."""

    reads_query_text = False

    def __init__(self, dim: int, num_users: int, max_seq_len: int) -> None:
        super().__init__()
        self.dim, self.num_users, self.max_seq_len = dim, num_users, max_seq_len

    def load_query_texts(self, texts: list[str]) -> None:
        """Keep what the encoder needs of the text of each user index 0..U-1 (a text encoder's token ids or vectors)."""

    def encode_texts(self, texts: list[str]) -> Tensor:
        """(n, D) query states of texts that are no user of the data (a text typed at serving time)."""
        raise ConfigError(f"{type(self).__name__} encodes histories, not texts; text queries need a text query encoder")

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class UserIdEncoder(QueryEncoder):
    """Matrix-factorisation style: the query is a learned embedding of the user id, the same at every position."""

    def __init__(self, dim: int, num_users: int, max_seq_len: int) -> None:
        super().__init__(dim, num_users, max_seq_len)
        self.user_embedding = nn.Embedding(num_users, dim)
        nn.init.normal_(self.user_embedding.weight, std=0.02)

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        return self.user_embedding(user_ids)[:, None, :].expand_as(history)  # (B, L, D)


class MeanPoolEncoder(QueryEncoder):
    """Running mean of the history's item embeddings, then a linear map (a causal bag of items).

    Args:
        project: apply a learned D x D linear map after pooling.
    """

    def __init__(self, dim: int, num_users: int, max_seq_len: int, project: bool = True) -> None:
        super().__init__(dim, num_users, max_seq_len)
        self.projection = nn.Linear(dim, dim) if project else nn.Identity()

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        weights = is_item.to(history.dtype)[..., None]  # (B, L, 1)
        running_sum = torch.cumsum(history * weights, dim=1)  # (B, L, D)
        running_count = torch.cumsum(weights, dim=1).clamp_min(1.0)  # (B, L, 1)
        return self.projection(running_sum / running_count)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a position-wise MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float, ffn_multiplier: int) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attn_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_multiplier * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_multiplier * dim, dim)
        )
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.residual_dropout(self.out(y.transpose(1, 2).reshape(B, L, D)))
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))


class SASRecEncoder(QueryEncoder):
    """SASRec-style causal transformer over the history (Kang & McAuley, 2018).

    Args:
        num_layers: transformer blocks.
        num_heads: attention heads (must divide the model dimension).
        dropout: dropout on embeddings, attention and residual branches.
        ffn_multiplier: hidden width of the position-wise MLP, in multiples of the dimension.
    """

    def __init__(
        self,
        dim: int,
        num_users: int,
        max_seq_len: int,
        num_layers: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        ffn_multiplier: int = 1,
    ) -> None:
        super().__init__(dim, num_users, max_seq_len)
        if dim % num_heads:
            raise ConfigError(f"num_heads={num_heads} must divide the item dimension {dim} (--model.item_dim)")
        self.position_embedding = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout, ffn_multiplier) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        B, L, D = history.shape
        positions = torch.arange(self.max_seq_len - L, self.max_seq_len, device=history.device)
        x = history * math.sqrt(D) + self.position_embedding(positions)  # (B, L, D)
        x = self.input_dropout(x) * is_item[..., None]
        # Attend to earlier real items, and always to oneself so that no row is fully masked
        # (padding rows would otherwise produce NaNs that leak through 0 * NaN).
        causal = self.causal[-L:, -L:]  # (L, L)
        attend = causal & (is_item[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))  # (B, L, L)
        attend = attend[:, None]  # (B, 1, L, L), broadcast over heads
        for block in self.blocks:
            x = block(x, attend) * is_item[..., None]
        return self.final_norm(x)
