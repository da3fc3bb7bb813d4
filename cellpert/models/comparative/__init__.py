"""Comparative identifiable deep generative models (Lopez et al., CLeaR 2024; docs/models.md, *Comparative VAE*).

:class:`ComparativeVAE`: background cells decoded from a shared latent z, target cells
from (z, t) with a salient latent t; Wasserstein (and optional MMD) regularisers;
``standard``, ``multi-objective`` and ``constrained`` training modes.
"""

from __future__ import annotations

from cellpert.models.comparative._model import DEFAULT_IS_TARGET_KEY, ComparativeVAE
from cellpert.models.comparative._module import (
    ComparativeVAEModule,
    gaussian_kl,
    mmd,
    wasserstein_to_zero,
)
from cellpert.models.comparative._trainingplan import (
    MODES,
    ComparativeTrainingPlan,
    dual_ascent_step,
    min_norm_coefficient,
)

__all__ = [
    "DEFAULT_IS_TARGET_KEY",
    "MODES",
    "ComparativeTrainingPlan",
    "ComparativeVAE",
    "ComparativeVAEModule",
    "dual_ascent_step",
    "gaussian_kl",
    "min_norm_coefficient",
    "mmd",
    "wasserstein_to_zero",
]
