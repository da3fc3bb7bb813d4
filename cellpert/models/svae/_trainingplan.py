"""Early stopping on the validation ELBO, counted from the end of the KL warm-up.

scvi-tools' :class:`~scvi.train.TrainingPlan` (Adam, KL warm-up) is used with metrics
logged once per epoch (:class:`SVAETrainingPlan`). During
the warm-up the objective changes every epoch, so the validation ELBO is not comparable
across epochs: :class:`WarmupAwareEarlyStopping` only starts tracking the best state and
counting patience once the warm-up is over, restores the best state at the end, and
records where it was.
"""

from __future__ import annotations

import copy
import logging
import math

import lightning.pytorch as pl
import torch
from scvi.train import TrainingPlan

from cellpert.models._trainingplan import EpochMetricsMixin

__all__ = ["SVAETrainingPlan", "WarmupAwareEarlyStopping"]

logger = logging.getLogger(__name__)


class SVAETrainingPlan(EpochMetricsMixin, TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` with metrics logged once per epoch."""


class WarmupAwareEarlyStopping(pl.Callback):
    """Early stopping and best-state restore on ``monitor``, after ``start_epoch``.

    Parameters
    ----------
    monitor
        Logged validation metric to minimise (``"elbo_validation"``: per-cell negative ELBO).
    start_epoch
        First epoch whose value counts (the end of the KL warm-up).
    patience
        Stop after this many validation checks without improvement (None: never stop).
    min_delta
        Improvement needed to reset the patience counter.
    restore_best
        Load the best state into the module when training ends.

    Attributes
    ----------
    best_score, best_epoch
        Best value seen after ``start_epoch`` and its epoch.
    stopped_epoch
        Epoch at which training was stopped early (None if it was not).
    """

    def __init__(
        self,
        monitor: str = "elbo_validation",
        *,
        start_epoch: int = 0,
        patience: int | None = 45,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.start_epoch = int(start_epoch)
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < self.start_epoch:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best_score - self.min_delta:
            self.best_score = value
            self.best_epoch = int(trainer.current_epoch)
            self._wait = 0
            if self.restore_best:
                self._state = copy.deepcopy(pl_module.module.state_dict())
            return
        self._wait += 1
        if self.patience is not None and self._wait >= self.patience:
            trainer.should_stop = True
            self.stopped_epoch = int(trainer.current_epoch)
            logger.info("early stopping at epoch %d (best %s at epoch %s)", self.stopped_epoch, self.monitor, self.best_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self._state is not None:
            pl_module.module.load_state_dict(self._state)
            logger.info("restored the state of epoch %s (%s = %.4f)", self.best_epoch, self.monitor, self.best_score)
