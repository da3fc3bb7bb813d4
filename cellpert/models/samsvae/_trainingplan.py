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
import torch
from scvi.train import TrainingPlan

from cellpert.models._trainingplan import EpochMetricsMixin

__all__ = ["PerturbationTrainingPlan", "TemperatureCallback"]

logger = logging.getLogger(__name__)


class PerturbationTrainingPlan(EpochMetricsMixin, TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` whose validation loss uses validation ``N_t``.

    Parameters
    ----------
    module
        The module.
    mask_logits_lr
        Option: a separate Adam learning rate for the q(M) logits (default: ``lr``).
    **kwargs
        :class:`~scvi.train.TrainingPlan` arguments.
    """

    def __init__(self, module, *, mask_logits_lr: float | None = None, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self.mask_logits_lr = mask_logits_lr

    def configure_optimizers(self):
        """Adam; the mask logits in their own parameter group when ``mask_logits_lr`` is set."""
        logits = getattr(self.module, "mask_logits", None)
        if self.mask_logits_lr is None or logits is None or self.optimizer_name != "Adam":
            return super().configure_optimizers()
        others = [p for p in self.module.parameters() if p.requires_grad and p is not logits]
        optimizer = torch.optim.Adam(
            [{"params": others}, {"params": [logits], "lr": self.mask_logits_lr}],
            lr=self.lr,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        return {"optimizer": optimizer}

    def validation_step(self, batch, batch_idx):
        """Validation step: the loss with ``split="val"``."""
        _, _, scvi_loss = self.forward(batch, loss_kwargs={**self.loss_kwargs, "split": "val"})
        self.record_loss(scvi_loss, "validation")


class TemperatureCallback(pl.Callback):
    """Anneal the relaxed-Bernoulli temperature geometrically from ``start`` to ``end``.

    The temperature after step ``s`` of ``n_steps`` is ``start · (end/start)^(s/n_steps)``
    (held at ``end`` afterwards).
    """

    def __init__(self, start: float, end: float, n_steps: int) -> None:
        super().__init__()
        self.start, self.end, self.n_steps = float(start), float(end), max(int(n_steps), 1)

    def temperature(self, step: int) -> float:
        frac = min(step / self.n_steps, 1.0)
        return self.start * (self.end / self.start) ** frac

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        pl_module.module.mask_temperature = self.temperature(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.module.mask_temperature = self.end
