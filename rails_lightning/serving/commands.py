"""``python -m rails_lightning index`` and ``python -m rails_lightning retrieve``.

    python -m rails_lightning index --ckpt_path RUN/checkpoints/best.ckpt --out INDEX_DIR [--index HNSW32] [--items @ids.txt]
    python -m rails_lightning index --add --ckpt_path NEWER.ckpt --items 2001,2002 --out INDEX_DIR   # a delta, no rebuild
    python -m rails_lightning index --compact --out INDEX_DIR                                          # fold the delta in
    python -m rails_lightning retrieve --index INDEX_DIR --user 42 [-k 10] [--exclude-history] [--json]
    python -m rails_lightning retrieve --index INDEX_DIR --history 1196,260,1210
    python -m rails_lightning retrieve --index INDEX_DIR --query "some text"   # a model with a text query tower
    python -m rails_lightning retrieve --index INDEX_DIR --interactive     # one query per line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rails_lightning.commands import argument_parser
from rails_lightning.errors import UserError
from rails_lightning.serving.index import Answer, ServingIndex, add_items, compact, export_index


def _item_list(text: str | None) -> list[str] | None:
    """``a,b,c`` or ``@file`` (one id per line) -> raw ids (as text; matched to int ids where the ids are ints)."""
    if text is None:
        return None
    if text.startswith("@"):
        return [line.strip() for line in Path(text[1:]).read_text().splitlines() if line.strip()]
    return [part.strip() for part in text.split(",") if part.strip()]


def build_index_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "index",
        "Export a trained model's item corpus for serving: item embeddings, a FAISS index (dot product) or "
        "the data of the exact / RAILS MoL top-k, users' histories, raw ids and titles, and a manifest; "
        "safetensors, FAISS and JSON files only (nothing is unpickled). With --add, encode new items into a delta "
        "next to the main index (no rebuild); with --compact, fold the delta into the main index.",
    )
    parser.add_argument("--ckpt_path", help="a checkpoint inside a run directory (RUN_DIR/checkpoints/*.ckpt)")
    parser.add_argument("--out", required=True, help="the index folder")
    parser.add_argument("--index", default="Flat", help="FAISS factory string for dot-product models: Flat (exact, default), "
                        "HNSW32, IVF1024,Flat, IVF1024,PQ16, ... (ignored for MoL)")
    parser.add_argument("--items", help="raw item ids, `a,b,c` or `@file` with one per line: the corpus to export "
                        "(default: every item of the run), or with --add the items to add")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--add", action="store_true", help="add --items (or every new item of --item_table), encoded by "
                      "--ckpt_path's item tower, to the index's delta")
    mode.add_argument("--compact", action="store_true", help="fold the delta into the main index")
    parser.add_argument("--item_table", help="with --add: metadata of items the model never saw (csv / parquet / json lines "
                        "with the columns its content tower reads), encoded from their content alone")
    parser.add_argument("--item_id_column", default="item_id", help="the id column of --item_table (default item_id)")
    return parser


def index_main(argv: Sequence[str]) -> int:
    parser = build_index_parser()
    args = parser.parse_args(argv)
    if args.compact:
        size = compact(args.out)
        print(f"[rails_lightning] compacted: {size} items in the main index of {args.out}", flush=True)
        return 0
    if not args.ckpt_path:
        parser.error("--ckpt_path is required (except with --compact)")
    if args.add:
        if not args.items and not args.item_table:
            parser.error("--add needs --items or --item_table")
        size = add_items(args.out, args.ckpt_path, _item_list(args.items), args.item_table, args.item_id_column)
        print(f"[rails_lightning] delta of {args.out}: {size} items", flush=True)
        return 0
    out = export_index(args.ckpt_path, args.out, args.index, _item_list(args.items))
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"[rails_lightning] {manifest['model']} index of {manifest['corpus_size']} items ({manifest['index']}): {out}", flush=True)
    return 0


def _table(answer: Answer, color: bool) -> str:
    bold, dim, reset = ("\033[1m", "\033[2m", "\033[0m") if color else ("", "", "")
    width = max([len(str(i)) for i in answer.item_ids] + [6])
    lines = [f"{bold}{'rank':>4}  {'item':<{width}}  {'score':>8}  title{reset}"]
    for rank, (item, title, score) in enumerate(zip(answer.item_ids, answer.titles, answer.scores), start=1):
        lines.append(f"{rank:>4}  {item!s:<{width}}  {dim}{score:8.4f}{reset}  {title}")
    lines.append(f"{dim}{len(answer.item_ids)} items in {answer.seconds * 1000:.1f} ms{reset}")
    return "\n".join(lines)


def _answer(index: ServingIndex, user: str | None, history: str | None, k: int, exclude: bool, text: str | None = None) -> Answer:
    if text is not None:
        return index.retrieve(text, k)
    index.check_query_kind(text=False)
    if user is not None:
        return index.retrieve(index.query(index.user_history(user), user, index.user_actions(user)), k, exclude)
    items, actions = index.parse_history(history.split(","))
    return index.retrieve(index.query(items, actions=actions), k, exclude)


def _show(answer: Answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"items": answer.item_ids, "titles": answer.titles, "scores": answer.scores,
                          "latency_ms": round(answer.seconds * 1000, 3)}), flush=True)
    else:
        print(_table(answer, sys.stdout.isatty()), flush=True)


def build_retrieve_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "retrieve",
        "Show what a model retrieves for a user (from their stored history), for a list of items or, for a model "
        "with a text query tower (document search, configs/scifact/*.yaml), for a text, from an index written by "
        "`python -m rails_lightning index`, with the query's latency.",
        epilog="--interactive reads one query per line after a prompt: `user RAW_ID` or comma-separated raw item ids (for a "
        "model with a text query tower: the query text); a bad query prints its error and the prompt returns; an empty "
        "line or the end of input ends it.",
    )
    parser.add_argument("--index", required=True, help="the index folder")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--user", help="a raw user id: the query is their whole stored history")
    query.add_argument("--history", help="comma-separated raw item ids, oldest first; for a model with action types, "
                       "each may say what the user did: `1196:liked,260:disliked+rated,1210`")
    query.add_argument("--query", metavar="TEXT", help="a query text, for a model with a text query tower (document search): "
                       "encoded by the model's query tower; the answer lists document ids and titles")
    query.add_argument("--interactive", action="store_true", help="read queries from standard input, one per line")
    parser.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--exclude-history", action="store_true", help="never return an item of the query's history "
                        "(--user, --history)")
    parser.add_argument("--approximate", action="store_true", help="MoL: the RAILS approximate top-k instead of exact scoring")
    parser.add_argument("--json", action="store_true", help="one JSON object per query instead of a table")
    return parser


def retrieve_main(argv: Sequence[str]) -> int:
    args = build_retrieve_parser().parse_args(argv)
    index = ServingIndex(args.index, approximate=args.approximate)
    if args.exclude_history and (args.query is not None or (args.interactive and index.reads_query_text)):
        raise UserError("--exclude-history is for --user and --history queries; a text query has no history")
    if not args.interactive:
        _show(_answer(index, args.user, args.history, args.k, args.exclude_history, args.query), args.json)
        return 0
    return _interactive(index, args.k, args.exclude_history, args.json)


INTERACTIVE_PROMPT = "query (`user ID` or item ids `a,b,c`; empty line ends)> "
TEXT_PROMPT = "query text (empty line ends)> "


def _interactive(index: ServingIndex, k: int, exclude: bool, as_json: bool) -> int:
    """One query per line until an empty line or the end of input. A bad query (an unknown user or item, a
    malformed line) prints its one-line error and the prompt returns: one typo does not end the session.
    The prompt goes to stderr, so that stdout holds only answers (tables or JSON lines). For a model with a text
    query tower each line is a query text."""
    texts = index.reads_query_text
    while True:
        print(TEXT_PROMPT if texts else INTERACTIVE_PROMPT, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            print(file=sys.stderr, flush=True)
            return 0
        line = line.strip()
        user = line.split(None, 1)[1].strip() if line.startswith("user ") and len(line.split(None, 1)) > 1 else None
        try:
            if texts:
                answer = _answer(index, None, None, k, exclude, text=line)
            elif line == "user" or (user is None and line.startswith("user ")):
                raise UserError("`user` needs an id, e.g. `user 42`")
            else:
                answer = _answer(index, user, None if user else line, k, exclude)
            _show(answer, as_json)
        except UserError as error:
            print(f"rails_lightning: error: {error}", file=sys.stderr, flush=True)
