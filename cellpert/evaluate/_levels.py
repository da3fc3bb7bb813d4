"""ATEs within the levels of a covariate (batch, donor, cell line) and pooled over them
(docs/models.md, *Covariates*).

Within level ℓ, the data ATE of t compares t's cells of level ℓ with the control cells of
level ℓ; the pooled ATE is the weighted mean over levels, ``Σ_ℓ w_ℓ ATE_t,ℓ / Σ_ℓ w_ℓ``,
over the levels where t has cells. ``pool="control"`` weighs each level by its number of
control cells in the screen (the population the counterfactual estimator averages
over), ``pool="uniform"`` weighs the levels equally. The same weights pool the model's
per-level ATEs, so data and model are compared like with like: a batch effect that is
unevenly spread over the perturbations no longer enters the data ATE as an effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError

__all__ = ["Pool", "level_values", "level_weights", "pool_frames", "pooled_ate"]

Pool = Literal["control", "uniform"]


def level_values(obs: pd.DataFrame, key: str) -> np.ndarray:
    """The level of each cell in ``obs[key]`` as strings; one-line errors for a missing
    column or missing values."""
    if key not in obs.columns:
        raise CellpertInputError(f"obs has no column {key!r} to compute ATEs by level; pass an existing obs column.")
    column = obs[key]
    missing = int(pd.isna(column).sum())
    if missing:
        raise CellpertInputError(
            f"obs[{key!r}] has {missing} cell(s) without a level; fill them (e.g. 'unknown') or drop those cells."
        )
    return column.astype(str).to_numpy()


def level_weights(levels: np.ndarray, is_control: np.ndarray, pool: Pool = "control") -> pd.Series:
    """Weight of each level: its number of control cells (``"control"``) or 1 (``"uniform"``).

    Levels without control cells get weight 0 (no within-level ATE exists there).
    """
    if pool not in ("control", "uniform"):
        raise CellpertInputError(f"pool must be 'control' or 'uniform', not {pool!r}.")
    names = sorted(set(levels.tolist()))
    counts = pd.Series(levels[np.asarray(is_control, bool)]).value_counts().reindex(names, fill_value=0)
    weights = counts.astype(float) if pool == "control" else (counts > 0).astype(float)
    if not (weights > 0).any():
        raise CellpertInputError("no level has control cells; the ATE within levels needs control cells in each level.")
    return weights


def pool_frames(frames: Mapping[str, pd.DataFrame], weights: pd.Series) -> pd.DataFrame:
    """Weighted mean of genes x labels frames over levels, per label over the levels that
    have it (the weights renormalised among them)."""
    used = [lvl for lvl in frames if weights.get(lvl, 0) > 0]
    if not used:
        raise CellpertInputError("no level with a positive weight has an ATE; check the level column.")
    index = frames[used[0]].index
    columns = pd.Index(sorted({c for lvl in used for c in frames[lvl].columns}), name="label")
    total = pd.DataFrame(0.0, index=index, columns=columns)
    norm = pd.Series(0.0, index=columns)
    for lvl in used:
        frame = frames[lvl]
        w = float(weights[lvl])
        total[frame.columns] += w * frame.to_numpy(dtype=np.float64)
        norm[frame.columns] += w
    return total / norm.to_numpy()[None, :]


def pooled_ate(
    ate: Callable[[np.ndarray], pd.DataFrame],
    *,
    levels: np.ndarray,
    weights: pd.Series,
    cells: np.ndarray,
    is_control: np.ndarray,
) -> pd.DataFrame:
    """The pooled within-level ATE of the selected cells, from a data-ATE function.

    ``ate(mask)`` computes the data ATE of the cells of a boolean mask (e.g.
    :func:`cellpert.evaluate.data_ate` with ``standard_error=True``). Each level whose
    selection holds control and perturbed cells gives a within-level ATE; they are pooled
    with :func:`pool_frames`. The result carries the attrs of a data ATE (``n_cells`` and
    ``n_control_cells`` summed over levels, ``standard_error`` pooled as an independent
    weighted mean) and ``attrs["per_level"]`` (level -> within-level frame).
    """
    cells = np.asarray(cells, dtype=bool)
    is_control = np.asarray(is_control, dtype=bool)
    per_level: dict[str, pd.DataFrame] = {}
    for lvl in weights.index[weights > 0]:
        mask = cells & (levels == lvl)
        if not (mask & is_control).any() or not (mask & ~is_control).any():
            continue
        per_level[str(lvl)] = ate(mask)
    if not per_level:
        raise CellpertInputError("no level has both control and perturbed cells among the cells scored.")
    pooled = pool_frames(per_level, weights)
    attrs: dict[str, Any] = dict(next(iter(per_level.values())).attrs)
    n_cells: dict[str, float] = {}
    for frame in per_level.values():
        for label, n in frame.attrs.get("n_cells", {}).items():
            n_cells[label] = n_cells.get(label, 0) + n
    attrs["n_cells"] = n_cells
    attrs["n_control_cells"] = int(sum(f.attrs.get("n_control_cells", 0) for f in per_level.values()))
    if all("standard_error" in f.attrs for f in per_level.values()):
        # Var(Σ w_ℓ A_ℓ / Σ w_ℓ) = Σ w_ℓ² se_ℓ² / (Σ w_ℓ)², levels independent
        var = pool_frames({k: f.attrs["standard_error"] ** 2 for k, f in per_level.items()}, weights**2)
        # pool_frames divides by Σ w²; rescale to Σ w² se² / (Σ w)²
        scale = _weight_sums(per_level, weights**2) / _weight_sums(per_level, weights) ** 2
        attrs["standard_error"] = np.sqrt(var * scale[var.columns].to_numpy()[None, :])
    attrs["per_level"] = per_level
    pooled.attrs = attrs
    return pooled


def _weight_sums(frames: Mapping[str, pd.DataFrame], weights: pd.Series) -> pd.Series:
    """Σ of ``weights`` over the levels that have each label."""
    out: dict[str, float] = {}
    for lvl, frame in frames.items():
        for label in frame.columns:
            out[label] = out.get(label, 0.0) + float(weights.get(lvl, 0.0))
    return pd.Series(out)
