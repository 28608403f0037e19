"""Top-k routines: FAISS flat == torch brute force == naive full sort, with history exclusion."""

import numpy as np
import pytest
import torch

from rails_lightning.baseline import PopularityTopK
from rails_lightning.errors import ConfigError
from rails_lightning.retrieval import SearchOptions, approximate_inner_product_retriever, inner_product_retriever
from rails_lightning.retrieval.topk import BruteForceTopK, Exclusion, FaissInnerProductTopK, keep_allowed, unique_ids


def inner_product_block(items):
    return lambda queries, start, end: queries @ items[start:end].T


def _naive_topk(queries, items, k, exclude):
    scores = queries @ items.T  # (B, N)
    for row, excluded in enumerate(exclude):
        for item in excluded:
            scores[row, item - 1] = float("-inf")
    top_scores, cols = scores.topk(k, dim=1)
    return top_scores, cols + 1


def _csr(exclude):
    offsets = torch.tensor([0] + list(np.cumsum([len(e) for e in exclude])), dtype=torch.long)
    items = torch.tensor([i for e in exclude for i in e], dtype=torch.long)
    return Exclusion(offsets, items)


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=gen)
    items = torch.randn(503, 16, generator=gen)
    exclude = [sorted(set(torch.randint(1, 504, (int(n),), generator=gen).tolist())) for n in torch.randint(0, 60, (37,), generator=gen)]
    return queries, items, exclude


@pytest.mark.parametrize("block_elements", [37, 37 * 64, 37 * 100, 37 * 503, 1 << 22])
def test_brute_force_matches_naive(problem, block_elements):
    queries, items, exclude = problem
    expected_scores, expected_ids = _naive_topk(queries, items, 50, exclude)
    scores, ids = BruteForceTopK(inner_product_block(items), len(items), block_elements).search(queries, 50, _csr(exclude))
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(ids, expected_ids)


def test_faiss_matches_brute_force(problem):
    queries, items, exclude = problem
    excluded = _csr(exclude)
    torch_scores, torch_ids = BruteForceTopK(inner_product_block(items), len(items), 1 << 22).search(queries, 50, excluded)
    faiss_scores, faiss_ids = FaissInnerProductTopK(items).search(queries, 50, excluded)
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-4, rtol=1e-4)
    # Ties aside (random floats have none), the ids agree exactly.
    assert (faiss_ids == torch_ids).float().mean() > 0.999
    for row, excluded_items in enumerate(exclude):
        assert not set(faiss_ids[row].tolist()) & set(excluded_items)


def test_faiss_without_exclusion(problem):
    queries, items, _ = problem
    expected_scores, expected_ids = _naive_topk(queries, items, 10, [[] for _ in queries])
    scores, ids = FaissInnerProductTopK(items).search(queries, 10)
    assert torch.equal(ids, expected_ids)


def test_everything_excluded_leaves_empty_slots():
    items = torch.eye(4)
    queries = torch.ones(1, 4)
    excluded = _csr([[1, 2, 3]])
    for retriever in (BruteForceTopK(inner_product_block(items), 4, 1 << 22), FaissInnerProductTopK(items)):
        scores, ids = retriever.search(queries, 3, excluded)
        assert ids[0, 0] == 4 and ids[0, 1:].tolist() == [0, 0]
        assert torch.isinf(scores[0, 1:]).all()


def test_keep_allowed_keeps_order_and_pads():
    ids = torch.tensor([[5, 3, 9, 1, 2]])
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0]])
    kept_scores, kept_ids = keep_allowed(scores, ids, 3, _csr([[3, 1]]), num_items=10)
    assert kept_ids.tolist() == [[5, 9, 2]]
    assert kept_scores.tolist() == [[9.0, 7.0, 5.0]]
    kept_scores, kept_ids = keep_allowed(scores, ids, 7, _csr([[3]]), num_items=10)  # fewer than k left
    assert kept_ids.tolist() == [[5, 9, 1, 2, 0, 0, 0]] and torch.isinf(kept_scores[0, 4:]).all()


@pytest.mark.parametrize("dense_limit", [0, 1 << 25])
def test_keep_allowed_drops_every_excluded_and_invalid_id_either_way(dense_limit):
    """The lookup table (small B x N) and the sorted membership test (beyond dense_limit) drop the same entries: every
    excluded id of its own row only, ids outside 1..N, -inf scores; what is left keeps its order."""
    g = torch.Generator().manual_seed(0)
    B, N, K = 40, 30, 12
    ids = torch.randint(-1, N + 3, (B, K), generator=g)  # 0, -1 and N+1.. are not items
    scores = torch.randn(B, K, generator=g).sort(dim=1, descending=True).values
    scores[::7, -1] = float("-inf")
    excluded = [torch.randint(1, N + 1, (int(n),), generator=g).tolist() for n in torch.randint(0, 8, (B,), generator=g)]
    kept_scores, kept_ids = keep_allowed(scores, ids, K, _csr(excluded), num_items=N, dense_limit=dense_limit)
    for row in range(B):
        allowed = [(float(s), int(i)) for s, i in zip(scores[row], ids[row])
                   if 1 <= i <= N and i not in excluded[row] and s != float("-inf")]  # fmt: skip
        assert kept_ids[row, : len(allowed)].tolist() == [i for _, i in allowed]
        assert kept_scores[row, : len(allowed)].tolist() == [s for s, _ in allowed]
        assert (kept_ids[row, len(allowed) :] == 0).all() and torch.isinf(kept_scores[row, len(allowed) :]).all()


def test_exclusion_repeat_and_unique_ids():
    exclusion = _csr([[1, 2], [], [7]])
    repeated = exclusion.repeat(2)
    assert repeated.offsets.tolist() == [0, 2, 4, 4, 4, 5, 6] and repeated.items.tolist() == [1, 2, 1, 2, 7, 7]
    assert exclusion.max_per_query() == 2
    assert unique_ids(torch.tensor([[3, 1, 3, 0, 1]])).tolist() == [[0, 1, 0, 3, 0]]  # sorted, repeats blanked


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_one_backend_choice_gives_the_same_results(problem, backend):
    queries, items, exclude = problem
    retriever = inner_product_retriever(items, SearchOptions(backend=backend))
    assert isinstance(retriever, FaissInnerProductTopK if backend == "faiss" else BruteForceTopK)
    _, expected_ids = _naive_topk(queries, items, 20, exclude)
    assert (retriever.search(queries, 20, _csr(exclude))[1] == expected_ids).float().mean() > 0.999
    auto = inner_product_retriever(items, SearchOptions())
    assert isinstance(auto, FaissInnerProductTopK)  # CPU tensors with FAISS installed


def test_popularity_ranks_by_count_minus_history():
    counts = np.array([0, 5, 50, 20, 1])  # item 2 most popular, then 3, then 1
    _, ids = PopularityTopK(counts).search(torch.zeros(2), 3, _csr([[], [2]]))
    assert ids.tolist() == [[2, 3, 1], [3, 1, 4]]


# ---------------------------------------------------------------- approximate FAISS indexes (factory strings)
@pytest.mark.parametrize(("factory", "search"), [("IVF16,Flat", "nprobe=16"), ("HNSW16", "efSearch=256"), ("Flat", "")])
def test_factory_index_with_exhaustive_search_parameters_is_exact(factory, search):
    torch.manual_seed(0)
    items, queries = torch.randn(2000, 16), torch.randn(30, 16)
    exclude = _csr([[1, 2, 3]] * 30)
    options = SearchOptions(index=factory, index_search=search)
    index = approximate_inner_product_retriever(items, options)
    exact = inner_product_retriever(items, SearchOptions())
    _, index_ids = index.search(queries, 10, exclude)
    _, exact_ids = exact.search(queries, 10, exclude)
    overlap = (index_ids[:, :, None] == exact_ids[:, None, :]).any(-1).float().mean()
    assert overlap >= (1.0 if factory != "HNSW16" else 0.97)  # IVF probing every list and Flat are exact


def test_factory_index_errors_name_the_problem():
    items = torch.randn(50, 8)
    with pytest.raises(ConfigError, match="not a FAISS index factory string"):
        approximate_inner_product_retriever(items, SearchOptions(index="NotAnIndex"))
    with pytest.raises(ConfigError, match="cannot train a FAISS 'IVF4096,Flat' index on 50 vectors"):
        approximate_inner_product_retriever(items, SearchOptions(index="IVF4096,Flat"))
    with pytest.raises(ConfigError, match="do not apply"):
        approximate_inner_product_retriever(items, SearchOptions(index="Flat", index_search="nprobe=4"))


@pytest.mark.parametrize("model", ["TwoTower", "MoL"])
def test_callback_logs_index_recall_every_epoch(tmp_path, model):
    from conftest import cpu_trainer, make_tiny_data, make_tiny_model
    from rails_lightning.callbacks import CorpusEvaluation

    data = make_tiny_data()
    evaluation = CorpusEvaluation(ks=(1, 10), index="IVF8,Flat", index_search="nprobe=8")
    trainer = cpu_trainer(tmp_path, 2, [evaluation], limit_train_batches=2)
    if model == "MoL":  # an inner-product index is for the dot product: a clear error, before any search
        with pytest.raises(ConfigError, match="for the dot product"):
            trainer.fit(make_tiny_model(data, "MoL"), datamodule=data)
        return
    trainer.fit(make_tiny_model(data, "TwoTower"), datamodule=data)
    assert [row["epoch"] for row in evaluation.history] == [0, 1]
    for row in evaluation.history:
        assert row["val/index_recall@100"] == pytest.approx(1.0)  # every list probed: exact
        assert row["val/index/hr@10"] == pytest.approx(row["val/hr@10"])
        assert row["val/index_build_seconds"] >= 0 and row["val/index_search_seconds"] >= 0
    assert evaluation.metric_keys(trainer.lightning_module) >= {"val/index_recall@100", "test/index/ndcg@10"}


@pytest.mark.parametrize("model", ["TwoTower", "MoL"])
def test_callback_searches_the_index_every_n_epochs_and_at_the_last(tmp_path, model):
    import functools

    from conftest import TINY_SIMILARITIES, cpu_trainer, make_tiny_data, make_tiny_model
    from rails_lightning.callbacks import CorpusEvaluation
    from rails_lightning.similarity.mol.topk import CombinedTopK

    data = make_tiny_data()
    index = {"index": "IVF8,Flat"} if model == "TwoTower" else {}  # MoL brings its own approximate top-k
    approximate = functools.partial(CombinedTopK, k_prime=4, averaged_k_prime=32)
    options = {} if model == "TwoTower" else {"similarity": functools.partial(TINY_SIMILARITIES["MoL"], approximate_topk=approximate)}
    evaluation = CorpusEvaluation(ks=(1, 10), index_every_n_epochs=2, **index)
    trainer = cpu_trainer(tmp_path, 4, [evaluation], limit_train_batches=1)
    trainer.fit(make_tiny_model(data, model, **options), datamodule=data)
    searched = ["val/index/hr@10" in row for row in evaluation.history]
    assert searched == [False, True, False, True]  # epochs 1 and 3: every 2nd, and the last
    # A fit whose last epoch is off the schedule still ends with one; a test always searches the index.
    evaluation = CorpusEvaluation(ks=(1, 10), index_every_n_epochs=2, **index)
    trainer = cpu_trainer(tmp_path / "three", 3, [evaluation], limit_train_batches=1)
    module = make_tiny_model(data, model, **options)
    trainer.fit(module, datamodule=data)
    assert ["val/index/hr@10" in row for row in evaluation.history] == [False, True, True]
    assert "test/index/hr@10" in trainer.test(module, datamodule=data, verbose=False)[0]


@pytest.mark.slow
def test_wandb_hit_rate_table_shows_the_index_only_where_it_was_searched(tmp_path):
    """trainer.callback_metrics keeps an epoch's index metrics into the next ones; the W&B HR@K table must not."""
    import json

    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from conftest import cpu_trainer, make_tiny_data, make_tiny_model
    from rails_lightning.callbacks import CorpusEvaluation, WandbHitRateTable

    if wandb.run is not None:  # a run an in-process fit of another test left open would be reused
        wandb.finish()
    data = make_tiny_data()
    # mode as an argument: once a wandb session has started in this process it ignores a changed WANDB_MODE
    logger = WandbLogger(project="rails_lightning_test", save_dir=str(tmp_path), mode="offline")
    evaluation = CorpusEvaluation(ks=(1, 10), index="IVF8,Flat", index_every_n_epochs=2)
    trainer = cpu_trainer(tmp_path, 4, [evaluation, WandbHitRateTable()], limit_train_batches=1, logger=logger)
    trainer.fit(make_tiny_model(data, "TwoTower"), datamodule=data)
    logger.experiment.finish()
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/val/hr_at_k_*.table.json"), key=lambda path: int(path.name.split("_")[3]))
    columns = [json.loads(path.read_text())["columns"] for path in tables]
    assert ["index HR@K" in c for c in columns] == [False, True, False, True]


def test_index_every_n_epochs_refuses_a_monitored_index_metric(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import cpu_trainer, make_tiny_data, make_tiny_model
    from rails_lightning.callbacks import CorpusEvaluation

    with pytest.raises(ConfigError, match=">= 1"):
        CorpusEvaluation(index_every_n_epochs=0)
    data = make_tiny_data()
    evaluation = CorpusEvaluation(ks=(1, 10), index="IVF8,Flat", index_every_n_epochs=2)
    trainer = cpu_trainer(tmp_path, 2, [evaluation, ModelCheckpoint(monitor="val/index/hr@10", mode="max")], limit_train_batches=1)
    with pytest.raises(ConfigError, match="monitor an exact metric"):
        trainer.fit(make_tiny_model(data, "TwoTower"), datamodule=data)
