"""Full-corpus evaluation at 100k, 1M and 10M items: re-encoding, exact search, approximate FAISS indexes.

For each corpus size N, one process:

1. builds the synthetic data with N items (``include_unseen_items``: every item is in the corpus) and the
   default two-tower model (SASRec, d=64), trained for ``--train_steps`` steps so that its item vectors
   have structure (``0``: untrained, random vectors: the hardest case for an approximate index);
2. runs the framework's own evaluation, ``Trainer.validate`` with ``CorpusEvaluation`` on ``--queries``
   queries: re-encoding of the corpus and exact search (FAISS flat) with history exclusion; records its
   time and the process's peak resident memory so far (data, model and evaluation included);
3. for each approximate index (FAISS factory string + search parameters): builds it from the encoded
   corpus with the callback's own builder, searches the same queries, and reports build and search time,
   the peak resident memory while it runs, and recall@100 against the exact top-100.

    python benchmarks/corpus_eval.py [--sizes 100000 1000000 10000000] [--queries 10000] [--train_steps 150]
    python benchmarks/corpus_eval.py --tiny --out /tmp/corpus_eval.json   # seconds: 2,000 items, checks that it runs

Prints a Markdown table (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

# Per corpus size: FAISS factory string -> the search parameters tried on it (IVF lists grow like 4 sqrt(N)).
INDEXES = {
    100_000: {"IVF1024,Flat": ["nprobe=8", "nprobe=32", "nprobe=128"], "HNSW32": ["efSearch=64", "efSearch=256"],
              "IVF1024,PQ32x4fs": ["nprobe=32"]},
    1_000_000: {"IVF4096,Flat": ["nprobe=16", "nprobe=64", "nprobe=128", "nprobe=160", "nprobe=256"], "HNSW32": ["efSearch=64", "efSearch=256"],
                "IVF16384,Flat": ["nprobe=256", "nprobe=512"], "IVF4096,PQ32x4fs": ["nprobe=64"],
                # 4-bit fast-scan PQ finds candidates cheaply, the exact vectors re-rank k_factor x k of them.
                "IVF4096,PQ32x4fs,RFlat": ["nprobe=128,k_factor_rf=8", "nprobe=160,k_factor_rf=8", "nprobe=256,k_factor_rf=8",
                                           "nprobe=256,k_factor_rf=16"]},
    # 10M: 4096 lists, not 4 sqrt(N): assigning 10M vectors to 16384 lists takes too long on 2 cores.
    10_000_000: {"IVF4096,Flat": ["nprobe=16", "nprobe=64"]},
}
# --tiny: 2,000 items, 500 users in 20 clusters, 200 queries, 2 training steps; indexes small enough to train on them.
TINY = {"sizes": [2_000], "queries": 200, "train_steps": 2, "users": 500, "clusters": 20}
TINY_INDEXES = {"IVF16,Flat": ["nprobe=4"], "HNSW32": ["efSearch=64"]}


class PeakMemory:
    """Peak resident memory (GB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._running = _rss_gb(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, _rss_gb())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_gb())


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def measure(num_items: int, num_queries: int, train_steps: int, checkpoint: str | None = None, only: str | None = None,
            eval_batch_size: int = 1000, tiny: bool = False) -> dict:
    import faiss
    import lightning.pytorch as pl
    import torch

    from rails_lightning.callbacks import CorpusEvaluation
    from rails_lightning.data import InteractionDataModule, SyntheticSource
    from rails_lightning.models import RetrievalModule
    from rails_lightning.objectives import SharedNegatives
    from rails_lightning.retrieval import SearchOptions, approximate_inner_product_retriever, inner_product_retriever

    pl.seed_everything(0, verbose=False)
    started = time.perf_counter()
    users, clusters = (TINY["users"], TINY["clusters"]) if tiny else (20_000, 1000)
    source = SyntheticSource(num_users=max(users, num_queries), num_items=num_items, num_clusters=clusters, include_unseen_items=True)
    data = InteractionDataModule(source, eval_batch_size=min(eval_batch_size, num_queries))
    if checkpoint:  # a model trained on this same data (e.g. by configs/synthetic/million_items_ivf.yaml)
        model = RetrievalModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        train_steps = 0
    else:
        model = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, objective=partial(SharedNegatives, num_negatives=512))
    result = {"items": data.num_items, "queries": num_queries, "train_steps": train_steps, "checkpoint": checkpoint,
              "data_seconds": time.perf_counter() - started}
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "devices": 1}
    if train_steps:
        started = time.perf_counter()
        pl.Trainer(max_steps=train_steps, limit_val_batches=0, enable_checkpointing=False, **quiet).fit(model, datamodule=data)
        result["train_seconds"] = time.perf_counter() - started

    # The framework's evaluation: re-encode, exact FAISS flat search, metrics.
    evaluation = CorpusEvaluation(ks=(10, 100))
    batches = -(-num_queries // min(eval_batch_size, num_queries))
    started = time.perf_counter()
    metrics = pl.Trainer(limit_val_batches=batches, callbacks=[evaluation], **quiet).validate(model, datamodule=data, verbose=False)[0]
    result.update(
        eval_seconds=time.perf_counter() - started, encode_seconds=metrics["val/encode_seconds"],
        exact_search_seconds=metrics["val/search_seconds"], hr_at_10=metrics["val/hr@10"],
        peak_gb_after_exact_eval=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )

    # The approximate indexes, built as the callback builds them, on the same corpus and queries.
    with torch.no_grad():
        items = model.encode_corpus()
        loader = data.query_loader("val")
        query_batches = [(model.encode_queries(b), b.exclusion) for _, b in zip(range(batches), loader)]
        started = time.perf_counter()
        exact = inner_product_retriever(items, SearchOptions())
        exact_ids = [exact.search(q, 100, e)[1] for q, e in query_batches]
        result["exact_top100_seconds"] = time.perf_counter() - started
        del exact
        result["indexes"] = []
        for factory, searches in (TINY_INDEXES if tiny else INDEXES.get(num_items, INDEXES[1_000_000])).items():
            if only and factory != only:
                continue
            with PeakMemory() as memory:
                started = time.perf_counter()
                index = approximate_inner_product_retriever(items, SearchOptions(index=factory, index_search=searches[0]))
                built = time.perf_counter() - started
                for search in searches:
                    faiss.ParameterSpace().set_index_parameters(index.index, search)
                    started = time.perf_counter()
                    found = [index.search(q, 100, e)[1] for q, e in query_batches]
                    searched = time.perf_counter() - started
                    hits = sum(int(((f[:, :, None] == x[:, None, :]).any(-1) & (x > 0)).sum()) for f, x in zip(found, exact_ids))
                    result["indexes"].append({
                        "index": factory, "search": search, "build_seconds": built, "search_seconds": searched,
                        "recall@100": hits / sum(int((x > 0).sum()) for x in exact_ids), "peak_gb": memory.peak,
                    })
                del index
    return result


def table(results: list[dict]) -> str:
    """One row per index: the exact flat search (the baseline of the speed-ups) first, then each approximate one."""
    lines = [
        "| items | model | index | search params | build (s) | search (s) | speed-up vs Flat | recall@100 | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        model = "trained" if r.get("checkpoint") or r.get("train_steps") else "untrained"
        flat = r["exact_top100_seconds"]
        lines.append(f"| {r['items']:,} | {model} | Flat (exact) | | | {flat:.1f} | 1x | 1 | {r['peak_gb_after_exact_eval']:.2f} (process, "
                     f"after the framework's validate) |")
        for x in r["indexes"]:
            lines.append(f"| {r['items']:,} | {model} | {x['index']} | {x['search']} | {x['build_seconds']:.1f} | {x['search_seconds']:.2f} | "
                         f"{flat / x['search_seconds']:.0f}x | {x['recall@100']:.3f} | {x['peak_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000], help="corpus sizes N")
    parser.add_argument("--queries", type=int, default=10_000, help="validation queries searched")
    parser.add_argument("--train_steps", type=int, default=150, help="training steps before evaluating (0: untrained)")
    parser.add_argument("--untrained_from", type=int, default=10_000_000,
                        help="corpora of this size or more are evaluated untrained (training 10M embeddings "
                             "with AdamW needs ~12 GB and hours on 2 cores)")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="trained checkpoints of the same synthetic data (num_users 20000, 1000 clusters, "
                             "include_unseen_items), used for the corpus size they were trained on instead of --train_steps")
    parser.add_argument("--only", help="measure only this index (a factory string of INDEXES)")
    parser.add_argument("--out", default="benchmarks/figures/corpus_eval.json", help="where the raw results go (JSON)")
    parser.add_argument("--tiny", action="store_true", help="2,000 items, 200 queries, 2 training steps, two small indexes: "
                        "checks that it runs, measures nothing")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.queries, args.train_steps = TINY["sizes"], TINY["queries"], TINY["train_steps"]
    if args.one:
        import torch

        trained = [c for c in args.checkpoints
                   if torch.load(c, map_location="cpu", weights_only=True)["hyper_parameters"]["num_items"] == args.one]
        steps = 0 if args.one >= args.untrained_from else args.train_steps
        print(json.dumps(measure(args.one, args.queries, steps, trained[0] if trained else None, args.only, tiny=args.tiny)))
        return
    results = []
    for size in args.sizes:  # one process per size, so that each peak memory is its own
        command = [sys.executable, __file__, "--one", str(size), "--queries", str(args.queries),
                   "--train_steps", str(args.train_steps), "--untrained_from", str(args.untrained_from),
                   *(["--only", args.only] if args.only else []), *(["--tiny"] if args.tiny else []), "--checkpoints", *args.checkpoints]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
