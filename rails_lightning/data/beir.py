"""``BeirSource``: a document-search dataset in the BEIR layout, as an interaction log.

The layout (Thakur et al., BEIR, 2021), which BEIR-format datasets share::

    corpus.jsonl       {"_id", "title", "text"}, one document per line
    queries.jsonl      {"_id", "text"}, one query per line
    qrels/train.tsv    query-id <tab> corpus-id <tab> score, after a header line
    qrels/dev.tsv      (optional) the validation queries
    qrels/test.tsv

A query is a "user" and its relevant documents are its interactions, so the one DataModule, model and
evaluation serve text search: the users are the queries that have a relevant document in a qrels file (their
text in ``InteractionLog.query_texts``), the corpus is every document of ``corpus.jsonl`` (relevant to some
query or not), and each query's role (train / val / test) comes from the qrels file it is in, for the
DataModule's ``split=by_query``. Without ``qrels/dev.tsv`` a seeded draw of the training queries validates.

A row with score <= 0 says a document was judged not relevant: it is no interaction. Graded scores are kept
(``InteractionLog.relevance``, the gains of nDCG); when every relevant row has the same score the data is
binary and ``relevance`` is None. A (query, document) pair listed twice keeps its last score, as BEIR's own
loader does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from rails_lightning.data.item_content import ItemContent
from rails_lightning.data.sequences import InteractionLog
from rails_lightning.data.source import InteractionSource
from rails_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

QRELS_FILES = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}  # role -> file under qrels/
DOCUMENT_COLUMN = "document"  # the item-content text column of each document's text


class BeirSource(InteractionSource):
    """A BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv): queries are the users,
    their relevant documents the interactions, every document of the corpus an item. Use it with
    ``InteractionDataModule(split="by_query")``.

    Args:
        data_dir: the folder.
        val_fraction: without ``qrels/dev.tsv``, the share of the training queries (a seeded random draw) that
            become validation queries; ignored when the folder has dev qrels.
        seed: the seed of that draw.
        text_fields: the corpus fields joined (with a space, empty ones left out) into each document's text: the
            item-content text column ``document`` (what a ``ContentTower`` reads with
            ``text_columns: [document]``) and what the BM25 and zero-shot baselines index.
    """

    def __init__(
        self,
        data_dir: str,
        val_fraction: float = 0.2,
        seed: int = 0,
        text_fields: Sequence[str] = ("title", "text"),
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"BeirSource.val_fraction must be in [0, 1), got {val_fraction}")
        if not text_fields:
            raise ConfigError("BeirSource.text_fields needs at least one corpus field (title, text)")
        self.data_dir = str(data_dir)
        self.val_fraction, self.seed = val_fraction, seed
        self.text_fields = list(text_fields)

    @property
    def description(self) -> str:
        return self.data_dir

    def _file(self, name: str, required: bool = True) -> Path | None:
        path = Path(self.data_dir) / name
        if not path.is_file():
            if required:
                raise DataError(
                    f"{path}: file not found (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/train.tsv, "
                    "qrels/test.tsv and optionally qrels/dev.tsv)"
                )
            return None
        return path

    def load(self) -> InteractionLog:
        corpus = _read_jsonl(self._file("corpus.jsonl"), ["_id"])
        if not corpus:
            raise DataError(f"{Path(self.data_dir) / 'corpus.jsonl'}: the corpus is empty (no documents)")
        queries = {record["_id"]: str(record.get("text") or "") for record in _read_jsonl(self._file("queries.jsonl"), ["_id", "text"])}
        doc_ids = [record["_id"] for record in corpus]
        known_docs = set(doc_ids)

        role_of: dict[str, str] = {}  # query id -> role
        where: dict[str, str] = {}  # query id -> the first qrels file naming it
        scores: dict[tuple[str, str], float] = {}  # (query, document) -> score, in file order
        repeats = 0
        for role, name in QRELS_FILES.items():
            path = self._file(f"qrels/{name}", required=role != "val")
            if path is None:
                continue
            for line_number, query, document, score in _read_qrels(path):
                if query not in queries:
                    raise DataError(f"{path}, line {line_number}: query {query!r} is not in queries.jsonl")
                if document not in known_docs:
                    raise DataError(f"{path}, line {line_number}: document {document!r} is not in corpus.jsonl")
                if role_of.setdefault(query, role) != role:
                    raise DataError(
                        f"{path}, line {line_number}: query {query!r} is also in {where[query]}; a query has one role "
                        "(train, dev or test)"
                    )
                where.setdefault(query, f"qrels/{name}")
                repeats += (query, document) in scores
                scores[(query, document)] = score
        if repeats:
            log.warning("%s: %d (query, document) pairs listed twice in the qrels; each keeps its last score", self.data_dir, repeats)

        relevant = [(q, d, s) for (q, d), s in scores.items() if s > 0]  # score <= 0: judged not relevant
        with_relevant = {q for q, _, _ in relevant}
        role_of = {q: r for q, r in role_of.items() if q in with_relevant}
        split_description = "validation: qrels/dev.tsv"
        if "val" not in role_of.values():
            train = sorted(q for q, r in role_of.items() if r == "train")
            drawn = np.random.default_rng(self.seed).permutation(len(train))[: round(self.val_fraction * len(train))]
            for index in drawn.tolist():
                role_of[train[index]] = "val"
            split_description = (
                f"validation: {len(drawn)} of the {len(train)} queries of qrels/train.tsv (val_fraction={self.val_fraction}, "
                f"seed={self.seed}; the folder has no qrels/dev.tsv)"
            )

        query_ids = np.array([q for q, _, _ in relevant], dtype=str)
        item_ids = np.array([d for _, d, _ in relevant], dtype=str)
        gains = np.array([s for _, _, s in relevant], dtype=np.float32)
        fields = {field: [str(record.get(field) or "") for record in corpus] for field in dict.fromkeys(["title", *self.text_fields])}
        documents = [" ".join(part for part in parts if part) for parts in zip(*(fields[f] for f in self.text_fields))]
        titles = [title or document[:80] for title, document in zip(fields["title"], documents)]
        content = ItemContent(raw_ids=np.array(doc_ids, dtype=str), text={"title": titles, DOCUMENT_COLUMN: documents})
        return InteractionLog(
            user_ids=query_ids,
            item_ids=item_ids,
            order=np.arange(len(relevant), dtype=np.int64),  # each query's relevant documents in file order
            name=self.data_dir,
            item_titles=dict(zip(doc_ids, titles)),
            catalogue=np.array(doc_ids, dtype=str),
            item_content=content,
            relevance=None if len(np.unique(gains)) <= 1 else gains,
            query_texts={q: queries[q] for q in role_of},
            query_roles=role_of,
            query_split_description=split_description,
        )


def _read_jsonl(path: Path, required: list[str]) -> list[dict]:
    """The records of a json-lines file (blank lines skipped), each with string ``_id``; a malformed line or a
    record without a required field is an error naming the file and line."""
    records, seen = [], {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line_number}: not a JSON object ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_number}: not a JSON object")
            missing = [name for name in required if name not in record]
            if missing:
                raise DataError(f"{path}, line {line_number}: no field {missing[0]!r} (each line needs {required})")
            record["_id"] = str(record["_id"])
            if record["_id"] in seen:
                raise DataError(f"{path}, line {line_number}: id {record['_id']!r} again (first at line {seen[record['_id']]})")
            seen[record["_id"]] = line_number
            records.append(record)
    return records


def _read_qrels(path: Path):
    """(line number, query id, document id, score) of each row of a qrels file after its header line."""
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if line_number == 1 or not line.strip():
                continue  # the header: query-id, corpus-id, score
            cells = line.rstrip("\n\r").split("\t")
            if len(cells) != 3:
                raise DataError(f"{path}, line {line_number}: expected 3 tab-separated columns (query-id, corpus-id, score), found {len(cells)}")
            try:
                score = float(cells[2])
            except ValueError as error:
                raise DataError(f"{path}, line {line_number}: the score {cells[2]!r} is not a number") from error
            yield line_number, cells[0], cells[1], score
