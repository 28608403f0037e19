"""One line per validation epoch on stdout when stdout is not a terminal.

Lightning's progress bar redraws one line in a terminal; written to a file (a sweep's ``trial.log``, ``nohup``, a
batch job's log, CI) it shows nothing until the fit ends, so an hour-long fit looks stuck. This callback prints,
after each validation of a fit, e.g.::

    [rails_lightning] epoch 52 (53/101) · val/hr@10 0.2659 (best 0.2689, epoch 49) · val/ndcg@10 0.1402 · train/softmax_loss 5.1230 · 38.2 s/epoch, 31 min left
"""

from __future__ import annotations

import sys
from typing import Literal, Sequence

from lightning.pytorch import Callback

from rails_lightning.callbacks.corpus_evaluation import CorpusEvaluation
from rails_lightning.reports.table import format_duration


class EpochLines(Callback):
    """Print a line per validation epoch of a fit: the epoch, ``metrics`` (the first with its best so far, higher is
    better), the training loss, the time per epoch and the time left. The figures are read from the
    ``CorpusEvaluation`` callback's history (every validation epoch's metrics and fit time, restored on resume), so
    this callback keeps no state of its own.

    Args:
        metrics: logged keys to show; the first is the one whose best is given.
        when: ``"auto"`` prints only when stdout is not a terminal (where the progress bar already shows them),
            ``"always"`` in a terminal too, ``"never"`` not at all.
    """

    def __init__(self, metrics: Sequence[str] = ("val/hr@10", "val/ndcg@10"), when: Literal["auto", "always", "never"] = "auto") -> None:
        self.metrics = tuple(metrics)
        self.when = when

    def _enabled(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not sys.stdout.isatty())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero or not self._enabled():
            return
        history = next((c.history for c in trainer.callbacks if isinstance(c, CorpusEvaluation)), None)
        if not history:
            return
        row, epoch, max_epochs = history[-1], history[-1]["epoch"], trainer.max_epochs
        parts = [f"epoch {epoch}" + (f" ({epoch + 1}/{max_epochs})" if max_epochs and max_epochs > 0 else "")]
        for index, key in enumerate(self.metrics):
            if key not in row:
                continue
            part = f"{key} {row[key]:.4f}"
            if index == 0:
                best = max((r for r in history if key in r), key=lambda r: r[key])
                part += f" (best {best[key]:.4f}, epoch {best['epoch']})"
            parts.append(part)
        parts += [f"{key} {float(value):.4f}" for key, value in sorted(trainer.callback_metrics.items())
                  if key.startswith("train/") and key.endswith("loss") and value.numel() == 1]
        per_epoch = row["fit_seconds"] / len(history)
        timing = f"{per_epoch:.1f} s/epoch"
        if max_epochs and max_epochs > 0:
            timing += f", {format_duration(per_epoch * max(max_epochs - epoch - 1, 0))} left"
        print("[rails_lightning] " + " · ".join(parts + [timing]), flush=True)
