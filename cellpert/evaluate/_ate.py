"""Average treatment effects, the two non-learned baselines and ATE metrics (docs/models.md, *Baselines: CPA-VAE and conditional VAE*, *ATE space and data ATE*).

Everything here is model independent: the data ATE is streamed over row chunks of the
count matrix (never densified as a whole), and the metrics compare any two genes x labels
ATE tables.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import r2_score

from cellpert._errors import CellpertInputError, CellpertWarning
from cellpert.data._layout import split_label
from cellpert.data._validate import DEFAULT_CHUNK_ROWS, iter_row_chunks

if TYPE_CHECKING:
    from cellpert.data import PerturbationScreen

__all__ = [
    "additive_baseline",
    "ate_from_counts",
    "ate_metrics",
    "data_ate",
    "interval_coverage",
    "mean_baseline",
    "noise_ceiling",
    "perturbseq_transform",
]

logger = logging.getLogger(__name__)

AteSpace = Literal["perturbseq", "mean"]

#: Target library size of the perturbseq normalisation.
PERTURBSEQ_SCALE = 1e4


# ------------------------------------------------------------------------ transform
def perturbseq_transform(counts_block: Any) -> np.ndarray | sp.csr_matrix:
    """The "perturbseq" normalisation y = log2(1e4 · x / Σ_g x + 1), row by row.

    Parameters
    ----------
    counts_block
        Cells x genes counts, dense or scipy sparse.

    Returns
    -------
    np.ndarray or scipy.sparse.csr_matrix
        float64 y of the same shape; sparse input gives CSR output with the same
        sparsity pattern (y = 0 where x = 0). Cells with library size 0 get y = 0.
    """
    if sp.issparse(counts_block):
        y = sp.csr_matrix(counts_block, dtype=np.float64, copy=True)
        lib = np.asarray(y.sum(axis=1)).ravel()
        scale = np.divide(PERTURBSEQ_SCALE, lib, out=np.zeros_like(lib), where=lib > 0)
        y.data = np.log1p(y.data * np.repeat(scale, np.diff(y.indptr))) / np.log(2.0)
        return y
    x = np.asarray(counts_block, dtype=np.float64)
    if x.ndim != 2:
        raise CellpertInputError(f"counts must be a cells x genes matrix, got shape {x.shape}.")
    lib = x.sum(axis=1)
    scale = np.divide(PERTURBSEQ_SCALE, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale[:, None]) / np.log(2.0)


def _to_space(block: Any, space: AteSpace) -> np.ndarray | sp.csr_matrix:
    if space == "perturbseq":
        return perturbseq_transform(block)
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float64)
    return np.asarray(block, dtype=np.float64)


def _resolve_cells(cells: Any, n: int) -> np.ndarray | None:
    """Sorted row indices from a boolean mask or index array (None = all rows)."""
    if cells is None:
        return None
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise CellpertInputError(
                f"the cell mask has length {arr.size} but the screen has {n} cells."
            )
        idx = np.flatnonzero(arr)
    elif np.issubdtype(arr.dtype, np.integer):
        idx = np.unique(arr.ravel())
        if idx.size and (idx[0] < 0 or idx[-1] >= n):
            raise CellpertInputError(f"cell indices must lie in [0, {n}); got {idx[0]}..{idx[-1]}.")
    else:
        raise CellpertInputError("cells must be a boolean mask or an array of integer row indices.")
    if idx.size == 0:
        raise CellpertInputError("the cell selection is empty; check the split.")
    return idx


# ------------------------------------------------------------------------- data ATE
def ate_from_counts(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    *,
    control: str | Sequence[str],
    space: AteSpace = "perturbseq",
    cells: np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    gene_names: Sequence[str] | pd.Index | None = None,
    standard_error: bool = False,
) -> pd.DataFrame:
    """ATE of every non-control label relative to control, streamed over row chunks.

    For each chunk the counts are transformed to the ATE space (dense or sparse, per
    chunk only) and per-label sums are accumulated with one sparse indicator-matrix
    product, so the cost is one pass over the matrix whatever the number of labels.

    Parameters
    ----------
    counts
        Cells x genes counts (scipy sparse, numpy, or a backed AnnData matrix).
    labels
        One label per cell (canonical: the same combination always spelled the same).
    control
        Label(s) of the control cells; all control cells form one group.
    space
        ``"perturbseq"``: y = log2(1e4 · x / ℓ + 1) (docs/models.md, *ATE space and data ATE*); ``"mean"``: raw counts.
    cells
        Boolean mask or integer indices of the cells to use (e.g. the training cells);
        default all.
    chunk_rows
        Rows per chunk.
    gene_names
        Index of the result; default ``0..G-1``.
    standard_error
        Also compute each entry's standard error, √(s²_t / n_t + s²_control / n_control)
        (one more sparse product per chunk), in ``attrs["standard_error"]``.

    Returns
    -------
    pd.DataFrame
        genes x labels (sorted non-control labels with at least one selected cell):
        mean y of the label's cells minus mean y of the control cells. ``attrs`` holds
        ``"n_cells"`` (dict label -> cells used), ``"n_control_cells"``, ``"space"`` and,
        with ``standard_error=True``, ``"standard_error"`` (a DataFrame like the result).

    Raises
    ------
    CellpertInputError
        When the selection has no control cells or no perturbed cells, or shapes
        disagree.
    """
    if space not in ("perturbseq", "mean"):
        raise CellpertInputError(f"space must be 'perturbseq' or 'mean', not {space!r}.")
    if int(chunk_rows) < 1:
        raise CellpertInputError(f"chunk_rows must be a positive integer, not {chunk_rows}.")
    n_cells, n_genes = counts.shape
    labels = np.asarray(labels, dtype=object).astype(str)
    if labels.shape != (n_cells,):
        raise CellpertInputError(
            f"there are {labels.size} labels for {n_cells} cells; pass one label per cell."
        )
    controls = [control] if isinstance(control, str) else [str(c) for c in control]
    if not controls:
        raise CellpertInputError("no control label given: ATEs are relative to control cells.")
    control_key = controls[0]
    labels = np.where(np.isin(labels, controls), control_key, labels)
    codes, groups = pd.factorize(labels, sort=True)
    n_groups = len(groups)
    rows = _resolve_cells(cells, n_cells)

    sums = np.zeros((n_groups, n_genes), dtype=np.float64)
    squares = np.zeros((n_groups, n_genes), dtype=np.float64) if standard_error else None
    n_per_group = np.zeros(n_groups, dtype=np.int64)
    for idx, block in iter_row_chunks(counts, chunk_rows=int(chunk_rows), rows=rows):
        y = _to_space(block, space)
        c = codes[idx]
        indicator = sp.csr_matrix(
            (np.ones(len(c)), (c, np.arange(len(c)))), shape=(n_groups, len(c))
        )
        part = indicator @ y
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
        if squares is not None:
            part = indicator @ (y.multiply(y) if sp.issparse(y) else y**2)
            squares += part.toarray() if sp.issparse(part) else np.asarray(part)
        n_per_group += np.bincount(c, minlength=n_groups)

    ctrl = int(np.flatnonzero(groups == control_key)[0]) if control_key in set(groups) else -1
    if ctrl < 0 or n_per_group[ctrl] == 0:
        raise CellpertInputError(
            f"no control cells ({', '.join(map(repr, controls))}) among the selected cells: "
            "effects relative to control cannot be computed; include control cells in the selection."
        )
    keep = (n_per_group > 0) & (np.arange(n_groups) != ctrl)
    if not keep.any():
        raise CellpertInputError(
            "no perturbed cells among the selected cells; check the selection."
        )
    means = sums / np.maximum(n_per_group, 1)[:, None]
    ate = (means[keep] - means[ctrl]).T
    index = pd.Index(gene_names if gene_names is not None else np.arange(n_genes), name="gene")
    if len(index) != n_genes:
        raise CellpertInputError(f"{len(index)} gene names for {n_genes} genes.")
    out = pd.DataFrame(ate, index=index, columns=pd.Index(list(groups[keep]), name="label"))
    out.attrs["n_cells"] = {
        str(g): int(k) for g, k in zip(groups[keep], n_per_group[keep], strict=True)
    }
    out.attrs["n_control_cells"] = int(n_per_group[ctrl])
    out.attrs["space"] = space
    if squares is not None:
        n = np.maximum(n_per_group, 1)[:, None].astype(np.float64)
        var = np.maximum(squares / n - means**2, 0.0) * n / np.maximum(n - 1, 1)
        se = np.sqrt(var[keep] / n[keep] + var[ctrl] / n[ctrl]).T
        out.attrs["standard_error"] = pd.DataFrame(se, index=index, columns=out.columns)
    logger.debug("ATE of %d labels from %d cells", int(keep.sum()), int(n_per_group.sum()))
    return out


def data_ate(
    screen: PerturbationScreen,
    *,
    space: AteSpace = "perturbseq",
    cells: np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    standard_error: bool = False,
) -> pd.DataFrame:
    """Data ATE of every perturbation label of a screen (docs/models.md, *ATE space and data ATE*).

    ATE_t = mean over cells with label t of y − mean over control cells of y, per gene,
    in the chosen space; streamed over row chunks (see :func:`ate_from_counts`).

    Parameters
    ----------
    screen
        From :func:`cellpert.data.load_screen`.
    space
        ``"perturbseq"`` (y = log2(1e4 · x / ℓ + 1)) or ``"mean"`` (raw counts).
    cells
        Boolean mask or integer indices restricting the cells used (e.g. the training
        split, to build baselines); default all cells. The selection must include
        control cells: a split whose test set holds only held-out combinations needs
        e.g. ``cells=(split == "test") | screen.is_control``.
    chunk_rows
        Rows per streamed chunk.
    standard_error
        Also compute the standard errors (see :func:`ate_from_counts`).

    Returns
    -------
    pd.DataFrame
        genes (``screen.gene_names``) x canonical non-control labels with at least one
        selected cell. ``attrs["n_cells"]`` maps each label to its number of cells,
        ``attrs["n_control_cells"]`` and ``attrs["space"]`` are set too (and
        ``attrs["standard_error"]`` on request).

    Raises
    ------
    CellpertInputError
        When the selected cells include no control or no perturbed cell.
    """
    return ate_from_counts(
        screen.counts,
        screen.labels,
        control=screen.control_labels,
        space=space,
        cells=cells,
        chunk_rows=chunk_rows,
        gene_names=screen.gene_names,
        standard_error=standard_error,
    )


# ------------------------------------------------------------------------ baselines
PartsOf = Callable[[str], Sequence[str]] | Mapping[str, Sequence[str]] | None


def _split_parts(label: str) -> list[str]:
    return [p for p in split_label(label) if p]


def _parts_function(parts_of: PartsOf) -> Callable[[str], list[str]]:
    if parts_of is None:
        return _split_parts
    if isinstance(parts_of, Mapping):
        return lambda label: list(parts_of[label]) if label in parts_of else _split_parts(label)
    return lambda label: list(parts_of(label))


def _check_ate_frame(frame: Any, name: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise CellpertInputError(
            f"{name} must be a genes x labels DataFrame (as returned by data_ate)."
        )
    return frame


def additive_baseline(
    train_ate: pd.DataFrame, labels: Sequence[str], parts_of: PartsOf = None
) -> pd.DataFrame:
    """Additive baseline: the effect of "A+B" is effect(A) + effect(B) (docs/models.md, *Baselines: CPA-VAE and conditional VAE*).

    Single effects are the training ATEs of the single-perturbation labels. A
    combination is always predicted as the sum of its parts' single effects, even when
    the combination itself is in ``train_ate``; a single seen in training is predicted by
    its own training effect.

    When a part P has no single-perturbation label in ``train_ate``, its effect is
    estimated from the training combinations that contain it and whose other parts all
    have single effects: the mean over those combinations C of
    ATE_C − Σ_{Q ∈ C, Q ≠ P} effect(Q). When no such combination exists, every label
    needing P is predicted as NaN and a :class:`~cellpert.CellpertWarning` names them
    (:func:`ate_metrics` leaves NaN predictions out of the overall figures).

    Parameters
    ----------
    train_ate
        genes x labels training ATEs (:func:`data_ate` on the training cells).
    labels
        Labels to predict (e.g. the held-out combinations). A label with no parts
        (control) is predicted as 0.
    parts_of
        Perturbations making up a label: a callable such as ``screen.label_parts``, a
        dict (labels it lacks are split on ``"+"``), or None to split on ``"+"``.

    Returns
    -------
    pd.DataFrame
        genes x ``labels`` predicted ATEs, same gene index as ``train_ate``.
    """
    train_ate = _check_ate_frame(train_ate, "train_ate")
    parts = _parts_function(parts_of)
    labels = [str(label) for label in labels]
    train_parts = {str(c): parts(str(c)) for c in train_ate.columns}
    single: dict[str, np.ndarray] = {}
    for col, ps in train_parts.items():
        if len(ps) == 1:
            single[ps[0]] = train_ate[col].to_numpy(dtype=np.float64)

    needed = sorted({p for label in labels for p in parts(label)} - set(single))
    effect = dict(single)
    unresolved = []
    for p in needed:
        estimates = [
            train_ate[col].to_numpy(dtype=np.float64) - sum(single[q] for q in ps if q != p)
            for col, ps in train_parts.items()
            if len(ps) > 1 and p in ps and all(q in single for q in ps if q != p)
        ]
        if estimates:
            effect[p] = np.mean(estimates, axis=0)
            logger.info(
                "additive baseline: effect of %s estimated from %d combination(s)",
                p,
                len(estimates),
            )
        else:
            unresolved.append(p)

    n_genes = train_ate.shape[0]
    out = np.zeros((n_genes, len(labels)))
    missing_labels = []
    for j, label in enumerate(labels):
        ps = parts(label)
        if any(p not in effect for p in ps):
            out[:, j] = np.nan
            missing_labels.append(label)
            continue
        for p in ps:
            out[:, j] += effect[p]
    if missing_labels:
        warnings.warn(
            f"additive baseline: no training effect for {', '.join(unresolved[:5])}"
            f"{' and more' if len(unresolved) > 5 else ''} (neither as a single nor inferable "
            f"from training combinations); {len(missing_labels)} label(s) predicted as NaN "
            f"(e.g. {', '.join(missing_labels[:3])}).",
            CellpertWarning,
            stacklevel=2,
        )
    return pd.DataFrame(out, index=train_ate.index, columns=pd.Index(labels, name="label"))


def mean_baseline(train_ate: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Mean baseline: every label predicted as the mean training effect (docs/models.md, *Baselines: CPA-VAE and conditional VAE*).

    Parameters
    ----------
    train_ate
        genes x labels training ATEs; the mean is taken over all its columns (every
        training perturbation label, singles and combinations; NaN entries skipped).
    labels
        Labels to predict.

    Returns
    -------
    pd.DataFrame
        genes x ``labels``, every column equal to the row-wise mean of ``train_ate``.
    """
    train_ate = _check_ate_frame(train_ate, "train_ate")
    if train_ate.shape[1] == 0:
        raise CellpertInputError("train_ate has no labels: there is no training effect to average.")
    mean = train_ate.to_numpy(dtype=np.float64)
    mean = np.nanmean(mean, axis=1) if np.isnan(mean).any() else mean.mean(axis=1)
    labels = [str(label) for label in labels]
    out = np.repeat(mean[:, None], len(labels), axis=1)
    return pd.DataFrame(out, index=train_ate.index, columns=pd.Index(labels, name="label"))


# -------------------------------------------------------------------------- metrics
def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns; NaN where either column is constant."""
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    na = np.sqrt((ac**2).sum(axis=0))
    nb = np.sqrt((bc**2).sum(axis=0))
    den = na * nb
    scale_a = np.maximum(np.abs(a).max(axis=0), 1e-300)
    scale_b = np.maximum(np.abs(b).max(axis=0), 1e-300)
    const = (np.ptp(a, axis=0) <= 1e-12 * scale_a) | (np.ptp(b, axis=0) <= 1e-12 * scale_b)
    r = np.full(a.shape[1], np.nan)
    ok = ~const & (den > 0)
    r[ok] = np.clip((ac[:, ok] * bc[:, ok]).sum(axis=0) / den[ok], -1.0, 1.0)
    return r


def _r2_columns(data: np.ndarray, model: np.ndarray) -> np.ndarray:
    """R² = 1 − SS_res / SS_tot of matching columns; NaN where data is constant."""
    ss_res = ((data - model) ** 2).sum(axis=0)
    dc = data - data.mean(axis=0)
    ss_tot = (dc**2).sum(axis=0)
    r2 = np.full(data.shape[1], np.nan)
    ok = ss_tot > 0
    r2[ok] = 1.0 - ss_res[ok] / ss_tot[ok]
    return r2


def _overall(data: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    if data.size < 2:
        return float("nan"), float("nan")
    r = float(_pearson_columns(data[:, None], model[:, None])[0])
    return r, float(r2_score(data, model))


def ate_metrics(
    data_ate: pd.DataFrame, pred_ate: pd.DataFrame, *, top_n: int = 20
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Pearson r and R² between data and predicted ATEs (docs/models.md, *ATE space and data ATE*).

    Overall figures use the flattened perturbations x genes matrix (R² is
    ``sklearn.metrics.r2_score(data, model)`` on it, so all-zero genes are harmless);
    the "top" versions use, for each perturbation, the ``top_n`` genes with the largest
    \\|data ATE\\| (ties broken by gene order), flattened across perturbations. Per-
    perturbation values are computed on each column; they are NaN where a vector is
    constant. Predicted columns holding NaN (e.g. an additive baseline that could not
    predict a label) get NaN per-perturbation values and are left out of the overall
    figures, with a :class:`~cellpert.CellpertWarning`.

    Parameters
    ----------
    data_ate
        genes x labels data ATEs (:func:`data_ate`, e.g. on the test cells); its labels
        are the perturbations evaluated.
    pred_ate
        genes x labels predicted ATEs; must contain every label and gene of
        ``data_ate`` (extra ones are ignored).
    top_n
        Genes per perturbation of the "top" metrics (the SAMS-VAE paper uses 20).

    Returns
    -------
    per_perturbation : pd.DataFrame
        One row per label: ``pearson``, ``r2``, ``pearson_top``, ``r2_top``, ``n_cells``
        (from ``data_ate.attrs["n_cells"]``; NaN when unknown).
    summary : dict
        ``pearson``, ``r2``, ``pearson_top``, ``r2_top`` (overall), ``top_n`` (genes
        actually used per perturbation), ``n_perturbations`` (used in the overall
        figures), ``n_excluded`` (labels left out for NaN predictions) and ``n_genes``.

    Raises
    ------
    CellpertInputError
        When ``pred_ate`` lacks labels or genes of ``data_ate``, ``data_ate`` holds NaN,
        or ``top_n`` < 1.
    """
    data_ate = _check_ate_frame(data_ate, "data_ate")
    pred_ate = _check_ate_frame(pred_ate, "pred_ate")
    if int(top_n) < 1:
        raise CellpertInputError(f"top_n must be at least 1, not {top_n}.")
    labels = list(data_ate.columns)
    missing = [c for c in labels if c not in pred_ate.columns]
    if missing:
        raise CellpertInputError(
            f"the prediction has no column for {len(missing)} label(s) of the data ATE "
            f"(e.g. {', '.join(map(str, missing[:3]))}); predict every evaluated label."
        )
    missing_genes = data_ate.index.difference(pred_ate.index)
    if len(missing_genes):
        raise CellpertInputError(
            f"the prediction lacks {len(missing_genes)} gene(s) of the data ATE "
            f"(e.g. {', '.join(map(str, missing_genes[:3]))}); use the same genes."
        )
    data = data_ate.to_numpy(dtype=np.float64)
    pred = pred_ate.loc[data_ate.index, labels].to_numpy(dtype=np.float64)
    if np.isnan(data).any():
        raise CellpertInputError("the data ATE contains NaN; recompute it with data_ate().")
    n_genes = data.shape[0]
    n = min(int(top_n), n_genes)

    valid = ~np.isnan(pred).any(axis=0)
    if not valid.all():
        warnings.warn(
            f"{int((~valid).sum())} predicted label(s) contain NaN (e.g. "
            f"{', '.join(str(labels[j]) for j in np.flatnonzero(~valid)[:3])}); they are left "
            "out of the overall metrics.",
            CellpertWarning,
            stacklevel=2,
        )

    # per perturbation, all genes
    pearson = _pearson_columns(data, pred)
    r2 = _r2_columns(data, pred)
    # per perturbation, top-n genes by |data ATE|
    top = np.argsort(-np.abs(data), axis=0, kind="stable")[:n]
    data_top = np.take_along_axis(data, top, axis=0)
    pred_top = np.take_along_axis(pred, top, axis=0)
    pearson_top = _pearson_columns(data_top, pred_top)
    r2_top = _r2_columns(data_top, pred_top)
    for arr in (pearson, r2, pearson_top, r2_top):
        arr[~valid] = np.nan

    n_cells_map = data_ate.attrs.get("n_cells", {}) or {}
    per = pd.DataFrame(
        {
            "pearson": pearson,
            "r2": r2,
            "pearson_top": pearson_top,
            "r2_top": r2_top,
            "n_cells": [float(n_cells_map.get(str(c), np.nan)) for c in labels],
        },
        index=pd.Index(labels, name="label"),
    )

    r_all, r2_all = _overall(data[:, valid].ravel(), pred[:, valid].ravel())
    r_top, r2_t = _overall(data_top[:, valid].ravel(), pred_top[:, valid].ravel())
    summary = {
        "pearson": r_all,
        "r2": r2_all,
        "pearson_top": r_top,
        "r2_top": r2_t,
        "top_n": n,
        "n_perturbations": int(valid.sum()),
        "n_excluded": int((~valid).sum()),
        "n_genes": n_genes,
    }
    return per, summary


# -------------------------------------------------------------------- noise ceiling
def _half_masks(codes: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``rows``, balanced within each group of ``codes``."""
    a = np.zeros(codes.shape[0], dtype=bool)
    b = np.zeros(codes.shape[0], dtype=bool)
    for g in np.unique(codes[rows]):
        members = rng.permutation(rows[codes[rows] == g])
        half = len(members) // 2
        a[members[:half]] = True
        b[members[half : 2 * half]] = True
    return a, b


def _top_r(first: np.ndarray, second: np.ndarray, n: int) -> float:
    """Pearson r of ``second`` vs ``first`` on each column's ``n`` largest |first| genes, flattened."""
    top = np.argsort(-np.abs(first), axis=0, kind="stable")[:n]
    return _overall(np.take_along_axis(first, top, 0).ravel(), np.take_along_axis(second, top, 0).ravel())[0]


def noise_ceiling(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    *,
    control: str | Sequence[str],
    cells: np.ndarray,
    evaluated: Sequence[str] | None = None,
    top_n: int = 20,
    n_repeats: int = 3,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ate: Callable[[np.ndarray], pd.DataFrame] | None = None,
) -> dict[str, float]:
    """How well a perfect predictor could agree with the data ATE of a set of cells.

    The selected cells of each label (and the control cells) are split into two random
    halves; ``r_half`` is the Pearson r between the two halves' ATEs on all genes
    (flattened over labels), averaged over ``n_repeats`` random splits. By the
    Spearman–Brown formula the full set's ATE has reliability ``ρ = 2 r_half / (1 +
    r_half)``, and the true effect's expected r against it is ``√ρ``: the ceiling.
    The top-N version chooses each label's genes on one half and correlates with the
    other (both ways), so that the selection does not inflate the figure.

    Parameters
    ----------
    counts, labels, control
        As :func:`ate_from_counts`.
    cells
        Boolean mask (or indices) of the cells whose ATE is the target (controls included).
    evaluated
        Labels to use (default: every non-control label with cells in both halves).
    top_n
        Genes per label of the top-N figure.
    n_repeats
        Random half splits averaged.
    seed
        Seeds the half splits.
    chunk_rows
        Rows per streamed chunk.
    ate
        The data ATE of a boolean mask of cells (default: :func:`ate_from_counts` of
        ``counts``), e.g. one pooled within the levels of a covariate, so that the
        ceiling is that of the target actually scored.

    Returns
    -------
    dict
        ``reliability`` (ρ), ``pearson`` (√ρ, the ceiling of the all-gene r),
        ``reliability_top``, ``pearson_top``, ``r_half``, ``r_half_top``, ``n_repeats``.
        NaN where a label has fewer than 2 cells in the selection.
    """
    n_cells = counts.shape[0]
    labels = np.asarray(labels, dtype=object).astype(str)
    rows = _resolve_cells(cells, n_cells)
    controls = [control] if isinstance(control, str) else [str(c) for c in control]
    codes = pd.factorize(np.where(np.isin(labels, controls), controls[0], labels))[0]
    rng = np.random.default_rng(seed)
    r_all, r_top = [], []
    for _ in range(int(n_repeats)):
        a, b = _half_masks(codes, rows, rng)
        try:
            if ate is None:
                ate_a = ate_from_counts(counts, labels, control=controls, cells=a, chunk_rows=chunk_rows)
                ate_b = ate_from_counts(counts, labels, control=controls, cells=b, chunk_rows=chunk_rows)
            else:
                ate_a, ate_b = ate(a), ate(b)
        except CellpertInputError:
            break
        common = [c for c in ate_a.columns if c in set(ate_b.columns)]
        if evaluated is not None:
            common = [c for c in common if c in set(map(str, evaluated))]
        if not common:
            break
        first, second = ate_a[common].to_numpy(), ate_b[common].to_numpy()
        r_all.append(_overall(first.ravel(), second.ravel())[0])
        n = min(int(top_n), first.shape[0])
        r_top.append(0.5 * (_top_r(first, second, n) + _top_r(second, first, n)))

    def ceiling(values: list[float]) -> tuple[float, float, float]:
        if not values or not np.isfinite(values).all():
            return float("nan"), float("nan"), float("nan")
        r = float(np.mean(values))
        rho = 2 * r / (1 + r) if r > -1 else float("nan")
        return r, rho, float(np.sqrt(max(rho, 0.0)))

    r, rho, top_r = ceiling(r_all)
    r_t, rho_t, top_t = ceiling(r_top)
    return {
        "r_half": r, "reliability": rho, "pearson": top_r,
        "r_half_top": r_t, "reliability_top": rho_t, "pearson_top": top_t,
        "n_repeats": len(r_all),
    }  # fmt: skip


def interval_coverage(truth: pd.DataFrame, lo: pd.DataFrame, hi: pd.DataFrame) -> dict[str, Any]:
    """How often intervals cover the true effects (genes x labels tables, aligned by name).

    Parameters
    ----------
    truth
        True ATEs (e.g. :func:`cellpert.data.simulate.sams_true_ate`).
    lo, hi
        Interval ends of a model's ATE (:class:`cellpert.evaluate.ModelATE`).

    Returns
    -------
    dict
        ``coverage`` (fraction of (gene, label) pairs with lo ≤ truth ≤ hi),
        ``per_label`` (Series), ``mean_width`` and ``n``.
    """
    truth = _check_ate_frame(truth, "truth")
    labels = [c for c in truth.columns if c in lo.columns]
    genes = truth.index.intersection(lo.index)
    if not labels or not len(genes):
        raise CellpertInputError("the truth and the intervals share no label or gene; align their names.")
    t = truth.loc[genes, labels].to_numpy(dtype=np.float64)
    a = lo.loc[genes, labels].to_numpy(dtype=np.float64)
    b = hi.loc[genes, labels].to_numpy(dtype=np.float64)
    inside = (a <= t) & (t <= b)
    return {
        "coverage": float(inside.mean()),
        "per_label": pd.Series(inside.mean(axis=0), index=pd.Index(labels, name="label")),
        "mean_width": float((b - a).mean()),
        "n": int(inside.size),
    }
