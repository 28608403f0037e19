"""The one place that picks how inner-product top-k runs: FAISS (CPU, or GPU when FAISS sees one)
or the exact chunked torch top-k on the tensors' own device, and the knobs every search shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rails_lightning.retrieval.topk import BruteForceTopK, FaissInnerProductTopK, TopKRetriever

Backend = Literal["auto", "faiss", "torch"]


@dataclass(frozen=True)
class SearchOptions:
    """How a retriever searches (chosen by the caller, e.g. the evaluation callback).

    Args:
        backend: ``auto`` uses FAISS for tensors on the CPU, or on a GPU when FAISS sees one, and the
            exact chunked torch top-k on the tensors' device otherwise (a GPU without FAISS-GPU, or no
            FAISS installed); ``faiss`` / ``torch`` force one.
        score_block_elements: exact torch scoring and MoL re-ranking hold at most this many
            (query, item[, component]) values at once (bounds their memory, ~20 bytes per value).
    """

    backend: Backend = "auto"
    score_block_elements: int = 1 << 22


def _faiss_gpus() -> int | None:
    """Number of GPUs FAISS sees; None without FAISS."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.get_num_gpus()


def uses_faiss(backend: Backend, device: torch.device) -> bool:
    """Whether an inner-product search over tensors on ``device`` runs in FAISS."""
    gpus = _faiss_gpus()
    if backend == "faiss":
        if gpus is None:
            raise ImportError("backend 'faiss' needs the faiss package (pip install faiss-cpu or faiss-gpu)")
        return True
    if backend == "torch":
        return False
    return gpus is not None and (device.type == "cpu" or gpus > 0)


def inner_product_retriever(vectors: Tensor, options: SearchOptions) -> TopKRetriever:
    """Exact inner-product top-k over (N, D) vectors: a FAISS flat index or the chunked torch top-k."""
    if uses_faiss(options.backend, vectors.device):
        # Only hand the index to a GPU when FAISS has one: without a GPU,
        # index_cpu_to_all_gpus silently returns an empty index.
        return FaissInnerProductTopK(vectors, on_gpu=bool(_faiss_gpus()))
    vectors = vectors.contiguous()
    return BruteForceTopK(lambda queries, start, end: queries @ vectors[start:end].T, len(vectors), options.score_block_elements)
