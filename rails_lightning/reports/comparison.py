"""Compare finished runs: the metric per run, mean ± std per model beside the most-popular baseline
(``summary.md``), a PNG of HR@K against K per model (``hr_at_k.png``), and the short table ``fit``
prints at its end (one run beside the baseline).

Numbers are those of the run records: the best-on-validation checkpoint on val and test, and the
most-popular baseline on the same split.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

from rails_lightning.reports.collect import DEFAULT_METRIC, MODEL_LABELS, ReportedRun, group_by_model
from rails_lightning.reports.table import markdown_table, mean_pm_std, short_number
from rails_lightning.runs import RunRecord

TABLE_KEYS = ("val/hr@10", "val/ndcg@10", "test/hr@10", "test/ndcg@10", "test/mrr")
FINAL_KEYS = tuple(f"{stage}/{name}" for stage in ("val", "test") for name in ("hr@10", "ndcg@10", "mrr"))
BASELINE_LABEL = "most popular items (baseline)"
# The other baselines a run record may hold (RunRecord.baselines), by name.
BASELINE_LABELS = {
    "bm25": "BM25 (baseline)", "zero_shot_minilm": "zero-shot MiniLM (baseline)", "random": "random (baseline)",
    "category_popularity": "category popularity (baseline)", "content_knn": "content kNN (baseline)",
}
# Shown by `fit` too when the run has them: what text retrieval (BEIR) reports.
TEXT_RETRIEVAL_KEYS = ("test/recall@100", "test/mrr@10")


def comparison_markdown(results: Sequence[ReportedRun], metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """Per-run table (metric per run) and per-model table (mean ± std over runs), with the popularity baseline."""
    keys = [metric] + [k for k in TABLE_KEYS if k != metric]
    param_names = [n for n in dict.fromkeys(name for r in results for name in r.params) if n not in ("model", "seed")]
    header = ["run", "model", *param_names, "seed", "status", *keys, "fit s"]
    rows = [
        [r.name, r.model, *(short_number(r.params.get(p, "")) for p in param_names), "" if r.record.seed is None else r.record.seed,
         r.shown_status, *(r.record.metrics.get(k, math.nan) for k in keys),
         "" if r.record.fit_seconds is None else f"{float(r.record.fit_seconds):.0f}"]
        for r in results
    ]
    parts = [f"## {title}" if title else "## Runs", "", markdown_table(header, rows), ""]

    header = ["model", "runs ok / all", *(f"{k} (mean ± std)" for k in keys)]
    rows = []
    for label, runs in _groups(results, param_names):
        ok = [r for r in runs if r.ok]
        cells = [mean_pm_std([r.record.metrics[key] for r in ok if key in r.record.metrics]) for key in keys]
        rows.append([label, f"{len(ok)} / {len(runs)}", *cells])
    # A baseline once per split: runs on the same split (other models or settings, same seed) hold the same one.
    baselines = _distinct(r.record.baseline for r in results if r.ok and r.record.baseline)
    if baselines:
        cells = [mean_pm_std([b[key] for b in baselines if key in b]) for key in keys]
        rows.append([BASELINE_LABEL, f"{len(baselines)} / {len(baselines)}", *cells])
    names = dict.fromkeys(name for r in results if r.ok for name in r.record.baselines)  # in first-seen order
    for name in names:
        others = _distinct(r.record.baselines[name] for r in results if r.ok and name in r.record.baselines)
        cells = [mean_pm_std([b[key] for b in others if key in b]) for key in keys]
        rows.append([BASELINE_LABELS.get(name, name), f"{len(others)} / {len(others)}", *cells])
    parts += ["## Per model: mean ± std over runs (seeds)", "", markdown_table(header, rows), ""]
    failed = [r for r in results if not r.ok]
    if failed:
        parts += [f"{len(failed)} run(s) did not finish: " + ", ".join(f"{r.name} ({r.shown_status}; log: {r.record.run_dir}/trial.log)" for r in failed), ""]
    return "\n".join(parts)


def _groups(results: Sequence[ReportedRun], param_names: Sequence[str]) -> list[tuple[str, list[ReportedRun]]]:
    """The rows of the per-model table: one per model and swept setting when some setting was run with several
    seeds (a grid of towers x seeds: each tower its own row), else one per model (a search whose every trial
    has its own setting: the model's mean over them)."""
    by_model = group_by_model(results)
    by_setting: dict[str, list[ReportedRun]] = {}
    for model, runs in by_model.items():
        for run in runs:
            setting = [f"{p}={short_number(run.params[p])}" for p in param_names if run.params.get(p, "") != ""]
            by_setting.setdefault(", ".join([MODEL_LABELS.get(model, model), *setting]), []).append(run)
    if param_names and any(len(runs) > 1 for runs in by_setting.values()):
        return list(by_setting.items())
    return [(MODEL_LABELS.get(model, model), runs) for model, runs in by_model.items()]


def _distinct(values: Iterable[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for value in values:
        seen.setdefault(json.dumps(value, sort_keys=True), value)
    return list(seen.values())


def final_table(record: RunRecord) -> str:
    """What ``fit`` prints at its end: the run's val and test HR@10, NDCG@10 and MRR beside the baselines' (with
    Recall@100 and MRR@10 when the run logged them, and its other baselines, text retrieval's or a cold split's)."""
    keys = [*FINAL_KEYS, *(k for k in TEXT_RETRIEVAL_KEYS if k in record.metrics)]
    rows = [[record.model, *(record.metrics.get(k, math.nan) for k in keys)],
            [BASELINE_LABEL, *(record.baseline.get(k, math.nan) for k in keys)]]
    rows += [[BASELINE_LABELS.get(name, name), *(metrics.get(k, math.nan) for k in keys)] for name, metrics in record.baselines.items()]
    return markdown_table(["model", *keys], rows)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ks(results: Sequence[ReportedRun], stage: str) -> list[int]:
    found = {int(k.split("@")[1]) for r in results for k in r.record.metrics if k.startswith(f"{stage}/hr@")}
    return sorted(found)


def plot_hr_at_k(results: Sequence[ReportedRun], path: str | Path, stages: Sequence[str] = ("val", "test")) -> Path:
    """PNG of HR@K against K per model (mean ± std over its runs) beside the popularity baseline, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ks = _ks(ok, stage)
        for model, runs in group_by_model(ok).items():
            curves = [[r.record.metrics.get(f"{stage}/hr@{k}", math.nan) for k in ks] for r in runs]
            stats = [_mean_std([c[i] for c in curves if not math.isnan(c[i])]) for i in range(len(ks))]
            means, stds = [s[0] for s in stats], [s[1] for s in stats]
            label = f"{MODEL_LABELS.get(model, model)}, n={len(runs)}"
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=4, label=label)
        baseline = [r.record.baseline for r in ok if r.record.baseline]
        if baseline and ks:
            ax.plot(ks, [statistics.fmean(b.get(f"{stage}/hr@{k}", math.nan) for b in baseline) for k in ks],
                    "k--", marker="x", label="most popular items")
        ax.set_xscale("log")
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (log scale)")
        ax.set_ylabel(f"{stage} HR@K")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{stage}: HR@K against K per model")
        ax.legend(fontsize=8)
    fig.suptitle("Full-corpus HR@K against K, MoL vs dot product (mean ± std over seeds)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Sequence[ReportedRun], out_dir: str | Path, metric: str = DEFAULT_METRIC, title: str | None = None) -> str:
    """``summary.md`` and ``hr_at_k.png`` in ``out_dir``; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(results, metric, title)
    if any(r.ok for r in results):
        plot_hr_at_k(results, out_dir / "hr_at_k.png")
        markdown += "\n![HR@K against K per model](hr_at_k.png)\n"
    (out_dir / "summary.md").write_text(markdown)
    return markdown
