"""Registry keys of the tensors every model family reads (scvi-tools ``AnnDataManager`` fields).

One definition each, shared by the modules, models and training plans.
"""

from __future__ import annotations

__all__ = ["DOSAGE_KEY", "IS_TARGET_KEY", "LABEL_KEY", "LIBRARY_KEY"]

#: The dosage matrix D (cells x perturbations; SAMS-VAE family).
DOSAGE_KEY = "dosage"
#: The observed library size ℓ_i (every family).
LIBRARY_KEY = "library_size"
#: The perturbation label, an integer code per cell (sVAE).
LABEL_KEY = "svae_label"
#: The target indicator g_i, 1 target and 0 background (comparative VAE).
IS_TARGET_KEY = "is_target"
