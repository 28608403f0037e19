"""``report --table``: the reproduction table (one row per config, its seeds together) and its place in a README.

Fast tests build run records in memory (grouping, labels, published figures, old records); the slow
ones make three tiny real fits through the CLI in-process (TwoTower seeds 0 and 1, MoL seed 0) and
run ``python -m rails_lightning report --table`` over them.
"""

import json
import math

import pytest

from conftest import TINY_CLI_ARGS
from rails_lightning.__main__ import main as command_main
from rails_lightning.reports import ReportedRun, build_parser, group_by_config, published_figures, results_table
from rails_lightning.reports.reproduction import RESULTS_TABLE_END, RESULTS_TABLE_START
from rails_lightning.runs import RECORD_FILE, SCHEMA_VERSION, RunRecord

# In-process fits pass their own args (LightningCLI warns about pytest's) and share W&B's one disabled run.
pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter"), pytest.mark.filterwarnings("ignore:There is a wandb run")]
SMALL_MOL = ["--model=MoL", *(f"--model.similarity.init_args.{k}={v}" for k, v in
                              (("num_query_components", 2), ("num_item_components", 2), ("component_dim", 16)))]
METRIC_COLUMNS = ("test/hr@1", "test/hr@10", "test/hr@50", "test/hr@200", "test/ndcg@10", "test/mrr")


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the markdown table, as lists of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


# ---------------------------------------------------------------------------------------- in memory
def _config(dataset="ml-1m", encoder="SASRecEncoder", layers=2, similarity="DotProduct", seed=0, run_dir="/runs/a", **model):
    source = ({"class_path": "rails_lightning.data.SyntheticSource", "init_args": {"num_users": 150}} if dataset == "synthetic"
              else {"class_path": "rails_lightning.data.MovieLensSource", "init_args": {"variant": dataset, "data_dir": "x"}})
    return {
        "seed_everything": seed, "run_dir": run_dir, "ckpt_path": None,
        "data": {"source": source, "max_seq_len": 200},
        "model": {"query_encoder": {"class_path": f"rails_lightning.models.{encoder}", "init_args": {"num_layers": layers}},
                  "similarity": {"class_path": f"rails_lightning.similarity.{similarity}"}, "learning_rate": 0.001, **model},
        "trainer": {"default_root_dir": run_dir, "max_epochs": 3,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": run_dir}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": f"{run_dir}/checkpoints", "monitor": "val/hr@10"}}]},
    }


def _run(name, config, hr10=0.3, status="finished"):
    model = "MoL" if config["model"]["similarity"]["class_path"].endswith("MixtureOfLogits") else "TwoTower"
    record = RunRecord(run_dir=f"/runs/{name}", status=status, model=model, config=config, val={"val/hr@10": hr10},
                       test={"test/hr@10": hr10, "test/ndcg@10": hr10 / 2}, epochs=3, fit_seconds=200.0, hardware="NVIDIA H100")
    return ReportedRun(record, name)


def test_seeds_and_paths_make_one_row_other_settings_another():
    runs = [
        _run("a", _config(seed=0, run_dir="/runs/a")),
        _run("b", _config(seed=1, run_dir="/elsewhere/b")),
        _run("c", _config(seed=0, run_dir="/runs/c", learning_rate=0.01)),
        _run("d", _config(dataset="synthetic", similarity="MixtureOfLogits")),
        _run("e", _config(seed=2, run_dir="/runs/e"), status="failed"),
    ]
    rows = group_by_config(runs)
    assert [(row.label, [r.name for r in row.runs]) for row in rows] == [
        ("ml-1m SASRec TwoTower (model.learning_rate=0.001)", ["a", "b"]),
        ("ml-1m SASRec TwoTower (model.learning_rate=0.01)", ["c"]),
        ("synthetic SASRec MoL", ["d"]),
    ]
    markdown = results_table(runs)
    assert "Left out, not finished: e (failed)" in markdown
    cells = _table_rows(markdown)
    assert cells[0][:4] == ["ml-1m SASRec TwoTower (model.learning_rate=0.001)", "2", "—", "0.3000 ± 0.0000"]
    assert cells[1][3] == "0.3000 ±—" and cells[1][-6:-3] == ["3", "3.3 min", "NVIDIA H100"]


def test_a_piece_of_another_class_is_one_label_entry_with_its_own_options():
    """Configs that differ in the objective's class: the label names the class and the options it has."""
    shared = {"class_path": "rails_lightning.objectives.SharedNegatives", "init_args": {"num_negatives": 512, "logq_correction": True}}
    mined = {"class_path": "rails_lightning.objectives.MinedNegatives", "init_args": {"num_negatives": 448, "num_mined": 64}}
    rows = group_by_config([_run("a", _config(objective=shared)), _run("b", _config(objective=mined)), _run("c", _config())])
    assert sorted(row.label for row in rows) == [
        "ml-1m SASRec TwoTower (objective=MinedNegatives(num_mined=64, num_negatives=448))",
        "ml-1m SASRec TwoTower (objective=None)",
        "ml-1m SASRec TwoTower (objective=SharedNegatives(num_negatives=512))",  # logq_correction=True is its default
    ]


@pytest.mark.parametrize("encoder, layers, similarity, published", [
    ("SASRecEncoder", 2, "DotProduct", "0.2853 / 0.1603 (SASRec, generative-recommenders README)"),
    ("HSTUEncoder", 2, "DotProduct", "0.3097 / 0.1720 (HSTU, generative-recommenders README)"),
    ("HSTUEncoder", 8, "DotProduct", "0.3294 / 0.1893 (HSTU-large, generative-recommenders README)"),
    ("HSTUEncoder", 4, "DotProduct", "—"),  # neither published depth
    ("HSTUEncoder", 8, "MixtureOfLogits", "0.3474 / 0.2000 (hstu-mol, RAILS repository)"),
    ("SASRecEncoder", 2, "MixtureOfLogits", "0.3079 / — (SASRec + MoL, KDD'23)"),
    ("MeanPoolEncoder", 2, "DotProduct", "—"),
])
def test_published_figure_only_for_its_dataset_encoder_and_model(encoder, layers, similarity, published):
    (row,) = _table_rows(results_table([_run("a", _config(encoder=encoder, layers=layers, similarity=similarity))]))
    assert row[-1] == published
    (row,) = _table_rows(results_table([_run("a", _config(dataset="ml-100k", encoder=encoder, layers=layers, similarity=similarity))]))
    assert row[-1] == "—"


def test_every_published_figure_says_where_it_comes_from_and_how_it_was_measured():
    figures = published_figures()
    assert len(figures) == 11
    for figure in figures:
        assert figure.url.startswith("https://") and figure.source and figure.split and figure.selection, figure
        assert set(figure.metrics) <= {"test/hr@10", "test/ndcg@10"} and 0 < figure.metrics["test/hr@10"] < 1, figure


def test_rows_say_their_split_and_selection_and_every_figure_of_their_data_is_listed_with_its_own():
    """Ours from the runs' config; each published or recomputed figure of ml-1m with its split, selection, source and
    the rows it stands beside (a model this project lacks, e.g. eSASRec, beside none)."""
    loo, temporal = _config(encoder="HSTUEncoder"), _config(encoder="HSTUEncoder", run_dir="/runs/t")
    loo["data"].update(split="leave_one_out", val_fraction=0.1, test_fraction=0.2)
    temporal["data"].update(split="temporal", val_fraction=0.1, test_fraction=0.2)
    unmonitored = _config(similarity="MixtureOfLogits", run_dir="/runs/u")
    unmonitored["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": None}}]
    runs = [_run("a", loo), _run("t", temporal), _run("u", unmonitored),
            _run("s", _config(dataset="synthetic"))]
    markdown = results_table(runs, all_figures=True)
    ours, figures = markdown.split("Published and recomputed figures")
    labels = {row[0]: row[11:13] for row in _table_rows(ours)}
    assert labels == {
        "ml-1m HSTU TwoTower (data.split=leave_one_out)": ["leave-one-out + validation item; the data's fixed order", "best val/hr@10"],
        "ml-1m HSTU TwoTower (data.split=temporal)":
            ["temporal: last 20% of events test, 10% before validate", "best val/hr@10"],
        "ml-1m SASRec MoL": ["leave-one-out + validation item; the data's fixed order", "last epoch"],
        "synthetic SASRec TwoTower": ["leave-one-out + validation item; the data's fixed order", "best val/hr@10"],
    }
    listed = {row[0]: row[1:] for row in _table_rows(figures)}
    ml1m = [figure for figure in published_figures() if figure.dataset == "ml-1m"]
    assert list(listed) == [f"{figure.figure} (ml-1m)" for figure in ml1m]  # every ml-1m figure, in the file's order
    for figure in ml1m:
        hr10, ndcg10, split, selection, source, beside = listed[f"{figure.figure} (ml-1m)"]
        assert (float(hr10), split, selection, source) == (figure.metrics["test/hr@10"], figure.split, figure.selection,
                                                           f"[{figure.source}]({figure.url})")
    two_blocks = "ml-1m HSTU TwoTower (data.split=leave_one_out)"  # not the temporal row: every figure is leave-one-out
    assert listed["HSTU (ml-1m)"][-1] == listed["HSTU, recomputed (ml-1m)"][-1] == listed["HSTU, RecTools (ml-1m)"][-1] == two_blocks
    assert listed["HSTU (ml-1m)"][2:4] == ["leave-one-out, no validation item; unstable time sort (generative-recommenders preprocessing)",
                                           "best checkpoint on test"]
    assert listed["HSTU, recomputed (ml-1m)"][2:4] == ["leave-one-out + validation item; stable time sort", "best on validation"]
    assert listed["eSASRec (ml-1m)"][-1] == listed["FuXi-α, recomputed (ml-1m)"][-1] == listed["HSTU-large (ml-1m)"][-1] == "—"
    assert listed["SASRec + MoL (ml-1m)"][-1] == "ml-1m SASRec MoL"
    assert "Published and recomputed figures" not in results_table(runs)  # the list comes with all_figures


def test_every_published_figure_of_the_issue_is_there_with_its_split_and_selection():
    figures = {(figure.figure, figure.source): figure for figure in published_figures()}
    expected = {  # (figure, source): (test HR@10, test NDCG@10 or None, selected on)
        ("SASRec", "generative-recommenders README"): (0.2853, 0.1603, "test"),
        ("HSTU", "generative-recommenders README"): (0.3097, 0.1720, "test"),
        ("HSTU, recomputed", "eSASRec benchmark (RecSys'25)"): (0.3037, 0.1719, "validation"),
        ("eSASRec", "eSASRec benchmark (RecSys'25)"): (0.3133, 0.1772, "validation"),
        ("FuXi-α, recomputed", "eSASRec benchmark (RecSys'25)"): (0.3164, 0.1813, "validation"),
        ("HSTU, RecTools", "RecTools HSTU tutorial"): (0.3226, 0.1880, "validation"),
    }
    for key, (hr10, ndcg10, selected_on) in expected.items():
        figure = figures[key]
        assert figure.metrics == {"test/hr@10": hr10, "test/ndcg@10": ndcg10} and selected_on in figure.selection, key
        assert ("unstable" in figure.split) == (selected_on == "test"), key  # the on-test figures are the unstable-sort ones
        assert len(figure.split) <= 100 and len(figure.selection) <= 50, key  # short enough for a table cell


def test_a_published_figure_without_hr10_is_refused(tmp_path):
    entry = {"figure": "X", "dataset": "ml-1m", "encoder": "SASRec", "encoder_layers": None, "model": "MoL",
             "metrics": {"test/ndcg@10": 0.2}, "split": "leave-one-out", "selection": "on test", "source": "s", "url": "https://x"}
    (tmp_path / "published.yaml").write_text(json.dumps({"figures": [entry]}))  # JSON is YAML
    with pytest.raises(ValueError, match="has no test/hr@10"):
        published_figures(tmp_path / "published.yaml")


def test_old_record_without_hardware_reads_as_unknown(tmp_path):
    (tmp_path / RECORD_FILE).write_text(json.dumps({"run_dir": str(tmp_path), "status": "finished", "model": "TwoTower",
                                                    "val": {"val/hr@10": 0.5}, "schema_version": SCHEMA_VERSION}))
    record = RunRecord.read(tmp_path)
    assert record.ok and record.hardware == "?"


def test_help_names_table_and_readme(tmp_path, capsys):
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "--table" in text and "--readme" in text and "results_table.md" in text
    assert command_main(["report", str(tmp_path), "--readme", "README.md"]) == 1
    assert "--readme needs --table" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Tiny real fits through the CLI, in this process: TwoTower seeds 0 and 1, MoL seed 0."""
    from rails_lightning.cli import main

    root = tmp_path_factory.mktemp("table_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        for name, extra in (("dot-seed0", ["--seed_everything=0"]), ("dot-seed1", ["--seed_everything=1"]),
                            ("mol-seed0", ["--seed_everything=0", *SMALL_MOL])):
            main(["fit", *TINY_CLI_ARGS, *extra, f"--run_dir={root / name}"])
    return root


def _by_hand(values):
    """Mean and sample standard deviation, written out."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.slow
def test_table_over_real_runs_has_a_row_per_config_with_mean_and_std(three_runs, tmp_path):
    runs = [three_runs / "dot-seed0", three_runs / "dot-seed1", three_runs / "mol-seed0"]
    records = [RunRecord.read(run) for run in runs]
    assert all(record.ok and record.hardware not in ("", "?") for record in records)
    assert command_main(["report", "--table", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "results_table.md").read_text()
    dot, mol = _table_rows(markdown)
    assert dot[:2] == ["synthetic SASRec TwoTower", "2"] and mol[:2] == ["synthetic SASRec MoL", "1"]
    for column, key in enumerate(METRIC_COLUMNS, start=2):
        mean, std = _by_hand([records[0].test[key], records[1].test[key]])
        assert dot[column] == f"{mean:.4f} ± {std:.4f}", key
        assert mol[column] == f"{records[2].test[key]:.4f} ±—", key
    assert dot[8] == mol[8] == "2"  # epochs
    assert dot[10] == records[0].hardware and dot[13] == mol[13] == "—"  # synthetic data: no published figure
    assert dot[11:13] == mol[11:13] == ["leave-one-out + validation item; the data's fixed order", "best val/hr@10"]
    assert "Published and recomputed figures" not in markdown  # none for synthetic data
    # The folder of the three runs gives the same table.
    assert command_main(["report", "--table", str(three_runs), "--out", str(tmp_path / "again")]) == 0
    assert _table_rows((tmp_path / "again" / "results_table.md").read_text()) == [dot, mol]


@pytest.mark.slow
def test_readme_gets_the_table_between_its_markers_only(three_runs, tmp_path, capsys):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\n## Measured so far\n\n| a | b |\n|---|---|\n\n", "\nMore text.\n"
    readme.write_text(f"{before}{RESULTS_TABLE_START}\n(regenerate: ...)\n{RESULTS_TABLE_END}{after}")
    args = ["report", "--table", str(three_runs), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    assert command_main(args) == 0
    table = (tmp_path / "out" / "results_table.md").read_text()
    assert readme.read_text() == f"{before}{RESULTS_TABLE_START}\n{table}{RESULTS_TABLE_END}{after}"
    assert "Regenerate: `python -m rails_lightning report --table" in table
    assert command_main(args) == 0  # regenerating leaves the same file
    assert readme.read_text() == f"{before}{RESULTS_TABLE_START}\n{table}{RESULTS_TABLE_END}{after}"
    capsys.readouterr()

    unmarked = tmp_path / "UNMARKED.md"
    unmarked.write_text(before + after)
    out = tmp_path / "not-written"
    assert command_main(["report", "--table", str(three_runs), "--out", str(out), "--readme", str(unmarked)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and RESULTS_TABLE_START in error and str(unmarked) in error
    assert unmarked.read_text() == before + after and not out.exists()


def test_an_option_stated_at_its_default_groups_with_a_run_recorded_before_the_option_existed():
    """A run recorded before `logit_gate_hidden_dim` existed (absent) and one after (None, its default) are one row;
    a value other than the default is its own row."""
    older, newer, linear = (_config(similarity="MixtureOfLogits", seed=seed) for seed in range(3))
    newer["model"]["similarity"]["init_args"] = {"logit_gate_hidden_dim": None, "num_query_components": 8}
    linear["model"]["similarity"]["init_args"] = {"logit_gate_hidden_dim": 0}
    rows = group_by_config([_run("old", older), _run("new", newer), _run("linear", linear)])
    assert sorted((row.label, [r.name for r in row.runs]) for row in rows) == [
        ("ml-1m SASRec MoL (model.similarity.init_args.logit_gate_hidden_dim=0)", ["linear"]),
        ("ml-1m SASRec MoL (model.similarity.init_args.logit_gate_hidden_dim=None)", ["old", "new"]),
    ]


def test_a_label_shows_the_class_default_of_an_option_a_run_does_not_state():
    """An HSTU run recorded before `time_bias_buckets` existed is labelled with the option's default (0), not None."""
    older, timed = _config(encoder="HSTUEncoder"), _config(encoder="HSTUEncoder", seed=1)
    timed["model"]["query_encoder"]["init_args"]["time_bias_buckets"] = 64
    rows = group_by_config([_run("old", older), _run("timed", timed)])
    assert sorted(row.label for row in rows) == [
        "ml-1m HSTU TwoTower (model.query_encoder.init_args.time_bias_buckets=0)",
        "ml-1m HSTU TwoTower (model.query_encoder.init_args.time_bias_buckets=64)",
    ]


def test_no_published_figure_stands_beside_a_run_on_another_split():
    """Every published figure is a leave-one-out one: a temporal-split row gets none, and no figure list follows."""
    from rails_lightning.reports.reproduction import ConfigRow, figures_table

    config = {"model": {"query_encoder": {"class_path": "rails_lightning.models.SASRecEncoder", "init_args": {"num_layers": 2}},
                        "similarity": {"class_path": "rails_lightning.similarity.DotProduct"}},
              "data": {"source": {"class_path": "rails_lightning.data.MovieLensSource", "init_args": {"variant": "ml-1m"}}}}

    class Run:
        model = "TwoTower"

    leave_one_out = ConfigRow("a", config, [Run()])
    temporal = ConfigRow("b", {**config, "data": {**config["data"], "split": "temporal"}}, [Run()])
    assert leave_one_out.published() is not None and temporal.published() is None
    assert figures_table([temporal]) == "" and "SASRec (ml-1m)" in figures_table([leave_one_out])
