"""Full-corpus top-K retrieval metrics computed from retrieved item ids.

:class:`RetrievalMetrics` accumulates HR@K, Recall@K, NDCG@K and MRR over all
queries of an evaluation run. Its input is what a full-corpus retriever
returns anyway: for each query, the ids of its best ``K_max`` items (best
first), plus the query's target item id(s).

Why not torchmetrics' own retrieval metrics:

* ``torchmetrics.retrieval.*`` take flat ``(preds, target, indexes)`` rows, one
  per (query, item) pair, at roughly 20 bytes a pair. For a corpus of millions of
  items and thousands of queries that is tens of GB, so full-corpus evaluation
  is impossible that way. Top-K ids cost ``B * K_max`` ints instead.
* Their functional recall and reciprocal rank treat items with score ``<= 0`` as
  not retrieved. Dot products and Mixture-of-Logits logits are often negative,
  which would silently lower those metrics. Working from ranks avoids scores
  entirely.

Conventions:

* Item id ``0`` is padding and never a real item; multi-target rows are padded
  with it. Duplicate target ids in a row count once.
* MRR is truncated at ``max(ks)``: a query whose first target is not within the
  first ``max(ks)`` retrieved ids contributes 0 (its true rank is unknown). ``mrr_cutoffs``
  adds MRR@c (``mrr@10``: 0 beyond rank c), as BEIR and MS MARCO report it.
* Graded relevance (``gains``, BEIR's qrels scores): DCG@K sums each retrieved target's gain
  (linear, as trec_eval / pytrec_eval and so BEIR compute it) over ``log2(rank + 1)``, and the
  ideal DCG puts the targets' gains in decreasing order on the first min(#targets, K) ranks.
  Without gains every target has gain 1: the binary nDCG. HR, Recall and MRR count a target
  as relevant whatever its gain.
* Sums are kept in float64 so that long runs do not lose precision. On devices
  without float64 (Apple MPS) call ``metric.set_dtype(torch.float32)`` first;
  per-batch arithmetic follows the states' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics
from torch import Tensor

from rails_lightning.retrieval.topk import unique_ids


class RetrievalMetrics(torchmetrics.Metric):
    """HR@k, Recall@k, NDCG@k for each ``k`` in ``ks``, MRR@max(ks), and MRR@c for each ``c`` in ``mrr_cutoffs``.

    ``update(topk_ids, targets, gains=None)``:
        ``topk_ids``: ``(B, K_max)`` integer item ids ranked best first, with
        ``K_max >= max(ks)``; extra columns are ignored.
        ``targets``: ``(B,)`` one target per query, or ``(B, T)`` several targets
        per query padded with ``0``; every row needs at least one target.
        ``gains``: None (binary relevance), or ``(B, T)`` float, the graded relevance of each target
        (aligned with ``targets``; ignored at padding).

    ``compute()`` returns ``{"hr@k", "recall@k", "ndcg@k" for k in ks, "mrr", "mrr@c" for c in mrr_cutoffs}`` as
    float scalar tensors, each the mean over all queries seen.

    All states are sums reduced with ``"sum"``, so they synchronise under DDP.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ks: Sequence[int] = (1, 10, 50, 200), mrr_cutoffs: Sequence[int] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = tuple(int(k) for k in ks)
        if not ks or any(k <= 0 for k in ks):
            raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
        self.ks = ks
        self.max_k = max(ks)
        self.mrr_cutoffs = tuple(int(c) for c in mrr_cutoffs)
        if any(not 0 < c <= self.max_k for c in self.mrr_cutoffs):
            raise ValueError(f"mrr_cutoffs must be in 1..max(ks) = {self.max_k}, got {self.mrr_cutoffs}")
        n = len(ks)
        f64 = torch.float64
        self.add_state("hit_sum", torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("recall_sum", torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", torch.zeros(n, dtype=f64), dist_reduce_fx="sum")
        self.add_state("rr_sum", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("rr_at_sum", torch.zeros(len(self.mrr_cutoffs), dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, topk_ids: Tensor, targets: Tensor, gains: Tensor | None = None) -> None:
        if topk_ids.ndim != 2:
            raise ValueError(f"topk_ids must be 2-D (B, K_max), got shape {tuple(topk_ids.shape)}")
        if topk_ids.shape[1] < self.max_k:
            raise ValueError(
                f"topk_ids has {topk_ids.shape[1]} columns but max(ks) = {self.max_k}; "
                f"retrieve at least {self.max_k} items per query"
            )
        if targets.ndim == 1:
            targets = targets.unsqueeze(1)
        if targets.ndim != 2 or targets.shape[0] != topk_ids.shape[0]:
            raise ValueError(
                f"targets must be (B,) or (B, T) with B = {topk_ids.shape[0]}, "
                f"got shape {tuple(targets.shape)}"
            )
        if gains is not None and gains.shape != targets.shape:
            raise ValueError(f"gains must be shaped like targets {tuple(targets.shape)}, got {tuple(gains.shape)}")
        if topk_ids.shape[0] == 0:
            return
        device, dtype = topk_ids.device, self.rr_sum.dtype
        topk = topk_ids[:, : self.max_k].long()
        targets = targets.to(device=device, dtype=torch.long)

        if gains is not None:  # sorted with their targets, so that a repeated target's gain counts once too
            targets, order = targets.sort(dim=1)
            gains = gains.to(device=device, dtype=dtype).gather(1, order)
        targets = unique_ids(targets)  # each target counts once
        valid = targets != 0  # (B, T)
        n_targets = valid.sum(dim=1)  # (B,)
        if bool((n_targets == 0).any()):
            raise ValueError("every query needs at least one non-zero target id (0 is padding)")

        # hit[b, r]: retrieved item at rank r+1 is a target. Masking with `valid` keeps padding 0
        # from matching a retrieved id 0. Targets are unique and topk ids are assumed unique,
        # so each target matches at most one position.
        hit = ((topk.unsqueeze(2) == targets.unsqueeze(1)) & valid.unsqueeze(1)).any(dim=2)  # (B, K)

        # Gather every k at once from cumulative sums over ranks.
        k_idx = torch.tensor(self.ks, device=device) - 1  # (n_ks,)
        hits_at_k = hit.cumsum(dim=1)[:, k_idx].to(dtype)  # (B, n_ks) number of targets in top k
        discount = 1.0 / torch.log2(torch.arange(2, self.max_k + 2, device=device, dtype=dtype))  # (K,)
        if gains is None:
            dcg_at_k = (hit.to(dtype) * discount).cumsum(dim=1)[:, k_idx]  # (B, n_ks)
            # Ideal DCG puts min(|targets|, k) targets at the top ranks: a prefix sum of the discounts.
            ideal_n = torch.minimum(n_targets.unsqueeze(1), k_idx + 1)  # (B, n_ks), >= 1
            idcg_at_k = discount.cumsum(dim=0)[ideal_n - 1]
        else:
            gains = gains.masked_fill(~valid, 0.0)  # (B, T)
            # The gain of the item at each rank: its target's gain, 0 for an item that is no target.
            gain_at_rank = ((topk.unsqueeze(2) == targets.unsqueeze(1)) & valid.unsqueeze(1)).to(dtype) @ gains.unsqueeze(2)  # (B, K, 1)
            dcg_at_k = (gain_at_rank.squeeze(2) * discount).cumsum(dim=1)[:, k_idx]  # (B, n_ks)
            # Ideal DCG: the gains in decreasing order on the first ranks (padding's 0 adds nothing past #targets).
            ideal = gains.sort(dim=1, descending=True).values[:, : self.max_k]  # (B, min(T, K))
            ideal = torch.nn.functional.pad(ideal, (0, self.max_k - ideal.shape[1]))  # (B, K)
            idcg_at_k = (ideal * discount).cumsum(dim=1)[:, k_idx]  # (B, n_ks)

        # Reciprocal rank of the first hit; argmax returns the first True. 0 if no hit in top max_k.
        first = hit.to(torch.uint8).argmax(dim=1)
        rr = torch.where(hit.any(dim=1), 1.0 / (first + 1).to(dtype), torch.zeros((), device=device, dtype=dtype))

        self.hit_sum += (hits_at_k > 0).to(dtype).sum(dim=0)
        self.recall_sum += (hits_at_k / n_targets.unsqueeze(1).to(dtype)).sum(dim=0)
        # (An ideal DCG of 0, from gains that are all 0, comes with a DCG of 0: nDCG 0.)
        self.ndcg_sum += (dcg_at_k / idcg_at_k.clamp_min(torch.finfo(dtype).tiny)).sum(dim=0)
        self.rr_sum += rr.sum()
        if self.mrr_cutoffs:
            cutoffs = torch.tensor(self.mrr_cutoffs, device=device)  # (n_c,)
            self.rr_at_sum += torch.where(first.unsqueeze(1) < cutoffs, rr.unsqueeze(1), 0.0).sum(dim=0)  # rr is 0 without a hit
        self.count += topk.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.to(self.rr_sum.dtype)
        hr, recall, ndcg = self.hit_sum / n, self.recall_sum / n, self.ndcg_sum / n
        out: dict[str, Tensor] = {}
        for i, k in enumerate(self.ks):
            out[f"hr@{k}"] = hr[i]
            out[f"recall@{k}"] = recall[i]
            out[f"ndcg@{k}"] = ndcg[i]
        out["mrr"] = self.rr_sum / n
        for i, cutoff in enumerate(self.mrr_cutoffs):
            out[f"mrr@{cutoff}"] = self.rr_at_sum[i] / n
        return out


def update_in_group(metric: RetrievalMetrics, topk_ids: Tensor, targets: Tensor, in_group: Tensor) -> None:
    """Update ``metric`` with the queries that have a target in a group (``in_group`` (B, T), aligned with
    ``targets``), each with its targets of the group only: the group's metrics from the same rankings."""
    rows = in_group.any(1)  # (B,)
    if rows.any():
        metric.update(topk_ids.to(targets.device)[rows], targets.where(in_group, 0)[rows])
