"""How a screen's perturbations spread over the levels of a covariate (``cellpert inspect``).

A perturbation whose cells all sit in one batch cannot be told apart from that batch by
any model; one whose cells sit mostly in one level while the control cells do not is
confounded with it unless the level is a covariate (docs/models.md, *Covariates*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError

__all__ = ["COMMON_COVARIATE_COLUMNS", "covariate_spread", "find_covariate_columns"]

#: obs columns ``cellpert inspect`` reports as covariates when the user names none.
COMMON_COVARIATE_COLUMNS = (
    "batch", "gem_group", "gemgroup", "lane", "library", "sample", "replicate", "donor",
    "cell_line", "cell_type", "plate", "well",
)  # fmt: skip
#: A label with more than this share of its cells in one level is reported as concentrated.
CONCENTRATED_SHARE = 0.8


def find_covariate_columns(obs: pd.DataFrame, *, exclude: Sequence[str] = ()) -> list[str]:
    """obs columns with a common covariate name and 2–1,000 levels (not ``exclude``)."""
    found = []
    for name in obs.columns:
        if str(name).lower() in COMMON_COVARIATE_COLUMNS and name not in exclude:
            n = obs[name].nunique(dropna=True)
            if 2 <= n <= 1000:
                found.append(str(name))
    return found


def covariate_spread(screen: Any, key: str) -> dict[str, Any]:
    """How the screen's labels spread over the levels of ``obs[key]``.

    Returns
    -------
    ``levels`` (level -> cells), ``control_cells_per_level``, ``missing`` (cells without
    a value), ``labels_in_one_level`` (labels whose cells are all in one level, when
    there are several), ``concentrated_labels`` (labels with more than 80% of their
    cells in one level), ``levels_without_control`` and ``max_share_median`` (median over
    labels of the largest level's share of the label's cells).
    """
    obs = screen.adata.obs
    if key not in obs.columns:
        raise CellpertInputError(f"obs has no column {key!r}; pass an existing obs column to --covariate-keys.")
    values = obs[key]
    missing = int(pd.isna(values).sum())
    levels = values.astype(str).where(~pd.isna(values), "<missing>").to_numpy()
    labels = np.asarray(screen.labels).astype(str)
    table = pd.crosstab(pd.Series(labels, name="label"), pd.Series(levels, name="level"))
    controls = [c for c in screen.control_labels if c in table.index]
    perturbed = table.drop(index=controls)
    share = perturbed.max(axis=1) / perturbed.sum(axis=1).clip(lower=1)
    control_row = table.loc[controls].sum(axis=0) if controls else pd.Series(0, index=table.columns)
    several = table.shape[1] > 1
    return {
        "key": key,
        "levels": {str(k): int(v) for k, v in table.sum(axis=0).items()},
        "control_cells_per_level": {str(k): int(v) for k, v in control_row.items()},
        "missing": missing,
        "labels_in_one_level": sorted(share.index[(perturbed > 0).sum(axis=1) == 1].tolist()) if several else [],
        "concentrated_labels": sorted(share.index[share > CONCENTRATED_SHARE].tolist()) if several else [],
        "levels_without_control": sorted(str(k) for k, v in control_row.items() if v == 0),
        "max_share_median": float(share.median()) if len(share) else float("nan"),
    }
