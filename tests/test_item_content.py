"""Item metadata as data: item tables read through ``datasets`` (csv, parquet, json lines), joined to the log
on the item id; MovieLens' movie file as content; one-line errors for bad tables; empty content, counted,
for items without a row."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from rails_lightning.cli import main
from rails_lightning.data import InteractionDataModule, InteractionLogSource, ItemTable, MovieLensSource
from rails_lightning.errors import DataError

ROWS = [  # item_id, title, genres, year
    (10, "Alpha", "Comedy|Drama", 1999),
    (11, "Beta", "Drama", None),
    (12, None, "", 2005),
]


def _log(tmp_path, items=(10, 11, 12, 13)):
    """An interaction log over ``items`` (13 has no metadata row): 6 users of 5 events each."""
    lines = ["user_id,item_id,timestamp"]
    for user in range(6):
        for step in range(5):
            lines.append(f"{user},{items[(user + step) % len(items)]},{step}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv_table(tmp_path, rows=ROWS, name="items.csv"):
    path = tmp_path / name
    path.write_text("item_id,title,genres,year\n" + "\n".join(
        f"{i},{'' if t is None else t},{g},{'' if y is None else y}" for i, t, g, y in rows) + "\n")
    return path


TABLE_COLUMNS = dict(text_columns=["title"], categorical_columns=["genres"], numeric_columns=["year"])


def _check_content(content):
    assert content.raw_ids.tolist() == [10, 11, 12]
    assert content.text["title"] == ["Alpha", "Beta", ""]
    assert content.categorical["genres"] == [("Comedy", "Drama"), ("Drama",), ()]
    assert content.numeric["year"][0] == 1999 and np.isnan(content.numeric["year"][1]) and content.numeric["year"][2] == 2005


def test_csv_item_table(tmp_path):
    _check_content(ItemTable(str(_csv_table(tmp_path)), **TABLE_COLUMNS).load())


def test_parquet_item_table_with_list_column(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({
        "item_id": [10, 11, 12], "title": ["Alpha", "Beta", None],
        "genres": [["Comedy", "Drama"], ["Drama"], []], "year": [1999, None, 2005],
    }), path)
    _check_content(ItemTable(str(path), **TABLE_COLUMNS).load())


def test_json_lines_item_table(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps({"item_id": i, "title": t, "genres": g.split("|") if g else [], "year": y})
                              for i, t, g, y in ROWS) + "\n")
    _check_content(ItemTable(str(path), **TABLE_COLUMNS).load())


def test_log_with_item_table_aligns_content_and_counts_items_without_a_row(tmp_path, caplog):
    source = InteractionLogSource(str(_log(tmp_path)), items=ItemTable(str(_csv_table(tmp_path)), **TABLE_COLUMNS))
    data = InteractionDataModule(source, min_interactions=2)
    with caplog.at_level(logging.WARNING):
        content = data.item_content
    assert "1 of 4 items have no row in the item table" in caplog.text
    raw = data.store.item_raw_ids.tolist()
    assert len(content) == data.num_items + 1 and content.text["title"][0] == ""  # row 0: padding
    row_of = {r: i for i, r in enumerate(raw)}
    assert content.text["title"][row_of[10]] == "Alpha" and content.categorical["genres"][row_of[11]] == ("Drama",)
    assert content.text["title"][row_of[13]] == "" and content.categorical["genres"][row_of[13]] == ()
    assert np.isnan(content.numeric["year"][row_of[13]])
    assert data.item_titles[row_of[10]] == "Alpha"


def test_item_table_from_the_command_line_config(tmp_path, monkeypatch):
    """The item table is a nested class in the source's config: YAML or dotted options pick it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = tmp_path / "content.yaml"
    config.write_text(
        "data:\n  min_interactions: 2\n  source:\n    class_path: rails_lightning.data.InteractionLogSource\n"
        f"    init_args:\n      path: {_log(tmp_path)}\n      items:\n        class_path: rails_lightning.data.ItemTable\n"
        f"        init_args: {{path: {_csv_table(tmp_path)}, text_columns: [title], categorical_columns: [genres]}}\n"
    )
    cli = main(["--config", str(config), "--model.item_dim=8", f"--run_dir={tmp_path / 'run'}"], run=False)
    content = cli.datamodule.item_content
    assert content.categorical["genres"][1:] != [()] * cli.datamodule.num_items


@pytest.mark.parametrize("case, rows, options, message", [
    ("duplicate id", [*ROWS, (11, "Again", "Drama", 2000)], {}, "items.csv, line 5: item id 11 in column 'item_id' appears again (first at line 3)"),
    ("missing id column", ROWS, {"id_column": "movie_id"}, "items.csv: missing column(s) ['movie_id']"),
    ("missing listed column", ROWS, {"text_columns": ["plot"]}, "items.csv: missing column(s) ['plot']"),
    ("empty id", [*ROWS, ("", "Nobody", "Drama", 2000)], {}, "items.csv, line 5: column 'item_id' is empty"),
    ("bad number", [*ROWS, (14, "Delta", "Drama", "soon")], {"numeric_columns": ["year"]}, "items.csv, line 5: column 'year' must be a number, found 'soon'"),
])
def test_bad_item_tables_are_one_line_errors(tmp_path, case, rows, options, message):
    path = _csv_table(tmp_path, rows)
    with pytest.raises(DataError) as error:
        ItemTable(str(path), **{"text_columns": ["title"], **options}).load()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_item_table_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        ItemTable(str(tmp_path / "nope.csv")).load()


@pytest.mark.skipif(not (SHARED_DATA / "ml-1m" / "movies.dat").exists(), reason="ML-1M files in ../shared/data are absent")
def test_movielens_movies_become_item_content():
    content = MovieLensSource("ml-1m", data_dir=str(SHARED_DATA / "ml-1m"), download=False).load().item_content
    first = content.raw_ids.tolist().index(1)
    assert content.text["title"][first] == "Toy Story" and content.numeric["year"][first] == 1995
    assert content.categorical["genres"][first] == ("Animation", "Children's", "Comedy")
    assert len({genre for genres in content.categorical["genres"] for genre in genres}) == 18
