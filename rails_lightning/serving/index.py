"""A trained model's corpus, exported for serving, and the queries answered from it.

``export_index(checkpoint, out_dir)`` writes, in formats that are never unpickled:

* ``index.safetensors``: the model's weights (``model.*``), the encoded corpus (``items.*``: the dot
  product's vectors (N, D); MoL's component embeddings (N, P_X, D_P) and gate logits (N, P)) and every
  user's history (``history.offsets`` (U + 1,), ``history.items`` (M,), contiguous ids);
* ``items.faiss`` (dot product only): a FAISS index of the item vectors, of the FAISS factory type asked
  for (``Flat`` exact; ``HNSW32``, ``IVF1024,Flat`` ... approximate), in FAISS's own file format;
* ``ids.json``: raw user ids, raw item ids and item titles (row r is item id r + 1);
* ``manifest.json``: model name and hyperparameters (plain data: the model is rebuilt from them),
  corpus size, index type, source checkpoint, date.

``ServingIndex(out_dir)`` loads it back: it encodes a query from a user's stored history or from a list
of raw item ids, and retrieves with FAISS (dot product) or the exact / RAILS approximate MoL top-k.

Shape legend: B queries, L history length, N corpus, K results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rails_lightning.data.batches import QueryBatch
from rails_lightning.errors import CheckpointError, UserError
from rails_lightning.models import RetrievalModule
from rails_lightning.retrieval import SearchOptions, TopKRetriever
from rails_lightning.retrieval.topk import Exclusion, FaissIndexTopK
from rails_lightning.runs import RunRecord

MANIFEST, TENSORS, FAISS_INDEX, ID_MAP = "manifest.json", "index.safetensors", "items.faiss", "ids.json"


def _run_config(checkpoint: Path) -> RunRecord:
    """The run a checkpoint belongs to (``RUN_DIR/checkpoints/x.ckpt``): its record, for the data config."""
    run_dir = checkpoint.resolve().parent.parent
    record = RunRecord.read(run_dir)
    if not record.config and (run_dir / "config.yaml").is_file():
        import yaml

        record.config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if not record.config.get("data"):
        raise UserError(f"{checkpoint}: not inside a run directory with run.json or config.yaml (RUN_DIR/checkpoints/*.ckpt)")
    return record


def export_index(checkpoint: str | Path, out_dir: str | Path, factory: str = "Flat") -> Path:
    """Export the model of ``checkpoint`` and its run's corpus to ``out_dir`` (see the module docstring)."""
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    model = RetrievalModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    data = _run_config(checkpoint).datamodule()
    store = data.store
    with torch.no_grad():
        items = model.encode_corpus()
    tensors = {f"model.{name}": value.contiguous() for name, value in model.state_dict().items()}
    fields = {"vectors": items} if isinstance(items, Tensor) else dict(zip(items._fields, items))
    tensors |= {f"items.{name}": value.contiguous() for name, value in fields.items()}
    tensors["history.offsets"] = torch.from_numpy(store.offsets)
    tensors["history.items"] = torch.from_numpy(store.items)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TENSORS))
    index_type = "exact MoL scoring (RAILS approximate top-k on request)"
    if isinstance(items, Tensor):
        import faiss

        vectors = items.float().numpy()
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        faiss.write_index(index, str(out / FAISS_INDEX))
        index_type = f"FAISS {factory}"
    titles = data.item_titles
    ids = {"users": store.user_raw_ids.tolist(), "items": store.item_raw_ids[1:].tolist(), "titles": titles[1:]}
    (out / ID_MAP).write_text(json.dumps(ids))
    manifest = {
        "model": model.model_name, "hparams": dict(model.hparams), "item_fields": list(fields),
        "corpus_size": model.num_items, "index": index_type, "checkpoint": str(checkpoint.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


@dataclass
class Answer:
    """Top items of one query: raw ids, titles, scores, and the search's wall time."""

    item_ids: list[Any]
    titles: list[str]
    scores: list[float]
    seconds: float


class ServingIndex:
    """An exported index, ready to answer queries.

    Args:
        directory: what ``export_index`` wrote.
        approximate: for MoL, search with the model's RAILS approximate top-k (its ``approximate_topk``
            option) instead of exact scoring.
    """

    def __init__(self, directory: str | Path, approximate: bool = False) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise UserError(f"{directory}: no {MANIFEST}; create the index with `python -m rails_lightning index`")
        self.manifest = json.loads((directory / MANIFEST).read_text())
        tensors = load_file(str(directory / TENSORS))
        self.model = RetrievalModule(**self.manifest["hparams"]).eval()
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        fields = [tensors[f"items.{name}"] for name in self.manifest["item_fields"]]
        if self.manifest["item_fields"] == ["vectors"]:
            self.items = fields[0]
        else:
            probe = self.model.encode_items(torch.tensor([1]))  # the representation's type
            self.items = type(probe)(*fields)
        self.history_offsets = tensors["history.offsets"].numpy()
        self.history_items = tensors["history.items"].numpy()
        ids = json.loads((directory / ID_MAP).read_text())
        self.user_index = {raw: i for i, raw in enumerate(ids["users"])}
        self.item_raw_ids, self.titles = ids["items"], ids["titles"]
        self.item_index = {raw: i + 1 for i, raw in enumerate(self.item_raw_ids)}
        self.retriever = self._retriever(directory, approximate)

    def _retriever(self, directory: Path, approximate: bool) -> TopKRetriever:
        if (directory / FAISS_INDEX).is_file():
            import faiss

            return FaissIndexTopK(faiss.read_index(str(directory / FAISS_INDEX)))
        if approximate:
            retriever = self.model.approximate_retriever(self.items, SearchOptions())
            if retriever is None:
                raise UserError("this model has no approximate top-k (set the similarity's approximate_topk when training)")
            return retriever
        return self.model.exact_retriever(self.items, SearchOptions())

    # ------------------------------------------------------------------ queries
    def _raw_id(self, text: str, known: dict) -> Any:
        """A raw id as the log had it: the int when the ids are ints, else the text."""
        if text in known:
            return text
        try:
            return int(text) if int(text) in known else None
        except ValueError:
            return None

    def user_history(self, raw_user: str) -> np.ndarray:
        user = self._raw_id(str(raw_user), self.user_index)
        if user is None:
            raise UserError(f"user {raw_user!r} is not in this index ({len(self.user_index)} users)")
        u = self.user_index[user]
        return self.history_items[self.history_offsets[u] : self.history_offsets[u + 1]]

    def items_of(self, raw_items: list[str]) -> np.ndarray:
        found = [self._raw_id(str(raw).strip(), self.item_index) for raw in raw_items if str(raw).strip()]
        unknown = [raw for raw, f in zip(raw_items, found) if f is None]
        if unknown or not found:
            raise UserError(f"item ids not in this index: {unknown or raw_items}")
        return np.array([self.item_index[f] for f in found], dtype=np.int64)

    def query(self, history: np.ndarray, user: str | None = None) -> QueryBatch:
        """One query: the last ``max_seq_len`` items of ``history`` (contiguous ids), left-padded."""
        length = self.model.hparams.max_seq_len
        window = np.zeros(length, dtype=np.int64)
        recent = history[-length:]
        window[length - len(recent) :] = recent
        user_index = 0 if user is None else self.user_index[self._raw_id(str(user), self.user_index)]
        return QueryBatch(
            user_ids=torch.tensor([user_index]), input_ids=torch.from_numpy(window)[None],
            targets=torch.zeros(1, 1, dtype=torch.long),
            exclude_offsets=torch.tensor([0, len(history)]), exclude_items=torch.from_numpy(np.asarray(history, dtype=np.int64)),
        )

    @torch.no_grad()
    def retrieve(self, batch: QueryBatch, k: int = 10, exclude_history: bool = False) -> Answer:
        started = time.perf_counter()
        queries = self.model.encode_queries(batch)
        exclude = Exclusion(batch.exclude_offsets, batch.exclude_items) if exclude_history else None
        scores, ids = self.retriever.search(queries, k, exclude)
        seconds = time.perf_counter() - started
        kept = [(int(i), float(s)) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if i > 0]
        return Answer(
            item_ids=[self.item_raw_ids[i - 1] for i, _ in kept], titles=[self.titles[i - 1] for i, _ in kept],
            scores=[s for _, s in kept], seconds=seconds,
        )
