"""Training plan of sVAE / sVAE+.

The shared :class:`~cellpert.models._trainingplan.CellpertTrainingPlan` (scvi-tools'
:class:`~scvi.train.TrainingPlan`: Adam, KL warm-up; metrics logged once per epoch;
``param_lrs`` for the perturbation parameters' own learning rate). Early stopping and
best-state restore use the shared
:class:`~cellpert.models._trainingplan.WarmupAwareEarlyStopping`, which only starts
counting once the KL warm-up is over.
"""

from __future__ import annotations

from cellpert.models._trainingplan import CellpertTrainingPlan

__all__ = ["SVAETrainingPlan"]


class SVAETrainingPlan(CellpertTrainingPlan):
    """The shared training plan, unchanged (a name of its own for ``_training_plan_cls``)."""
