"""The one place that picks how inner-product top-k runs: FAISS (CPU, or GPU when FAISS sees one)
or the exact chunked torch top-k on the tensors' own device, the knobs every search shares, and the
approximate FAISS indexes (any factory string: ``IVF4096,Flat``, ``HNSW32``, ``IVF4096,PQ32``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from rails_lightning.errors import ConfigError

from rails_lightning.retrieval.topk import BruteForceTopK, FaissIndexTopK, FaissInnerProductTopK, TopKRetriever

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
        index: a FAISS factory string (``IVF4096,Flat``, ``HNSW32``, ``IVF4096,PQ32``, ...) of an approximate
            inner-product index searched beside the exact one (dot product only); None for none.
        index_search: its search parameters in FAISS's ``ParameterSpace`` syntax, e.g. ``nprobe=64`` or
            ``efSearch=128`` ("" keeps FAISS's defaults).
        index_train_size: at most this many corpus vectors (a random sample) train the index (IVF centroids,
            PQ codebooks); FAISS wants at least 39 per IVF list.
    """

    backend: Backend = "auto"
    score_block_elements: int = 1 << 22
    index: str | None = None
    index_search: str = ""
    index_train_size: int = 1 << 18

    def exact(self) -> SearchOptions:
        """These options without the approximate index's: all that an exact search depends on."""
        return SearchOptions(self.backend, self.score_block_elements)


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
        return FaissInnerProductTopK(vectors, partial(faiss_to_gpus, device=vectors.device) if _faiss_gpus() else None)
    vectors = vectors.contiguous()
    return BruteForceTopK(lambda queries, start, end: queries @ vectors[start:end].T, len(vectors), options.score_block_elements)


_GPU_RESOURCES: dict[int, Any] = {}  # one FAISS resource object per GPU, alive as long as the process


def faiss_to_gpus(index, device: torch.device):
    """A CPU FAISS index -> the same on GPUs: on ``device``'s GPU when the vectors are on one (one process per
    GPU, as under DDP), otherwise sharded across every GPU FAISS sees (``IndexShards``: each holds 1/G of the
    corpus; a single GPU gets the plain GPU index)."""
    import faiss

    if device.type == "cuda":
        gpu = device.index or 0
        resources = _GPU_RESOURCES.setdefault(gpu, faiss.StandardGpuResources())
        return faiss.index_cpu_to_gpu(resources, gpu, index)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, options)


def build_faiss_index(vectors: Tensor, factory: str, search: str = "", train_size: int = 1 << 18, on_gpu: bool = False):
    """A FAISS inner-product index of ``factory`` type over (N, D) vectors (row r = item id r + 1): trained on a
    random sample of at most ``train_size`` rows when it needs training, filled, its ``search`` parameters set.

    ``on_gpu``: the index goes to the GPU(s) (``faiss_to_gpus``); types FAISS cannot run on a GPU (HNSW) stay
    on the CPU.
    """
    import faiss
    import numpy as np

    array = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
    try:
        index = faiss.index_factory(array.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(f"{factory!r} is not a FAISS index factory string ({str(error).strip().splitlines()[-1][:160]})") from error
    if on_gpu:
        try:
            index = faiss_to_gpus(index, vectors.device)
        except (RuntimeError, AttributeError):  # no GPU version of this index type: search it on the CPU
            on_gpu = False
    if not index.is_trained:
        sample = array
        if len(array) > train_size:
            sample = array[np.sort(np.random.default_rng(0).choice(len(array), train_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as error:  # e.g. fewer vectors than IVF lists
            raise ConfigError(f"cannot train a FAISS {factory!r} index on {len(sample)} vectors "
                              f"({str(error).strip().splitlines()[-1][:160]}); pick a smaller index for this corpus") from error
    index.add(array)
    if search:
        space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
        try:
            space.set_index_parameters(index, search)
        except RuntimeError as error:
            raise ConfigError(f"index search parameters {search!r} do not apply to a {factory!r} index "
                             f"({str(error).strip().splitlines()[-1][:160]})") from error
    return index


def approximate_inner_product_retriever(vectors: Tensor, options: SearchOptions) -> TopKRetriever | None:
    """The approximate FAISS index of ``options.index`` over (N, D) vectors, or None when no index is asked for."""
    if options.index is None:
        return None
    # On the GPU(s) whenever FAISS has any, as the exact flat index.
    index = build_faiss_index(vectors, options.index, options.index_search, options.index_train_size, on_gpu=bool(_faiss_gpus()))
    return FaissIndexTopK(index)
