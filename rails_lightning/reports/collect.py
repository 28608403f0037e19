"""The runs a report shows: run directories of ``fit``, folders of them, and local sweep directories
(``sweep.json``: every trial, a failed one with its status), each as a ``ReportedRun``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rails_lightning.errors import UserError
from rails_lightning.runs import RECORD_FILE, RunRecord

DEFAULT_METRIC = "val/hr@10"
MODEL_ORDER = {"TwoTower": 0, "MoL": 1}  # the dot-product baseline first, then MoL, then other models
MODEL_LABELS = {"TwoTower": "TwoTower (dot product)", "MoL": "MoL (mixture of logits)"}


@dataclass
class ReportedRun:
    """A run as a report shows it: its record, a name, and (for a sweep trial) the swept parameters."""

    record: RunRecord
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # overrides the record's status (a sweep's failed trial)

    @property
    def model(self) -> str:
        return self.record.model

    @property
    def ok(self) -> bool:
        return not self.status and self.record.ok

    @property
    def shown_status(self) -> str:
        return self.status or self.record.status


def collect_runs(paths: Iterable[str | Path]) -> list[ReportedRun]:
    """Run directories, local sweep directories (all their trials), folders of runs -> runs, in order."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such run directory or sweep folder")
        if (path / "sweep.json").exists():
            runs += sweep_results(path)
        elif (path / RECORD_FILE).exists() or (path / "config.yaml").exists():
            runs.append(ReportedRun(RunRecord.read(path), path.name))
        else:  # a folder of run directories
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / RECORD_FILE).exists()) if path.is_dir() else []
            if not children:
                raise UserError(f"{path}: no {RECORD_FILE}, config.yaml or sweep.json here or one level down: not a run of `fit`")
            runs += [ReportedRun(RunRecord.read(child), child.name) for child in children]
    return runs


def sweep_results(sweep_dir: str | Path) -> list[ReportedRun]:
    """The trials of a local sweep (``sweep.json`` written by ``rails_lightning.sweep``)."""
    record = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    runs = []
    for trial in record["trials"]:
        run = RunRecord.read(Path(sweep_dir) / trial["name"])
        if run.model == "?":
            run.model = trial.get("model", "?")
        status = "" if trial.get("status") == "finished" else trial.get("status", "failed")
        runs.append(ReportedRun(run, trial["name"], trial.get("params", {}), status))
    return runs


def group_by_model(runs: Sequence[ReportedRun]) -> dict[str, list[ReportedRun]]:
    """Model class -> its runs, in ``MODEL_ORDER``."""
    groups: dict[str, list[ReportedRun]] = {}
    for run in sorted(runs, key=lambda r: MODEL_ORDER.get(r.model, len(MODEL_ORDER))):
        groups.setdefault(run.model, []).append(run)
    return groups
