"""Cold-start items: the split that holds them out of training, the metrics that rank them (against the corpus and
among themselves), the baselines beside a model, and real fits that report them."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch
import yaml

from conftest import cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.baseline import (
    RankedScores,
    category_popularity,
    category_popularity_baseline,
    content_knn_baseline,
    evaluate_scores,
    random_baseline,
)
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.data import InteractionDataModule, InteractionLogSource, ItemTable
from rails_lightning.data.sequences import draw_cold_items
from rails_lightning.errors import ConfigError
from rails_lightning.models.item_towers import ContentTower
from rails_lightning.objectives import FullSoftmax, MinedNegatives, PerQueryNegatives, SharedNegatives
from rails_lightning.retrieval import BruteForceTopK, Exclusion, SubsetTopK
from rails_lightning.similarity.base import with_group_dim

COLD = {"cold_item_fraction": 0.2, "cold_item_seed": 5}


# ---------------------------------------------------------------------------------------------------- the split
def test_cold_items_are_a_seeded_draw_within_popularity_strata():
    rng = np.random.default_rng(0)
    counts = np.concatenate([[0], rng.permutation(np.arange(1, 1001) ** 3)])  # (N + 1,) distinct, long-tailed
    cold = draw_cold_items(counts, 0.1, 10, seed=3)
    assert not cold[0] and cold.sum() == 100
    np.testing.assert_array_equal(cold, draw_cold_items(counts, 0.1, 10, seed=3))
    assert (cold != draw_cold_items(counts, 0.1, 10, seed=4)).any()
    # Ten from each decile of popularity: as many popular cold items as rare ones.
    ranks = np.argsort(np.argsort(counts[1:]))  # (N,) popularity rank
    np.testing.assert_array_equal(np.bincount(ranks[cold[1:]] // 100, minlength=10), [10] * 10)
    # Tied counts (most items of a long tail have one event) are cut through at random, not by id.
    tied = np.concatenate([[0], np.ones(1000, dtype=np.int64)])
    assert draw_cold_items(tied, 0.1, 10, seed=3).sum() == 100


def test_bad_cold_split_options_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"cold_item_fraction must be in \[0, 1\)"):
        make_tiny_data(cold_item_fraction=1.0)
    with pytest.raises(ConfigError, match="holds out no item of 400"):
        make_tiny_data(cold_item_fraction=0.001).setup("fit")


def _cold_and_standard():
    return make_tiny_data(**COLD), make_tiny_data()


def test_no_cold_item_is_in_any_training_batch_and_training_keeps_the_rest():
    """Every training batch, input and target, holds warm items only; each training sequence is the standard
    split's with the cold items' events taken out."""
    data, standard = _cold_and_standard()
    data.setup("fit")
    cold = data.cold_items
    assert cold.sum() == 80 and data.summary()["cold_items"] == 80 and data.summary()["cold_item_seed"] == 5
    np.testing.assert_array_equal(data.training_item_ids, np.flatnonzero(~cold[1:]) + 1)
    store, L = standard.store, data.max_seq_len
    seen = 0
    for batch in data.train_dataloader():
        assert not cold[batch.input_ids.numpy()].any() and not cold[batch.target_ids.numpy()].any()
        for user, inputs, targets in zip(batch.user_ids.tolist(), batch.input_ids.numpy(), batch.target_ids.numpy()):
            sequence = store.items[store.offsets[user] : standard.split.train_end[user]]
            warm = sequence[~cold[sequence]][-(L + 1) :]
            assert inputs[inputs > 0].tolist() == warm[:-1].tolist() and targets[targets > 0].tolist() == warm[1:].tolist()
            seen += 1
    assert seen == len(data._train_dataset()) > 0
    assert data.train_item_counts[cold].sum() == 0 and data.train_item_counts.sum() > 0


@pytest.mark.parametrize("stage", ["val", "test"])
def test_queries_keep_their_targets_and_lose_their_cold_history(stage):
    """The same queries and targets as the standard split; a history (input and exclusion) without cold items."""
    data, standard = _cold_and_standard()
    data.setup(stage)
    cold = data.cold_items
    batches = list(zip(data.query_loader(stage, sharded=False), standard.query_loader(stage, sharded=False)))
    assert sum(len(b.user_ids) for b, _ in batches) == len(getattr(standard.split, stage)) > 0
    store, queries = standard.store, getattr(standard.split, stage)
    for batch, plain in batches:
        torch.testing.assert_close(batch.user_ids, plain.user_ids)
        torch.testing.assert_close(batch.targets, plain.targets)
        for row in range(len(batch.user_ids)):
            user = int(batch.user_ids[row])
            (query,) = np.flatnonzero(queries.users == user)
            history = store.items[store.offsets[user] : queries.history_end[query]]  # the standard split's, whole
            assert batch.input_ids[row][batch.input_ids[row] > 0].tolist() == history[~cold[history]][-data.max_seq_len :].tolist()
            excluded = batch.exclude_items[batch.exclude_offsets[row] : batch.exclude_offsets[row + 1]].numpy()
            plain_excluded = plain.exclude_items[plain.exclude_offsets[row] : plain.exclude_offsets[row + 1]].numpy()
            assert excluded.tolist() == plain_excluded[~cold[plain_excluded]].tolist()
        # The cold and warm target groups: the cold split adds them.
        names = data.target_group_names
        assert names == ("cold", "warm")
        is_cold = cold[batch.targets.numpy()]
        np.testing.assert_array_equal(batch.target_groups.numpy(), np.where(batch.targets.numpy() > 0, np.where(is_cold, 1, 2), 0))
    assert data.summary()[f"{stage}_queries_with_a_cold_target"] == sum(int(cold[b.targets.numpy()].any(1).sum()) for b, _ in batches)


# ---------------------------------------------------------------------------------------------------- negatives
class _Recorded:
    """Keeps every id an objective draws (a subclass of the real objective: its draws are unchanged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn: list[torch.Tensor] = []

    def negatives(self, step):
        negatives = super().negatives(step)
        self.drawn += [ids.flatten() for ids in (negatives.shared, negatives.per_query, negatives.per_sequence) if ids is not None]
        return negatives


RECORDED = {
    "uniform_and_in_batch": functools.partial(type("RecordedShared", (_Recorded, SharedNegatives), {}), num_negatives=64, num_in_batch_negatives=32),
    "per_query": functools.partial(type("RecordedPerQuery", (_Recorded, PerQueryNegatives), {}), num_negatives=16),
    "full": type("RecordedFull", (_Recorded, FullSoftmax), {}),
    "mined": functools.partial(type("RecordedMined", (_Recorded, MinedNegatives), {}), num_negatives=16, num_mined=8, mining_depth=30, start_epoch=1),
}


@pytest.mark.parametrize("objective", sorted(RECORDED))
def test_no_objective_draws_a_cold_item_as_a_negative(tmp_path, objective):
    """Two real epochs on a tiny cold split: no negative any objective draws is cold, and the draws reach
    across the warm items (mined ones too, from the second epoch on)."""
    torch.manual_seed(0)
    data = make_tiny_data(**COLD)
    module = make_tiny_model(data, objective=RECORDED[objective])
    cpu_trainer(tmp_path, 2, enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)
    drawn = torch.cat(module.objective.drawn)
    assert drawn.numel() > 0 and not data.cold_items[drawn.numpy()].any()
    assert len(torch.unique(drawn)) > 0.5 * len(data.training_item_ids)
    torch.testing.assert_close(module.training_item_ids, torch.from_numpy(data.training_item_ids))
    if objective == "mined":
        assert module.objective.retriever is not None  # it mined in epoch 1, among the warm items only


def test_a_subset_retriever_ranks_its_items_alone_with_the_history_excluded():
    torch.manual_seed(0)
    queries, corpus = torch.randn(6, 4), torch.randn(30, 4)  # items 1..30
    subset = torch.tensor([2, 5, 9, 11, 17, 23, 29])
    inner = BruteForceTopK(lambda q, start, end: q @ corpus[subset - 1][start:end].T, len(subset), 1 << 20)
    exclusion = Exclusion(torch.tensor([0, 2, 2, 3, 3, 3, 5]), torch.tensor([5, 1, 9, 23, 30]))  # rows 0, 2, 5
    _, ids = SubsetTopK(inner, subset, 30).search(queries, 4, exclusion)
    for row in range(6):
        excluded = set(exclusion.items[exclusion.offsets[row] : exclusion.offsets[row + 1]].tolist())
        allowed = [i for i in subset.tolist() if i not in excluded]
        expected = sorted(allowed, key=lambda i: -float(queries[row] @ corpus[i - 1]))[:4]
        assert ids[row].tolist() == expected, row


# ---------------------------------------------------------------------------------------------------- metrics
def _brute_force(module, data, ks, target_in: np.ndarray, rank_among: np.ndarray) -> dict[str, float]:
    """The metrics of the val queries whose (leave-one-out) target is in ``target_in`` ((N + 1,) mask): its rank among
    the items of ``rank_among`` ((N + 1,) mask) that the query does not exclude, by scoring every item."""
    module.eval()
    hr, ndcg, rr, count = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0), 0.0, 0
    with torch.no_grad():
        corpus = module.encode_corpus()  # (N, ...)
        for batch in data.query_loader("val", sharded=False):
            queries = module.encode_queries(batch)
            scores, _ = module.similarity.score(with_group_dim(queries, 0), with_group_dim(corpus, 0))  # (1, B, N)
            for row in range(len(batch.user_ids)):
                target = int(batch.targets[row, 0])
                if not target_in[target]:
                    continue
                allowed = torch.from_numpy(rank_among[1:].copy())  # (N,)
                allowed[batch.exclude_items[batch.exclude_offsets[row] : batch.exclude_offsets[row + 1]] - 1] = False
                rank = int(((scores[0, row] > scores[0, row, target - 1]) & allowed).sum())
                count += 1
                rr += 1 / (rank + 1) if rank < max(ks) else 0.0
                for k in ks:
                    hr[k] += rank < k
                    ndcg[k] += 1 / math.log2(rank + 2) if rank < k else 0.0
    return {**{f"hr@{k}": hr[k] / count for k in ks}, **{f"ndcg@{k}": ndcg[k] / count for k in ks}, "mrr": rr / count}


@pytest.mark.parametrize("model", ["TwoTower", "MoL"])
def test_cold_metrics_equal_a_brute_force_ranking(tmp_path, model):
    """A real fit of an id-embedding model on a cold split (its cold items are untrained vectors): val/cold/... equals
    the brute-force metrics of the cold targets ranked over the whole corpus, val/cold_only/... among the cold items."""
    torch.manual_seed(0)
    data = make_tiny_data(**COLD, eval_batch_size=50)
    module = make_tiny_model(data, model)
    ks = (1, 5, 20)
    evaluation = CorpusEvaluation(ks=ks)
    cpu_trainer(tmp_path, 2, [evaluation], enable_checkpointing=False).fit(module, datamodule=data)
    logged = evaluation.last_metrics
    assert {"val/cold/hr@5", "val/warm/hr@5", "val/cold_only/hr@5", "val/cold_only/mrr"} <= evaluation.metric_keys(module, datamodule=data)
    cold, every = data.cold_items, np.ones_like(data.cold_items)
    for group, expected in (("cold", _brute_force(module, data, ks, cold, every)), ("cold_only", _brute_force(module, data, ks, cold, cold)),
                            ("warm", _brute_force(module, data, ks, ~cold, every))):
        for name, value in expected.items():
            assert logged[f"val/{group}/{name}"] == pytest.approx(value, abs=1e-6), (group, name)
    assert logged["val/cold_only/hr@20"] > logged["val/cold/hr@20"]  # fewer items to rank among


# ---------------------------------------------------------------------------------------------------- baselines
def _genre_log(folder, drama_users=30, comedy_users=10, length=5, per_genre=6):
    """Items 1..G are dramas, G+1..2G comedies (their titles and genres say so); drama fans watch dramas only,
    comedy fans comedies only, so that with more drama fans dramas are more popular."""
    rng = random.Random(0)
    log, table = ["user_id,item_id,timestamp"], ["item_id,title,genres"]
    dramas, comedies = range(1, per_genre + 1), range(per_genre + 1, 2 * per_genre + 1)
    table += [f"{i},drama film {i},Drama" for i in dramas] + [f"{i},comedy film {i},Comedy" for i in comedies]
    for user in range(drama_users + comedy_users):
        items = dramas if user < drama_users else comedies
        log += [f"{user},{item},{t}" for t, item in enumerate(rng.sample(items, length))]
    (folder / "log.csv").write_text("\n".join(log) + "\n")
    (folder / "items.csv").write_text("\n".join(table) + "\n")
    items = ItemTable(str(folder / "items.csv"), text_columns=["title"], categorical_columns=["genres"])
    return InteractionLogSource(str(folder / "log.csv"), items=items)


def _is_drama(data) -> np.ndarray:
    """(N + 1,) whether each item id is a drama."""
    return np.array([False] + [genres == ("Drama",) for genres in data.item_content.categorical["genres"][1:]])


def test_category_popularity_averages_the_popularity_of_an_items_values():
    counts = np.array([0, 3, 1, 2])  # padding, three items
    scores = category_popularity(counts, [(), ("a",), ("a", "b"), ("b",)])  # a: 3 + 1 events, b: 1 + 2
    np.testing.assert_allclose(scores, [0.0, 4.0, 3.5, 3.0])


def test_ranked_scores_break_ties_at_random_with_a_seed():
    ties = torch.zeros(1, 12)  # every item scores the same
    ranker = RankedScores(12, seed=1)
    first = [int(ranker.search(ties, 3)[1][0, 0]) for _ in range(100)]  # one batch after another
    assert len(set(first)) > 6  # not the lowest id each time
    again = RankedScores(12, seed=1)
    assert first == [int(again.search(ties, 3)[1][0, 0]) for _ in range(100)]
    _, ids = RankedScores(12).search(torch.arange(12.0).expand(2, -1), 4, Exclusion(torch.tensor([0, 1, 1]), torch.tensor([12])))
    assert ids.tolist() == [[11, 10, 9, 8], [12, 11, 10, 9]]  # best first, the excluded item skipped


def test_baselines_on_a_known_case(tmp_path):
    """Genre popularity puts every (more popular) drama above every comedy: a drama target is in the top 6, a
    comedy one never. Content kNN with one vector per genre finds every target in the top 6 of its own genre;
    a random ranking does not."""
    data = InteractionDataModule(_genre_log(tmp_path), min_interactions=3, max_seq_len=8)
    data.setup("fit")
    drama = _is_drama(data)
    targets = np.array([int(b) for batch in data.query_loader("val", sharded=False) for b in batch.targets[:, 0]])
    genre = category_popularity_baseline(data, "val", ks=(1, 6))
    assert genre["val/hr@6"] == pytest.approx(drama[targets].mean())
    vectors = torch.from_numpy(np.stack([~drama, drama], axis=1).astype(np.float32))  # (N + 1, 2); padding (1, 0) is never read
    knn = content_knn_baseline(data, vectors, "val", ks=(1, 6))
    assert knn["val/hr@6"] == 1.0
    chance = random_baseline(data, "val", ks=(1, 6))
    assert chance["val/hr@6"] < 1.0 and chance == random_baseline(data, "val", ks=(1, 6))
    with pytest.raises(ConfigError, match=r"asked for \['year'\], the data has \['genres'\]"):
        category_popularity_baseline(data, "val", columns=["year"])


@pytest.mark.parametrize("stage", ["val", "test"])
def test_baselines_cold_metrics_equal_a_brute_force_ranking(tmp_path, stage):
    """Under a cold split, content kNN with distinct random vectors (no ties): its whole-corpus, cold and cold-only
    metrics equal each target's rank computed here, by the cosine to the history's mean vector."""
    data = InteractionDataModule(_genre_log(tmp_path, length=8, per_genre=10), min_interactions=3, max_seq_len=8,
                                 cold_item_fraction=0.25, cold_item_strata=1, cold_item_seed=2)
    data.setup("fit")
    vectors = torch.randn(data.num_items + 1, 4, generator=torch.Generator().manual_seed(0))
    got = content_knn_baseline(data, vectors, stage, ks=(1, 3))
    cold = data.cold_items
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    ranks = {"": [], "cold": [], "warm": [], "cold_only": []}
    for batch in data.query_loader(stage, sharded=False):
        for row in range(len(batch.user_ids)):
            history = batch.input_ids[row][batch.input_ids[row] > 0]
            assert len(history), "5 cold items cannot fill a history of 6"
            scores = unit[1:] @ torch.nn.functional.normalize(unit[history].mean(0), dim=0)  # (N,)
            target = int(batch.targets[row, 0])
            allowed = torch.ones(data.num_items, dtype=torch.bool)
            allowed[batch.exclude_items[batch.exclude_offsets[row] : batch.exclude_offsets[row + 1]] - 1] = False
            above = (scores > scores[target - 1]) & allowed
            ranks[""].append(int(above.sum()))
            ranks["cold" if cold[target] else "warm"].append(int(above.sum()))
            if cold[target]:
                ranks["cold_only"].append(int((above & torch.from_numpy(cold[1:])).sum()))
    assert ranks["cold"] and ranks["warm"]
    for group, group_ranks in ranks.items():
        prefix = f"{stage}/{group}/" if group else f"{stage}/"
        assert got[prefix + "hr@3"] == pytest.approx(np.mean([r < 3 for r in group_ranks])), group
        assert got[prefix + "mrr"] == pytest.approx(np.mean([1 / (r + 1) if r < 3 else 0 for r in group_ranks])), group
    assert evaluate_scores(data, stage, lambda batch: torch.zeros(len(batch.targets), data.num_items), (1, 3)).keys() == got.keys()


# ---------------------------------------------------------------------------------------------------- a real fit
@pytest.mark.parametrize("tower", ["ContentTower", "IdAndContent"])
def test_a_content_tower_fit_reports_cold_metrics_and_baselines(tmp_path, monkeypatch, tower):
    """A tiny fit through the CLI with a content tower on a cold split: the run reports val/cold/hr@10 and
    val/cold_only/hr@10, records the cold items and their seed (the run's), and the baselines beside it; no cold
    item had a training event. With ids beside the content, a cold item's id vector is still exactly zero after
    training (it is placed by its content alone) while the trained items' moved."""
    from rails_lightning.cli import main
    from rails_lightning.runs import RunRecord

    monkeypatch.setenv("WANDB_MODE", "disabled")
    _genre_log(tmp_path, drama_users=40, comedy_users=40, length=5)
    config = tmp_path / "cold.yaml"
    config.write_text(f"""
seed_everything: 3
data:
  min_interactions: 3
  max_seq_len: 8
  cold_item_fraction: 0.34
  cold_item_strata: 1
  source:
    class_path: rails_lightning.data.InteractionLogSource
    init_args:
      path: {tmp_path / 'log.csv'}
      items:
        class_path: rails_lightning.data.ItemTable
        init_args: {{path: {tmp_path / 'items.csv'}, text_columns: [title], categorical_columns: [genres]}}
model:
  item_dim: 16
  item_tower:
    class_path: rails_lightning.models.item_towers.{tower}
    init_args: {{text_columns: [title], categorical_columns: [genres], text_cache_dir: null, hidden_dim: 32}}
  objective:
    class_path: rails_lightning.objectives.SharedNegatives
    init_args: {{num_negatives: 8}}
trainer:
  max_epochs: 4
  enable_progress_bar: false
  logger: false
""")
    cli = main(["fit", "--config", str(config), f"--run_dir={tmp_path / 'run'}"])
    assert isinstance(cli.model.item_tower, ContentTower)
    record = RunRecord.read(tmp_path / "run")
    assert record.ok and record.data["cold_items"] == 4 and record.data["cold_item_seed"] == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["cold_item_seed"] == 3
    for key in ("val/cold/hr@10", "val/cold_only/hr@10", "val/warm/hr@10", "test/cold/ndcg@10", "test/cold_only/ndcg@10"):
        assert 0.0 <= record.metrics[key] <= 1.0, key
    assert set(record.baselines) == {"random", "category_popularity", "content_knn"}
    for values in record.baselines.values():
        assert {"val/cold/hr@10", "test/cold_only/hr@10"} <= set(values)
    assert record.baseline["test/cold/hr@10"] >= 0.0  # popularity, cold targets too
    # The title and genre place a cold item with its genre: better than chance among the cold items.
    assert record.test["test/cold_only/mrr"] > record.baselines["random"]["test/cold_only/mrr"]
    assert cli.datamodule.train_item_counts[cli.datamodule.cold_items].sum() == 0
    if tower == "IdAndContent":
        id_vectors = cli.model.item_tower.ids.embedding.weight.detach()  # (N + 1, D)
        cold = torch.from_numpy(cli.datamodule.cold_items)
        assert cold.sum() == 4 and (id_vectors[cold] == 0).all()
        trained = torch.from_numpy(cli.datamodule.train_item_counts > 0)
        assert (id_vectors[trained].abs().sum(dim=-1) > 0).all()


def test_the_seeds_of_a_cold_split_experiment_are_one_row_of_the_results_table():
    """A cold split drawn with the run's seed differs between seeds like the seed itself; one drawn with another
    seed is a setting of its own."""
    from rails_lightning.reports.reproduction import experiment_config

    def config(seed, cold_seed):
        return {"seed_everything": seed, "data": {"cold_item_fraction": 0.1, "cold_item_seed": cold_seed}}

    assert experiment_config(config(0, 0)) == experiment_config(config(1, 1)) == {"data": {"cold_item_fraction": 0.1}}
    assert experiment_config(config(0, 7)) == {"data": {"cold_item_fraction": 0.1, "cold_item_seed": 7}}


def test_a_cold_split_row_says_so_stands_beside_no_published_figure_and_is_labelled_by_its_tower():
    """Rows of a towers x seeds cold-start grid on ML-1M: the split cell names the held-out share; no published
    figure (all of them train on every item) is beside them or listed under them; each row is labelled by its
    tower's class alone (IdAndContent's inherited defaults and the featuriser inside it are not differences)."""
    from rails_lightning.reports import ReportedRun
    from rails_lightning.reports.reproduction import results_table
    from rails_lightning.runs import RunRecord

    def run(tower, init_args, seed):
        config = {"seed_everything": seed, "data": {"cold_item_fraction": 0.1, "source": {
            "class_path": "rails_lightning.data.MovieLensSource", "init_args": {"variant": "ml-1m"}}},
            "model": {"query_encoder": {"class_path": "rails_lightning.models.SASRecEncoder"},
                      "item_tower": {"class_path": f"rails_lightning.models.item_towers.{tower}", "init_args": init_args}}}
        record = RunRecord(run_dir=f"/r/{tower}{seed}", model="TwoTower", config=config, val={"val/hr@10": 0.1}, test={"test/hr@10": 0.1 + seed / 100})
        return ReportedRun(record, f"{tower}-{seed}")

    content = {"text_columns": ["title"], "categorical_columns": ["genres"],
               "text_featurizer": {"class_path": "rails_lightning.data.text_features.PretrainedSentenceEncoder"}}
    both = {**content, "id_dropout": 0.5, "hidden_dim": 256, "text_featurizer": {"class_path": "rails_lightning.data.text_features.PretrainedSentenceEncoder"}}
    runs = [run(tower, args, seed) for tower, args in (("ContentTower", content), ("IdAndContent", both), ("IdEmbedding", {})) for seed in range(2)]
    table = results_table(runs, all_figures=True)
    rows = [line for line in table.splitlines() if line.startswith("| ml-1m")]
    assert [row.split("|")[1].strip() for row in rows] == [
        f"ml-1m SASRec TwoTower (item_tower={tower}())" for tower in ("ContentTower", "IdAndContent", "IdEmbedding")]
    assert all("10% of items held out of training (cold)" in row and row.rstrip(" |").endswith("—") for row in rows)
    assert "Published and recomputed figures" not in table


def test_a_cold_split_of_text_queries_is_refused():
    """split=by_query trains on (query, document) pairs that do not go through the warm events: refused, not leaked."""
    from rails_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="cold_item_fraction works with the leave_one_out and temporal splits"):
        InteractionDataModule(split="by_query", cold_item_fraction=0.1)
