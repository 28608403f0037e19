"""``python -m rails_lightning report``: the comparison (default), ``--leaderboard`` or ``--table``."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Sequence

from rails_lightning.commands import argument_parser
from rails_lightning.errors import UserError
from rails_lightning.reports.collect import DEFAULT_METRIC, collect_runs
from rails_lightning.reports.comparison import write_report
from rails_lightning.reports.leaderboard import LEADERBOARD_FILE, write_leaderboard
from rails_lightning.reports.reproduction import RESULTS_TABLE_END, RESULTS_TABLE_FILE, RESULTS_TABLE_START, write_results_table


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "report",
        "Turn finished runs (run directories of `fit`, or local sweep directories) into a markdown "
        "comparison table (summary.md: the metric per run, mean ± std per model beside the most-popular baseline) "
        "and a PNG of HR@K against K per model (hr_at_k.png); --leaderboard ranks the runs, --table writes the "
        "reproduction table (one row per config, mean ± std over seeds, next to the published figure).",
    )
    parser.add_argument("runs", nargs="+", help="run directories (with run.json), folders of them, or local sweep directories")
    parser.add_argument("--out", default=None, help="output folder (default: sweeps_out/report-<date-time>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"headline metric of the tables (default {DEFAULT_METRIC})")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--leaderboard", action="store_true", help=f"rank every run by --metric instead ({LEADERBOARD_FILE})")
    kind.add_argument("--table", action="store_true", help=f"the reproduction table instead ({RESULTS_TABLE_FILE}): one row per "
                      "config (its seeds together), test HR@1/10/50/200, NDCG@10, MRR as mean ± std, epochs, fit time, "
                      "hardware, split and selection, the published figure; then every published figure for the same data "
                      "with its own split, selection and source")
    parser.add_argument("--metrics", nargs="+", default=[], metavar="KEY",
                        help="with --table: these metric keys as its columns instead, each mean ± std over seeds (e.g. "
                        "test/hr@10 test/liked/hr@10 test/disliked/recall@10 for an ablation with target groups; a key "
                        "a run did not log shows as —)")
    parser.add_argument("--readme", default=None, help=f"with --table: also put the table between the {RESULTS_TABLE_START} "
                        f"and {RESULTS_TABLE_END} lines of this file (e.g. README.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readme and not args.table:
        raise UserError("--readme needs --table (it puts the reproduction table into the file)")
    if args.metrics and not args.table:
        raise UserError("--metrics needs --table (it chooses the table's columns)")
    results = collect_runs(args.runs)
    out = Path(args.out or f"sweeps_out/report-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.table:
        command = shlex.join(["python", "-m", "rails_lightning", "report", "--table", *args.runs, *(["--readme", args.readme] if args.readme else []),
                              *(["--metrics", *args.metrics] if args.metrics else [])])
        print(write_results_table(results, out, args.readme, command, args.metrics))
        print(f"[rails_lightning] results table: {out / RESULTS_TABLE_FILE}" + (f", {args.readme}" if args.readme else ""), flush=True)
        return 0
    if args.leaderboard:
        print(write_leaderboard(results, out, args.metric))
        print(f"[rails_lightning] leaderboard: {out / LEADERBOARD_FILE}", flush=True)
        return 0
    print(write_report(results, out, args.metric, title=f"{len(results)} runs"))
    print(f"[rails_lightning] report: {out / 'summary.md'}, {out / 'hr_at_k.png'}", flush=True)
    return 0
