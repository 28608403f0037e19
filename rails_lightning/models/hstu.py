"""HSTU query encoder: Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024,
"Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations").

Shape legend:
    B     batch
    L     sequence length (histories are left-padded, position L - 1 is the query)
    D     model dimension (the item dimension)
    H     attention heads
    d_qk  width of one head's queries and keys
    d_v   width of one head's values (and gates U)

One HSTU layer replaces a transformer block (attention + MLP) with a single gated unit:

    U, V, Q, K = split(SiLU(Linear(LayerNorm(x))))          # pointwise projection
    A          = SiLU(Q K^T + relative position bias) / n    # pointwise aggregated attention, masked
    Y          = A V                                         # spatial aggregation
    x          = x + Linear(Dropout(LayerNorm(Y) * U))       # pointwise transformation

The attention weights are not a softmax: they do not sum to one over the history, so a history with
many items relevant to the query yields a larger Y than one with few (the paper's argument: the
*intensity* of a user's engagement is kept, not averaged away). ``n`` is the constant
``max_seq_len``, the padded length L of every batch this framework builds, as the reference
implementation divides by the padded length. A constant is used rather than the number of real
items because dividing by the number of items would turn the sum back into a mean and lose that
intensity; and a constant rather than the batch's own L keeps the output at a real position
independent of how much left-padding a batch carries.

Masking: a position attends to itself and to earlier *real* items only; padding is never attended.
The mask multiplies A (there is no softmax), so a padding row attends to nothing, gets A = 0 and
Y = 0, and produces no NaN. Padding positions are zeroed after every layer.

Relative attention bias: one learned scalar per distance ``i - j`` in ``0 .. max_seq_len - 1``,
shared by the heads (as in the reference implementation). With ``time_bias_buckets > 0`` (and
timestamps in the data), also one learned scalar per bucket of the time between the two items,

    dt_ij    = |t_i - t_j|                                     # seconds, t_i the time of the item at i
    bucket   = min(floor(2 * log2(1 + dt_ij)), buckets - 1)    # half-octaves: 1 s -> 2, 1 day -> 32, 1 year -> 49

so that an item watched minutes before the query position can weigh differently from one watched
years before, however many items lie between them. The paper buckets the log time difference too;
its reference code measures it from the time of the *next* event (the request), this one from the
query position's own latest item, which needs nothing from the target.

Output: L2-normalised (``normalize_output=True``, as the HSTU/RAILS reference normalises its user
embeddings) or passed through a final LayerNorm (``normalize_output=False``, as SASRecEncoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rails_lightning.errors import ConfigError, UserError
from rails_lightning.models.encoders import QueryEncoder


class _BiasLookup(torch.autograd.Function):
    """``table[index]`` for a small bias table read at many positions, whose backward sums the gradient into the
    table with ``index_add_``. Indexing's own backward (``index_put_`` with accumulation) serialises over repeated
    indices, and a relative-bias table of 64-200 entries is read at B * L * L positions, so on a GPU that backward
    was nearly all of a training step of configs/ml-1m/hstu_mol.yaml; ``index_add_`` does the same sums without
    serialising (CPU and GPU)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_entries = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        # Summed in float32 at least: a bfloat16 gradient would lose the small terms of sums over millions of positions.
        total = torch.zeros(ctx.num_entries, dtype=torch.promote_types(grad.dtype, torch.float32), device=grad.device)
        return total.index_add_(0, index.reshape(-1), grad.reshape(-1).to(total.dtype)), None


class HSTULayer(nn.Module):
    """One HSTU layer: pointwise projection, pointwise aggregated attention, gated output, residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        dropout: float,
        attention_dropout: float,
        max_seq_len: int,
        time_bias_buckets: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim, self.max_seq_len = num_heads, qk_dim, v_dim, max_seq_len
        # The two LayerNorms carry no affine weights: each is followed by a learned linear map or gate.
        self.input_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.uvqk = nn.Linear(dim, num_heads * (2 * v_dim + 2 * qk_dim), bias=False)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        self.relative_position_bias = nn.Parameter(torch.empty(max_seq_len).normal_(std=0.02))  # one scalar per distance
        # One scalar per bucket of log time difference (None without timestamps).
        self.relative_time_bias = nn.Parameter(torch.empty(time_bias_buckets).normal_(std=0.02)) if time_bias_buckets else None
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.attention_norm = nn.LayerNorm(num_heads * v_dim, elementwise_affine=False, eps=1e-6)
        self.output_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(num_heads * v_dim, dim)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, attend: Tensor, distance: Tensor, time_buckets: Tensor | None = None) -> Tensor:
        """x (B, L, D), attend (B, 1, L, L) bool, distance (L, L) long, time buckets (B, L, L) long or None -> (B, L, D)."""
        B, L, _ = x.shape
        H, d_qk, d_v = self.num_heads, self.qk_dim, self.v_dim
        uvqk = F.silu(self.uvqk(self.input_norm(x)))  # (B, L, H * (2 d_v + 2 d_qk))
        u, v, q, k = uvqk.split([H * d_v, H * d_v, H * d_qk, H * d_qk], dim=-1)
        v = v.view(B, L, H, d_v).transpose(1, 2)  # (B, H, L, d_v)
        q = q.view(B, L, H, d_qk).transpose(1, 2)  # (B, H, L, d_qk)
        k = k.view(B, L, H, d_qk).transpose(1, 2)  # (B, H, L, d_qk)
        scores = q @ k.transpose(-2, -1) + _BiasLookup.apply(self.relative_position_bias, distance)  # (B, H, L, L)
        if self.relative_time_bias is not None:
            scores = scores + _BiasLookup.apply(self.relative_time_bias, time_buckets)[:, None]  # (B, H, L, L), shared by the heads
        a = F.silu(scores) / self.max_seq_len * attend  # (B, H, L, L), zero where not attended
        a = self.attention_dropout(a)
        y = (a @ v).transpose(1, 2).reshape(B, L, H * d_v)  # (B, L, H * d_v)
        return x + self.out(self.output_dropout(self.attention_norm(y) * u))  # (B, L, D)


class HSTUEncoder(QueryEncoder):
    """HSTU (Zhai et al., 2024) over the history: a stack of causal HSTU layers.

    Args:
        num_layers: HSTU layers (the paper's blocks).
        num_heads: attention heads.
        qk_dim: width d_qk of one head's queries and keys (default ``dim // num_heads``).
        v_dim: width d_v of one head's values and gates (default ``dim // num_heads``).
        dropout: dropout on the input embeddings and on each layer's gated output (before its
            output projection).
        attention_dropout: dropout on the attention weights A (the reference keeps this at 0).
        normalize_output: L2-normalise the output states (the reference HSTU's ``l2_norm``); if
            False, a final LayerNorm instead.
        time_bias_buckets: 0 for the relative position bias alone; N > 0 adds a learned bias per
            half-octave bucket of the time between two items (module docstring), N buckets, the
            last catching everything longer (bucket 63 starts at 2^31.5 s, ~96 years). Needs timestamps in the data
            (MovieLens, a log with a time column; not the synthetic sources).
    """

    def __init__(
        self,
        dim: int,
        num_users: int,
        max_seq_len: int,
        num_layers: int = 2,
        num_heads: int = 1,
        qk_dim: int | None = None,
        v_dim: int | None = None,
        dropout: float = 0.2,
        attention_dropout: float = 0.0,
        normalize_output: bool = True,
        time_bias_buckets: int = 0,
    ) -> None:
        super().__init__(dim, num_users, max_seq_len)
        if time_bias_buckets < 0:
            raise ConfigError(f"time_bias_buckets must be >= 0 (0: no time bias), got {time_bias_buckets}")
        self.time_bias_buckets = time_bias_buckets
        if not 1 <= num_heads <= dim:
            raise ConfigError(f"num_heads={num_heads} must be between 1 and the item dimension {dim} (--model.item_dim)")
        qk_dim, v_dim = qk_dim or dim // num_heads, v_dim or dim // num_heads
        self.normalize_output = normalize_output
        self.position_embedding = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            HSTULayer(dim, num_heads, qk_dim, v_dim, dropout, attention_dropout, max_seq_len, time_bias_buckets)
            for _ in range(num_layers)
        )
        self.final_norm = nn.Identity() if normalize_output else nn.LayerNorm(dim)
        positions = torch.arange(max_seq_len)
        self.register_buffer("distance", positions[:, None] - positions[None, :], persistent=False)  # (L, L), i - j

    def time_buckets(self, timestamps: Tensor) -> Tensor:
        """Seconds (B, L) -> the bucket of |t_i - t_j| for every pair (B, L, L), long."""
        elapsed = (timestamps[:, :, None] - timestamps[:, None, :]).abs().double()  # (B, L, L), seconds
        return (2.0 * torch.log2(1.0 + elapsed)).long().clamp_max(self.time_bias_buckets - 1)  # (B, L, L)

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        B, L, D = history.shape
        time_buckets = None
        if self.time_bias_buckets:
            if timestamps is None:
                raise UserError(
                    f"HSTUEncoder(time_bias_buckets={self.time_bias_buckets}) needs the time of each history item, and "
                    "these batches have none (the data source has no timestamps, e.g. the synthetic ones, or a query "
                    "given as bare item ids); set time_bias_buckets: 0"
                )
            time_buckets = self.time_buckets(timestamps)  # (B, L, L); pairs with padding are masked below
        positions = torch.arange(self.max_seq_len - L, self.max_seq_len, device=history.device)
        x = history * math.sqrt(D) + self.position_embedding(positions)  # (B, L, D)
        x = self.input_dropout(x) * is_item[..., None]  # (B, L, D), padding zeroed
        distance = self.distance[-L:, -L:]  # (L, L), i - j (the same for any L-window)
        # Causal and to real items only: i attends to j <= i where j holds an item.
        attend = (distance >= 0) & is_item[:, None, :]  # (B, L, L)
        attend = attend[:, None]  # (B, 1, L, L), broadcast over heads
        distance = distance.clamp_min(0)  # (L, L), future distances are masked anyway
        for layer in self.layers:
            x = layer(x, attend, distance, time_buckets) * is_item[..., None]  # (B, L, D)
        if self.normalize_output:
            return F.normalize(x, dim=-1, eps=1e-6)  # (B, L, D), padding rows stay zero
        return self.final_norm(x)  # (B, L, D)
