"""Training plan of sVAE / sVAE+.

scvi-tools' :class:`~scvi.train.TrainingPlan` (Adam, KL warm-up) is used with metrics
logged once per epoch (:class:`SVAETrainingPlan`). Early stopping and best-state restore
use the shared :class:`~cellpert.models._trainingplan.WarmupAwareEarlyStopping`, which
only starts counting once the KL warm-up is over.
"""

from __future__ import annotations

from scvi.train import TrainingPlan

from cellpert.models._trainingplan import EpochMetricsMixin, WarmupAwareEarlyStopping

__all__ = ["SVAETrainingPlan", "WarmupAwareEarlyStopping"]


class SVAETrainingPlan(EpochMetricsMixin, TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` with metrics logged once per epoch."""
