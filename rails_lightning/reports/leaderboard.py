"""Rank finished runs by one metric (``leaderboard.md``): model, key hyperparameters, the metric, val and
test HR@1 / HR@10 / NDCG@10 / MRR of the best checkpoint, its size and date."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rails_lightning.reports.collect import DEFAULT_METRIC, ReportedRun
from rails_lightning.reports.table import markdown_table
from rails_lightning.runs import RunRecord

LEADERBOARD_KEYS = ("hr@1", "hr@10", "ndcg@10", "mrr")
HYPERPARAMETERS = ("learning_rate", "temperature", "objective", "item_dim")
LEADERBOARD_FILE = "leaderboard.md"


def _hyperparameter(value: Any) -> Any:
    """A config value for a table cell: a ``class_path`` spec as ``Class(option=value, ...)``."""
    if isinstance(value, dict) and "class_path" in value:
        options = ", ".join(f"{k}={v}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rpartition('.')[2]}({options})"
    return value


def _checkpoint_mb(record: RunRecord) -> str:
    path = Path(record.checkpoint) if record.checkpoint else None
    return f"{path.stat().st_size / 2**20:.1f}" if path is not None and path.is_file() else ""


def leaderboard_rows(runs: Sequence[ReportedRun], metric: str = DEFAULT_METRIC) -> tuple[list[str], list[list[Any]]]:
    """Finished runs ranked by ``metric`` (best first) as (header, rows); runs without the metric are left out."""
    ranked = sorted((r for r in runs if r.ok and metric in r.record.metrics), key=lambda r: -r.record.metrics[metric])
    stages = [stage for stage in ("val", "test") if any(f"{stage}/hr@10" in r.record.metrics for r in ranked)]
    header = ["rank", "run", "model", *HYPERPARAMETERS, metric, *(f"{s}/{k}" for s in stages for k in LEADERBOARD_KEYS), "ckpt MB", "date"]
    rows = []
    for rank, run in enumerate(ranked, start=1):
        model_config = run.record.config.get("model") or {}
        params = [_hyperparameter(model_config.get(name, "")) for name in HYPERPARAMETERS]
        metrics = run.record.metrics
        rows.append([rank, run.name, run.model, *params, metrics[metric],
                     *(metrics.get(f"{s}/{k}", math.nan) for s in stages for k in LEADERBOARD_KEYS),
                     _checkpoint_mb(run.record), run.record.created[:10]])
    return header, rows


def write_leaderboard(runs: Sequence[ReportedRun], out_dir: str | Path, metric: str = DEFAULT_METRIC) -> str:
    """``leaderboard.md`` in ``out_dir``; returns the markdown."""
    header, rows = leaderboard_rows(runs, metric)
    markdown = f"## Leaderboard by {metric} ({len(rows)} of {len(runs)} runs finished with it)\n\n" + markdown_table(header, rows) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LEADERBOARD_FILE).write_text(markdown)
    return markdown
