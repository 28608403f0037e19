"""The corpus index: one corpus encoding per change of the weights, shared by evaluation and mining; sharded encoding."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from conftest import cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.objectives import MinedNegatives
from rails_lightning.retrieval import SearchOptions, Shards

MODELS = ["TwoTower", "MoL"]


def _fresh_corpus(module):
    """The whole corpus encoded directly by the item tower, as evaluated (what mining used before the corpus index)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        items = module.encode_items(torch.arange(1, module.num_items + 1))
    module.train(was_training)
    return items


def _assert_same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        assert torch.equal(x, y)


class MiningCheck(pl.Callback):
    """At the first step of every mining epoch the objective's retriever ranks the batch's queries exactly as a
    retriever over a fresh encoding of the current weights does (what the objective mined from before the corpus
    index)."""

    def __init__(self) -> None:
        self.checked_epochs: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        objective = module.objective
        if batch_idx or module.current_epoch < objective.start_epoch:
            return
        fresh = _fresh_corpus(module)
        module.eval()  # no dropout (MoL's gate dropout would make the two rankings differ)
        with torch.no_grad():
            states = module.encode_sequence(batch.user_ids, batch.input_ids, batch.timestamps)[:, -1]
            queries = module.similarity.query_representation(states, batch.user_ids)
            expected = module.exact_retriever(fresh, SearchOptions()).search(queries, objective.mining_depth)
            _assert_same(objective.retriever.search(queries, objective.mining_depth), expected)
        module.train()
        self.checked_epochs.append(module.current_epoch)


@pytest.mark.parametrize("model", MODELS)
def test_one_corpus_encoding_per_epoch_with_mining_and_evaluation(tmp_path, monkeypatch, model):
    """MinedNegatives and CorpusEvaluation in one fit: the corpus is encoded once per epoch (at its validation) and
    the next epoch mines from that very encoding, which equals a fresh encoding of the weights it mines with."""
    torch.manual_seed(0)
    data = make_tiny_data()
    objective = functools.partial(MinedNegatives, num_negatives=16, num_mined=4, mining_depth=20, start_epoch=1)
    module = make_tiny_model(data, model, objective=objective)
    encodings, corpus_encodings = [], []
    encode, encode_corpus = module.corpus_index.encode, module.encode_corpus

    def counted_encode(*args, **kwargs):
        encodings.append(module.current_epoch)
        return encode(*args, **kwargs)

    def counted_encode_corpus(*args, **kwargs):  # any path that encodes the whole corpus
        corpus_encodings.append(module.current_epoch)
        return encode_corpus(*args, **kwargs)

    monkeypatch.setattr(module.corpus_index, "encode", counted_encode)
    monkeypatch.setattr(module, "encode_corpus", counted_encode_corpus)
    check, evaluation = MiningCheck(), CorpusEvaluation(ks=(1, 10))
    cpu_trainer(tmp_path, 3, [evaluation, check], limit_train_batches=2, enable_checkpointing=False).fit(module, datamodule=data)
    assert encodings == corpus_encodings == [0, 1, 2]  # one per epoch, at its validation
    assert check.checked_epochs == [1, 2]
    assert [row["epoch"] for row in evaluation.history] == [0, 1, 2]


def test_the_index_encodes_again_only_when_the_weights_change():
    """Repeated requests reuse one encoding and one retriever per search options (the approximate index's options
    do not change an exact search); loading new weights, a step's end, a training epoch's start (once the objective
    took what it mines from) and a stage's end drop them."""
    torch.manual_seed(0)
    data = make_tiny_data()
    module = make_tiny_model(data)
    index = module.corpus_index
    items = index.items()
    exact = index.exact_retriever()
    assert index.items() is items and index.exact_retriever(SearchOptions(index="Flat")) is exact
    assert index.exact_retriever(SearchOptions(backend="torch")) is not exact
    flat = index.approximate_retriever(SearchOptions(index="Flat"))
    assert flat is not None and index.approximate_retriever(SearchOptions(index="Flat")) is flat

    other = make_tiny_model(data).state_dict()  # another seed's weights
    module.load_state_dict(other)
    assert index.items() is not items and index.exact_retriever() is not exact
    _assert_same(index.items(), _fresh_corpus(module))
    hooks = (lambda: module.on_train_batch_end(None, None, 0), module.on_train_epoch_start, lambda: module.teardown("fit"))
    for hook in hooks:
        items = index.items()
        hook()
        assert index.items() is not items


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_encoding_gathers_the_whole_corpus(monkeypatch, model, world_size):
    """Under DDP each process encodes rows rank * S .. (rank + 1) * S (the last share padded) and the gathered shares
    are the whole corpus in order; the other processes' shares are encoded here in their place."""
    data = make_tiny_data()
    module = make_tiny_model(data, model).eval()
    share = -(-module.num_items // world_size)  # 400 items: 200 or 134 (the last share 2 rows of padding)

    def fields(representation):
        return representation if isinstance(representation, tuple) else (representation,)

    for rank in range(world_size):
        with torch.no_grad():  # every process's share, as that process encodes it
            shares = [fields(module.encode_corpus(start=r * share, count=share)) for r in range(world_size)]
        gathered = iter(range(len(shares[0])))  # the gather is called field by field, in order

        def all_gather(rows):  # (S, ...) -> (W, S, ...)
            field = next(gathered)
            assert torch.equal(rows, shares[rank][field])  # this process's own share
            return torch.stack([parts[field] for parts in shares])

        module.corpus_index.invalidate()
        monkeypatch.setattr(module, "corpus_shards", lambda: Shards(rank, world_size, all_gather))
        _assert_same(module.corpus_index.items(), _fresh_corpus(module))
