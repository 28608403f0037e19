"""Losses. Pure functions of tensors.

Shape legend: M training positions (queries), R sampled negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_softmax_loss(
    positive_logits: Tensor,  # (M,)
    negative_logits: Tensor,  # (M, R)
    positive_ids: Tensor,  # (M,)
    negative_ids: Tensor,  # (R,) shared by every query, or (M, R)
    log_expected_counts: Tensor | None = None,  # (R,) or (M, R)
) -> Tensor:
    """Softmax cross-entropy of each positive against its negatives (shared by the batch, or per query).

    ``log_expected_counts`` is the logQ correction: the log of how many times each
    negative was expected to be drawn. Subtracting it makes the sampled softmax an
    unbiased estimate of the full softmax (popular items drawn from the batch's
    positives would otherwise be over-penalised). Negatives that happen to be the
    positive itself ("accidental hits") are masked out.
    """
    if log_expected_counts is not None:
        negative_logits = negative_logits - log_expected_counts
    accidental_hit = positive_ids[:, None] == negative_ids  # (M, R)
    negative_logits = negative_logits.masked_fill(accidental_hit, torch.finfo(negative_logits.dtype).min)
    logits = torch.cat([positive_logits[:, None], negative_logits], dim=1)  # (M, 1 + R)
    return F.cross_entropy(logits, torch.zeros_like(positive_ids))


def entropy(probabilities: Tensor, dim: int = -1) -> Tensor:
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim)


def load_balancing_loss(usage: Tensor, mean_entropy: Tensor) -> Tensor:
    """Mutual-information regulariser for mixture gates, from their statistics over a batch of gates pi (P,):
    ``usage`` (P,) the mean gate, ``mean_entropy`` () the mean of H(pi).

    ``-H(mean_batch pi) + mean_batch H(pi)``: low when the batch as a whole uses every
    component (high marginal entropy) while each single score commits to few components
    (low conditional entropy).
    """
    return -entropy(usage) + mean_entropy
