"""Latency and recall of the RAILS approximate MoL top-k algorithms against exact MoL top-k.

    python benchmarks/mol_topk.py                      # 100k and 1M items, 8 x 4 x 64, all algorithms
    python benchmarks/mol_topk.py --sizes 100000 --queries 32
    python benchmarks/mol_topk.py --tiny               # seconds: 1,000 items, 8 queries, a model of 1 epoch on 500 items

1. The MoL model of ``--config`` (default ``configs/synthetic/mol.yaml``: 8 x 4 components,
   D_P = 64, SASRec encoder) is trained on a larger synthetic catalogue (``--train_items``
   items, ``--train_users`` users, ``--train_epochs`` epochs) and cached in ``--checkpoint``;
   an existing checkpoint is reused.
2. Queries: the first ``--queries`` validation queries, encoded by the model, with their
   history excluded as in evaluation.
3. Corpora of ``--sizes`` items: the trained items' item-tower vectors, then (beyond the trained
   catalogue) copies of random trained items plus Gaussian noise (``--noise`` x the per-dimension
   std), all mapped through the *trained* MoL item heads (``similarity.item_representation``) to
   component embeddings and gate logits.
4. Exact MoL top-100 runs in a fresh child process, which also reports its peak memory (RSS
   sampled every 5 ms and ``ru_maxrss``; the child holds only the corpus, the queries and the
   MoL similarity module: the gate network, plus its small component heads, unused by the
   search). Every approximate algorithm at several k' runs in this process; its recall
   is ``|approx top-100 & exact top-100| / 100`` averaged over queries, its latency is the
   wall time of ``search`` (index building reported apart), all on ``--threads`` threads.
5. ``--device cuda``: the same on a GPU (training too). Corpus, queries and gate network live on
   the GPU, timings synchronise it, the exact search reports the GPU's peak allocated memory
   as well, and the inner-product searches run in torch (FAISS-GPU when FAISS sees the GPU).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

ROOT = Path(__file__).resolve().parents[1]
K = 100


# ---------------------------------------------------------------------------------------------- the model
def trained_model(args):
    """The MoL of ``--config`` (model section only), trained on a larger synthetic catalogue; cached."""
    from lightning.pytorch import Trainer

    from rails_lightning.cli import main as cli_main

    checkpoint = Path(args.checkpoint)
    cli_args = [
        "--config", str(ROOT / args.config), f"--seed_everything={args.seed}", "--trainer.logger=false",
        "--model.similarity.init_args.approximate_topk=null", "--run_dir", str(checkpoint.parent),
        f"--data.source.init_args.num_items={args.train_items}", f"--data.source.init_args.num_users={args.train_users}",
        f"--data.source.init_args.num_clusters={max(1, args.train_items // 50)}", f"--data.eval_batch_size={args.queries}",
    ]
    argv, sys.argv = sys.argv, [sys.argv[0]]  # the CLI must not read this script's arguments
    try:
        cli = cli_main(cli_args, run=False)
    finally:
        sys.argv = argv
    model, data = cli.model, cli.datamodule
    if model.model_name != "MoL":
        raise SystemExit(f"{args.config} does not configure a MoL model")
    if checkpoint.exists():
        print(f"model: reusing {checkpoint}", flush=True)
        try:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
        except RuntimeError as error:  # e.g. a cache written before the model's layout changed
            raise SystemExit(f"{checkpoint} does not fit the model of {args.config} (delete it to retrain): {error}") from error
        return model.eval(), data
    trainer = Trainer(
        max_epochs=args.train_epochs, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, accelerator="gpu" if args.device == "cuda" else "cpu",
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    print(f"model: trained {args.train_epochs} epochs in {time.perf_counter() - started:.0f} s", flush=True)
    trainer.save_checkpoint(checkpoint)
    return model.cpu().eval(), data


def similarity_options(model) -> dict:
    """The options of the model's MoL similarity: its constructor's defaults, overridden by those it was built with."""
    import inspect

    from rails_lightning.models.factories import build_factory
    from rails_lightning.similarity import Similarity

    factory = build_factory(model.hparams.similarity, Similarity)  # functools.partial(class, **options)
    signature = inspect.signature(factory.func)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **model.hparams.similarity["init_args"]}


def timed(function, device: str):
    """(result, wall seconds) of ``function()``, the GPU synchronised on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


@torch.no_grad()
def corpus(model, size: int, noise: float, seed: int = 0):
    """MoLItems of ``size`` items: the trained ones, then noisy copies of random trained ones."""
    trained = model.item_vectors(torch.arange(1, model.num_items + 1))  # (I, D)
    gen = torch.Generator().manual_seed(seed)
    extra = size - len(trained)
    if extra < 0:
        raise ValueError(f"corpus size {size} is smaller than the trained catalogue {len(trained)}")
    source = torch.randint(0, len(trained), (extra,), generator=gen)
    vectors = torch.cat([trained, trained[source] + noise * trained.std(0) * torch.randn(extra, trained.shape[1], generator=gen)])
    parts = [model.similarity.item_representation(chunk) for chunk in vectors.split(65536)]
    return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))


# ---------------------------------------------------------------------------------------------- exact, in a child
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exact_child(problem_path: str, out_path: str, threads: int, device: str = "cpu") -> None:
    """Fresh process: load corpus + queries + MoL similarity, exact MoL top-100, report time and peak memory."""
    torch.set_num_threads(threads)
    from rails_lightning.models.factories import build_factory
    from rails_lightning.retrieval import SearchOptions
    from rails_lightning.similarity.mol.topk import MoLExactTopK
    from rails_lightning.similarity import Similarity

    problem = torch.load(problem_path, mmap=False, weights_only=False)
    similarity = build_factory(problem["similarity_spec"], Similarity)(*problem["similarity_args"]).eval()
    similarity.load_state_dict(problem["similarity_state"])
    items, queries, exclude = problem["items"], problem["queries"], problem["exclude"]
    if device == "cuda":
        similarity = similarity.cuda()
        items, queries, exclude = (move_data_to_device(x, device) for x in (items, queries, exclude))
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()
    peak, running = [baseline], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.no_grad():
        (scores, ids), seconds = timed(lambda: MoLExactTopK(similarity, items, SearchOptions()).search(queries, K, exclude), device)
    running[0] = False
    sampler.join()
    torch.save(
        {
            "ids": ids.cpu(), "scores": scores.cpu(), "seconds": seconds, "rss_before": baseline, "rss_peak": peak[0],
            "gpu_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        out_path,
    )


def run_exact(model, items, queries, exclude, threads: int, workdir: Path, device: str) -> dict:
    problem, out = workdir / "problem.pt", workdir / "exact.pt"
    similarity = model.similarity
    spec, args = model.hparams.similarity, (similarity.input_dim, similarity.num_users)  # rebuilt as RetrievalModule builds it
    cpu = functools.partial(move_data_to_device, device="cpu")
    state = {name: value.cpu() for name, value in similarity.state_dict().items()}
    torch.save(
        {"similarity_spec": spec, "similarity_args": args, "similarity_state": state, "items": cpu(items), "queries": cpu(queries),
         "exclude": cpu(exclude)},
        problem,
    )
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import mol_topk; "
        f"mol_topk.exact_child({str(problem)!r}, {str(out)!r}, {threads}, {device!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    result = torch.load(out, weights_only=False)
    problem.unlink()
    return result


# ---------------------------------------------------------------------------------------------- approximate
def recall(ids, exact_ids) -> float:
    found = (exact_ids[:, :, None] == ids[:, None, :]).any(-1) & (exact_ids > 0)
    return float((found.sum(1) / (exact_ids > 0).sum(1).clamp_min(1)).mean())


def approximate_settings(args):
    from rails_lightning.retrieval import SearchOptions
    from rails_lightning.similarity.mol.topk import AveragedEmbeddingTopK, CombinedTopK, PerEmbeddingTopK

    settings = []
    for backend in ("auto", "torch"):  # auto: the default (FAISS on the CPU); torch: the torch top-k
        if backend == "torch" and not args.torch_backend:
            continue
        options = SearchOptions(backend=backend)
        for k in args.per_embedding_k:
            settings.append(("per-embedding", f"{k}", functools.partial(PerEmbeddingTopK, options=options, k_prime=k), options))
        for k in args.averaged_k:
            settings.append(("averaged", f"{k}", functools.partial(AveragedEmbeddingTopK, options=options, k_prime=k), options))
        for k, averaged in zip(args.per_embedding_k, args.averaged_k):
            settings.append(("combined", f"{k} + {averaged}", functools.partial(CombinedTopK, options=options, k_prime=k, averaged_k_prime=averaged), options))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train_items", type=int, default=20_000)
    parser.add_argument("--train_users", type=int, default=6_000)
    parser.add_argument("--train_epochs", type=int, default=4)
    parser.add_argument("--config", default="configs/synthetic/mol.yaml", help="the MoL model to train (its model section)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "mol_topk_bench" / "mol.ckpt"), help="trained model cache")
    parser.add_argument("--noise", type=float, default=0.5, help="std of the noise added to copied item vectors, per dimension, relative")
    parser.add_argument("--per_embedding_k", type=int, nargs="+", default=[4, 16, 64], help="k' of the per-embedding search")
    parser.add_argument("--averaged_k", type=int, nargs="+", default=[256, 1024, 4096], help="k' of the averaged-embedding search")
    parser.add_argument("--torch_backend", action=argparse.BooleanOptionalAction, default=True, help="also time the torch inner-product backend")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train, store the corpus and search")
    parser.add_argument("--append_results", default=None, help="append the markdown section to this file")
    parser.add_argument("--tiny", action="store_true", help="1,000 items, 8 queries, one k' of each search, FAISS only, a model "
                        "trained 1 epoch on 500 items and 300 users, cached in a temporary folder: checks that it runs, measures nothing")
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.queries, args.train_items, args.train_users, args.train_epochs = [1_000], 8, 500, 300, 1
        args.per_embedding_k, args.averaged_k, args.torch_backend = [4], [128], False
        if args.checkpoint == parser.get_default("checkpoint"):
            scratch = tempfile.mkdtemp(prefix="mol_topk_tiny_")
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            args.checkpoint = str(Path(scratch) / "mol.ckpt")
    if args.device == "cuda":
        args.torch_backend = False  # the default backend on a GPU is torch already (FAISS-GPU where FAISS sees it)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass

    from rails_lightning.retrieval import uses_faiss

    model, data = trained_model(args)
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        queries = model.encode_queries(batch)
    exclude = move_data_to_device(batch.exclusion, args.device)
    queries = move_data_to_device(queries, args.device)
    model.similarity.to(args.device)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    P_Q, P_X = model.similarity.num_query_components, model.similarity.num_item_components
    options = similarity_options(model)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}, search on {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads; {len(batch.user_ids)} queries, top-{K}, history excluded; "
        f"MoL {P_Q} x {P_X} x {options['component_dim']} of {args.config} (gate hidden {options['gate_hidden_dim']}), "
        f"trained {args.train_epochs} epochs on synthetic data ({data.num_items} items, {data.num_users} users); "
        f"corpus items beyond those: noisy copies (noise {args.noise}).",
        "",
    ]
    for size in args.sizes:
        started = time.perf_counter()
        with torch.no_grad():
            items = move_data_to_device(corpus(model, size, args.noise), args.device)
        print(f"\n== {size:,} items (corpus built in {time.perf_counter() - started:.1f} s)", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            exact = run_exact(model, items, queries, exclude, args.threads, Path(workdir), args.device)
        corpus_bytes = sum(f.numel() * f.element_size() for f in items)
        gpu_peak = f"; peak GPU memory allocated {exact['gpu_peak'] / 2**30:.2f} GiB" if exact["gpu_peak"] is not None else ""
        print(f"exact: {exact['seconds']:.3f} s, peak RSS {exact['rss_peak'] / 2**30:.2f} GiB{gpu_peak}", flush=True)
        lines += [
            f"### {size:,} items",
            "",
            f"Exact MoL top-{K}: **{exact['seconds']:.3f} s**; peak memory of the process that holds the corpus and runs it: "
            f"RSS {exact['rss_peak'] / 2**30:.2f} GiB (ru_maxrss {exact['ru_maxrss'] / 2**30:.2f} GiB; "
            f"{exact['rss_before'] / 2**30:.2f} GiB before the search, of which the corpus {corpus_bytes / 2**30:.2f} GiB){gpu_peak}.",
            "",
            "| algorithm | k' | inner-product backend | candidates / query | index build s | search s | speed-up vs exact | recall@100 vs exact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, k_prime, factory, search_options in approximate_settings(args):
            with torch.no_grad():
                retriever, build_seconds = timed(lambda: factory(model.similarity, items), args.device)
                (_, ids), seconds = timed(lambda: retriever.search(queries, K, exclude), args.device)
                candidates = retriever.candidates(queries, exclude)
                unique = float(sum(len(set(row.tolist()) - {0}) for row in candidates) / len(candidates))
            backend_name = "faiss" if uses_faiss(search_options.backend, items.components.device) else "torch"
            r = recall(ids.cpu(), exact["ids"])
            row = f"| {name} | {k_prime} | {backend_name} | {unique:.0f} | {build_seconds:.3f} | {seconds:.3f} | {exact['seconds'] / seconds:.1f}x | {r:.4f} |"
            print(row, flush=True)
            lines.append(row)
            del retriever
        lines.append("")
        del items
    section = "\n".join(lines)
    print("\n" + section)
    if args.append_results:
        path = Path(args.append_results)
        command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
        header = "" if path.exists() else "# Benchmark results\n\nMeasured figures, each with its command, machine and date.\n"
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        with path.open("a") as f:
            f.write(f"{header}\n## MoL top-k: exact vs RAILS approximate ({date})\n\nCommand: `{command}`\n\n{section}\n")


if __name__ == "__main__":
    main()
