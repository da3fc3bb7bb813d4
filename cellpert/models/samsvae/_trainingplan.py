"""Training plan and callbacks of the SAMS-VAE family.

The optimisation is scvi-tools' :class:`~scvi.train.TrainingPlan` (Adam, weight decay,
Lightning) with metrics logged once per epoch (:class:`~cellpert.models._trainingplan.EpochMetricsMixin`);
what differs lives here:

- the validation loss scales each perturbation's global terms by ``1 / N_t`` with
  ``N_t`` counted on the validation split (the training loss uses the training split);
- :class:`TemperatureCallback` optionally anneals the relaxed-Bernoulli temperature.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from cellpert.models._trainingplan import CellpertTrainingPlan

__all__ = ["PerturbationTrainingPlan", "TemperatureCallback"]

logger = logging.getLogger(__name__)


class PerturbationTrainingPlan(CellpertTrainingPlan):
    """:class:`~cellpert.models._trainingplan.CellpertTrainingPlan` whose validation loss
    uses validation ``N_t`` (the mask logits' own learning rate: ``param_lrs``)."""

    def validation_step(self, batch, batch_idx):
        """Validation step: the loss with ``split="val"``."""
        _, _, scvi_loss = self.forward(batch, loss_kwargs={**self.loss_kwargs, "split": "val"})
        self.record_loss(scvi_loss, "validation")


class TemperatureCallback(pl.Callback):
    """Anneal the relaxed-Bernoulli temperature geometrically from ``start`` to ``end``.

    The temperature after step ``s`` of ``n_steps`` is ``start · (end/start)^(s/n_steps)``
    (held at ``end`` afterwards); ``n_steps`` defaults to the trainer's planned number of
    steps (``trainer.estimated_stepping_batches``).
    """

    def __init__(self, start: float, end: float, n_steps: int | None = None) -> None:
        super().__init__()
        self.start, self.end = float(start), float(end)
        self.n_steps = None if n_steps is None else max(int(n_steps), 1)

    def temperature(self, step: int) -> float:
        frac = min(step / (self.n_steps or 1), 1.0)
        return self.start * (self.end / self.start) ** frac

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.n_steps is None:
            self.n_steps = max(int(trainer.estimated_stepping_batches), 1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        pl_module.module.mask_temperature = self.temperature(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.module.mask_temperature = self.end
