"""W&B extras of a run: an HR@K-against-K table and chart per evaluation, the best checkpoint as an artifact.

Both callbacks act only when the trainer has a ``WandbLogger`` (they do nothing with
``--trainer.logger=false`` or another logger) and never fail a run: W&B is a record of the
run, not part of it. With ``WANDB_MODE=disabled`` the calls are no-ops; offline, the table and
chart are stored in the run's files and uploaded by ``wandb sync``.
"""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from rails_lightning.callbacks.corpus_evaluation import CorpusEvaluation


def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


def hit_rate_rows(metrics: dict, stage: str) -> tuple[list[str], list[list[float]]]:
    """Columns and one row per K of ``{stage}/hr@K`` (with NDCG@K, Recall@K and the approximate HR@K when logged)."""
    pattern = re.compile(rf"^{re.escape(stage)}/hr@(\d+)$")
    ks = sorted(int(m.group(1)) for m in map(pattern.match, metrics) if m)
    columns = ["K", "HR@K"]
    optional = {"NDCG@K": f"{stage}/ndcg@{{k}}", "Recall@K": f"{stage}/recall@{{k}}", "index HR@K": f"{stage}/index/hr@{{k}}"}
    present = {name: key for name, key in optional.items() if ks and key.format(k=ks[0]) in metrics}
    columns += list(present)
    rows = [[k, float(metrics[f"{stage}/hr@{k}"])] + [float(metrics[key.format(k=k)]) for key in present.values()] for k in ks]
    return columns, rows


class WandbHitRateTable(Callback):
    """After every validation (and test) log a ``wandb.Table`` of K, HR@K, NDCG@K, ... and a line chart of HR@K against K.

    Keys: ``val/hr_at_k`` (the table) and ``val/hr_at_k_chart`` (the chart), ``test/...`` likewise.
    The values are the full-corpus metrics that ``CorpusEvaluation`` logged for that epoch.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log("val", trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("test", trainer)

    @rank_zero_only
    def _log(self, stage: str, trainer: pl.Trainer) -> None:
        logger = _wandb_logger(trainer)
        if logger is None:
            return
        # CorpusEvaluation's own record of this evaluation where there is one: trainer.callback_metrics keeps metrics of
        # earlier epochs, such as the approximate index's under CorpusEvaluation(index_every_n_epochs > 1).
        evaluation = next((callback for callback in trainer.callbacks if isinstance(callback, CorpusEvaluation)), None)
        columns, rows = hit_rate_rows(evaluation.last_metrics if evaluation is not None else trainer.callback_metrics, stage)
        if not rows:
            return
        try:
            import wandb

            table = wandb.Table(columns=columns, data=rows)
            title = f"{stage} HR@K against K (epoch {trainer.current_epoch})"
            chart = wandb.plot.line(table, "K", "HR@K", title=title)
            logger.log_metrics({f"{stage}/hr_at_k": table, f"{stage}/hr_at_k_chart": chart}, step=trainer.global_step)
        except Exception as error:  # noqa: BLE001 - W&B must not break a run
            warnings.warn(f"W&B HR@K table not logged: {error}", stacklevel=2)


class WandbBestCheckpoint(Callback):
    """At the end of ``fit``, log the best checkpoint (by the ``ModelCheckpoint`` monitor) as a W&B ``model`` artifact.

    Only when the run is online: an offline run would copy every checkpoint into W&B's
    staging area for a later ``wandb sync``, and a disabled run has nowhere to put it.

    Args:
        name: artifact name; ``{run_id}`` is replaced by the W&B run id.
    """

    def __init__(self, name: str = "model-{run_id}") -> None:
        self.name = name

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger, checkpoint = _wandb_logger(trainer), trainer.checkpoint_callback
        if logger is None or checkpoint is None or not checkpoint.best_model_path:
            return
        try:
            import wandb

            run = logger.experiment
            if run.offline or run.disabled:
                return
            score = checkpoint.best_model_score
            artifact = wandb.Artifact(
                self.name.format(run_id=run.id),
                type="model",
                metadata={"monitor": checkpoint.monitor, "score": None if score is None else float(score), "epoch": trainer.current_epoch},
            )
            artifact.add_file(checkpoint.best_model_path, name="model.ckpt")
            run.log_artifact(artifact, aliases=["best", "latest"])
        except Exception as error:  # noqa: BLE001 - W&B must not break a run
            warnings.warn(f"W&B checkpoint artifact not logged: {error}", stacklevel=2)
