"""Train / validation / test splits, stored as an obs column (docs/models.md, *ATE space and data ATE*)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError
from cellpert.data._screen import PerturbationScreen

__all__ = [
    "DEFAULT_SPLIT_KEY",
    "SPLIT_NAMES",
    "combination_split",
    "eligible_heldout_combinations",
    "heldout_perturbation_split",
    "make_split",
    "random_split",
]

logger = logging.getLogger(__name__)

#: obs column written by default.
DEFAULT_SPLIT_KEY = "cellpert_split"
#: Values of a split column. "unused" cells take part in no split (data-efficiency split).
SPLIT_NAMES = ("train", "val", "test", "unused")


def _assign_fractions(n: int, fractions: Sequence[float], rng: np.random.Generator, names: Sequence[str]) -> np.ndarray:
    fractions = np.asarray(fractions, dtype=float)
    if (fractions < 0).any() or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6):
        raise CellpertInputError(
            f"split fractions {fractions.tolist()} must be >= 0 and sum to 1; e.g. 0.64,0.16,0.2."
        )
    order = rng.permutation(n)
    bounds = np.round(np.cumsum(fractions) * n).astype(int)
    out = np.empty(n, dtype=object)
    start = 0
    for name, stop in zip(names, bounds, strict=True):
        out[order[start:stop]] = name
        start = stop
    return out


def random_split(
    n_cells: int, *, fractions: Sequence[float] = (0.64, 0.16, 0.2), seed: int = 0
) -> np.ndarray:
    """Seeded random cell split into train / val / test (default 64/16/20).

    Returns
    -------
    One of ``"train"``, ``"val"``, ``"test"`` per cell.
    """
    return _assign_fractions(n_cells, fractions, np.random.default_rng(seed), ("train", "val", "test"))


def heldout_perturbation_split(
    screen: PerturbationScreen,
    heldout: Sequence[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Cells of the held-out labels are test; the others are split train / val.

    Parameters
    ----------
    heldout
        Canonical labels (``"A"``, ``"A+B"``) to hold out.
    """
    known = set(screen.labels)
    missing = [h for h in heldout if h not in known]
    if missing:
        raise CellpertInputError(
            f"held-out perturbation(s) {', '.join(missing[:5])} are not labels of this screen; "
            "check the spelling (combinations as 'A+B')."
        )
    rng = np.random.default_rng(seed)
    test = np.isin(screen.labels, list(heldout))
    out = np.empty(screen.n_cells, dtype=object)
    out[test] = "test"
    rest = np.flatnonzero(~test)
    out[rest] = _assign_fractions(len(rest), (1 - val_fraction, val_fraction), rng, ("train", "val"))
    return out


def eligible_heldout_combinations(screen: PerturbationScreen, *, seed: int = 0, test_fraction: float = 0.25) -> list[str]:
    """Combinations held out by :func:`combination_split` (in held-out order).

    The double (or higher) combinations are shuffled with ``seed``; walking from the end
    of that order, a combination is held out when each of its parts is still seen in
    training, alone or in a combination that is not held out, until
    ``ceil(test_fraction · n_combinations)`` are held out (or none is left eligible).
    """
    combos = screen.combination_labels
    if not combos:
        raise CellpertInputError("the screen has no combinations ('A+B' labels); use --split random.")
    rng = np.random.default_rng(seed)
    order = [combos[i] for i in rng.permutation(len(combos))]
    n_test = math.ceil(test_fraction * len(combos))
    seen_by: dict[str, int] = {}
    singles = set(screen.single_labels)
    for combo in combos:
        for part in screen.label_parts(combo):
            seen_by[part] = seen_by.get(part, 0) + 1
    heldout: list[str] = []
    for combo in reversed(order):
        if len(heldout) == n_test:
            break
        parts = screen.label_parts(combo)
        # each part must stay visible: as a single, or in another non-held-out combination
        if all(p in singles or seen_by[p] > 1 for p in parts):
            heldout.append(combo)
            for p in parts:
                seen_by[p] -= 1
    return heldout


def combination_split(
    screen: PerturbationScreen,
    *,
    seed: int = 0,
    fraction: float = 1.0,
    test_fraction: float = 0.25,
    val_fraction: float = 0.2,
) -> np.ndarray:
    """The Norman combination split and data-efficiency split (docs/models.md, *ATE space and data ATE*).

    Test cells are those of the held-out combinations
    (:func:`eligible_heldout_combinations`, independent of ``fraction`` so that the test
    set is the same for every fraction). A fraction ``fraction`` of the other
    combinations (in shuffled order) is used for training; the remaining combinations'
    cells are ``"unused"``. Used combinations, singles and controls are split
    ``1 - val_fraction`` / ``val_fraction`` into train / val.

    Every part of a held-out combination is trained on, whatever the fraction: a part
    with no single label keeps, besides the fraction's combinations, the next combination
    of the shuffled order that holds it (so a small fraction can use a few more
    combinations than ``fraction`` says), and a part whose cells all fell into val gets
    its first val cell moved into train (only with a handful of such cells).
    """
    if not 0.0 <= fraction <= 1.0:
        raise CellpertInputError(f"--fraction {fraction} must be between 0 and 1.")
    heldout = eligible_heldout_combinations(screen, seed=seed, test_fraction=test_fraction)
    combos = screen.combination_labels
    logger.info(
        "combination split: %d of %d combinations held out (%s)", len(heldout), len(combos), ", ".join(heldout)
    )
    rng = np.random.default_rng(seed)
    others = [c for c in combos if c not in set(heldout)]
    others = [others[i] for i in rng.permutation(len(others))]
    n_used = int(round(fraction * len(others)))
    used = others[:n_used]
    singles = set(screen.single_labels)
    heldout_parts = sorted({p for combo in heldout for p in screen.label_parts(combo)})
    for part in heldout_parts:  # a held-out part must stay in training (no single: a used combination)
        if part not in singles and not any(part in screen.label_parts(c) for c in used):
            extra = next((c for c in others[n_used:] if part in screen.label_parts(c)), None)
            if extra is not None:  # always found: eligible_heldout_combinations kept one
                used.append(extra)
    out = np.empty(screen.n_cells, dtype=object)
    is_combo = np.isin(screen.labels, combos)
    out[np.isin(screen.labels, heldout)] = "test"
    out[is_combo & ~np.isin(screen.labels, used) & (out != "test")] = "unused"
    rest = np.flatnonzero(pd.isna(pd.Series(out)).to_numpy())
    out[rest] = _assign_fractions(len(rest), (1 - val_fraction, val_fraction), rng, ("train", "val"))
    _train_every_part(screen, out, heldout_parts)
    return out


def _train_every_part(screen: PerturbationScreen, split: np.ndarray, parts: Sequence[str]) -> None:
    """Move into train the first val cell of each of ``parts`` that has no train cell (in place)."""
    labels = pd.unique(screen.labels)
    for part in parts:
        has_part = np.isin(screen.labels, [lab for lab in labels if part in screen.label_parts(lab)])
        if not (has_part & (split == "train")).any():
            in_val = np.flatnonzero(has_part & (split == "val"))
            if len(in_val):
                split[in_val[0]] = "train"


def make_split(
    screen: PerturbationScreen,
    kind: Literal["random", "combinations", "data-efficiency", "heldout"] = "random",
    *,
    seed: int = 0,
    fraction: float = 1.0,
    fractions: Sequence[float] = (0.64, 0.16, 0.2),
    heldout: Sequence[str] = (),
    key_added: str = DEFAULT_SPLIT_KEY,
) -> pd.Series:
    """Compute a split and store it in ``screen.adata.obs[key_added]``.

    Parameters
    ----------
    kind
        ``"random"`` (cells, ``fractions``), ``"combinations"`` (Norman OOD with all
        other combinations used), ``"data-efficiency"`` (the same with ``fraction`` of
        the other combinations), ``"heldout"`` (the labels in ``heldout`` are test).

    Returns
    -------
    The split as a categorical Series; also written to ``screen.adata.obs[key_added]``.
    """
    if kind == "random":
        values = random_split(screen.n_cells, fractions=fractions, seed=seed)
    elif kind == "combinations":
        values = combination_split(screen, seed=seed, fraction=1.0)
    elif kind == "data-efficiency":
        values = combination_split(screen, seed=seed, fraction=fraction)
    elif kind == "heldout":
        values = heldout_perturbation_split(screen, heldout, seed=seed)
    else:
        raise CellpertInputError(f"unknown split {kind!r}; choose random, combinations, data-efficiency or heldout.")
    series = pd.Series(
        pd.Categorical(values, categories=list(SPLIT_NAMES)), index=screen.adata.obs_names, name=key_added
    )
    screen.adata.obs[key_added] = series
    return series


def read_split(screen: PerturbationScreen, key: str) -> np.ndarray:
    """Read a split column, checking its values."""
    if key not in screen.adata.obs.columns:
        raise CellpertInputError(f"obs has no split column {key!r}; pass --split-key with an existing column or --split.")
    values = screen.adata.obs[key].astype(str).to_numpy()
    bad = sorted(set(values) - set(SPLIT_NAMES))
    if bad:
        raise CellpertInputError(
            f"split column {key!r} has values {', '.join(bad[:5])}; expected train, val, test (or unused)."
        )
    return values
