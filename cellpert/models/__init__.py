"""Model families, each as an scvi-tools model / module / training plan.

- :class:`SAMSVAE`, :class:`CPAVAE`, :class:`ConditionalVAE` (:mod:`cellpert.models.samsvae`);
- :class:`SVAE`, :class:`SVAEPlus` (:mod:`cellpert.models.svae`);
- :func:`prepare_anndata`: a :class:`~cellpert.data.PerturbationScreen` to a set-up-ready AnnData.
"""

from __future__ import annotations

from cellpert.models._prepare import DEFAULT_DOSAGE_KEY, DEFAULT_LIBRARY_SIZE_KEY, prepare_anndata
from cellpert.models.samsvae import CPAVAE, SAMSVAE, ConditionalVAE
from cellpert.models.svae import SVAE, SVAEPlus

__all__ = [
    "CPAVAE",
    "DEFAULT_DOSAGE_KEY",
    "DEFAULT_LIBRARY_SIZE_KEY",
    "SAMSVAE",
    "SVAE",
    "ConditionalVAE",
    "SVAEPlus",
    "prepare_anndata",
]
