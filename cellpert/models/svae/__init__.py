"""sVAE and sVAE+ (sparse mechanism shift VAEs) and their out-of-distribution protocol."""

from __future__ import annotations

from cellpert.models.svae._model import DEFAULT_LABEL_KEY, SVAE, SVAEPlus, prepare_labels
from cellpert.models.svae._module import SVAEModule
from cellpert.models.svae._ood import out_of_distribution

__all__ = [
    "DEFAULT_LABEL_KEY",
    "SVAE",
    "SVAEModule",
    "SVAEPlus",
    "out_of_distribution",
    "prepare_labels",
]
