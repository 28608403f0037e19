"""The one table formatter of the reports (``rails_lightning.reports.table``) and the table ``fit`` prints
at its end (``comparison.final_table``); the reports themselves are tested in test_results_table.py
(reproduction), test_sweeps.py (comparison) and test_serving.py (leaderboard)."""

import math

from rails_lightning.reports import ReportedRun, comparison_markdown, final_table, markdown_table, mean_pm_std
from rails_lightning.runs import RunRecord


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_columns_are_padded_to_one_width_and_cells_formatted():
    text = markdown_table(["run", "val/hr@10", "model"], [["a", 0.5, {"class_path": "x.y.MoL"}], ["long name", math.nan, "Two"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned in a terminal
    assert [line.index("|", 2) for line in lines] == [len("| long name ")] * 4
    assert lines[1].startswith("|-----------|")  # the separator row spans the padded width
    assert [_cells(line) for line in lines[2:]] == [["a", "0.5000", "MoL"], ["long name", "nan", "Two"]]


def test_mean_pm_std_shows_no_spread_for_one_run():
    assert mean_pm_std([]) == "—"
    assert mean_pm_std([0.25]) == "0.2500 ±—"
    assert mean_pm_std([0.2, 0.4]) == "0.3000 ± 0.1414"


def test_final_table_puts_the_run_beside_the_popularity_baseline():
    record = RunRecord(run_dir="/r", model="MoL", val={"val/hr@10": 0.31, "val/ndcg@10": 0.17, "val/mrr": 0.12},
                       test={"test/hr@10": 0.29}, baseline={"val/hr@10": 0.05, "test/hr@10": 0.04})
    header, _, model, baseline = (_cells(line) for line in final_table(record).splitlines())
    assert header == ["model", "val/hr@10", "val/ndcg@10", "val/mrr", "test/hr@10", "test/ndcg@10", "test/mrr"]
    assert model == ["MoL", "0.3100", "0.1700", "0.1200", "0.2900", "nan", "nan"]
    assert baseline == ["most popular items (baseline)", "0.0500", "nan", "nan", "0.0400", "nan", "nan"]


def _trial(model, seed, tower, hr, split_baseline):
    record = RunRecord(run_dir=f"/r/{model}{tower}{seed}", model=model, config={"seed_everything": seed},
                       val={"val/hr@10": hr}, baseline={"val/hr@10": split_baseline})
    return ReportedRun(record, f"{model}-{tower}-seed{seed}", {"item_tower": tower} if tower else {})


def _per_model_rows(text):
    table = text.split("## Per model")[1].splitlines()[4:]
    return {_cells(line)[0]: _cells(line)[1:] for line in table if line.startswith("|")}


def test_the_per_model_table_has_a_row_per_swept_setting_run_with_seeds():
    """A grid of towers x seeds: each (model, tower) its own row over its seeds, not the model's mean over towers;
    the baseline of each split (seed) counted once, however many runs share it."""
    runs = [_trial(model, seed, tower, hr + seed / 100, 0.05 + seed / 100)
            for model in ("TwoTower", "MoL") for tower, hr in (("ContentTower", 0.1), ("IdEmbedding", 0.5)) for seed in range(3)]
    rows = _per_model_rows(comparison_markdown(runs, "val/hr@10"))
    assert rows["TwoTower (dot product), item_tower=ContentTower"][:2] == ["3 / 3", "0.1100 ± 0.0100"]
    assert rows["MoL (mixture of logits), item_tower=IdEmbedding"][:2] == ["3 / 3", "0.5100 ± 0.0100"]
    assert rows["most popular items (baseline)"][:2] == ["3 / 3", "0.0600 ± 0.0100"]
    assert len(rows) == 5
    # A search whose every trial has its own setting: one row per model, over its trials.
    search = [_trial("TwoTower", 0, f"T{i}", 0.1 * i, 0.05) for i in range(1, 4)]
    rows = _per_model_rows(comparison_markdown(search, "val/hr@10"))
    assert rows["TwoTower (dot product)"][:2] == ["3 / 3", "0.2000 ± 0.1000"] and rows["most popular items (baseline)"][0] == "1 / 1"
