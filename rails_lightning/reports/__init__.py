"""Reports over finished runs, one module per report, all printed through one table formatter:

* ``comparison``: the metric per run and mean ± std per model beside the most-popular baseline
  (``summary.md``), HR@K against K per model (``hr_at_k.png``), and the table ``fit`` prints at its end;
* ``leaderboard``: the runs ranked by one metric (``leaderboard.md``);
* ``reproduction``: one row per config, its seeds together, beside the published figure
  (``results_table.md``; the figures and their sources are in ``published.yaml``);
* ``collect``: which runs a path stands for (run directories, folders of them, local sweeps);
* ``table``: the markdown table formatter and cell formats they share;
* ``command``: ``python -m rails_lightning report``.

Examples:

    python -m rails_lightning report runs/A runs/B ... [--out DIR] [--metric val/hr@10]
    python -m rails_lightning report sweeps_out/mol_vs_dot-20260101-120000     # a local sweep
    python -m rails_lightning report --leaderboard runs/                       # ranked by --metric
    python -m rails_lightning report --table RUNS... [--readme README.md]     # the reproduction table

A run is a run directory of ``python -m rails_lightning fit`` (its run record, ``run.json``); a local
sweep directory (``sweep.json``) stands for all of its trials.
"""

from rails_lightning.reports.collect import DEFAULT_METRIC, ReportedRun, collect_runs, group_by_model, sweep_results
from rails_lightning.reports.command import build_parser, main
from rails_lightning.reports.comparison import comparison_markdown, final_table, plot_hr_at_k, write_report
from rails_lightning.reports.leaderboard import leaderboard_rows, write_leaderboard
from rails_lightning.reports.reproduction import (
    PublishedFigure, group_by_config, published_figures, results_table, write_results_table,
)
from rails_lightning.reports.table import format_cell, format_duration, markdown_table, mean_pm_std

__all__ = [
    "DEFAULT_METRIC", "ReportedRun", "collect_runs", "group_by_model", "sweep_results", "build_parser", "main",
    "comparison_markdown", "final_table", "plot_hr_at_k", "write_report", "leaderboard_rows", "write_leaderboard",
    "PublishedFigure", "group_by_config", "published_figures", "results_table", "write_results_table",
    "format_cell", "format_duration", "markdown_table", "mean_pm_std",
]
