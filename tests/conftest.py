"""Shared tiny fixtures and the test tiers.

Tiers: ``pytest -m "not slow"`` is the fast tier for everyday work (pure functions, parity checks,
short in-process fits); ``slow`` marks subprocess runs of the CLI, sweeps, notebooks and the real
MovieLens files; ``gpu`` marks tests that need CUDA (skipped without it). The README's
``python -m pytest`` runs everything.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from rails_lightning.data import InteractionDataModule, SyntheticSource
from rails_lightning.models import RetrievalModule, SASRecEncoder
from rails_lightning.objectives import SharedNegatives
from rails_lightning.similarity import DotProduct, MixtureOfLogits

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_DATA = Path(__file__).parent / "data"

#: CLI arguments that shrink the embedded default to a run of a few seconds (CLI and sweep tests).
TINY_CLI_ARGS = [
    "--data.source.init_args.num_users=150",
    "--data.source.init_args.num_items=200",
    "--data.source.init_args.num_clusters=8",
    "--data.source.init_args.mean_sequence_length=12",
    "--data.max_seq_len=12",
    "--data.batch_size=32",
    "--model.item_dim=16",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
]

#: The two similarities of the tiny models, by model name.
TINY_SIMILARITIES = {
    "TwoTower": DotProduct,
    "MoL": functools.partial(MixtureOfLogits, num_query_components=4, num_item_components=2, component_dim=16, component_hidden_dim=32),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_float32_matmul_precision():
    """A config with ``float32_matmul_precision`` (configs/ml-1m/hstu_mol.yaml) sets it for the whole process when
    the CLI builds it; every test starts from the setting the session started with."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def tiny_cli_args() -> list[str]:
    return list(TINY_CLI_ARGS)


def make_tiny_data(**kwargs) -> InteractionDataModule:
    """300 users, 400 items in 10 clusters, histories of ~15: a fit of a few seconds."""
    source = SyntheticSource(num_users=300, num_items=400, num_clusters=10, mean_sequence_length=15, seed=1)
    return InteractionDataModule(source, **{"max_seq_len": 16, "batch_size": 32, "eval_batch_size": 128, **kwargs})


def make_tiny_model(data: InteractionDataModule, model: str = "TwoTower", **kwargs) -> RetrievalModule:
    """A 16-dimensional one-layer SASRec model of either similarity on ``data``."""
    options = {
        "item_dim": 16, "query_encoder": functools.partial(SASRecEncoder, num_layers=1),
        "similarity": TINY_SIMILARITIES[model], "objective": functools.partial(SharedNegatives, num_negatives=32), "learning_rate": 5e-3, **kwargs,
    }
    return RetrievalModule(data.num_items, data.num_users, data.max_seq_len, data.num_item_features, **options)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """Point the `datasets` cache at a temporary directory (keeps the tests hermetic)."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_data() -> InteractionDataModule:
    return make_tiny_data()


class LossRecorder(pl.Callback):
    """Keeps the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def cpu_trainer(root, epochs: int, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet one-process CPU trainer writing under ``root``."""
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=root, callbacks=list(callbacks), **options
    )


#: The topics of the tiny BEIR folder: each document and query is about one of them.
TINY_BEIR_TOPICS = {
    "cardiology": ["heart", "artery", "blood", "pressure", "cardiac", "stroke"],
    "oncology": ["tumor", "cancer", "chemotherapy", "metastasis", "biopsy", "radiation"],
    "genetics": ["gene", "mutation", "genome", "dna", "inheritance", "sequencing"],
    "neuroscience": ["brain", "neuron", "synapse", "memory", "cortex", "dopamine"],
    "immunology": ["antibody", "vaccine", "immune", "infection", "virus", "inflammation"],
    "nutrition": ["diet", "vitamin", "protein", "obesity", "calories", "fiber"],
}


def write_tiny_beir(folder: Path, dev: bool = False, graded: bool = False, seed: int = 0) -> Path:
    """A small BEIR-format folder: 60 documents on 6 topics (12 relevant to no query), 48 training queries and 12 test
    queries (each about one document, some with a second relevant one), text ids; with ``dev`` 8 of the training
    queries go to qrels/dev.tsv instead; with ``graded`` the second relevant document scores 1 and the first 2."""
    import json
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    documents = []
    for topic, words in TINY_BEIR_TOPICS.items():
        for k in range(10):
            text = " ".join(rng.choice(words) for _ in range(12))
            documents.append({"_id": f"d{len(documents):03d}", "title": f"{topic} study {k}", "text": text, "topic": topic})
    queries, rows = [], {"train": [], "dev": [], "test": []}
    relevant_documents = documents[: 8 * len(TINY_BEIR_TOPICS)]
    for q in range(60):
        document = relevant_documents[q % len(relevant_documents)]
        words = TINY_BEIR_TOPICS[document["topic"]]
        queries.append({"_id": f"q{q:02d}", "text": f"{document['title']}: " + " ".join(rng.sample(words, 3))})
        role = "test" if q >= 48 else "dev" if dev and q < 8 else "train"
        rows[role].append((queries[-1]["_id"], document["_id"], 2 if graded else 1))
        if q % 5 == 0:  # a second relevant document on the same topic
            second = next(d for d in relevant_documents if d["topic"] == document["topic"] and d is not document)
            rows[role].append((queries[-1]["_id"], second["_id"], 1))
    with open(folder / "corpus.jsonl", "w") as out:
        for document in documents:
            out.write(json.dumps({k: document[k] for k in ("_id", "title", "text")}) + "\n")
    with open(folder / "queries.jsonl", "w") as out:
        for query in queries + [{"_id": "q_unjudged", "text": "a query no qrels file names"}]:
            out.write(json.dumps(query) + "\n")
    for role, role_rows in rows.items():
        if role_rows:
            (folder / "qrels" / f"{role}.tsv").write_text(
                "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in role_rows)
            )
    return folder
