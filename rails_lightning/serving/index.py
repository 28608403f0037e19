"""A trained model's corpus, exported for serving, grown without rebuilds, and the queries answered from it.

``export_index(checkpoint, out_dir)`` writes, in formats that are never unpickled:

* ``index.safetensors``: the model's weights (``model.*``), the encoded corpus (``items.*``: the dot
  product's vectors (N, D); MoL's component embeddings (N, P_X, D_P) and gate logits (N, P)) and every
  user's history (``history.offsets`` (U + 1,), ``history.items`` (M,), the model's item ids);
* ``items.faiss`` (dot product only): a FAISS index of the item vectors, of the FAISS factory type asked
  for (``Flat`` exact; ``HNSW32``, ``IVF1024,Flat`` ... approximate), in FAISS's own file format;
* ``ids.json``: raw user ids, the raw id of every model item id, and the raw ids and titles of the
  corpus rows (row r holds the r-th item of ``rows``; an export may hold a subset of the model's items);
* ``manifest.json``: model name and hyperparameters (plain data: the model is rebuilt from them),
  corpus size, index type, source checkpoint, date.

``add_items(out_dir, checkpoint, raw_ids, item_table)`` encodes new items with a checkpoint's item tower (by id,
or, for items the model never saw, from their metadata through a content tower) into a *delta* (``delta.safetensors``, ``delta.json``) without touching the main index; ``ServingIndex`` searches
main and delta and merges the two top-k lists by score (exact: each list holds its part's best k
allowed items). ``compact(out_dir)`` folds the delta into the main index (FAISS rebuilt from the stored
vectors).

A model whose queries are texts (a text query tower, ``rails_lightning.models.text_queries``: document search on
a ``BeirSource``) exports the same way, its documents as the items; ``ServingIndex.retrieve`` takes a text typed
at serving time, encodes it with the model's query tower (``RetrievalModule.encode_texts``) and answers it from the
same index (FAISS for the dot product, exact or RAILS top-k for MoL).

Shape legend: B queries, L history length, N corpus rows, K results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from rails_lightning.data.actions import pack
from rails_lightning.data.batches import QueryBatch
from rails_lightning.errors import CheckpointError, UserError
from rails_lightning.models import RetrievalModule
from rails_lightning.models.former_layouts import rename_former_weights
from rails_lightning.retrieval import SearchOptions, TopKRetriever, inner_product_retriever
from rails_lightning.retrieval.backend import build_faiss_index
from rails_lightning.retrieval.topk import NEG_INF, Exclusion, FaissIndexTopK
from rails_lightning.runs import RunRecord

MANIFEST, TENSORS, FAISS_INDEX, ID_MAP = "manifest.json", "index.safetensors", "items.faiss", "ids.json"
DELTA_TENSORS, DELTA_IDS = "delta.safetensors", "delta.json"


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


def _load_model(checkpoint: str | Path):
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    model = RetrievalModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    return model, _run_config(checkpoint).datamodule()


def _lookup(raw: Any, index: dict) -> Any:
    """A raw id as the log had it: the int when the ids are ints, else the text; None when ``index`` lacks it."""
    if raw in index:
        return raw
    number = _as_int(raw)
    return number if number in index else None


def _as_int(raw: Any) -> Any:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return raw


def _model_ids(raw_ids: Sequence[Any], item_raw_ids: list[Any], what: str) -> np.ndarray:
    """Raw item ids -> the model's contiguous item ids (1..N); unknown ones are an error."""
    index = {raw: i + 1 for i, raw in enumerate(item_raw_ids)}
    found = [_lookup(raw, index) for raw in raw_ids]
    unknown = [raw for raw, f in zip(raw_ids, found) if f is None]
    if unknown:
        raise UserError(f"{len(unknown)} item ids unknown to {what}, e.g. {unknown[:5]}")
    return np.array([index[f] for f in found], dtype=np.int64)


def _fields(items: Any) -> dict[str, Tensor]:
    return {"vectors": items} if isinstance(items, Tensor) else dict(zip(items._fields, items))


def _faiss_index(vectors: Tensor, factory: str, path: Path) -> None:
    import faiss

    faiss.write_index(build_faiss_index(vectors, factory, train_size=len(vectors)), str(path))


@torch.no_grad()
def export_index(checkpoint: str | Path, out_dir: str | Path, factory: str = "Flat", item_ids: Sequence[Any] | None = None) -> Path:
    """Export the model of ``checkpoint`` and its run's corpus (or the raw ``item_ids`` of it) to ``out_dir``."""
    from safetensors.torch import save_file

    model, data = _load_model(checkpoint)
    store, out = data.store, Path(out_dir)
    model_raw_ids = store.item_raw_ids[1:].tolist()
    rows = _model_ids(item_ids, model_raw_ids, "the model") if item_ids is not None else np.arange(1, model.num_items + 1)
    parts = [model.encode_items(chunk) for chunk in torch.from_numpy(rows).split(65536)]
    items = torch.cat(parts) if isinstance(parts[0], Tensor) else type(parts[0])(*(torch.cat(f) for f in zip(*parts)))
    fields = _fields(items)
    tensors = {f"model.{name}": value.contiguous() for name, value in model.state_dict().items()}
    tensors |= {f"items.{name}": value.contiguous() for name, value in fields.items()}
    tensors["history.offsets"] = torch.from_numpy(store.offsets)
    tensors["history.items"] = torch.from_numpy(store.items)
    if store.actions is not None:  # what each history event was, over the model's action_names (in the manifest)
        tensors["history.actions"] = torch.from_numpy(store.actions)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (DELTA_TENSORS, DELTA_IDS, FAISS_INDEX):
        (out / stale).unlink(missing_ok=True)
    save_file(tensors, str(out / TENSORS))
    index_type = "exact MoL scoring (RAILS approximate top-k on request)"
    if isinstance(items, Tensor):
        _faiss_index(items, factory, out / FAISS_INDEX)
        index_type = f"FAISS {factory}"
    titles = data.item_titles
    ids = {
        "users": store.user_raw_ids.tolist(), "model_items": model_raw_ids,
        "rows": [model_raw_ids[i - 1] for i in rows.tolist()], "titles": [titles[i] for i in rows.tolist()],
    }
    (out / ID_MAP).write_text(json.dumps(ids))
    manifest = {
        "model": model.model_name, "hparams": dict(model.hparams), "item_fields": list(fields), "corpus_size": len(rows),
        "index": index_type, "faiss_factory": factory, "checkpoint": str(Path(checkpoint).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _read_ids(directory: Path) -> tuple[dict, dict]:
    ids = json.loads((directory / ID_MAP).read_text())
    delta = json.loads((directory / DELTA_IDS).read_text()) if (directory / DELTA_IDS).is_file() else {"rows": [], "titles": []}
    return ids, delta


@torch.no_grad()
def add_items(
    index_dir: str | Path, checkpoint: str | Path, item_ids: Sequence[Any] | None, item_table: str | None = None,
    item_id_column: str = "item_id",
) -> int:
    """Encode raw items into the index's delta with ``checkpoint``'s item tower; returns the delta's size.

    Items the checkpoint's run knows are encoded by id. Items it never saw need a model whose item tower reads
    content (``ContentTower``, ``IdAndContent``) and their rows in ``item_table`` (csv / parquet / json lines,
    the columns the tower reads, ids in ``item_id_column``): they are encoded from their content alone.
    Without ``item_ids``, every item of ``item_table`` that the index lacks is added.
    """
    from safetensors.torch import load_file, save_file

    from rails_lightning.data.item_content import ItemTable

    index_dir = Path(index_dir)
    manifest = json.loads((index_dir / MANIFEST).read_text())
    ids, delta = _read_ids(index_dir)
    present = dict.fromkeys(ids["rows"] + delta["rows"])
    model, data = _load_model(checkpoint)
    model_raw_ids = data.store.item_raw_ids[1:].tolist()
    content = None
    if item_table is not None:
        tower = model.item_tower
        if not tower.reads_content:
            raise UserError(f"{checkpoint}'s item tower ({type(tower).__name__}) reads item ids only: --item_table needs a content tower")
        content = ItemTable(item_table, item_id_column, tower.text_columns, tower.categorical_columns, tower.numeric_columns).load()
    if item_ids is None:
        if content is None:
            raise UserError("give the items to add (--items) or their metadata (--item_table)")
        item_ids = [raw for raw in content.raw_ids.tolist() if _lookup(raw, present) is None]
    new = [raw for raw in item_ids if _lookup(raw, present) is None]
    if len(new) != len(item_ids):
        raise UserError(f"{len(item_ids) - len(new)} of the items are in the index already")
    model_index = {raw: i + 1 for i, raw in enumerate(model_raw_ids)}
    known = [raw for raw in new if _lookup(raw, model_index) is not None]
    unseen = [raw for raw in new if _lookup(raw, model_index) is None]
    parts, rows, titles = [], [], []
    if known:
        known_ids = _model_ids(known, model_raw_ids, f"the model of {checkpoint}")
        parts.append(_fields(model.encode_items(torch.from_numpy(known_ids))))
        rows += [model_raw_ids[i - 1] for i in known_ids.tolist()]
        titles += [data.item_titles[i] for i in known_ids.tolist()]
    if unseen:
        if content is None:
            raise UserError(
                f"{len(unseen)} item ids unknown to the model of {checkpoint}, e.g. {unseen[:5]}: a model with a content "
                "tower (ContentTower, IdAndContent) encodes new items from their metadata, given with --item_table FILE"
            )
        table_ids = {raw: raw for raw in content.raw_ids.tolist()}
        found = [_lookup(raw, table_ids) for raw in unseen]
        missing = [raw for raw, f in zip(unseen, found) if f is None]
        if missing:
            raise UserError(f"{len(missing)} new items have no row in {item_table}, e.g. {missing[:5]}")
        described, _ = content.aligned(np.array(found, dtype=content.raw_ids.dtype))
        parts.append(_fields(model.similarity.item_representation(model.item_tower.encode_content(described))))
        rows += found
        names = described.titles() or {}
        titles += [names.get(raw, f"item {raw}") for raw in found]
    fields = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    if list(fields) != manifest["item_fields"]:
        raise UserError(f"{checkpoint} is a {model.model_name} model; this index holds {manifest['model']} items")
    if (index_dir / DELTA_TENSORS).is_file():
        old = load_file(str(index_dir / DELTA_TENSORS))
        fields = {name: torch.cat([old[f"items.{name}"], value]) for name, value in fields.items()}
    save_file({f"items.{name}": value.contiguous() for name, value in fields.items()}, str(index_dir / DELTA_TENSORS))
    delta = {"rows": delta["rows"] + rows, "titles": delta["titles"] + titles}
    (index_dir / DELTA_IDS).write_text(json.dumps(delta))
    return len(delta["rows"])


def compact(index_dir: str | Path) -> int:
    """Fold the delta into the main index (FAISS rebuilt from the stored vectors); returns the corpus size."""
    from safetensors.torch import load_file, save_file

    index_dir = Path(index_dir)
    if not (index_dir / DELTA_TENSORS).is_file():
        return json.loads((index_dir / MANIFEST).read_text())["corpus_size"]
    manifest = json.loads((index_dir / MANIFEST).read_text())
    tensors, delta_tensors = load_file(str(index_dir / TENSORS)), load_file(str(index_dir / DELTA_TENSORS))
    for name in manifest["item_fields"]:
        tensors[f"items.{name}"] = torch.cat([tensors[f"items.{name}"], delta_tensors[f"items.{name}"]]).contiguous()
    ids, delta = _read_ids(index_dir)
    ids["rows"] += delta["rows"]
    ids["titles"] += delta["titles"]
    save_file(tensors, str(index_dir / TENSORS))
    if (index_dir / FAISS_INDEX).is_file():
        _faiss_index(tensors["items.vectors"], manifest["faiss_factory"], index_dir / FAISS_INDEX)
    (index_dir / ID_MAP).write_text(json.dumps(ids))
    manifest["corpus_size"] = len(ids["rows"])
    (index_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (index_dir / DELTA_TENSORS).unlink()
    (index_dir / DELTA_IDS).unlink()
    return manifest["corpus_size"]


@dataclass
class Answer:
    """Top items of one query: raw ids, titles, scores, and the search's wall time."""

    item_ids: list[Any]
    titles: list[str]
    scores: list[float]
    seconds: float


class ServingIndex:
    """An exported index (main rows, then any delta rows), ready to answer queries.

    Args:
        directory: what ``export_index`` (and ``add_items``) wrote.
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
        weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        rename_former_weights(weights)  # an index exported in a former layout
        self.model.load_state_dict(weights)
        self.history_offsets = tensors["history.offsets"].numpy()
        self.history_items = tensors["history.items"].numpy()
        self.history_actions = tensors["history.actions"].numpy() if "history.actions" in tensors else None
        self.action_names = tuple(self.manifest["hparams"].get("action_names") or ())
        ids, delta = _read_ids(directory)
        self.user_index = {raw: i for i, raw in enumerate(ids["users"])}
        self.model_items = ids["model_items"]  # raw id of each model item id - 1
        self.model_item_index = {raw: i + 1 for i, raw in enumerate(self.model_items)}
        self.row_raw_ids, self.titles = ids["rows"] + delta["rows"], ids["titles"] + delta["titles"]
        self.num_main = len(ids["rows"])
        self.row_index = {raw: r + 1 for r, raw in enumerate(self.row_raw_ids)}  # raw id -> 1-based row
        self.main = self._retriever(directory, self._items(tensors), approximate, FAISS_INDEX)
        self.delta = None
        if (directory / DELTA_TENSORS).is_file():
            self.delta = self._retriever(directory, self._items(load_file(str(directory / DELTA_TENSORS))), approximate, None)
        self._text_encoder_loaded = False

    def _items(self, tensors: dict[str, Tensor]) -> Any:
        fields = [tensors[f"items.{name}"] for name in self.manifest["item_fields"]]
        if self.manifest["item_fields"] == ["vectors"]:
            return fields[0]
        probe = self.model.encode_items(torch.tensor([1]))  # the representation's type
        return type(probe)(*fields)

    def _retriever(self, directory: Path, items: Any, approximate: bool, faiss_file: str | None) -> TopKRetriever:
        if faiss_file is not None and (directory / faiss_file).is_file():
            import faiss

            return FaissIndexTopK(faiss.read_index(str(directory / faiss_file)))
        if isinstance(items, Tensor):  # the delta of a dot-product index: small, searched exactly
            return inner_product_retriever(items, SearchOptions())
        if approximate:
            retriever = self.model.approximate_retriever(items, SearchOptions())
            if retriever is None:
                raise UserError("this model has no approximate top-k (set the similarity's approximate_topk when training)")
            return retriever
        return self.model.exact_retriever(items, SearchOptions())

    # ------------------------------------------------------------------ queries
    @property
    def reads_query_text(self) -> bool:
        """The model's queries are texts (``text_query``), not histories (``query``)."""
        return self.model.query_encoder.reads_query_text

    def check_query_kind(self, text: bool) -> None:
        """A one-line error when a query of the other kind is asked of this model."""
        encoder = type(self.model.query_encoder).__name__
        if text and not self.reads_query_text:
            raise UserError(
                f"this index's model encodes histories ({encoder}), not texts: query it with --user or --history; "
                "--query needs a model trained with a text query tower (configs/scifact/*.yaml)"
            )
        if not text and self.reads_query_text:
            raise UserError(f"this index's model reads query texts ({encoder}), not histories: query it with --query \"some text\"")

    def _user_range(self, raw_user: str) -> slice:
        user = _lookup(str(raw_user), self.user_index)
        if user is None:
            raise UserError(f"user {raw_user!r} is not in this index ({len(self.user_index)} users)")
        u = self.user_index[user]
        return slice(self.history_offsets[u], self.history_offsets[u + 1])

    def user_history(self, raw_user: str) -> np.ndarray:
        """The user's stored history, as the model's item ids."""
        return self.history_items[self._user_range(raw_user)]

    def user_actions(self, raw_user: str) -> np.ndarray | None:
        """The action bitmasks of the user's stored history events, or None when the index has no actions."""
        return None if self.history_actions is None else self.history_actions[self._user_range(raw_user)]

    def parse_history(self, entries: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """``["1196:liked", "260:disliked+rated", "1210"]`` -> the model's item ids and, for a model with action
        types, each event's action bitmask (an entry without ``:`` has none of them)."""
        entries = [str(entry).strip() for entry in entries if str(entry).strip()]
        items = self.items_of([entry.split(":", 1)[0] for entry in entries])
        if not self.action_names:
            if any(":" in entry for entry in entries):
                raise UserError("this model has no action types; give plain item ids (`1196,260`)")
            return items, None
        flags = np.zeros((len(entries), len(self.action_names)), dtype=bool)  # (B, A)
        for row, entry in enumerate(entries):
            names = [n.strip() for n in entry.split(":", 1)[1].split("+")] if ":" in entry else []
            unknown = [n for n in names if n not in self.action_names]
            if unknown:
                raise UserError(f"{entry}: unknown action type(s) {unknown}; this model knows {list(self.action_names)}")
            flags[row, [self.action_names.index(n) for n in names]] = True
        return items, pack(flags)

    def items_of(self, raw_items: list[str]) -> np.ndarray:
        """Raw item ids -> the model's item ids (a history the model can encode)."""
        raw_items = [str(raw).strip() for raw in raw_items if str(raw).strip()]
        found = [_lookup(raw, self.model_item_index) for raw in raw_items]
        unknown = [raw for raw, f in zip(raw_items, found) if f is None]
        if unknown or not found:
            raise UserError(f"item ids the model does not know: {unknown or raw_items}")
        return np.array([self.model_item_index[f] for f in found], dtype=np.int64)

    def query(self, history: np.ndarray, user: str | None = None, actions: np.ndarray | None = None) -> QueryBatch:
        """One query from ``history`` (the model's item ids, oldest first) and its events' action bitmasks (for a
        model with action types; none given: no action): its last ``max_seq_len`` events, left-padded; the whole
        history is what ``--exclude-history`` excludes. Without a user, user index 0 stands in."""
        length = self.model.hparams.max_seq_len

        def window(values: np.ndarray) -> Tensor:  # (1, L), left-padded with 0
            out = np.zeros(length, dtype=np.int64)
            recent = np.asarray(values, dtype=np.int64)[-length:]
            out[length - len(recent) :] = recent
            return torch.from_numpy(out)[None]

        if self.action_names and actions is None:
            actions = np.zeros(len(history), dtype=np.int64)
        user_index = 0 if user is None else self.user_index[_lookup(str(user), self.user_index)]
        return QueryBatch(
            user_ids=torch.tensor([user_index]), input_ids=window(history), targets=torch.zeros(1, 1, dtype=torch.long),
            exclude_offsets=torch.tensor([0, len(history)]), exclude_items=torch.from_numpy(np.asarray(history, dtype=np.int64)),
            actions=None if actions is None else window(actions),
        )

    def _row_exclusion(self, batch: QueryBatch) -> tuple[Exclusion, Exclusion]:
        """The history (model item ids) as 1-based rows of the main part and of the delta part."""
        rows = [self.row_index.get(self.model_items[i - 1]) for i in batch.exclude_items.tolist()]
        main = torch.tensor(sorted({r for r in rows if r is not None and r <= self.num_main}), dtype=torch.long)
        delta = torch.tensor(sorted({r - self.num_main for r in rows if r is not None and r > self.num_main}), dtype=torch.long)
        return Exclusion(torch.tensor([0, len(main)]), main), Exclusion(torch.tensor([0, len(delta)]), delta)

    @torch.no_grad()
    def retrieve(self, query: QueryBatch | str, k: int = 10, exclude_history: bool = False) -> Answer:
        """The top ``k`` rows for a history query (a ``QueryBatch`` from ``query``) or, for a model whose queries are
        texts, a text (it has no history to exclude). The answer's time covers encoding the query and the search."""
        text = isinstance(query, str)
        self.check_query_kind(text)
        if text and not query.strip():
            raise UserError("the query text is empty")
        if text and not self._text_encoder_loaded:  # the first text query loads the encoder before its timer starts
            self.model.encode_texts(["warm-up"])
            self._text_encoder_loaded = True
        started = time.perf_counter()
        if text:
            queries, main_exclusion, delta_exclusion = self.model.encode_texts([query]), None, None
        else:
            queries = self.model.encode_queries(query)
            main_exclusion, delta_exclusion = self._row_exclusion(query) if exclude_history else (None, None)
        scores, rows = self.main.search(queries, k, main_exclusion)
        if self.delta is not None:
            delta_scores, delta_rows = self.delta.search(queries, k, delta_exclusion)
            delta_rows = torch.where(delta_rows > 0, delta_rows + self.num_main, 0)
            scores, pick = torch.cat([scores, delta_scores], 1).topk(k, dim=1)
            rows = torch.cat([rows, delta_rows], 1).gather(1, pick)
        seconds = time.perf_counter() - started
        kept = [(int(r), float(s)) for r, s in zip(rows[0].tolist(), scores[0].tolist()) if r > 0 and s != NEG_INF]
        return Answer(
            item_ids=[self.row_raw_ids[r - 1] for r, _ in kept], titles=[self.titles[r - 1] for r, _ in kept],
            scores=[s for _, s in kept], seconds=seconds,
        )
