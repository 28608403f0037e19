"""The record of a run: what ``python -m rails_lightning fit`` (or ``validate`` / ``test``) leaves in its
run directory as ``run.json``, and what ``sweep``, ``report`` and the notebooks read back.

One schema for every subcommand: a ``fit`` fills everything, a ``validate`` or ``test`` only its
own section (``status`` says which). ``RunRecord.load_model`` rebuilds the evaluated model from the
checkpoint alone (``weights_only=True``), ``RunRecord.datamodule`` the data from the saved config.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rails_lightning.errors import UserError

RECORD_FILE = "run.json"
SCHEMA_VERSION = 1

Status = Literal["finished", "validated", "tested", "predicted", "failed", "missing"]

#: This process's run directories (the CLI appends each when it creates it), for clean-up after a failure.
STARTED_RUN_DIRS: list[Path] = []


def remove_unused_run_dirs() -> None:
    """After a failed command: remove the run directories it started that hold nothing but their config."""
    for run_dir in STARTED_RUN_DIRS:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"config.yaml"}:
            for leftover in run_dir.iterdir():
                leftover.unlink()
            run_dir.rmdir()


@dataclass
class RunRecord:
    """A finished (or failed) run.

    Attributes:
        run_dir: the run directory.
        status: ``finished`` (a whole fit), ``validated`` / ``tested`` (those subcommands), ``failed``,
            ``missing`` (no record: the run did not get that far).
        model: ``TwoTower`` or ``MoL`` (the similarity's model name).
        config: the full resolved config (as ``config.yaml``).
        val, test: ``val/...`` and ``test/...`` metrics of the best checkpoint (fit) or of the evaluated one.
        baseline: the most-popular-items baseline on the same split, same keys.
        text_baselines: for data whose queries are texts (``BeirSource``), the text-retrieval baselines on the
            same split, same keys, by name (``bm25``, ``zero_shot_minilm``); empty otherwise.
        history: per validation epoch, ``{"epoch": e, "val/hr@10": ..., ...}``.
        epochs: epochs trained.
        fit_seconds: wall time of ``fit`` (training and per-epoch evaluation).
        data: facts of the data (users, items, interactions, ...).
        checkpoint: the checkpoint the val/test metrics come from (the best one for a fit).
        created: when the record was written (ISO 8601).
        hardware: what the run ran on (``hardware_description``); ``?`` in records written before it was kept.
    """

    run_dir: str
    status: Status = "finished"
    model: str = "?"
    config: dict[str, Any] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    text_baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int | None = None
    fit_seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    created: str = ""
    hardware: str = "?"
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ derived
    @property
    def name(self) -> str:
        return Path(self.run_dir).name

    @property
    def ok(self) -> bool:
        return self.status == "finished" and bool(self.val)

    @property
    def metrics(self) -> dict[str, float]:
        return {**self.val, **self.test}

    @property
    def seed(self) -> int | None:
        return self.config.get("seed_everything")

    # ------------------------------------------------------------------ files
    def write(self, filename: str = RECORD_FILE) -> Path:
        """Write the record (``run.json``) atomically: a temporary file in the same directory, then renamed."""
        path = Path(self.run_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(asdict(self)), indent=2)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".run-", suffix=".json", delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """The record of ``run_dir``; status ``missing`` when the run wrote none."""
        path = Path(run_dir) / RECORD_FILE
        if not path.exists():
            return cls(run_dir=str(run_dir), status="missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not a readable run record ({error})") from error
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: run record schema {data.get('schema_version')}, this version reads {SCHEMA_VERSION}")
        data["run_dir"] = str(run_dir)  # the directory may have moved since
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    # ------------------------------------------------------------------ rebuilding
    def load_model(self, checkpoint: str | Path | None = None):
        """The model of this run in eval mode, from ``checkpoint`` (default: the record's) alone, ``weights_only=True``."""
        from rails_lightning.models import RetrievalModule

        path = checkpoint or self.checkpoint or Path(self.run_dir) / "checkpoints" / "last.ckpt"
        return RetrievalModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()

    def datamodule(self):
        """The run's ``InteractionDataModule``, rebuilt from the ``data`` section of its config."""
        from jsonargparse import ArgumentParser

        from rails_lightning.data import InteractionDataModule

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(InteractionDataModule, "data")
        config = parser.parse_object({"data": self.config.get("data") or {}})
        return parser.instantiate_classes(config).data


def hardware_description(device, processes: int = 1) -> str:
    """What a run on ``device`` (a ``torch.device``) ran on, for the record: the GPU's name
    (``NVIDIA H100 80GB HBM3``) for CUDA, else the CPU's model and the cores this process may use;
    ``N x`` in front for N processes (DDP)."""
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple GPU (MPS)"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"{_cpu_model()}, {cores} cores"
    return f"{processes} x {name}" if processes > 1 else name


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "CPU"


def _finite(value: Any) -> Any:
    """NaN / inf become None so that the record is valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
