"""Identifiability metrics of docs/models.md, *Identifiability metrics and ICA*: MCC, linear R², mask recovery, block leakage.

The ICA transforms (:func:`ica_rotate`, :func:`latent_shifts`, :func:`ica_masks`) live in
:mod:`cellpert.models._components._ica` (models use them too) and are re-exported here.

All functions take cells x dimensions arrays (numpy arrays, DataFrames or CPU torch
tensors). Constant columns (collapsed latent dimensions) are handled without NaN: they
correlate 0 with everything and are left out of regressions.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from cellpert._errors import CellpertInputError
from cellpert.models._components._ica import as_matrix as _as_2d
from cellpert.models._components._ica import ica_masks, ica_rotate, latent_shifts

__all__ = [
    "MCCResult",
    "align_latents",
    "block_leakage",
    "ica_masks",
    "ica_rotate",
    "latent_shifts",
    "linear_r2",
    "mask_recovery",
    "match_latents",
    "mcc",
]

logger = logging.getLogger(__name__)

CorrMethod = Literal["pearson", "spearman"]

#: Relative spread below which a column counts as constant.
_CONSTANT_RTOL = 1e-12


# --------------------------------------------------------------------------- helpers
def _same_rows(**arrays: np.ndarray) -> None:
    rows = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{k} has {v}" for k, v in rows.items())
        raise CellpertInputError(
            f"the matrices must have one row per cell, in the same order ({shown} rows)."
        )
    n = next(iter(rows.values()))
    if n < 2:
        raise CellpertInputError(f"at least 2 cells are needed to compare latents (got {n}).")


def _constant_columns(x: np.ndarray) -> np.ndarray:
    spread = np.ptp(x, axis=0)
    scale = np.maximum(np.abs(x).max(axis=0), np.finfo(np.float64).tiny)
    return spread <= _CONSTANT_RTOL * scale


def _standardise(x: np.ndarray) -> np.ndarray:
    """Centre columns and scale them to unit norm; constant columns become 0."""
    const = _constant_columns(x)
    xc = x - x.mean(axis=0)
    norm = np.sqrt((xc**2).sum(axis=0))
    ok = ~const & (norm > 0)
    out = np.zeros_like(xc)
    out[:, ok] = xc[:, ok] / norm[ok]
    return out


def _correlation(true: np.ndarray, learned: np.ndarray, method: CorrMethod) -> np.ndarray:
    """Signed correlations, true dims x learned dims; 0 where a column is constant."""
    if method == "spearman":
        true = rankdata(true, axis=0)
        learned = rankdata(learned, axis=0)
    elif method != "pearson":
        raise CellpertInputError(f"method must be 'pearson' or 'spearman', not {method!r}.")
    corr = _standardise(true).T @ _standardise(learned)
    return np.clip(corr, -1.0, 1.0)


# ------------------------------------------------------------------------------ MCC
class MCCResult(float):
    """The mean correlation coefficient, a float that also carries the matching.

    It compares, formats and serialises (``json.dumps``) like a float; the matching
    is available as attributes.

    Attributes
    ----------
    method
        ``"pearson"`` or ``"spearman"``.
    perm
        ``perm[k]`` is the learned dimension matched to true dimension ``k`` (-1 when
        there are fewer learned than true dimensions and ``k`` is unmatched).
    signs
        Sign (+1 / -1) of the correlation of each matched pair (0 when unmatched).
    matched_corr
        \\|corr\\| of each matched pair, per true dimension (0 when unmatched).
    corr
        Signed correlation matrix, true dimensions x learned dimensions.
    """

    method: str
    perm: np.ndarray
    signs: np.ndarray
    matched_corr: np.ndarray
    corr: np.ndarray

    def __new__(
        cls,
        value: float,
        *,
        method: str = "pearson",
        perm: np.ndarray | None = None,
        signs: np.ndarray | None = None,
        matched_corr: np.ndarray | None = None,
        corr: np.ndarray | None = None,
    ) -> MCCResult:
        obj = super().__new__(cls, value)
        obj.method = method
        obj.perm = np.zeros(0, dtype=np.int64) if perm is None else perm
        obj.signs = np.zeros(0, dtype=np.int64) if signs is None else signs
        obj.matched_corr = np.zeros(0) if matched_corr is None else matched_corr
        obj.corr = np.zeros((0, 0)) if corr is None else corr
        return obj

    def __repr__(self) -> str:
        return f"MCCResult({float(self):.4f}, method={self.method!r}, perm={self.perm.tolist()})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary.

        Returns
        -------
        ``{"mcc", "method", "perm", "signs", "matched_corr"}`` with plain Python values.
        """
        return {
            "mcc": float(self),
            "method": self.method,
            "perm": [int(p) for p in self.perm],
            "signs": [int(s) for s in self.signs],
            "matched_corr": [float(c) for c in self.matched_corr],
        }


def match_latents(
    true: Any, learned: Any, *, method: CorrMethod = "pearson"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match learned latent dimensions to true ones by Hungarian matching on \\|corr\\|.

    Solves ``scipy.optimize.linear_sum_assignment`` on ``-|corr|``. The matrix may be
    rectangular: with more learned than true dimensions the surplus learned dimensions
    stay unmatched; with fewer, some true dimensions stay unmatched.

    Parameters
    ----------
    true
        True latents, cells x K_true.
    learned
        Learned latents (e.g. posterior means), cells x K_learned, same cells in the
        same order.
    method
        Correlation used for matching: ``"pearson"`` or ``"spearman"``.

    Returns
    -------
    perm
        int array of length K_true: ``perm[k]`` is the learned dimension matched to true
        dimension ``k``, or -1 when unmatched.
    signs
        int array of length K_true: sign of the matched correlation (+1 or -1; 0 when
        unmatched), so that ``learned[:, perm[k]] * signs[k]`` tracks ``true[:, k]``.
    corr
        Signed correlation matrix, K_true x K_learned (0 for constant columns).

    Raises
    ------
    CellpertInputError
        When the row counts differ, values are not finite or ``method`` is unknown.
    """
    t = _as_2d(true, "true latents")
    lh = _as_2d(learned, "learned latents")
    _same_rows(true=t, learned=lh)
    corr = _correlation(t, lh, method)
    rows, cols = linear_sum_assignment(-np.abs(corr))
    perm = np.full(t.shape[1], -1, dtype=np.int64)
    perm[rows] = cols
    signs = np.zeros(t.shape[1], dtype=np.int64)
    signs[rows] = np.where(corr[rows, cols] < 0, -1, 1)
    return perm, signs, corr


def mcc(true: Any, learned: Any, *, method: CorrMethod = "pearson") -> MCCResult:
    """Mean correlation coefficient between true and learned latents (docs/models.md, *Identifiability metrics and ICA*).

    The mean of \\|corr\\| over the pairs chosen by :func:`match_latents`, i.e. over
    min(K_true, K_learned) pairs. A constant (collapsed) learned dimension correlates 0
    with every true dimension.

    Parameters
    ----------
    true
        True latents, cells x K_true.
    learned
        Learned latents, cells x K_learned.
    method
        ``"pearson"`` (linear) or ``"spearman"`` (rank, monotone).

    Returns
    -------
    MCCResult
        A float in [0, 1] carrying ``perm``, ``signs``, ``matched_corr`` and ``corr``.
    """
    perm, signs, corr = match_latents(true, learned, method=method)
    matched = perm >= 0
    matched_corr = np.zeros(len(perm))
    matched_corr[matched] = np.abs(corr[np.flatnonzero(matched), perm[matched]])
    value = float(matched_corr[matched].mean())
    return MCCResult(
        value, method=method, perm=perm, signs=signs, matched_corr=matched_corr, corr=corr
    )


def align_latents(
    learned: Any, perm: np.ndarray | MCCResult, signs: np.ndarray | None = None
) -> np.ndarray:
    """Reorder and sign-flip learned latents to line up with the true dimensions.

    Parameters
    ----------
    learned
        Learned latents, cells x K_learned.
    perm
        ``perm`` from :func:`match_latents`, or an :class:`MCCResult`.
    signs
        ``signs`` from :func:`match_latents` (taken from ``perm`` when it is an
        :class:`MCCResult`; default all +1).

    Returns
    -------
    cells x K_true array whose column ``k`` is ``signs[k] * learned[:, perm[k]]`` (zeros for
    unmatched true dimensions).
    """
    if isinstance(perm, MCCResult):
        signs = perm.signs if signs is None else signs
        perm = perm.perm
    lh = _as_2d(learned, "learned latents")
    perm = np.asarray(perm, dtype=np.int64)
    signs = np.ones(len(perm), dtype=np.int64) if signs is None else np.asarray(signs)
    if perm.max(initial=-1) >= lh.shape[1]:
        raise CellpertInputError(
            f"the matching refers to learned dimension {perm.max()} but there are only {lh.shape[1]}."
        )
    out = np.zeros((lh.shape[0], len(perm)))
    ok = perm >= 0
    out[:, ok] = lh[:, perm[ok]] * signs[ok]
    return out


# ------------------------------------------------------------------------- linear R²
def linear_r2(true: Any, learned: Any) -> float:
    """R² of an ordinary least-squares regression from learned latents to true latents.

    Fits ``true ≈ learned @ W + b`` (in sample) and returns the R² averaged over true
    dimensions. Constant learned columns are dropped from the regressors; constant true
    dimensions, having no variance to explain, are left out of the average. With as many
    regressors as cells, the in-sample R² is trivially 1: use many more cells than
    dimensions.

    Parameters
    ----------
    true
        Target latents, cells x K_true.
    learned
        Predictor latents, cells x K_learned.

    Returns
    -------
    float
        Mean R² over non-constant true dimensions, in [0, 1]; 1 for any invertible
        linear (affine) map between the two.

    Raises
    ------
    CellpertInputError
        When the row counts differ, values are not finite, or every true dimension is
        constant.
    """
    t = _as_2d(true, "true latents")
    lh = _as_2d(learned, "learned latents")
    _same_rows(true=t, learned=lh)
    target = ~_constant_columns(t)
    if not target.any():
        raise CellpertInputError(
            "every true latent dimension is constant: there is nothing to explain."
        )
    t = t[:, target]
    t_c = t - t.mean(axis=0)
    x = lh[:, ~_constant_columns(lh)]
    if x.shape[1] == 0:
        return 0.0
    # centring removes the intercept; standardising keeps lstsq well conditioned
    x_c = x - x.mean(axis=0)
    x_c = x_c / np.sqrt((x_c**2).sum(axis=0))
    coef, *_ = np.linalg.lstsq(x_c, t_c, rcond=None)
    ss_res = ((t_c - x_c @ coef) ** 2).sum(axis=0)
    ss_tot = (t_c**2).sum(axis=0)
    r2 = 1.0 - ss_res / ss_tot
    return float(np.clip(r2, 0.0, 1.0).mean())


# --------------------------------------------------------------------- mask recovery
def mask_recovery(
    true_mask: Any,
    learned_probs: Any,
    *,
    matching: np.ndarray | MCCResult | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Precision, recall and F1 of a learned perturbation-to-latent mask (docs/models.md, *Identifiability metrics and ICA*).

    ``learned_probs`` (q(M) or σ(log_alpha), perturbations x K_learned) is binarised as
    ``probs > threshold``; its columns are reordered to the true latent dimensions with
    ``matching`` (the same matching as the latents, from :func:`match_latents` or
    :func:`mcc`), then compared entry-wise with ``true_mask``. Learned dimensions left
    unmatched are ignored; unmatched true dimensions count as predicted all-zero.

    Parameters
    ----------
    true_mask
        True binary mask, perturbations x K_true (non-zero means "targets").
    learned_probs
        Mask probabilities in [0, 1], perturbations x K_learned (rows in the same
        perturbation order as ``true_mask``).
    matching
        ``perm`` from :func:`match_latents`, or an :class:`MCCResult`. None means the
        dimensions are already aligned (requires K_learned >= K_true; the first K_true
        columns are used).
    threshold
        Probabilities above this count as present.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1`` (floats; 0 when undefined because there are no
        predicted or no true entries, 1 when both are empty) and the counts ``tp``,
        ``fp``, ``fn``.

    Raises
    ------
    CellpertInputError
        For mismatched shapes, probabilities outside [0, 1] or an invalid matching.
    """
    truth = _as_2d(true_mask, "true mask") != 0
    probs = _as_2d(learned_probs, "learned mask probabilities")
    if truth.shape[0] != probs.shape[0]:
        raise CellpertInputError(
            f"the true mask has {truth.shape[0]} perturbations but the learned one has "
            f"{probs.shape[0]}; pass both with one row per perturbation, in the same order."
        )
    if probs.min() < 0 or probs.max() > 1:
        raise CellpertInputError(
            "learned mask values must be probabilities in [0, 1]; pass σ(log_alpha) or q(M), not logits."
        )
    k_true, k_learned = truth.shape[1], probs.shape[1]
    if isinstance(matching, MCCResult):
        matching = matching.perm
    if matching is None:
        if k_learned < k_true:
            raise CellpertInputError(
                f"the learned mask has {k_learned} latent dimensions, fewer than the {k_true} true ones; "
                "pass matching= from match_latents()."
            )
        perm = np.arange(k_true)
    else:
        perm = np.asarray(matching, dtype=np.int64).ravel()
        if len(perm) != k_true:
            raise CellpertInputError(
                f"matching has {len(perm)} entries but the true mask has {k_true} latent dimensions; "
                "pass the perm returned by match_latents(true_latents, learned_latents)."
            )
        if perm.max(initial=-1) >= k_learned:
            raise CellpertInputError(
                f"matching refers to learned dimension {perm.max()} but the learned mask has {k_learned}."
            )
    pred_bin = probs > threshold
    aligned = np.zeros_like(truth)
    ok = perm >= 0
    aligned[:, ok] = pred_bin[:, perm[ok]]
    tp = int((aligned & truth).sum())
    fp = int((aligned & ~truth).sum())
    fn = int((~aligned & truth).sum())
    if tp + fp + fn == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


# --------------------------------------------------------------------- block leakage
def block_leakage(z_true: Any, t_true: Any, z_hat: Any, t_hat: Any) -> dict[str, float]:
    """Linear R² between the shared (z) and target-specific (t) blocks (docs/models.md, *Identifiability metrics and ICA*).

    For the comparative models, each block should be explained by its own estimate and
    not by the other block's. Background cells have t = 0 by construction, so pass the
    target-condition cells only.

    Parameters
    ----------
    z_true, t_true
        True shared and salient latents, cells x d_z and cells x d_t.
    z_hat, t_hat
        Their estimates, same cells in the same order.

    Returns
    -------
    dict
        ``r2_z_from_z_hat`` and ``r2_t_from_t_hat`` (recovery; near 1 is good),
        ``r2_z_from_t_hat`` and ``r2_t_from_z_hat`` (leakage; near 0 is good), each from
        :func:`linear_r2`.
    """
    z, t = _as_2d(z_true, "z_true"), _as_2d(t_true, "t_true")
    zh, th = _as_2d(z_hat, "z_hat"), _as_2d(t_hat, "t_hat")
    _same_rows(z_true=z, t_true=t, z_hat=zh, t_hat=th)
    return {
        "r2_z_from_z_hat": linear_r2(z, zh),
        "r2_t_from_t_hat": linear_r2(t, th),
        "r2_z_from_t_hat": linear_r2(z, th),
        "r2_t_from_z_hat": linear_r2(t, zh),
    }
