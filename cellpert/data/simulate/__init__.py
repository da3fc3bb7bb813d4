"""Simulated perturbation screens with known ground truth (docs/models.md, *Simulators*).

Each simulator is a keyword-only function ``simulate_xxx(*, seed=0, ...) -> AnnData``
that writes counts in ``X``, labels in ``obs['perturbation']``, a split in
``obs['cellpert_split']``, the true latents in ``obsm['X_true_*']`` and the ground truth
in ``uns['cellpert']['ground_truth']``.
"""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad

from cellpert.data.simulate._comparative import simulate_comparative
from cellpert.data.simulate._sams import sams_true_ate, simulate_sams
from cellpert.data.simulate._sparse_shift import simulate_sparse_shift

__all__ = ["SIMULATORS", "sams_true_ate", "simulate_comparative", "simulate_sams", "simulate_sparse_shift"]

#: The simulators by the name the CLI and the ground truth (``simulator``) use.
SIMULATORS: dict[str, Callable[..., ad.AnnData]] = {
    "sparse-shift": simulate_sparse_shift,
    "sams": simulate_sams,
    "comparative": simulate_comparative,
}
