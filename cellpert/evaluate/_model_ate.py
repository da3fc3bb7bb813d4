"""Model average treatment effects from posterior predictive particles (docs/models.md, *ATE space and data ATE*).

Works with any model exposing the prediction protocol of the cellpert models
(SAMS-VAE family now, sVAE later):

- ``model.perturbation_names``: the columns of the dosage matrix D;
- ``model.dosage_from_labels(labels, control=...)``: (R, T) dosage rows for labels;
- ``model.get_predictive_means(dosage, *, n_samples, library_size, transform, seed,
  chunk_size)``: (R, G) mean over ``n_samples`` posterior predictive particles of the
  transformed counts, with ``library_size`` a scalar or one value per row.

The model ATE of label t is the predictive mean of t's row minus that of the control
row, computed for all labels at once (one vectorised call per group of particles and
block of labels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from cellpert._errors import CellpertInputError
from cellpert.data import split_label

__all__ = [
    "ModelATE", "calibrate_interval", "combine_with_average", "counterfactual_ate", "model_ate", "posterior_ate",
    "posterior_interval",
]  # fmt: skip

logger = logging.getLogger(__name__)

LibrarySize = Literal["fixed", "empirical"]
#: Default ℓ of the "fixed" library size (docs/models.md, *ATE space and data ATE*).
FIXED_LIBRARY_SIZE = 1e4
#: ATE space -> ``get_predictive_means`` transform.
_TRANSFORMS = {"perturbseq": "perturbseq", "mean": "counts"}


@dataclass
class ModelATE:
    """A model's ATEs with their Monte Carlo intervals (genes x labels DataFrames)."""

    ate: pd.DataFrame
    """genes x labels: mean over all particles of the label's row minus the control row."""
    lo: pd.DataFrame
    """Lower end of the per-gene interval (see :func:`model_ate`)."""
    hi: pd.DataFrame
    """Upper end of the per-gene interval."""
    config: dict[str, Any] = field(default_factory=dict)
    """How it was computed (particles, groups, library size, seed, ...)."""
    per_level: dict[str, ModelATE] = field(default_factory=dict)
    """The ATE within each level of a covariate (counterfactual estimator with
    ``cell_levels``; empty otherwise); ``ate`` then pools them."""


#: Cells the posterior estimator decodes per group (a label's training cells, the controls).
DEFAULT_MAX_CELLS = 1000


def _group_seeds(seed: int, n: int) -> list[int]:
    """Independent 31-bit seeds derived from ``seed`` (one per group and label block)."""
    state = np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)
    return [int(s) & 0x7FFFFFFF for s in state]


def _check_labels(labels: Sequence[str], control: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """The labels to predict (non-empty, distinct, no control) and the control labels."""
    labels = [str(label) for label in labels]
    controls = [control] if isinstance(control, str) else [str(c) for c in control]
    if not labels:
        raise CellpertInputError("no labels to predict; give at least one perturbation label.")
    if len(set(labels)) != len(labels):
        raise CellpertInputError("the labels to predict contain duplicates; give each label once.")
    bad = [label for label in labels if label in controls]
    if bad:
        raise CellpertInputError(f"{bad[0]!r} is a control label; the ATE of control is 0 by definition.")
    return labels, controls


def _library_sizes(
    library_size: LibrarySize | float, control_library_sizes: np.ndarray | None
) -> tuple[float | None, np.ndarray | None]:
    """``(fixed ℓ, None)`` for ``"fixed"`` or a number; ``(None, pool)`` for ``"empirical"``,
    the control cells' positive library sizes to draw from."""
    empirical = isinstance(library_size, str) and library_size == "empirical"
    if isinstance(library_size, str) and not empirical and library_size != "fixed":
        raise CellpertInputError(f"library_size must be 'fixed', 'empirical' or a number, not {library_size!r}.")
    if not empirical:
        fixed_value = FIXED_LIBRARY_SIZE if library_size == "fixed" else float(library_size)
        if not fixed_value > 0:
            raise CellpertInputError(f"the library size must be positive, not {library_size}.")
        return fixed_value, None
    if control_library_sizes is None:
        raise CellpertInputError(
            "library_size='empirical' needs the control cells' library sizes (control_library_sizes)."
        )
    pool = np.asarray(control_library_sizes, dtype=np.float64).ravel()
    pool = pool[np.isfinite(pool) & (pool > 0)]
    if pool.size == 0:
        raise CellpertInputError("no control cell with a positive library size to sample from.")
    return None, pool


def model_ate(
    model: Any,
    labels: Sequence[str],
    *,
    control: str | Sequence[str] = "control",
    n_particles: int = 2500,
    n_groups: int = 50,
    library_size: LibrarySize | float = "fixed",
    control_library_sizes: np.ndarray | None = None,
    space: Literal["perturbseq", "mean"] = "perturbseq",
    interval: float = 0.9,
    seed: int = 0,
    max_rows: int = 512,
    chunk_size: int | None = None,
    gene_names: Sequence[str] | pd.Index | None = None,
) -> ModelATE:
    """Model ATE of every label relative to control, with a per-gene Monte Carlo interval.

    The ``n_particles`` particles are split into ``n_groups`` groups of (nearly) equal
    size. Each group is one call of ``model.get_predictive_means`` on the rows
    ``[control, label_1, ..., label_R]`` (at most ``max_rows`` labels per call; every
    block of labels carries its own control row) with its own seed, and gives one ATE
    estimate per label and gene: ``mean_t - mean_control`` over that group's particles
    (each particle: fresh (E, M) from q, fresh z^b ~ N(0, I) per row, NB counts,
    transform). The reported ATE is the particle-weighted mean of the group estimates,
    i.e. the mean over all ``n_particles`` particles (docs/models.md, *ATE space and data ATE*).

    **What the interval measures.** ``lo`` / ``hi`` form a batch-means Monte Carlo
    confidence interval of level ``interval`` for the reported ATE:
    ``ate ± t_{(1+interval)/2, n_groups-1} · sd_groups / sqrt(n_groups)``, where
    ``sd_groups`` is the standard deviation of the group estimates across groups. It says
    how precisely ``n_particles`` particles pin down the model's predictive ATE (the value
    at infinitely many particles), so that differences smaller than it are Monte Carlo
    noise. It is *not* a posterior credible interval of the effect: every particle draws
    fresh globals (E, M) from q, so the posterior's uncertainty is averaged into the
    predictive mean rather than spread into the interval. With
    ``library_size="empirical"`` the interval also covers the variation due to the
    sampled library sizes. Only sums and sums of squares over groups are kept (memory
    ``O(labels x genes)`` whatever ``n_groups``).

    Parameters
    ----------
    model
        A trained model with the prediction protocol (module docstring).
    labels
        Labels to predict (``"A"``, ``"A+B"``); control labels are not allowed.
    control
        Control label(s), passed to ``model.dosage_from_labels``.
    n_particles
        Posterior predictive particles S (paper: 2,500).
    n_groups
        Groups of particles for the interval (at least 2, at most ``n_particles``).
    library_size
        ``"fixed"``: ℓ = 1e4 for every row (docs/models.md, *ATE space and data ATE*); a number: that fixed ℓ;
        ``"empirical"``: for every group and every row, ℓ is drawn (with replacement)
        from ``control_library_sizes`` — the observed library sizes of the control
        cells — so the predicted expression has the data's count depth (the
        perturbseq transform removes the depth from the mean but not its sparsity).
    control_library_sizes
        Observed control-cell library sizes (needed for ``"empirical"``).
    space
        ``"perturbseq"`` (y = log2(1e4 x / Σ_g x + 1)) or ``"mean"`` (raw counts,
        meaningful with ``"empirical"`` library sizes).
    interval
        Level of the interval, in (0, 1).
    seed
        Seeds every draw; the same seed gives the same result.
    max_rows
        Labels per vectorised call (bounds memory for very many labels).
    chunk_size
        Particles per vectorised chunk inside a call (default: the model's).
    gene_names
        Index of the results (default ``0..G-1``).

    Returns
    -------
    ModelATE
        ``ate``, ``lo``, ``hi`` (genes x labels, float64) and ``config``.

    Raises
    ------
    CellpertInputError
        For an empty label list, a control label among the labels, unknown
        perturbations, or invalid options.
    """
    labels, controls = _check_labels(labels, control)
    n_particles = int(n_particles)
    n_groups = int(n_groups)
    if n_particles < 2:
        raise CellpertInputError(f"n_particles must be at least 2, not {n_particles}.")
    if not 2 <= n_groups <= n_particles:
        raise CellpertInputError(f"n_groups must be between 2 and n_particles ({n_particles}), not {n_groups}.")
    if not 0.0 < float(interval) < 1.0:
        raise CellpertInputError(f"interval must lie in (0, 1), e.g. 0.9, not {interval}.")
    if space not in _TRANSFORMS:
        raise CellpertInputError(f"space must be 'perturbseq' or 'mean', not {space!r}.")
    if int(max_rows) < 1:
        raise CellpertInputError(f"max_rows must be a positive integer, not {max_rows}.")

    fixed_value, pool = _library_sizes(library_size, control_library_sizes)
    empirical = pool is not None

    dosage = np.asarray(model.dosage_from_labels(labels, control=controls), dtype=np.float32)
    control_row = np.zeros((1, dosage.shape[1]), dtype=np.float32)
    sizes = np.full(n_groups, n_particles // n_groups)
    sizes[: n_particles % n_groups] += 1
    blocks = [np.arange(s, min(s + int(max_rows), len(labels))) for s in range(0, len(labels), int(max_rows))]
    seeds = _group_seeds(seed, n_groups * len(blocks) + 1)
    lib_rng = np.random.default_rng(seeds[-1])
    transform = _TRANSFORMS[space]

    total = None  # Σ_g n_g · ate_g
    total_sq = None  # Σ_g ate_g²  (unweighted, for the spread across groups)
    total_plain = None  # Σ_g ate_g
    for g, n_g in enumerate(sizes):
        for b, rows in enumerate(blocks):
            block = np.vstack([control_row, dosage[rows]])
            lib: float | np.ndarray
            lib = lib_rng.choice(pool, size=len(block), replace=True) if pool is not None else fixed_value
            means = np.asarray(
                model.get_predictive_means(
                    block,
                    n_samples=int(n_g),
                    library_size=lib,
                    transform=transform,
                    seed=seeds[g * len(blocks) + b],
                    chunk_size=chunk_size,
                ),
                dtype=np.float64,
            )
            est = (means[1:] - means[0]).T  # genes x block labels
            if total is None:
                n_genes = est.shape[0]
                total = np.zeros((n_genes, len(labels)))
                total_sq = np.zeros((n_genes, len(labels)))
                total_plain = np.zeros((n_genes, len(labels)))
            total[:, rows] += n_g * est
            total_plain[:, rows] += est
            total_sq[:, rows] += est**2
        logger.debug("model ATE: group %d/%d done", g + 1, n_groups)

    ate = total / n_particles
    mean_g = total_plain / n_groups
    var_g = np.maximum(total_sq - n_groups * mean_g**2, 0.0) / (n_groups - 1)
    half = float(stats.t.ppf(0.5 + float(interval) / 2.0, n_groups - 1)) * np.sqrt(var_g / n_groups)
    index = pd.Index(gene_names if gene_names is not None else np.arange(ate.shape[0]), name="gene")
    if len(index) != ate.shape[0]:
        raise CellpertInputError(f"{len(index)} gene names for a model with {ate.shape[0]} genes.")
    columns = pd.Index(labels, name="label")
    config = {
        "n_particles": n_particles,
        "n_groups": n_groups,
        "library_size": "empirical" if empirical else float(fixed_value),
        "space": space,
        "interval": float(interval),
        "interval_kind": "batch-means Monte Carlo confidence interval of the ATE",
        "seed": int(seed),
    }
    if pool is not None:
        config["control_library_median"] = float(np.median(pool))
    logger.info(
        "model ATE of %d labels from %d particles in %d groups (max half-width %.3g)",
        len(labels),
        n_particles,
        n_groups,
        float(np.max(half)) if half.size else math.nan,
    )
    return ModelATE(
        ate=pd.DataFrame(ate, index=index, columns=columns),
        lo=pd.DataFrame(ate - half, index=index, columns=columns),
        hi=pd.DataFrame(ate + half, index=index, columns=columns),
        config=config,
    )


def posterior_interval(
    draws: np.ndarray, mc_var: np.ndarray | None = None, *, interval: float = 0.9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean and interval of an effect from its values under draws of the globals.

    ``draws`` (P, ...) holds one estimate per draw of the global latents, each averaged
    over local particles (cells). Its spread across draws is the posterior spread plus
    the Monte Carlo error of each draw's average; with ``mc_var`` (that error's variance
    per draw) the deviations from the mean are shrunk by ``sqrt(1 − mean(mc_var) / s²)``
    (s² the variance across draws) before the quantiles are read, so that the interval
    does not widen with fewer local particles.

    Returns
    -------
    mean, lo, hi with the shape of ``draws[0]``.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.shape[0] < 2:
        raise CellpertInputError("a posterior interval needs at least 2 draws of the global latents.")
    mean = draws.mean(0)
    alpha = (1.0 - float(interval)) / 2.0
    q_lo, q_hi = np.quantile(draws, [alpha, 1.0 - alpha], axis=0)
    if mc_var is not None:
        total = draws.var(0, ddof=1)
        noise = np.asarray(mc_var, dtype=np.float64).mean(0)
        factor = np.sqrt(np.clip(1.0 - np.divide(noise, total, out=np.ones_like(total), where=total > 0), 0.0, 1.0))
        q_lo = mean + factor * (q_lo - mean)
        q_hi = mean + factor * (q_hi - mean)
    return mean, q_lo, q_hi


def counterfactual_ate(
    model: Any,
    labels: Sequence[str],
    *,
    control: str | Sequence[str] = "control",
    cells: Sequence[int],
    n_draws: int = 100,
    transform: Literal["perturbseq", "rho"] = "perturbseq",
    basal: Literal["sample", "mean"] = "sample",
    interval: float = 0.9,
    seed: int = 0,
    gene_names: Sequence[str] | pd.Index | None = None,
    cell_levels: Sequence[str] | None = None,
    weights: pd.Series | None = None,
    latent_shift: Literal["empirical", "model"] = "empirical",
    label_cells: Mapping[str, Sequence[int]] | None = None,
    label_cell_levels: Mapping[str, Sequence[str]] | None = None,
) -> ModelATE:
    """Counterfactual model ATE on real control cells, with a posterior interval.

    cellpert's default estimator (docs/models.md, *ATE space and data ATE*): the control cells
    ``cells`` (e.g. the training split's) are encoded, each perturbation's latent shift is
    applied, and every cell is decoded at its own library size; counts are sampled and put
    in the perturbseq space, so the prediction is in the same space and at the same depth
    as the data ATE it is compared with. The effect is the mean over cells of the
    difference to the same cells decoded as controls, averaged over ``n_draws`` draws of
    the global latents (E, M) from q.

    **The latent shift** (``latent_shift``). ``"empirical"`` (default): each label's shift
    is measured where its training cells lie in the model's latent space, the mean of
    their posterior positions minus the training control cells'
    (:meth:`~cellpert.models._base.CounterfactualMixin.get_empirical_shifts`; a label
    without training cells, e.g. a held-out combination, gets the sum of its parts').
    ``"model"``: the model's own shift, ``D_r (E ⊙ M)`` under draws of the global latents
    (SAMS-VAE / CPA-VAE / sVAE; the conditional VAE decodes the dosage). The model's
    shift can miss part of where a label's cells lie (the encoder then puts the rest
    into their basal states), which shrinks every effect: on the SAMS simulator the
    slope of the ATE on the truth is 0.85 with the model's shift and 0.96 with the
    empirical one (benchmarks/RESULTS_ate.md).

    **The interval**: quantiles over the draws of the cell-averaged effect
    (:func:`posterior_interval`, Monte Carlo error removed). With the empirical shift
    the draws are a bootstrap of the labels' and the controls' mean positions: the
    interval includes the uncertainty of which cells were observed (their sampling),
    not that of the network weights (point estimates). With the model's shift the draws
    are of the global latents (E, M): the interval includes their posterior
    uncertainty only (the conditional VAE has none: width 0).

    Parameters
    ----------
    model
        A trained model with ``dosage_from_labels`` and ``get_counterfactual_effects``.
    labels
        Labels to predict.
    control
        Control label(s).
    cells
        Row indices (in the model's AnnData) of the control cells to encode.
    n_draws
        Draws of the global latents (at least 2).
    transform
        ``"perturbseq"`` (sampled counts, the data's space) or ``"rho"``
        (``log2(1e4 ρ + 1)``, the noise-free normalised mean).
    basal
        ``"sample"`` (z^b drawn from q) or ``"mean"`` (its mean).
    interval
        Level of the posterior interval.
    seed
        Seeds every draw.
    gene_names
        Index of the results.
    latent_shift
        ``"empirical"`` or ``"model"`` (see above).
    label_cells
        For the empirical shift: row indices of each label's training cells (the labels
        and, for combinations without cells, their parts). None: ``"model"`` is used.
    label_cell_levels
        With ``cell_levels`` and the empirical shift: the level of each of
        ``label_cells[label]`` (same keys, same order). Each level's shifts are then
        measured within the level (its cells of the label against its control cells),
        so that a label whose cells are spread over the levels unlike the controls does
        not carry that difference of composition into its effect; a label with fewer
        than 2 cells in a level uses its shift over all levels there. None: one shift
        over all levels.
    cell_levels, weights
        By level of a covariate (docs/models.md, *Covariates*): the level of each of
        ``cells`` and the weight of each level (:func:`cellpert.evaluate.level_weights`).
        The ATE within level ℓ uses ℓ's control cells (each keeps its own covariates);
        ``ate`` is the weighted mean over levels, computed per draw of the global latents
        (the draws are the same in every level), so the interval is that of the pooled
        effect. Per-level results are in ``per_level``.

    Returns
    -------
    ModelATE
    """
    labels, controls = _check_labels(labels, control)
    if int(n_draws) < 2:
        raise CellpertInputError(f"n_draws must be at least 2, not {n_draws}.")
    if not 0.0 < float(interval) < 1.0:
        raise CellpertInputError(f"interval must lie in (0, 1), e.g. 0.9, not {interval}.")
    if transform not in ("perturbseq", "rho"):
        raise CellpertInputError(f"transform must be 'perturbseq' or 'rho', not {transform!r}.")
    if not hasattr(model, "get_counterfactual_effects"):
        raise CellpertInputError(
            f"{type(model).__name__} has no counterfactual estimator; use estimator='prior'."
        )
    if latent_shift not in ("empirical", "model"):
        raise CellpertInputError(f"latent_shift must be 'empirical' or 'model', not {latent_shift!r}.")
    dosage = np.asarray(model.dosage_from_labels(labels, control=controls), dtype=np.float32)
    cells = np.asarray(cells, dtype=np.int64)
    shifts = None
    if latent_shift == "empirical" and (label_cells is None or not hasattr(model, "get_empirical_shifts")):
        logger.warning("no training cells per label (or %s has no latent positions): using the model's latent shift",
                       type(model).__name__)  # fmt: skip
        latent_shift = "model"
    if latent_shift == "empirical":
        groups = [_shift_groups(label, label_cells) for label in labels]
        measured = model.get_empirical_shifts(groups, control_cells=cells, dosage=dosage, n_draws=int(n_draws), seed=seed)
        shifts = measured["draws"]
    within_level = latent_shift == "empirical" and cell_levels is not None and label_cell_levels is not None

    def level_shifts(level: str, controls: np.ndarray) -> np.ndarray:
        """The empirical shifts measured within one level; a group with fewer than 2 cells
        there keeps the shift over all levels."""
        in_level = {
            lab: np.asarray(rows, dtype=np.int64)[np.asarray(label_cell_levels[lab]).astype(str) == level]
            for lab, rows in label_cells.items()
        }
        local = [_shift_groups(label, in_level) for label in labels]
        usable = [bool(g) and all(len(c) >= 2 for c in g) for g in local]
        local = [g if ok else [] for g, ok in zip(local, usable, strict=True)]
        got = model.get_empirical_shifts(local, control_cells=controls, dosage=None, n_draws=int(n_draws), seed=seed)
        out = got["draws"].copy()
        missing = ~np.asarray(usable)
        out[:, missing] = shifts[:, missing]
        return out

    def effects(indices: np.ndarray, level: str | None = None) -> dict[str, Any]:
        # the same seed in every level: the same draws of the global latents
        use = level_shifts(level, indices) if within_level and level is not None and len(indices) >= 2 else shifts
        return model.get_counterfactual_effects(
            dosage, indices=indices, n_draws=int(n_draws), transform=transform, basal=basal, seed=seed, shifts=use,
        )  # fmt: skip

    columns = pd.Index(labels, name="label")

    def frames(out: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        draws = np.swapaxes(out["effects"], 1, 2)  # (P, G, R)
        return posterior_interval(draws, np.swapaxes(out["mc_var"], 1, 2), interval=interval)

    per_level: dict[str, ModelATE] = {}
    if cell_levels is None:
        out = effects(cells)
    else:
        cell_levels = np.asarray(cell_levels, dtype=object).astype(str)
        if cell_levels.shape != cells.shape:
            raise CellpertInputError(f"cell_levels has {cell_levels.size} values for {cells.size} cells.")
        if weights is None:
            raise CellpertInputError("cell_levels needs the level weights (cellpert.evaluate.level_weights).")
        outs = {
            str(lvl): effects(cells[cell_levels == str(lvl)], str(lvl))
            for lvl in weights.index[weights > 0]
            if (cell_levels == str(lvl)).any()
        }
        if not outs:
            raise CellpertInputError("no level with a positive weight has control cells to build counterfactuals on.")
        w = np.array([float(weights[lvl]) for lvl in outs])
        w_sum = w.sum()
        out = {
            "effects": sum(wi * o["effects"] for wi, o in zip(w, outs.values(), strict=True)) / w_sum,
            "mc_var": sum(wi**2 * o["mc_var"] for wi, o in zip(w, outs.values(), strict=True)) / w_sum**2,
            "n_cells": int(sum(o["n_cells"] for o in outs.values())),
        }
        for lvl, o in outs.items():
            a, lo_, hi_ = frames(o)
            idx = pd.Index(gene_names if gene_names is not None else np.arange(a.shape[0]), name="gene")
            per_level[lvl] = ModelATE(
                ate=pd.DataFrame(a, index=idx, columns=columns),
                lo=pd.DataFrame(lo_, index=idx, columns=columns),
                hi=pd.DataFrame(hi_, index=idx, columns=columns),
                config={"n_basal_cells": int(o["n_cells"]), "weight": float(weights[lvl])},
            )
    ate, lo, hi = frames(out)
    index = pd.Index(gene_names if gene_names is not None else np.arange(ate.shape[0]), name="gene")
    config = {
        "estimator": "counterfactual",
        "n_draws": int(n_draws),
        "n_basal_cells": int(out["n_cells"]),
        "basal": basal,
        "library_size": "observed (each control cell's own)",
        "space": "perturbseq",
        "transform": transform,
        "interval": float(interval),
        "latent_shift": latent_shift,
        "shift_within_levels": bool(within_level),
        "interval_kind": (
            "bootstrap of the labels' and the controls' mean latent positions (sampling of the cells)"
            if latent_shift == "empirical" else "posterior interval over draws of the global latents (E, M)"
        ),
        "seed": int(seed),
    }
    if per_level:
        config["levels"] = {lvl: m.config for lvl, m in per_level.items()}
    logger.info("counterfactual ATE of %d labels on %d control cells, %d draws (%s latent shift)", len(labels), out["n_cells"], n_draws, latent_shift)
    return ModelATE(
        ate=pd.DataFrame(ate, index=index, columns=columns),
        lo=pd.DataFrame(lo, index=index, columns=columns),
        hi=pd.DataFrame(hi, index=index, columns=columns),
        config=config,
        per_level=per_level,
    )


def posterior_ate(
    model: Any,
    labels: Sequence[str],
    *,
    control: str | Sequence[str] = "control",
    cells: Sequence[int],
    label_cells: Mapping[str, Sequence[int]],
    n_draws: int = 100,
    interval: float = 0.9,
    seed: int = 0,
    gene_names: Sequence[str] | pd.Index | None = None,
    cell_levels: Sequence[str] | None = None,
    weights: pd.Series | None = None,
    label_cell_levels: Mapping[str, Sequence[str]] | None = None,
    max_cells: int | None = DEFAULT_MAX_CELLS,
) -> ModelATE:
    """Posterior-predictive model ATE: the model's denoised cells of each label against its controls.

    cellpert's default estimator (docs/models.md, *ATE space and data ATE*). Every
    training cell of a label, and every control cell ``cells``, is decoded at draws of its
    own posterior (:meth:`~cellpert.models._base.CounterfactualMixin.get_posterior_expression`:
    its latent from q under its own perturbation and covariates, counts drawn at its own
    library size, in the perturbseq space), and the label's ATE is the mean over its cells
    minus the mean over the controls. This is the data ATE of the same cells with each
    cell's count noise replaced by the model's expectation, so it is in the same space,
    at the same depths and over the same cells (hence the same mixture of responses and
    of covariate levels) as the data ATE it predicts; scvi-tools contrasts groups of
    cells the same way for differential expression. A label without at least 2 training
    cells (e.g. a held-out combination) gets the counterfactual estimate
    (:func:`counterfactual_ate`, the empirical shifts of its parts).
    Every group of cells is decoded at the same ``n_draws`` draws of the global latents
    (``model.sample_posterior_globals``), drawn once: each contrast is then taken at
    common draws of the globals, and a screen with many labels does not redraw them per
    label.

    **The interval**: mean ± z · se, with se² = var(label cells)/n + var(controls)/m of the
    cells' posterior-predictive values: the uncertainty of which cells were observed, not
    that of the network weights (point estimates). Labels that fall back to the
    counterfactual keep its interval.

    Parameters
    ----------
    model
        A trained model with ``get_posterior_expression`` (and, for the fallback,
        ``get_counterfactual_effects``).
    labels, control
        Labels to predict; control label(s).
    cells
        Row indices of the control cells (e.g. the training split's).
    label_cells
        Row indices of each label's training cells (and of the parts of combinations
        without cells).
    n_draws
        Posterior draws per cell (and draws of the counterfactual fallback).
    interval
        Level of the interval.
    seed
        Seeds every draw.
    gene_names
        Index of the results.
    cell_levels, weights, label_cell_levels
        By level of a covariate (docs/models.md, *Covariates*): the levels of ``cells``,
        the weight of each level and the levels of ``label_cells``. The ATE within level
        ℓ contrasts the label's cells in ℓ with ℓ's controls (a label with fewer than 2
        cells in ℓ: the counterfactual on ℓ's controls); ``ate`` is the weighted mean
        over levels, its se that of a weighted mean of independent estimates.
    max_cells
        Cells decoded per group (a label's cells, the controls; within a level with
        ``cell_levels``): a larger group is represented by that many of its cells drawn
        at random (seeded), so that time and memory do not grow with the screen (the
        se of a mean over 1,000 cells is 3% of the cells' spread). None: every cell.
        Each group is decoded and reduced to its mean and variance on its own, so memory
        is that of one group.

    Returns
    -------
    ModelATE
    """
    labels, controls = _check_labels(labels, control)
    if not 0.0 < float(interval) < 1.0:
        raise CellpertInputError(f"interval must lie in (0, 1), e.g. 0.9, not {interval}.")
    if not hasattr(model, "get_posterior_expression"):
        raise CellpertInputError(f"{type(model).__name__} has no posterior estimator; use estimator='counterfactual'.")
    cells = np.asarray(cells, dtype=np.int64)
    if cells.size < 2:
        raise CellpertInputError("the posterior ATE needs at least 2 control cells; check the split.")
    if max_cells is not None and int(max_cells) < 2:
        raise CellpertInputError(f"max_cells must be at least 2 (or None: every cell), not {max_cells}.")
    z = float(stats.norm.ppf(0.5 + float(interval) / 2.0))
    own = {lab: np.asarray(label_cells.get(lab, ()), dtype=np.int64) for lab in labels}
    columns = pd.Index(labels, name="label")
    decoded: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, int]] = {}
    # one set of global draws for every group: the groups are contrasted at the same draws
    # of the global latents, and those are drawn once (not once per group)
    global_draws = model.sample_posterior_globals(int(n_draws), seed=seed)

    def moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean and variance over the cells ``rows`` of their posterior values (at most
        ``max_cells`` of them, drawn at random), each group decoded once with its own seed."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        key = tuple(rows.tolist())
        if key not in decoded:
            group_seed = _group_seeds(seed + len(decoded), 1)[0]
            chosen = rows
            if max_cells is not None and len(rows) > int(max_cells):
                pick = np.random.default_rng(group_seed).choice(len(rows), size=int(max_cells), replace=False)
                chosen = rows[np.sort(pick)]
            values = model.get_posterior_expression(chosen, n_draws=int(n_draws), seed=group_seed, global_draws=global_draws)
            decoded[key] = (values.mean(0), values.var(0, ddof=1), len(chosen))
        return decoded[key]

    index = pd.Index(gene_names if gene_names is not None else np.arange(len(moments(cells)[0])), name="gene")
    cf_kw = {"control": controls, "n_draws": max(2, int(n_draws)), "interval": interval, "seed": seed,
             "gene_names": index, "label_cells": label_cells}  # fmt: skip

    def contrast(controls_: np.ndarray, groups: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Mean and se of each label's cells minus ``controls_``; the counterfactual where a
        label has fewer than 2 cells."""
        c_mean, c_var, n_c = moments(controls_)
        c_var = c_var / n_c
        mean = pd.DataFrame(np.nan, index=index, columns=columns)
        se = mean.copy()
        missing = []
        for lab in labels:
            rows = groups[lab]
            if len(rows) < 2:
                missing.append(lab)
                continue
            v_mean, v_var, n_v = moments(rows)
            mean[lab] = v_mean - c_mean
            se[lab] = np.sqrt(v_var / n_v + c_var)
        if missing:
            cf = counterfactual_ate(model, missing, cells=controls_, **cf_kw)
            mean[missing] = cf.ate[missing].to_numpy()
            se[missing] = ((cf.hi - cf.lo)[missing] / (2 * z)).to_numpy()
        return mean, se

    per_level: dict[str, ModelATE] = {}
    n_fallback = sum(len(own[lab]) < 2 for lab in labels)
    if cell_levels is None:
        ate, se = contrast(cells, own)
    else:
        cell_levels = np.asarray(cell_levels, dtype=object).astype(str)
        if cell_levels.shape != cells.shape:
            raise CellpertInputError(f"cell_levels has {cell_levels.size} values for {cells.size} cells.")
        if weights is None or label_cell_levels is None:
            raise CellpertInputError("cell_levels needs the level weights and label_cell_levels.")
        lab_levels = {lab: np.asarray(label_cell_levels.get(lab, ()), dtype=object).astype(str) for lab in labels}
        parts = {}
        for lvl in weights.index[weights > 0]:
            lvl = str(lvl)
            controls_l = cells[cell_levels == lvl]
            if len(controls_l) < 2:
                continue
            groups = {lab: own[lab][lab_levels[lab] == lvl] if len(own[lab]) else own[lab] for lab in labels}
            m, e = contrast(controls_l, groups)
            parts[lvl] = (float(weights[lvl]), m, e)
            per_level[lvl] = ModelATE(ate=m, lo=m - z * e, hi=m + z * e,
                                      config={"n_basal_cells": int(len(controls_l)), "weight": float(weights[lvl])})  # fmt: skip
        if not parts:
            raise CellpertInputError("no level with a positive weight has 2 control cells to contrast with.")
        w_sum = sum(w for w, _, _ in parts.values())
        ate = sum(w * m for w, m, _ in parts.values()) / w_sum
        se = np.sqrt(sum((w * e) ** 2 for w, _, e in parts.values())) / w_sum
    config = {
        "estimator": "posterior",
        "n_draws": int(n_draws),
        "n_basal_cells": int(cells.size),
        "n_label_cells": {lab: int(len(own[lab])) for lab in labels},
        "max_cells": None if max_cells is None else int(max_cells),
        "n_decoded_cells": int(sum(n for _, _, n in decoded.values())),
        "n_counterfactual_labels": int(n_fallback),
        "library_size": "observed (each cell's own)",
        "space": "perturbseq",
        "interval": float(interval),
        "interval_kind": "mean ± z·se over the cells (sampling of the label's and the controls' cells)",
        "seed": int(seed),
        "global_draws": "shared by every group",
        "latent_shift": "empirical",  # of the counterfactual fallback
    }
    if per_level:
        config["levels"] = {lvl: m.config for lvl, m in per_level.items()}
    logger.info("posterior ATE of %d labels (%d by the counterfactual) against %d control cells, %d draws per cell",
                len(labels), n_fallback, cells.size, n_draws)  # fmt: skip
    return ModelATE(ate=ate, lo=ate - z * se, hi=ate + z * se, config=config, per_level=per_level)


def _shift_groups(label: str, label_cells: Mapping[str, Sequence[int]]) -> list[Sequence[int]]:
    """The cell groups an empirical shift of ``label`` is measured on: its own training
    cells, else each of its parts' (all of them, or none: the model's shift)."""
    own = label_cells.get(label, ())
    if len(own):
        return [own]
    parts = [p for p in split_label(label) if p]
    groups = [label_cells.get(p, ()) for p in parts]
    return groups if len(parts) > 1 and all(len(g) for g in groups) else []


def calibrate_interval(
    pred: ModelATE,
    target: pd.DataFrame,
    target_se: pd.DataFrame,
    *,
    base_se: pd.DataFrame | None = None,
    interval: float | None = None,
) -> tuple[ModelATE, dict[str, float]]:
    """Widen (or narrow) a model's intervals so that they hold their level on held-out cells.

    The model's error ``e = ate − truth`` is taken as Normal with standard deviation
    ``c · b / z``, with ``b = √(h² + (z · base_se)²)`` (h the interval's half-width, z the
    Normal quantile of the level, ``base_se`` e.g. the standard error of the training
    cells' ATE, the sampling noise the model learned each effect from; without it, or
    where it is missing, ``b = h``, and a constant when every width is 0; widths are
    floored at the 10th percentile of the positive ones, since a zero width cannot be
    scaled into coverage). On the SAMS
    simulator the posterior width alone puts the error in the wrong places (recalibrated
    coverage of the truth 0.58–0.64); with the training standard errors 0.87–0.88. The held-out data ATE is the truth plus its own noise
    of standard error ``se``, so ``|target − ate| ≤ z √((c h / z)² + se²)`` should hold
    for the interval's fraction of the (gene, label) pairs; ``c`` is found by bisection
    and the returned intervals are ``ate ± c h``. Fit it on validation cells, judge it on
    others (e.g. a simulator's truth).

    Parameters
    ----------
    pred
        The model's ATE and interval.
    target
        genes x labels held-out data ATE (e.g. of the validation cells).
    target_se
        Its standard errors (``data_ate(..., standard_error=True).attrs["standard_error"]``).
    interval
        Level (default: the prediction's).

    Returns
    -------
    The recalibrated :class:`ModelATE` and ``{"factor": c, "coverage_before": (of the
    model's own intervals), "coverage_after": ...}`` (coverage of the target, its noise
    accounted for).
    """
    level = float(interval if interval is not None else pred.config.get("interval", 0.9))
    labels = [c for c in target.columns if c in pred.ate.columns]
    genes = target.index.intersection(pred.ate.index)
    if not labels or not len(genes):
        raise CellpertInputError("the held-out target shares no label or gene with the prediction.")
    z = float(stats.norm.ppf(0.5 + level / 2))
    ate = pred.ate.loc[genes, labels].to_numpy()
    half_frame = (pred.hi - pred.lo) / 2
    if base_se is not None:
        extra = (z * base_se).reindex(index=half_frame.index, columns=half_frame.columns).fillna(0.0)
        half_frame = np.sqrt(half_frame**2 + extra**2)
    half_all = half_frame.to_numpy()
    half = half_frame.loc[genes, labels].to_numpy()
    positive = half_all[np.isfinite(half_all) & (half_all > 0)]
    constant = positive.size == 0
    if constant:
        half, half_all = np.ones_like(half), np.ones_like(half_all)
    else:
        # a zero width (a gene never expressed in a label's training cells, a posterior
        # with no spread) cannot be scaled into coverage: floor the widths at the 10th
        # percentile of the positive ones (the factor below then scales them all)
        floor = float(np.quantile(positive, 0.1))
        half, half_all = np.maximum(np.nan_to_num(half), floor), np.maximum(np.nan_to_num(half_all), floor)
    err = np.abs(target.loc[genes, labels].to_numpy() - ate)
    se = target_se.loc[genes, labels].to_numpy()

    def covered(c: float, width: np.ndarray | None = None) -> float:
        w = half if width is None else width
        return float((err <= z * np.sqrt((c * w / z) ** 2 + se**2)).mean())

    # how the model's own intervals fare, before any recalibration
    coverage_posterior = covered(1.0, ((pred.hi - pred.lo) / 2).loc[genes, labels].to_numpy())

    lo_c, hi_c = 0.0, 1.0
    while covered(hi_c) < level and hi_c < 1e6:
        hi_c *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo_c + hi_c)
        lo_c, hi_c = (mid, hi_c) if covered(mid) < level else (lo_c, mid)
    factor = hi_c
    new_half = pd.DataFrame(factor * half_all, index=pred.ate.index, columns=pred.ate.columns)
    out = ModelATE(
        ate=pred.ate,
        lo=pred.ate - new_half,
        hi=pred.ate + new_half,
        config={**pred.config, "interval_kind": "recalibrated on held-out cells", "calibration_factor": factor},
    )
    info = {
        "factor": float(factor),
        "constant_width": bool(constant),
        "coverage_before": coverage_posterior,
        "coverage_after": covered(factor),
        "n": int(err.size),
    }
    return out, info


def combine_with_average(
    pred: ModelATE,
    average: pd.DataFrame,
    target: pd.DataFrame | None,
    *,
    average_se: pd.DataFrame | None = None,
    min_cells: Mapping[str, float] | None = None,
) -> ModelATE:
    """The model's ATE combined with the training cells' average, ``w · average + (1 − w) · model``.

    The two estimates err differently: the training-cell average carries each label's
    count noise, the model's posterior estimate removes it but adds the model's own
    error (on the SAMS simulator about as large). One weight ``w`` in [0, 1] for every
    label and gene is fitted on held-out cells, by least squares against their data ATE
    (``w = <a − m, t − m> / ‖a − m‖²``, clipped): the held-out target is the truth plus
    noise independent of both estimates, so minimising the squared error against it
    minimises it against the truth in expectation. Fit it on validation cells (never the
    cells it is scored on). Labels absent from ``average`` (no training cells, e.g.
    held-out combinations) keep the model's estimate and do not enter the fit.

    The interval is ``ate ± (w · z · se_average + (1 − w) · h)`` (h the model interval's
    half-width, z its Normal quantile; the two errors taken as fully correlated, the
    conservative choice); with ``average_se`` missing, the model's width.

    Parameters
    ----------
    pred
        The model's ATE (e.g. :func:`posterior_ate`).
    average
        genes x labels training-cell average ATE.
    target
        genes x labels held-out data ATE (the validation cells'); None: no held-out
        cells, the model's estimate is returned (``w = 0``).
    average_se
        Standard errors of ``average`` (same shape), for the interval.
    min_cells
        ``{label: training cells}``: labels with fewer than 2 are not combined (their
        "average" is then not an estimate from their own cells).

    Returns
    -------
    ModelATE
        ``config["combined"]``: ``{"weight": w, "fitted_on_labels": n, ...}``.
    """
    labels = [c for c in pred.ate.columns if c in average.columns]
    if min_cells is not None:
        labels = [c for c in labels if float(min_cells.get(c, 0)) >= 2]
    fit = [] if target is None else [c for c in labels if c in target.columns]
    genes = pred.ate.index
    weight, reason = 0.0, "no held-out cells to fit the weight on: the model's estimate alone"
    if fit:
        m = pred.ate.loc[genes, fit].to_numpy(dtype=float)
        d = average.reindex(index=genes)[fit].to_numpy(dtype=float) - m
        e = target.reindex(index=genes)[fit].to_numpy(dtype=float) - m
        ok = np.isfinite(d) & np.isfinite(e)
        denominator = float((d[ok] ** 2).sum())
        if denominator > 0:
            weight = float(np.clip((d[ok] * e[ok]).sum() / denominator, 0.0, 1.0))
            reason = "least squares against the held-out cells' data ATE"
        else:
            reason = "the model's estimate equals the average: nothing to combine"
    ate, lo, hi = pred.ate.copy(), pred.lo.copy(), pred.hi.copy()
    if labels and weight > 0:
        level = float(pred.config.get("interval", 0.9))
        z = float(stats.norm.ppf(0.5 + level / 2))
        avg = average.reindex(index=genes)[labels]
        combined = weight * avg + (1 - weight) * pred.ate[labels]
        half = (pred.hi[labels] - pred.lo[labels]) / 2
        if average_se is not None:
            se = average_se.reindex(index=genes)[labels].fillna(0.0)
            half = weight * z * se + (1 - weight) * half
        ate[labels], lo[labels], hi[labels] = combined, combined - half, combined + half
    config = {
        **pred.config,
        "combined": {
            "weight": weight,
            "how": reason,
            "fitted_on_labels": len(fit),
            "combined_labels": len(labels) if weight > 0 else 0,
        },
    }
    return ModelATE(ate=ate, lo=lo, hi=hi, config=config, per_level=pred.per_level)
