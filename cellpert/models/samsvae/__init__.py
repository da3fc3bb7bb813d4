"""SAMS-VAE and the two baselines of its paper (CPA-VAE, conditional VAE)."""

from __future__ import annotations

from cellpert.models.samsvae._model import CPAVAE, SAMSVAE, ConditionalVAE
from cellpert.models.samsvae._module import PerturbationVAEModule

__all__ = ["CPAVAE", "SAMSVAE", "ConditionalVAE", "PerturbationVAEModule"]
