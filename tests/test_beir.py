"""BEIR-format data: the source on a folder written here (and its one-line errors), the ``by_query`` split, and
the metrics as BEIR reports them (graded nDCG against a hand-computed example and a plain-Python BEIR-style
loop, MRR@10).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import write_tiny_beir
from rails_lightning.baseline import popularity_baseline
from rails_lightning.data import BeirSource, InteractionDataModule
from rails_lightning.errors import ConfigError, DataError
from rails_lightning.metrics import RetrievalMetrics


def _data(folder, **source_options) -> InteractionDataModule:
    return InteractionDataModule(BeirSource(str(folder), **source_options), split="by_query", max_seq_len=1, batch_size=8)


def test_source_reads_queries_documents_roles_and_texts(tmp_path):
    folder = write_tiny_beir(tmp_path / "beir")
    log = BeirSource(str(folder)).load()
    qrels = {role: [line.split("\t") for line in (folder / "qrels" / f"{role}.tsv").read_text().splitlines()[1:]] for role in ("train", "test")}
    assert len(log.user_ids) == sum(len(rows) for rows in qrels.values())
    assert set(log.catalogue.tolist()) == {json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()}
    assert len(log.catalogue) == 60 and len(set(log.item_ids.tolist())) < 60  # never-relevant documents are in the corpus
    assert "q_unjudged" not in log.query_roles  # a query without qrels is no user
    roles = list(log.query_roles.values())
    assert roles.count("test") == 12 and roles.count("val") == round(0.2 * 48) and roles.count("train") == 48 - roles.count("val")
    assert log.relevance is None  # binary qrels
    first = json.loads((folder / "corpus.jsonl").read_text().splitlines()[0])
    row = log.item_content.raw_ids.tolist().index(first["_id"])
    assert log.item_content.text["document"][row] == f"{first['title']} {first['text']}"
    assert log.item_titles[first["_id"]] == first["title"]
    assert log.query_texts["q00"] == json.loads((folder / "queries.jsonl").read_text().splitlines()[0])["text"]
    assert "seed=0" in log.query_split_description and "no qrels/dev.tsv" in log.query_split_description


def test_validation_draw_is_seeded_and_dev_qrels_replace_it(tmp_path):
    folder = write_tiny_beir(tmp_path / "beir")

    def validation(**options):
        return sorted(q for q, role in BeirSource(str(folder), **options).load().query_roles.items() if role == "val")

    assert validation(seed=3) == validation(seed=3) != validation(seed=4)
    assert len(validation(val_fraction=0.5)) == 24
    with_dev = BeirSource(str(write_tiny_beir(tmp_path / "dev", dev=True))).load()
    assert sorted(q for q, r in with_dev.query_roles.items() if r == "val") == [f"q{q:02d}" for q in range(8)]
    assert with_dev.query_split_description == "validation: qrels/dev.tsv"


def test_graded_scores_and_zero_scores(tmp_path):
    folder = write_tiny_beir(tmp_path / "beir", graded=True)
    with open(folder / "qrels" / "test.tsv", "a") as out:
        out.write("q50\td059\t0\n")  # judged not relevant: no interaction
    log = BeirSource(str(folder)).load()
    assert sorted(set(log.relevance.tolist())) == [1.0, 2.0]
    assert "d059" not in log.item_ids.tolist()


def _bad(tmp_path, change) -> str:
    folder = write_tiny_beir(tmp_path / "beir")
    change(folder)
    with pytest.raises(DataError) as error:
        BeirSource(str(folder)).load()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_files_are_named(tmp_path):
    assert "corpus.jsonl: file not found" in _bad(tmp_path / "a", lambda f: (f / "corpus.jsonl").unlink())
    assert "qrels/test.tsv: file not found" in _bad(tmp_path / "b", lambda f: (f / "qrels" / "test.tsv").unlink())


def test_qrels_naming_an_unknown_query_or_document_gives_file_and_line(tmp_path):
    train_lines = len((write_tiny_beir(tmp_path / "probe") / "qrels" / "train.tsv").read_text().splitlines())
    test_lines = len((tmp_path / "probe" / "qrels" / "test.tsv").read_text().splitlines())

    def append(row, name="train.tsv"):
        return lambda folder: open(folder / "qrels" / name, "a").write(row)

    message = _bad(tmp_path / "a", append("q_missing\td001\t1\n"))
    assert f"train.tsv, line {train_lines + 1}: query 'q_missing' is not in queries.jsonl" in message
    message = _bad(tmp_path / "b", append("q01\td999\t1\n"))
    assert f"train.tsv, line {train_lines + 1}: document 'd999' is not in corpus.jsonl" in message
    message = _bad(tmp_path / "c", append("q01\td001\tvery\n"))
    assert f"line {train_lines + 1}: the score 'very' is not a number" in message
    message = _bad(tmp_path / "d", append("q01\td001\t1\n", "test.tsv"))
    assert f"test.tsv, line {test_lines + 1}: query 'q01' is also in qrels/train.tsv" in message


def test_empty_corpus_and_malformed_json_lines(tmp_path):
    assert "corpus.jsonl: the corpus is empty" in _bad(tmp_path / "a", lambda f: (f / "corpus.jsonl").write_text(""))

    def break_line(folder):
        lines = (folder / "corpus.jsonl").read_text().splitlines()
        lines[4] = lines[4][:20]
        (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")

    assert "corpus.jsonl, line 5: not a JSON object" in _bad(tmp_path / "b", break_line)
    message = _bad(tmp_path / "c", lambda f: open(f / "queries.jsonl", "a").write('{"text": "no id"}\n'))
    assert "queries.jsonl, line 62: no field '_id'" in message


def test_split_by_query_trains_pairs_and_evaluates_every_relevant_document(tmp_path):
    data = _data(write_tiny_beir(tmp_path / "beir"))
    data.setup("fit")
    store, split = data.store, data.split
    log = BeirSource(data.source.data_dir).load()
    roles = np.array([log.query_roles[raw] for raw in store.user_raw_ids.tolist()])
    train_pairs = int(store.lengths[roles == "train"].sum())
    batches = list(data.train_dataloader())
    assert sum(len(b.user_ids) for b in batches) == train_pairs
    for batch in batches:
        assert batch.input_ids.shape == (len(batch.user_ids), 1) and not batch.input_ids.any()
        assert batch.target_ids.shape == (len(batch.user_ids), 1)
        assert set(roles[batch.user_ids.numpy()]) == {"train"}
        for user, item in zip(batch.user_ids.tolist(), batch.target_ids[:, 0].tolist()):
            assert item in store.items[store.offsets[user] : store.offsets[user + 1]]
    for stage, role in (("val", "val"), ("test", "test")):
        queries = split.val if stage == "val" else split.test
        assert sorted(queries.users.tolist()) == np.flatnonzero(roles == role).tolist()
        for batch in data.query_loader(stage, sharded=False):
            assert batch.exclude_items.numel() == 0 and batch.target_gains is None  # nothing excluded; binary
            for user, targets in zip(batch.user_ids.tolist(), batch.targets.tolist()):
                assert sorted(t for t in targets if t) == sorted(store.items[store.offsets[user] : store.offsets[user + 1]].tolist())
    summary = data.summary()
    assert summary["val_queries"] == len(split.val) and "seed=0" in summary["query_split"]
    assert summary["items"] == 60  # the whole corpus


def test_one_relevant_document_is_enough_whatever_min_interactions(tmp_path):
    data = InteractionDataModule(BeirSource(str(write_tiny_beir(tmp_path / "beir"))), split="by_query", min_interactions=5)
    assert data.num_users == 60


def test_graded_gains_travel_with_the_targets(tmp_path):
    data = _data(write_tiny_beir(tmp_path / "beir", graded=True))
    batch = next(iter(data.query_loader("test", sharded=False)))
    assert batch.target_gains.shape == batch.targets.shape
    assert ((batch.target_gains > 0) == (batch.targets > 0)).all()
    assert set(batch.target_gains[batch.targets > 0].tolist()) == {1.0, 2.0}
    assert 0.0 <= popularity_baseline(data, "test", (1, 10))["test/ndcg@10"] <= 1.0


def test_split_and_source_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="use --data.split=by_query"):
        InteractionDataModule(BeirSource(str(write_tiny_beir(tmp_path / "beir")))).num_items
    with pytest.raises(ConfigError, match="needs a source whose queries have their own split"):
        InteractionDataModule(split="by_query").num_items


# ---------------------------------------------------------------------------- metrics as BEIR reports them
def test_graded_ndcg_mrr_at_10_by_hand():
    """One query, targets 7 (gain 3), 9 (gain 1), 4 (gain 2); ranking 9, 1, 7, 2, 4, ...:
    DCG@3 = 1/log2(2) + 3/log2(4) = 2.5, ideal DCG@3 = 3 + 2/log2(3) + 1/2; MRR@1 = 1 (9 is first)."""
    topk = torch.tensor([[9, 1, 7, 2, 4, 5, 6, 8, 3, 10]])
    targets, gains = torch.tensor([[7, 9, 4]]), torch.tensor([[3.0, 1.0, 2.0]])
    metric = RetrievalMetrics(ks=(3, 5), mrr_cutoffs=(1, 2))
    metric.update(topk, targets, gains)
    out = metric.compute()
    assert float(out["ndcg@3"]) == pytest.approx(2.5 / (3 + 2 / math.log2(3) + 0.5))
    dcg5 = 1 + 3 / 2 + 2 / math.log2(6)
    assert float(out["ndcg@5"]) == pytest.approx(dcg5 / (3 + 2 / math.log2(3) + 0.5))
    assert float(out["mrr@1"]) == float(out["mrr@2"]) == float(out["mrr"]) == 1.0
    assert float(out["recall@3"]) == pytest.approx(2 / 3)
    later = RetrievalMetrics(ks=(10,), mrr_cutoffs=(2, 10))
    later.update(torch.tensor([[5, 6, 7, 1, 2, 3, 4, 8, 9, 10]]), torch.tensor([[7]]))
    assert float(later.compute()["mrr@2"]) == 0.0 and float(later.compute()["mrr@10"]) == pytest.approx(1 / 3)


def _beir_style(run: list[list[int]], qrels: list[dict[int, float]], k: int) -> tuple[float, float, float]:
    """nDCG@k (linear gains, ideal over the sorted gains), Recall@k and MRR@k as pytrec_eval / BEIR compute them,
    one query at a time in plain Python."""
    ndcg = recall = rr = 0.0
    for ranking, relevant in zip(run, qrels):
        dcg = sum(relevant.get(item, 0.0) / math.log2(rank + 2) for rank, item in enumerate(ranking[:k]))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:k]))
        ndcg += dcg / ideal
        recall += len(set(ranking[:k]) & set(relevant)) / len(relevant)
        rr += next((1 / (rank + 1) for rank, item in enumerate(ranking[:k]) if item in relevant), 0.0)
    return ndcg / len(run), recall / len(run), rr / len(run)


@pytest.mark.parametrize("graded", [True, False])
def test_metrics_agree_with_a_plain_python_beir_loop(graded):
    rng = random.Random(7)
    run, qrels = [], []
    for _ in range(50):
        run.append(rng.sample(range(1, 301), 100))
        relevant = rng.sample(range(1, 301), rng.randint(1, 15))
        qrels.append({item: float(rng.choice([1, 2, 3])) if graded else 1.0 for item in relevant})
    width = max(len(q) for q in qrels)
    targets = torch.tensor([list(q) + [0] * (width - len(q)) for q in qrels])
    gains = torch.tensor([list(q.values()) + [0.0] * (width - len(q)) for q in qrels]) if graded else None
    metric = RetrievalMetrics(ks=(10, 100), mrr_cutoffs=(10,))
    for start in range(0, 50, 16):  # in batches, as the callback feeds it
        metric.update(torch.tensor(run[start : start + 16]), targets[start : start + 16], None if gains is None else gains[start : start + 16])
    out = metric.compute()
    for k in (10, 100):
        ndcg, recall, rr = _beir_style(run, qrels, k)
        assert float(out[f"ndcg@{k}"]) == pytest.approx(ndcg, abs=1e-12)
        assert float(out[f"recall@{k}"]) == pytest.approx(recall, abs=1e-12)
    assert float(out["mrr@10"]) == pytest.approx(_beir_style(run, qrels, 10)[2], abs=1e-12)


def test_gains_of_one_are_the_binary_metrics():
    topk = torch.randint(1, 60, (20, 50))
    targets = torch.randint(0, 60, (20, 4))
    targets[:, 0] = torch.randint(1, 60, (20,))
    binary, graded = RetrievalMetrics((1, 10, 50)), RetrievalMetrics((1, 10, 50))
    binary.update(topk, targets)
    graded.update(topk, targets, (targets > 0).float())
    assert {k: float(v) for k, v in binary.compute().items()} == pytest.approx({k: float(v) for k, v in graded.compute().items()})
