"""Command line of the Lightning subcommands: ``python -m rails_lightning {fit,validate,test,predict}``.

A LightningCLI of the one ``RetrievalModule`` and ``InteractionDataModule`` whose embedded default
config (``rails_lightning/configs/default.yaml``) trains a two-tower model on synthetic data;
``--config configs/...yaml`` picks another experiment and ``--model=MoL`` / ``--model=TwoTower``
a ready-made model (``rails_lightning/configs/models/``). The CLI owns the side effects around a
run: the run directory, W&B mode, the saved config, the run record (``run.json``) and the final report.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from rails_lightning.baseline import (
    category_popularity_baseline, content_knn_baseline, popularity_baseline, random_baseline, text_retrieval_baselines,
)
from rails_lightning.callbacks import CorpusEvaluation
from rails_lightning.commands import PROG, help_description
from rails_lightning.data.datamodule import InteractionDataModule
from rails_lightning.errors import CheckpointError, ConfigError
from rails_lightning.models.factories import build_factory
from rails_lightning.models.former_layouts import current_hyperparameters
from rails_lightning.models.retrieval_module import RetrievalModule
from rails_lightning.reports.comparison import final_table
from rails_lightning.runs import RECORD_FILE, STARTED_RUN_DIRS, RunRecord, hardware_description
from rails_lightning.runtime import keep_freed_memory
from rails_lightning.similarity import Similarity

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
MODEL_PRESETS = {path.stem: path for path in (Path(__file__).parent / "configs" / "models").glob("*.yaml")}
SUBCOMMANDS = ("fit", "validate", "test", "predict")
SUBCOMMAND_DETAILS = {
    "fit": "Without --config, the embedded default: a SASRec-style two-tower model on synthetic data. The run "
    "directory (printed first) gets config.yaml, checkpoints/, run.json and the W&B run (offline without W&B "
    "credentials). --model=MoL or --model=TwoTower picks a ready-made model; every option below applies on top; "
    "--model.similarity.help MixtureOfLogits lists a chosen class's options.",
    "validate": "Give --run_dir the checkpoint's run directory to write validate.json beside its run.json.",
    "test": "Give --run_dir the checkpoint's run directory to write test.json beside its run.json.",
    "predict": "Returns the query vectors of the test split through Lightning's predict loop (see --help of "
    "`index` and `retrieve` to serve a model instead).",
}
RUN_DIR_ENV = "RAILS_LIGHTNING_RUN_DIR"  # the run directory, handed to the processes of a DDP launch


def _wandb_settings():
    """wandb's process-wide settings (the environment, the settings files, the netrc), loaded once.

    Reading them fixes them for the rest of the process, the mode included: a later ``WANDB_MODE`` in the
    environment is ignored. So the mode is decided here and written into these settings as well as into
    the environment (which the processes a DDP launch or a sweep starts inherit)."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings


def _wandb_has_credentials(settings) -> bool:
    """Whether W&B has credentials for the host it logs in to (``settings.base_url``, whatever that is),
    read through wandb's own credential readers in wandb's order: the environment, the session, the netrc
    entry for that host, wandb's settings. Nothing goes over the network (``wandb.login`` can wait on it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib import wbauth

        if isinstance(wbauth.session_credentials(host=settings.base_url), wbauth.AuthApiKey):
            return True
        return bool(wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except Exception:  # noqa: BLE001 - a broken W&B set-up means no credentials, not a failed run
        return False


def _wandb_reachable(base_url: str, timeout: float = 3.0) -> bool:
    """Whether the W&B server answers a TCP connection within ``timeout`` (so that a run cannot hang on it)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(base_url)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def settle_wandb_mode() -> str:
    """Decide how W&B logs this process, before anything creates a W&B run, and never so that it prompts.

    ``WANDB_MODE`` from the environment is respected, except that ``online`` without credentials is refused
    (wandb would ask for a login). Otherwise: online with credentials and a server that answers, offline
    without (the run stays in the run directory; ``wandb sync`` uploads it later). Returns the reason for
    an offline run (empty when online, disabled, or chosen by the user)."""
    import wandb

    settings = _wandb_settings()
    chosen = os.environ.get("WANDB_MODE")
    if chosen:
        if chosen == "online" and not _wandb_has_credentials(settings):
            raise ConfigError(
                f"WANDB_MODE=online but W&B has no credentials for {settings.base_url}: run `wandb login`, "
                "or unset WANDB_MODE to log offline"
            )
        settings.update_from_settings(wandb.Settings(mode=chosen))
        return ""
    if not _wandb_has_credentials(settings):
        mode, reason = "offline", "no credentials; `wandb login` to log online"
    elif not _wandb_reachable(settings.base_url):
        mode, reason = "offline", f"{settings.base_url} did not answer"
    else:
        mode, reason = "online", ""
    os.environ["WANDB_MODE"] = mode
    settings.update_from_settings(wandb.Settings(mode=mode))
    return reason


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's paragraphs and example kept as written (subcommand
    parsers take their parent's formatter)."""


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _uses_wandb(logger_config) -> bool:
    """Whether the config's ``trainer.logger`` (a bool, a ``{class_path, init_args}`` entry or a list) has W&B."""
    return any(isinstance(entry, Namespace) and str(entry.get("class_path", "")).endswith("WandbLogger") for entry in _as_list(logger_config))


class SaveConfigToRunDir(SaveConfigCallback):
    """The resolved config goes to ``<run_dir>/config.yaml`` whatever the logger.

    (Lightning's own callback writes to the logger's ``log_dir``: ``version_N/`` for a CSVLogger.)
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(self.config.run_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)


class RailsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir",
            default=None,
            help="Directory of this run (config.yaml, checkpoints, W&B files, run.json). "
            "Default: <trainer.default_root_dir or .>/runs/<date-time>-<model>.",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Optional[Literal["highest", "high", "medium"]],
            default=None,
            help="torch.set_float32_matmul_precision for this run: 'high' lets float32 matrix products run in "
            "TF32 on a GPU with tensor cores (faster, ~1e-3 relative error), 'medium' in bf16; 'highest' is full "
            "float32. Default: leave PyTorch's setting (full float32).",
        )
        # Data facts the model is built from.
        for name in ("num_items", "num_users", "num_item_features", "action_names"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.link_arguments("data.max_seq_len", "model.max_seq_len")

    def before_instantiate_classes(self) -> None:
        if self.subcommand:  # a real run, not a parse for a test or a notebook
            keep_freed_memory()
        config = self.config[self.subcommand] if self.subcommand else self.config
        # A process Lightning's DDP launcher started (LOCAL_RANK > 0) re-runs this command line: it joins the
        # run directory its first process chose. Other launchers (torchrun, SLURM) start every process at once.
        launched = int(os.environ.get("LOCAL_RANK", "0")) > 0 and RUN_DIR_ENV in os.environ
        run_dir = config.get("run_dir") or (os.environ[RUN_DIR_ENV] if launched else None)
        if not run_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("a multi-process run started by an external launcher needs --run_dir, the same for every process")
        if not run_dir:
            root = Path(config.trainer.default_root_dir or ".")
            model_name = build_factory({"class_path": str(config.model.similarity.class_path)}, Similarity).func.model_name
            run_dir = root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}-{os.getpid()}"
        data = config.get("data")
        if data is not None and data.get("cold_item_fraction") and data.get("cold_item_seed") is None and type(config.get("seed_everything")) is int:
            data.cold_item_seed = config.seed_everything  # the cold items are the run seed's draw; config.yaml names it
        if config.get("float32_matmul_precision"):
            torch.set_float32_matmul_precision(config.float32_matmul_precision)
        self.run_dir = Path(run_dir).resolve()
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # for the processes a DDP launch starts from this one
        config.run_dir = str(self.run_dir)
        config.trainer.default_root_dir = str(self.run_dir)
        # Loggers and callbacks are config entries here ({class_path, init_args}), or a bool for `logger`.
        for logger in _as_list(config.trainer.logger):
            if isinstance(logger, Namespace) and "save_dir" in logger.get("init_args", {}):
                logger.init_args.save_dir = str(self.run_dir)
        for callback in _as_list(config.trainer.callbacks or []):
            if str(callback.class_path).endswith("ModelCheckpoint") and not callback.init_args.dirpath:
                callback.init_args.dirpath = str(self.run_dir / "checkpoints")
        # W&B must never block on a login prompt or an unreachable server.
        self.wandb_offline_reason = settle_wandb_mode() if _uses_wandb(config.trainer.logger) else ""
        if self.subcommand == "fit" and not config.get("ckpt_path") and not launched and _holds_a_run(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds a run; resume it with --ckpt_path={self.run_dir / 'checkpoints' / 'last.ckpt'} "
                "or choose another --run_dir"
            )
        if self.subcommand in ("validate", "test", "predict") and not config.get("ckpt_path"):
            self._print(f"no --ckpt_path: {self.subcommand} evaluates a freshly initialised (untrained) model")

    def _parse_ckpt_path(self) -> None:
        """The model's options from ``--ckpt_path``'s hyperparameters, as LightningCLI reads them, except that
        checkpoints are only ever loaded with ``weights_only=True`` (no code runs from a file); one given by URL is
        downloaded to a cache keyed by the whole URL, not its file name; a missing or unreadable file is a one-line
        error; and a checkpoint of a former layout is read in today's (``models/former_layouts.py``)."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is None or "weights_only" not in config:
            return super()._parse_ckpt_path()
        if config.weights_only is False:
            raise ConfigError("--weights_only=false would let a checkpoint run code when it is loaded; rails_lightning refuses it")
        config.weights_only = True
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):
            return super()._parse_ckpt_path()
        if "://" in str(ckpt_path):
            ckpt_path = config.ckpt_path = str(download_checkpoint(str(ckpt_path)))
        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"{ckpt_path}: checkpoint not found (--ckpt_path takes a .ckpt file, e.g. RUN_DIR/checkpoints/best.ckpt)")
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{ckpt_path}: refused to load the checkpoint: it holds objects other than weights and plain data "
                "(loading them would run code from the file), or it is not a checkpoint"
            ) from error
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
            raise CheckpointError(f"{ckpt_path}: not a readable checkpoint ({type(error).__name__}: {_first_line(str(error))[:200]})") from error
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{ckpt_path}: not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
        hparams = current_hyperparameters(checkpoint.get("hyper_parameters") or {})
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _start_run(self) -> None:
        """The run directory exists from here on (not before: a failed set-up leaves nothing behind)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        STARTED_RUN_DIRS.append(self.run_dir)
        self._print(f"run directory: {self.run_dir}")

    def before_validate(self) -> None:
        self._start_run()
        self._announce_offline_wandb()

    def before_test(self) -> None:
        self._start_run()
        self._announce_offline_wandb()

    def before_predict(self) -> None:
        self._start_run()

    @rank_zero_only
    def _print(self, message: str) -> None:
        print(f"[rails_lightning] {message}", file=sys.stderr, flush=True)

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()
        self.datamodule.setup("fit")  # refuses empty splits before anything is written
        self._start_run()
        summary = self.datamodule.summary()
        self._print("data: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"data": summary, "num_parameters": sum(p.numel() for p in self.model.parameters())})
        self._log_resolved_config()
        self._announce_offline_wandb()

    def _announce_offline_wandb(self) -> None:
        """One line for an offline W&B run that the CLI chose: where it is and how to upload it."""
        from lightning.pytorch.loggers import WandbLogger

        if not self.wandb_offline_reason or not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
                sync_dir = logger.experiment.settings.sync_dir
                self._print(f"W&B is offline ({self.wandb_offline_reason}). Upload this run later with: wandb sync {sync_dir}")

    def _resolved_config(self) -> dict:
        """The full resolved config, as config.yaml holds it."""
        import yaml

        resolved = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        resolved.pop("config", None)  # the --config file paths, not settings
        return resolved

    def _log_resolved_config(self) -> None:
        """The full resolved config into the W&B run config, under ``config``."""
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [logger for logger in self.trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers or not self.trainer.is_global_zero:
            return
        resolved = self._resolved_config()
        for logger in wandb_loggers:
            # Nested under one key: sweep parameters (`model`, `seed_everything`) stay the agent's own.
            logger.experiment.config.update({"config": resolved}, allow_val_change=True)

    def after_fit(self) -> None:
        # The whole run's history and fit time (over resumes), read before evaluating the best checkpoint
        # restores the callback's state of that epoch.
        evaluation = self._corpus_evaluation()
        history = list(evaluation.history) if evaluation is not None else []
        fit_seconds = evaluation.fit_seconds if evaluation is not None else time.perf_counter() - self._fit_started
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        # Final numbers come from the best checkpoint, on val and on test.
        val = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        test = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        if self.trainer.is_global_zero:
            self._report(val[0] if val else {}, test[0] if test else {}, best, fit_seconds, history)

    def after_validate(self) -> None:
        self._write_evaluation("val", "validated")

    def after_test(self) -> None:
        self._write_evaluation("test", "tested")

    def _corpus_evaluation(self) -> CorpusEvaluation | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, CorpusEvaluation)), None)

    def _record(self, **fields) -> RunRecord:
        return RunRecord(
            run_dir=str(self.run_dir), model=self.model.model_name, config=self._resolved_config(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            hardware=hardware_description(self.trainer.strategy.root_device, self.trainer.world_size), **fields,
        )

    def _write_evaluation(self, stage: str, status: str) -> None:
        """The record of a validate / test run; beside (not over) the record of a finished fit in that directory."""
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
            ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
            filename = f"{self.subcommand}.json" if RunRecord.read(self.run_dir).status == "finished" else RECORD_FILE
            path = self._record(status=status, checkpoint=ckpt_path, **{stage: metrics}).write(filename)
            self._print(f"run record: {path}")

    def _report(self, val: dict, test: dict, best: str | None, fit_seconds: float, history: list[dict]) -> None:
        evaluation = self._corpus_evaluation()
        ks = evaluation.ks if evaluation is not None else (1, 10, 50, 200)
        cutoffs = evaluation.mrr_cutoffs if evaluation is not None else ()
        baseline = {
            **popularity_baseline(self.datamodule, "val", ks, mrr_cutoffs=cutoffs),
            **popularity_baseline(self.datamodule, "test", ks, mrr_cutoffs=cutoffs),
        }
        baselines = self._cold_start_baselines(ks) if self.datamodule.cold_items is not None else {}
        # Text queries: BM25 and the zero-shot sentence encoder on the same split, beside the model.
        baselines.update(text_retrieval_baselines(self.datamodule, ks, cutoffs))
        record = self._record(
            status="finished",
            val={k: float(v) for k, v in val.items()},
            test={k: float(v) for k, v in test.items()},
            baseline=baseline,
            baselines=baselines,
            history=history,
            epochs=self.trainer.current_epoch,
            fit_seconds=round(fit_seconds, 1),
            data=self.datamodule.summary(),
            checkpoint=best,
        )
        path = record.write()
        for logger in self.trainer.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in record.metrics.items()})
            logger.log_metrics({f"baseline_popularity/{k}": v for k, v in baseline.items()})
            for name, values in baselines.items():
                logger.log_metrics({f"baseline_{name}/{k}": v for k, v in values.items()})
        print("\n" + final_table(record), flush=True)
        self._print(f"best checkpoint: {best}")
        self._print(f"run record: {path}")


    def _cold_start_baselines(self, ks) -> dict[str, dict[str, float]]:
        """The baselines of a cold split on val and test, by name: random; category popularity when the items have
        categorical content; content kNN when the model's item tower featurises text (with its own featuriser)."""
        data = self.datamodule
        runs = {"random": lambda stage: random_baseline(data, stage, ks)}
        if data.item_content is not None and data.item_content.categorical:
            runs["category_popularity"] = lambda stage: category_popularity_baseline(data, stage, ks)
        text = self.model.item_tower.text_vectors
        if text is not None:
            runs["content_knn"] = lambda stage: content_knn_baseline(data, text.cpu(), stage, ks)
        return {name: {**run("val"), **run("test")} for name, run in runs.items()}


CHECKPOINT_CACHE = Path(os.environ.get("RAILS_LIGHTNING_CACHE", "~/.cache/rails_lightning")).expanduser() / "checkpoints"


def download_checkpoint(url: str, timeout: float = 60.0) -> Path:
    """A checkpoint URL -> a local file under a folder named by the URL's hash (two URLs with the same
    file name never share a file); written to a temporary file and renamed when complete."""
    import hashlib
    import tempfile
    import urllib.request

    folder = CHECKPOINT_CACHE / hashlib.sha256(url.encode()).hexdigest()[:24]
    path = folder / (Path(url.split("?", 1)[0]).name or "model.ckpt")
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
            while chunk := response.read(1 << 20):
                tmp.write(chunk)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{url}: could not download the checkpoint ({error})") from error
    os.replace(tmp.name, path)
    return path


def _holds_a_run(run_dir: Path) -> bool:
    return (run_dir / RECORD_FILE).exists() or any((run_dir / "checkpoints").glob("*.ckpt"))


def _expand_model_presets(argv: list[str]) -> list[str]:
    """``--model=MoL`` / ``--model TwoTower`` -> the ready-made model file of that name (configs/models/)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--model=") and arg.split("=", 1)[1] in MODEL_PRESETS:
            out[i] = f"--model={MODEL_PRESETS[arg.split('=', 1)[1]]}"
        elif arg == "--model" and i + 1 < len(out) and out[i + 1] in MODEL_PRESETS:
            out[i + 1] = str(MODEL_PRESETS[out[i + 1]])
    return out


def main(args: list[str] | None = None, run: bool = True, cli_class: type[RailsCLI] = RailsCLI) -> RailsCLI:
    """The Lightning subcommands; ``run=False`` only parses and instantiates (tests, notebooks, benchmarks)."""
    if args is None:  # LightningCLI reads sys.argv itself; the presets are expanded there
        sys.argv[1:] = _expand_model_presets(sys.argv[1:])
        argv = None
    else:
        argv = _expand_model_presets(list(args))
    _check_config_files(sys.argv[1:] if argv is None else argv)
    # Parse errors raise (ConfigError below) instead of printing the whole usage and exiting.
    parser_kwargs = {"default_config_files": [str(DEFAULT_CONFIG)], "exit_on_error": False}
    # Every subcommand starts from the embedded default (--config files override it); its --help starts with
    # what it does and an example.
    subcommand_kwargs = {
        subcommand: {
            **parser_kwargs,
            "usage": f"{PROG} {subcommand} [--config FILE] [--OPTION VALUE ...]",
            "description": help_description(subcommand, SUBCOMMAND_DETAILS[subcommand]),
        }
        for subcommand in SUBCOMMANDS
    }
    try:
        return cli_class(
            RetrievalModule,
            InteractionDataModule,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            parser_kwargs={"exit_on_error": False, "prog": PROG, "formatter_class": _HelpFormatter, **subcommand_kwargs}
            if run
            else parser_kwargs,
            args=argv,
            run=run,
        )
    except ArgumentError as error:
        raise ConfigError(f"{_first_line(str(error))} (see `python -m rails_lightning fit --help`)") from error
    except MisconfigurationException as error:  # Lightning's word for a bad trainer option
        raise ConfigError(_first_line(str(error))) from error


class _Parsed(Exception):
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(RailsCLI):
    def _parse_ckpt_path(self) -> None:  # the first step after parsing: stop there
        raise _Parsed(self.config)


def parse_command_line(args: list[str]) -> Namespace:
    """What a Lightning subcommand's command line (``["fit", "--config", FILE, ...]``) parses to, exactly as
    ``main`` parses it, with nothing loaded, instantiated or run (no data, no checkpoint: ``--ckpt_path`` may
    name a file that does not exist). Raises ``ConfigError`` for what ``main`` would refuse."""
    try:
        main(args, cli_class=_ParseOnlyCLI)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable: parsing always ends in _Parsed")


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else message


def _check_config_files(argv: list[str]) -> None:
    """Every ``--config FILE`` exists and is valid YAML; errors name the file and the line."""
    import yaml

    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found (--config takes a YAML file, e.g. configs/ml-1m/mol.yaml)")
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from error
