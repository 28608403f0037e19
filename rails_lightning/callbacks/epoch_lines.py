"""One line per validation epoch on stdout when stdout is not a terminal.

Lightning's progress bar redraws one line in a terminal; written to a file (a sweep's ``trial.log``, ``nohup``, a
batch job's log, CI) it shows nothing until the fit ends, so an hour-long fit looks stuck. This callback prints,
after each validation of a fit, e.g.::

    [rails_lightning] epoch 52 (53/101) · val/hr@10 0.2659 (best 0.2689, epoch 49) · val/ndcg@10 0.1402 · train/softmax_loss 5.1230 · 38.2 s/epoch, 31 min left
"""

from __future__ import annotations

import sys
import time
from typing import Literal, Sequence

from lightning.pytorch import Callback

from rails_lightning.reports.table import format_duration


class EpochLines(Callback):
    """Print a line per validation epoch of a fit: the epoch, ``metrics`` (the first with its best so far, higher is
    better), the training loss, the time per epoch and the time left.

    Args:
        metrics: logged keys to show; the first is the one whose best is tracked.
        when: ``"auto"`` prints only when stdout is not a terminal (where the progress bar already shows them),
            ``"always"`` in a terminal too, ``"never"`` not at all.
    """

    def __init__(self, metrics: Sequence[str] = ("val/hr@10", "val/ndcg@10"), when: Literal["auto", "always", "never"] = "auto") -> None:
        self.metrics = tuple(metrics)
        self.when = when
        self._best: tuple[float, int] | None = None
        self._started: float | None = None
        self._first_epoch = 0

    def state_dict(self) -> dict:
        return {"best": None if self._best is None else list(self._best)}  # a resumed fit knows its best so far

    def load_state_dict(self, state_dict: dict) -> None:
        best = state_dict.get("best")
        self._best = None if best is None else (float(best[0]), int(best[1]))

    def _enabled(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not sys.stdout.isatty())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._started, self._first_epoch = time.perf_counter(), trainer.current_epoch

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero or not self._enabled():
            return
        logged = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        epoch = trainer.current_epoch
        parts = [f"epoch {epoch}" + (f" ({epoch + 1}/{trainer.max_epochs})" if trainer.max_epochs and trainer.max_epochs > 0 else "")]
        for index, key in enumerate(self.metrics):
            if key not in logged:
                continue
            part = f"{key} {logged[key]:.4f}"
            if index == 0:
                if self._best is None or logged[key] > self._best[0]:
                    self._best = (logged[key], epoch)
                part += f" (best {self._best[0]:.4f}, epoch {self._best[1]})"
            parts.append(part)
        parts += [f"{key} {value:.4f}" for key, value in sorted(logged.items()) if key.startswith("train/") and key.endswith("loss")]
        if self._started is not None:
            done = epoch + 1 - self._first_epoch
            per_epoch = (time.perf_counter() - self._started) / max(done, 1)
            timing = f"{per_epoch:.1f} s/epoch"
            if trainer.max_epochs and trainer.max_epochs > 0:
                timing += f", {format_duration(per_epoch * max(trainer.max_epochs - epoch - 1, 0))} left"
            parts.append(timing)
        print("[rails_lightning] " + " · ".join(parts), flush=True)
