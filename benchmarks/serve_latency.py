"""Serving latency: single-query p50 / p95 / p99 and batched throughput of top-k search, with recall
against exact search, at corpus sizes of 100k and 1M items.

    python benchmarks/serve_latency.py [--sizes 100000 1000000] [--queries 1000]
    python benchmarks/serve_latency.py --tiny          # seconds: 5,000 items, 50 / 10 queries (checks that it runs)

Dot product: FAISS ``Flat`` (exact) against ``HNSW32`` at several ``efSearch`` (approximate), over
L2-normalised 64-d item vectors. MoL: exact MoL scoring against the RAILS averaged-embedding top-k
(``AveragedEmbeddingTopK``), 8 x 4 x 64 components, through ``rails_lightning``'s own retrievers.

The vectors are synthetic and clustered (1,000 centres, each item a centre plus noise of the same
scale, then normalised; queries drawn the same way), and the MoL gate network is untrained: the
figures are about search cost and approximation quality on data with cluster structure, not about a
trained model's recall. Recall@10 is |approx top-10 & exact top-10| / 10, averaged over the queries.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """``n`` unit vectors, each a random centre plus Gaussian noise of the centres' scale."""
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    ms = np.array(seconds) * 1000
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99))


def single_query(search, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    search(queries[:1])  # warm-up
    times, ids = [], []
    for q in queries:
        started = time.perf_counter()
        ids.append(search(q[None]))
        times.append(time.perf_counter() - started)
    return times, ids


def recall(approx: list[np.ndarray], exact: list[np.ndarray], k: int) -> float:
    return float(np.mean([len(set(a[0, :k].tolist()) & set(e[0, :k].tolist())) / k for a, e in zip(approx, exact)]))


def row(name: str, size: int, times: list[float], throughput: float, rec: float, build: float) -> str:
    p50, p95, p99 = percentiles(times)
    return f"| {name} | {size:,} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {throughput:,.0f} | {rec:.3f} | {build:.1f} |"


def dot_product(size: int, args, rng) -> list[str]:
    import faiss

    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    items, queries = clustered(size, args.dim, rng, centres), clustered(args.queries, args.dim, rng, centres)
    batch = clustered(args.batch, args.dim, rng, centres)
    rows = []
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(items)
    flat_build = time.perf_counter() - started
    exact_times, exact_ids = single_query(lambda q: flat.search(q, args.k)[1], queries)
    started = time.perf_counter()
    flat.search(batch, args.k)
    rows.append(row("dot, FAISS Flat (exact)", size, exact_times, args.batch / (time.perf_counter() - started), 1.0, flat_build))
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    hnsw.add(items)
    hnsw_build = time.perf_counter() - started
    for ef in args.ef:
        hnsw.hnsw.efSearch = ef
        times, ids = single_query(lambda q: hnsw.search(q, args.k)[1], queries)
        started = time.perf_counter()
        hnsw.search(batch, args.k)
        throughput = args.batch / (time.perf_counter() - started)
        rows.append(row(f"dot, FAISS HNSW32 efSearch={ef}", size, times, throughput, recall(ids, exact_ids, args.k), hnsw_build))
    return rows


@torch.no_grad()
def mixture_of_logits(size: int, args, rng) -> list[str]:
    from rails_lightning.retrieval import SearchOptions
    from rails_lightning.similarity.mol.topk import AveragedEmbeddingTopK, MoLExactTopK
    from rails_lightning.similarity import MixtureOfLogits

    torch.manual_seed(0)
    similarity = MixtureOfLogits(args.dim, 1, 8, 4, 64).eval()
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    started = time.perf_counter()
    vectors = torch.from_numpy(clustered(size, args.dim, rng, centres))
    items = type(similarity.item_representation(vectors[:1]))(
        *(torch.cat(parts) for parts in zip(*(similarity.item_representation(v) for v in vectors.split(65536))))
    )
    encode = time.perf_counter() - started
    queries = similarity.query_representation(torch.from_numpy(clustered(args.mol_queries, args.dim, rng, centres)), torch.zeros(args.mol_queries, dtype=torch.long))
    one = lambda i: type(queries)(*(f[i : i + 1] for f in queries))  # noqa: E731
    options = SearchOptions()
    exact = MoLExactTopK(similarity, items, options)
    rows = []
    exact_times, exact_ids = single_query(lambda i: exact.search(one(int(i.ravel()[0])), args.k)[1].numpy(), np.arange(args.mol_queries)[:, None])
    started = time.perf_counter()
    exact.search(queries, args.k)
    rows.append(row("MoL 8x4x64, exact", size, exact_times, args.mol_queries / (time.perf_counter() - started), 1.0, encode))
    for k_prime in args.k_prime:
        started = time.perf_counter()
        approx = AveragedEmbeddingTopK(similarity, items, options, k_prime=k_prime)
        build = time.perf_counter() - started
        times, ids = single_query(lambda i: approx.search(one(int(i.ravel()[0])), args.k)[1].numpy(), np.arange(args.mol_queries)[:, None])
        started = time.perf_counter()
        approx.search(queries, args.k)
        throughput = args.mol_queries / (time.perf_counter() - started)
        rows.append(row(f"MoL, RAILS averaged top-k k'={k_prime}", size, times, throughput, recall(ids, exact_ids, args.k), build))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes")
    parser.add_argument("--dim", type=int, default=64, help="item vector dimension")
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed (dot product)")
    parser.add_argument("--mol_queries", type=int, default=50, help="single queries timed (MoL)")
    parser.add_argument("--batch", type=int, default=1024, help="queries of the batched-throughput search")
    parser.add_argument("--k", type=int, default=10, help="top-k")
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128], help="HNSW efSearch values")
    parser.add_argument("--ef_construction", type=int, default=64, help="HNSW efConstruction")
    parser.add_argument("--k_prime", type=int, nargs="+", default=[256, 1024], help="RAILS averaged top-k candidates")
    parser.add_argument("--no_mol", action="store_true", help="skip MoL")
    parser.add_argument("--tiny", action="store_true", help="5,000 items, 50 dot-product and 10 MoL queries, batches of 64, "
                        "efSearch 32, k' 256: checks that it runs, measures nothing")
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.queries, args.mol_queries, args.batch, args.ef, args.k_prime = [5_000], 50, 10, 64, [32], [256]
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}")
    print("| search | items | p50 ms | p95 ms | p99 ms | batched queries/s | recall@10 | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        rng = np.random.default_rng(0)
        for line in dot_product(size, args, rng):
            print(line, flush=True)
        if not args.no_mol:
            for line in mixture_of_logits(size, args, rng):
                print(line, flush=True)


if __name__ == "__main__":
    main()
