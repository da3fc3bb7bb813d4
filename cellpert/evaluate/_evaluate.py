"""End-to-end ATE evaluation: data ATE, model ATE, baselines, metrics per split, IWELBO.

This is what ``cellpert evaluate-ate`` runs (docs/models.md, *Baselines: CPA-VAE and conditional VAE*, *ATE space and data ATE*). The computation
(:func:`compute_ate_evaluation`) works on an in-memory screen and model; the file-level
function (:func:`cellpert.runs.evaluate_ate`, the application layer) loads a screen and
a ``cellpert train`` run, computes, and writes the results back with
:func:`write_ate_results` through :func:`cellpert.data.save_results`.

Conventions
-----------
- **Held-out target** (default, ``data_cells="split"``; docs/models.md, "Evaluation").
  Split s is scored against the data ATE of its own cells: each label's split-s cells
  minus the split's control cells (when the split has none, e.g. held-out combinations,
  the control cells outside the training split). Under a random cell split the ``val``
  and ``test`` columns therefore use cells no model or baseline was fitted on. The split
  shown (``iwelbo_split``, the command's ``--split``, default ``test``) gives the
  per-perturbation table, ``varm["ate_data"]`` and the report, so every table, key and
  figure of one evaluation uses the same target; ``config["target"]`` names it.
  ``data_cells="all"`` is the SAMS-VAE paper's protocol: every split against the data
  ATE of all cells, training cells included (the training-cell baselines then look far
  better than they are).
- **Noise ceiling** of the shown target (:func:`cellpert.evaluate.noise_ceiling`): the r a
  perfect predictor would reach, from split halves and Spearman–Brown; next to it, the r
  the training-cell average is expected to reach from noise alone, √(ρ_train ρ_test).
- **Label splits.** A label belongs to split s when at least one of its cells is in s
  (``"unused"`` cells are ignored). The per-perturbation table lists each label's splits
  (``"test"``, ``"train+val"``, ``"train+val+test"``).
- **Baselines** are computed from the data ATE of the *training* cells (split
  ``"train"``, control included): *average* (each label's own training cells' average
  effect; a label without training cells, e.g. a held-out combination, gets the additive
  sum), *additive* (the sum of the parts' training effects, for a single its own) and
  *mean* (the mean training effect).
- **Model ATE**: ``estimator="combined"`` (default) is the posterior estimate below
  combined with the training-cell average, ``w · average + (1 − w) · posterior``, one
  weight fitted on the validation cells (:func:`cellpert.evaluate.combine_with_average`;
  the test cells are never used). ``estimator="posterior"`` contrasts the model's denoised
  training cells of each label with its denoised training control cells, each decoded at
  draws of its own posterior and its own depth (:func:`cellpert.evaluate.posterior_ate`;
  a label without training cells gets the counterfactual); ``estimator="counterfactual"``
  encodes the training control cells, shifts them by each perturbation and decodes at
  their own depth (:func:`cellpert.evaluate.counterfactual_ate`); ``estimator="prior"``
  is the paper's (:func:`cellpert.evaluate.model_ate`).
- **Held-out IWELBO**: ``model.get_iwelbo(split=iwelbo_split, n_samples=100)``, the mean
  over that split's cells (docs/models.md, *ATE space and data ATE*).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError, CellpertWarning
from cellpert.data import UNS_KEY, PerturbationScreen, to_uns
from cellpert.data._validate import DEFAULT_CHUNK_ROWS
from cellpert.evaluate._ate import (
    additive_baseline,
    ate_metrics,
    data_ate,
    interval_coverage,
    mean_baseline,
    noise_ceiling,
)
from cellpert.evaluate._levels import Pool, level_values, level_weights, pooled_ate
from cellpert.evaluate._model_ate import (
    DEFAULT_MAX_CELLS,
    LibrarySize,
    ModelATE,
    calibrate_interval,
    combine_with_average,
    counterfactual_ate,
    model_ate,
    posterior_ate,
)

__all__ = [
    "METRIC_NAMES",
    "AteEvaluation",
    "compute_ate_evaluation",
    "label_splits",
    "score_against_truth",
    "write_ate_results",
]

logger = logging.getLogger(__name__)

#: Metrics of :func:`cellpert.evaluate.ate_metrics` reported per predictor.
METRIC_NAMES = ("pearson", "r2", "pearson_top", "r2_top")
#: Splits reported in the summary (plus ``"all"``: every label).
EVAL_SPLITS = ("train", "val", "test")
#: uns key (under ``uns["cellpert"]``) of the evaluation results.
METRICS_UNS_KEY = "ate_metrics"
#: uns key (under ``uns["cellpert"]``) naming the evaluation ``varm["ate_data"]`` is from.
DATA_SOURCE_UNS_KEY = "ate_data_source"
#: Key of a data-only evaluation (no model).
DATA_KEY = "data"

Estimator = Literal["combined", "posterior", "counterfactual", "prior"]
#: The estimators of :func:`compute_ate_evaluation`.
ESTIMATORS = ("combined", "posterior", "counterfactual", "prior")


@dataclass
class AteEvaluation:
    """Everything an ATE evaluation computed (see :func:`compute_ate_evaluation`)."""

    key: str
    """Output key: the model key (``samsvae``, ``cpa_vae``) or ``"data"``."""
    data_ate: pd.DataFrame
    """genes x labels data ATE the evaluation scored against (``config["target"]``)."""
    per_perturbation: pd.DataFrame
    """One row per label: ``split``, ``n_cells`` and ``<predictor>_<metric>``."""
    summary: pd.DataFrame | None
    """``<predictor>_<metric>``, ``n_perturbations``, ``iwelbo`` x splits (None without model)."""
    model_ate: ModelATE | None = None
    """The model's ATEs and intervals (None for a data-only evaluation)."""
    model_ate_calibrated: ModelATE | None = None
    """The same ATEs with intervals recalibrated on the validation cells
    (:func:`cellpert.evaluate.calibrate_interval`; None without validation cells)."""
    baselines: dict[str, pd.DataFrame] = field(default_factory=dict)
    """``additive``, ``mean`` and ``average`` predictions (genes x labels) from the training cells."""
    iwelbo: float = float("nan")
    """Mean held-out IWELBO per cell (NaN without model or held-out cells)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Evaluation settings, timings and the model's identity."""
    path: Path | None = None
    """The file written (set by :func:`evaluate_ate`)."""
    per_level: pd.DataFrame | None = None
    """With ``level_key``: level x [``weight``, ``n_control_cells``, ``<predictor>_<metric>``],
    each predictor scored within each level against that level's target (the shown split)."""

    @property
    def predictors(self) -> list[str]:
        """Predictors scored: ``model`` (when present), ``additive``, ``mean``, ``average``."""
        return (["model"] if self.model_ate is not None else []) + list(self.baselines)


# ----------------------------------------------------------------------- splits
def label_splits(labels: np.ndarray, split_values: np.ndarray | None, controls: Sequence[str]) -> pd.DataFrame:
    """Which splits each non-control label has cells in.

    Parameters
    ----------
    labels
        Canonical label per cell.
    split_values
        Split per cell (``train`` / ``val`` / ``test`` / ``unused``), or None (every
        label is in no split; only ``"all"`` is scored).
    controls
        Control labels (left out).

    Returns
    -------
    pd.DataFrame
        Index: labels (sorted); boolean columns ``train``, ``val``, ``test`` and the
        string column ``split`` (e.g. ``"train+val"``; ``"none"`` without split).
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    keep = ~np.isin(labels, list(controls))
    uniq = sorted(pd.unique(labels[keep]).tolist())
    out = pd.DataFrame(False, index=pd.Index(uniq, name="label"), columns=list(EVAL_SPLITS))
    if split_values is not None:
        split_values = np.asarray(split_values, dtype=object).astype(str)
        frame = pd.DataFrame({"label": labels[keep], "split": split_values[keep]})
        present = frame[frame["split"].isin(EVAL_SPLITS)].drop_duplicates()
        for s in EVAL_SPLITS:
            out.loc[present.loc[present["split"] == s, "label"].unique(), s] = True
    out["split"] = [
        "+".join(s for s in EVAL_SPLITS if row[s]) or "none" for _, row in out[list(EVAL_SPLITS)].iterrows()
    ]
    return out


def _split_values(screen: PerturbationScreen, model: Any, split: np.ndarray | str | None) -> np.ndarray | None:
    if split is not None and not isinstance(split, str):
        values = np.asarray(split, dtype=object).astype(str)
        if values.shape != (screen.n_cells,):
            raise CellpertInputError(f"split has {values.size} values for {screen.n_cells} cells.")
        return values
    if isinstance(split, str):
        if split not in screen.adata.obs.columns:
            raise CellpertInputError(f"obs has no split column {split!r}; pass an existing column.")
        return screen.adata.obs[split].astype(str).to_numpy()
    if model is not None and hasattr(model, "split_values"):
        return np.asarray(model.split_values(), dtype=object).astype(str)
    from cellpert.data import DEFAULT_SPLIT_KEY

    if DEFAULT_SPLIT_KEY in screen.adata.obs.columns:
        return screen.adata.obs[DEFAULT_SPLIT_KEY].astype(str).to_numpy()
    return None


#: The data ATE of a boolean mask of cells (with standard errors on request): the plain
#: :func:`cellpert.evaluate.data_ate`, or its pooled within-level version (``level_key``).
AteOf = Any


def _training_ate(
    screen: PerturbationScreen, split_values: np.ndarray, ate_of: AteOf
) -> tuple[pd.DataFrame, np.ndarray]:
    """Data ATE of the training cells (the baselines' input) and the cells it used."""
    train = split_values == "train"
    if not (train & screen.is_control).any():
        logger.warning("no control cell in the training split; the baselines use all control cells")
        train = train | screen.is_control
    return ate_of(train, standard_error=True), train


def _training_standard_errors(train_ate: pd.DataFrame, labels: list[str], screen: PerturbationScreen) -> pd.DataFrame:
    """Standard error of each label's training-cell ATE; a label without training cells
    (a held-out combination) gets its parts' combined in quadrature, as the additive
    baseline combines their effects (NaN when a part has none)."""
    se = train_ate.attrs["standard_error"]
    out = pd.DataFrame(np.nan, index=se.index, columns=pd.Index(labels, name="label"))
    for label in labels:
        if label in se.columns:
            out[label] = se[label]
            continue
        parts = screen.label_parts(label)
        if parts and all(p in se.columns for p in parts):
            out[label] = np.sqrt(sum(se[p] ** 2 for p in parts))
    return out


def _target_cells(screen: PerturbationScreen, split_values: np.ndarray, s: str, labels: list[str]) -> tuple[np.ndarray, str]:
    """Cells of the held-out target of split ``s``, and which controls it uses.

    The labels' split-``s`` cells, with the split's own control cells; when the split has
    none (e.g. held-out combinations), the control cells outside the training split;
    failing that, all control cells.
    """
    in_split = split_values == s
    controls = screen.is_control & in_split
    source = f"the {s} control cells"
    if not controls.any():
        controls = screen.is_control & (split_values != "train")
        source = "the control cells outside the training split"
        if not controls.any():
            controls = screen.is_control
            source = "all control cells (no held-out control cell; the baselines share them)"
        logger.info("split %r has no control cells; its data ATE uses %s", s, source)
    return (in_split & np.isin(screen.labels, labels)) | controls, source


def _split_target(
    screen: PerturbationScreen, split_values: np.ndarray, s: str, labels: list[str], ate_of: AteOf
) -> pd.DataFrame:
    """Data ATE of the labels' split-s cells vs the split's control cells (see :func:`_target_cells`),
    with its standard errors in ``attrs["standard_error"]`` (and, by level, ``attrs["per_level"]``)."""
    cells, source = _target_cells(screen, split_values, s, labels)
    full = ate_of(cells, standard_error=True)
    keep = [c for c in labels if c in full.columns]
    target = full[keep].copy()
    target.attrs = {**full.attrs, "standard_error": full.attrs["standard_error"][keep], "controls": source}
    if "per_level" in full.attrs:
        target.attrs["per_level"] = {
            lvl: f[[c for c in keep if c in f.columns]] for lvl, f in full.attrs["per_level"].items()
        }
    return target


def _basal_cells(screen: PerturbationScreen, split_values: np.ndarray | None) -> np.ndarray:
    """Control cells the counterfactual estimator encodes: the training split's (else all)."""
    if split_values is not None:
        train = np.flatnonzero(screen.is_control & (split_values == "train"))
        if len(train):
            return train
    logger.warning("no training control cells: the counterfactual ATE encodes every control cell")
    return np.flatnonzero(screen.is_control)


def _label_cells(
    screen: PerturbationScreen, split_values: np.ndarray | None, labels: list[str]
) -> dict[str, np.ndarray] | None:
    """Training cells of each label and of each label's parts (the empirical latent shift's)."""
    if split_values is None:
        return None
    train = split_values == "train"
    wanted = set(labels) | {p for lab in labels for p in screen.label_parts(lab)}
    rows = np.flatnonzero(train)
    groups = pd.Series(rows).groupby(screen.labels[train]).indices
    return {lab: rows[groups[lab]] for lab in wanted if lab in groups}


def _predict(
    screen: PerturbationScreen, model: Any, labels: list[str], split_values: np.ndarray | None, *,
    estimator: Estimator, n_particles: int, n_groups: int, n_draws: int, library_size: LibrarySize | float,
    seed: int, levels: np.ndarray | None = None, weights: pd.Series | None = None,
    latent_shift: str = "empirical", max_cells: int | None = DEFAULT_MAX_CELLS,
) -> ModelATE:  # fmt: skip
    """The model's ATE of every label with the chosen estimator (see :func:`compute_ate_evaluation`;
    ``"combined"`` is combined with the average by the caller)."""
    if estimator == "combined":
        estimator = "posterior"
    if estimator == "posterior" and (not hasattr(model, "get_posterior_expression") or split_values is None):
        logger.warning("%s has no posterior estimator here (or no training split); using the counterfactual",
                       type(model).__name__)  # fmt: skip
        estimator = "counterfactual"
    if estimator == "counterfactual" and not hasattr(model, "get_counterfactual_effects"):
        logger.warning("%s has no counterfactual estimator; using the prior estimator", type(model).__name__)
        estimator = "prior"
    if estimator in ("posterior", "counterfactual"):
        cells = _basal_cells(screen, split_values)
        label_cells = _label_cells(screen, split_values, labels)
        by_level = {} if levels is None else {
            "cell_levels": levels[cells], "weights": weights,
            "label_cell_levels": None if label_cells is None else {lab: levels[rows] for lab, rows in label_cells.items()},
        }  # fmt: skip
        common = {"control": screen.control_labels, "cells": cells, "n_draws": n_draws, "seed": seed,
                  "gene_names": screen.gene_names, "label_cells": label_cells, **by_level}  # fmt: skip
        if estimator == "posterior":
            return posterior_ate(model, labels, max_cells=max_cells, **common)
        return counterfactual_ate(model, labels, latent_shift=latent_shift, **common)
    if levels is not None:
        raise CellpertInputError(
            "ATEs by level need the posterior or counterfactual estimator (they keep each cell's level); "
            "use estimator='posterior' (the default)."
        )
    pred = model_ate(
        model, labels, control=screen.control_labels, n_particles=n_particles, n_groups=n_groups,
        library_size=library_size, control_library_sizes=screen.library_size[screen.is_control],
        seed=seed, gene_names=screen.gene_names,
    )  # fmt: skip
    pred.config["estimator"] = "prior"
    return pred


def _training_baselines(
    screen: PerturbationScreen, split_values: np.ndarray | None, labels: list[str], ate_of: AteOf
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame | None, np.ndarray | None]:
    """The ``additive``, ``mean`` and ``average`` baselines from the training cells' data
    ATE (empty without a training split), that ATE and the cells it used."""
    if split_values is None or not (split_values == "train").any():
        logger.warning("no training split: the additive and mean baselines are not computed")
        return {}, None, None
    train_ate, train_cells = _training_ate(screen, split_values, ate_of)
    return _baselines_from(train_ate, labels, screen), train_ate, train_cells


def _baselines_from(train_ate: pd.DataFrame, labels: list[str], screen: PerturbationScreen) -> dict[str, pd.DataFrame]:
    """The ``additive``, ``mean`` and ``average`` baselines from a training-cell data ATE."""
    baselines: dict[str, pd.DataFrame] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellpertWarning)
        baselines["additive"] = additive_baseline(train_ate, labels, parts_of=screen.label_parts)
    for w in caught:
        logger.warning("%s", w.message)
    baselines["mean"] = mean_baseline(train_ate, labels)
    # the training cells' own average effect of each label (a label without training
    # cells, e.g. a held-out combination, falls back to the additive sum)
    average = baselines["additive"].copy()
    seen = [c for c in labels if c in train_ate.columns]
    average[seen] = train_ate[seen].to_numpy()
    baselines["average"] = average
    return baselines


def _per_level_summary(
    screen: PerturbationScreen, target: pd.DataFrame, pred: ModelATE, train_ate: pd.DataFrame | None,
    weights: pd.Series, top_n: int,
) -> pd.DataFrame:  # fmt: skip
    """level x [``weight``, ``n_control_cells``, ``<predictor>_<metric>``]: every predictor
    within each level against that level's held-out target."""
    rows = []
    per_target = target.attrs.get("per_level", {})
    per_train = train_ate.attrs.get("per_level", {}) if train_ate is not None else {}
    for lvl in weights.index:
        row: dict[str, Any] = {"level": str(lvl), "weight": float(weights[lvl])}
        tgt = per_target.get(str(lvl))
        if tgt is None or tgt.shape[1] == 0:
            rows.append(row)
            continue
        row["n_control_cells"] = float(tgt.attrs.get("n_control_cells", np.nan))
        labels = list(tgt.columns)
        predictions: dict[str, pd.DataFrame] = {}
        if str(lvl) in pred.per_level:
            predictions["model"] = pred.per_level[str(lvl)].ate
        if str(lvl) in per_train:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CellpertWarning)
                predictions.update(_baselines_from(per_train[str(lvl)], labels, screen))
        for name, frame in predictions.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CellpertWarning)
                _, values = ate_metrics(tgt, frame[[c for c in labels if c in frame.columns]], top_n=top_n)
            for m in METRIC_NAMES:
                row[f"{name}_{m}"] = values[m]
            row[f"{name}_n_perturbations"] = values["n_perturbations"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("level")


def _summary(
    predictions: dict[str, pd.DataFrame], splits: pd.DataFrame, labels: list[str],
    targets: dict[str, pd.DataFrame] | None, ate_all: pd.DataFrame, top_n: int,
) -> pd.DataFrame:  # fmt: skip
    """Metric x split table: each predictor against each split's target (held-out targets
    when given, else the data ATE of all cells); the ceiling and IWELBO rows start NaN."""
    rows = [f"{name}_{m}" for name in predictions for m in METRIC_NAMES]
    rows += [f"{name}_n_perturbations" for name in predictions]
    rows += ["ceiling_pearson", "ceiling_pearson_top", "expected_train_average_pearson"]
    rows += ["iwelbo", "n_iwelbo_cells"]
    columns = [*EVAL_SPLITS, "all"]
    summary = pd.DataFrame(np.nan, index=pd.Index(rows, name="metric"), columns=pd.Index(columns, name="split"))
    for s in columns:
        chosen = labels if s == "all" else [c for c in labels if bool(splits.loc[c, s])]
        if not chosen:
            continue
        target = targets[s] if targets is not None and s in targets else ate_all[chosen]
        for name, frame in predictions.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CellpertWarning)
                _, values = ate_metrics(target, frame, top_n=top_n)
            for m in METRIC_NAMES:
                summary.loc[f"{name}_{m}", s] = values[m]
            summary.loc[f"{name}_n_perturbations", s] = values["n_perturbations"]
    return summary


def _ceiling(
    screen: PerturbationScreen, split_values: np.ndarray, shown: str, evaluated: list[str],
    train_cells: np.ndarray | None, summary: pd.DataFrame, config: dict[str, Any], *,
    top_n: int, seed: int, chunk_rows: int, ate_of: AteOf | None = None,
) -> None:  # fmt: skip
    """Noise ceiling of the shown split's target, and the r the training-cell average is
    expected to reach from noise alone (into ``summary`` and ``config``)."""
    cells, _ = _target_cells(screen, split_values, shown, evaluated)
    kw = {"control": screen.control_labels, "top_n": top_n, "seed": seed, "chunk_rows": chunk_rows, "ate": ate_of}
    ceil = noise_ceiling(screen.counts, screen.labels, cells=cells, evaluated=evaluated, **kw)
    summary.loc["ceiling_pearson", shown] = ceil["pearson"]
    summary.loc["ceiling_pearson_top", shown] = ceil["pearson_top"]
    config["noise_ceiling"] = ceil
    if train_cells is not None:
        train_ceil = noise_ceiling(screen.counts, screen.labels, cells=train_cells, evaluated=evaluated, **kw)
        expected = float(np.sqrt(max(train_ceil["reliability"], 0) * max(ceil["reliability"], 0)))
        summary.loc["expected_train_average_pearson", shown] = expected
        config["training_reliability"] = train_ceil


# ------------------------------------------------------------------ computation
def compute_ate_evaluation(
    screen: PerturbationScreen,
    model: Any = None,
    *,
    key_added: str | None = None,
    key: str | None = None,
    split: np.ndarray | str | None = None,
    data_cells: Literal["all", "split"] = "split",
    estimator: Estimator = "combined",
    n_particles: int = 2500,
    n_groups: int = 50,
    n_draws: int = 100,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    library_size: LibrarySize | float = "fixed",
    top_n: int = 20,
    iwelbo_split: str = "test",
    iwelbo_samples: int = 100,
    ceiling: bool = True,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    level_key: str | None = None,
    pool: Pool = "control",
    latent_shift: Literal["empirical", "model"] = "empirical",
) -> AteEvaluation:
    """Data ATE, model ATE, baselines, metrics per split, noise ceiling and IWELBO, in memory.

    See the module docstring for the conventions: by default every split is scored
    against the data ATE of its own cells (held out from training for ``val`` and
    ``test``), baselines come from the training cells, and the per-perturbation table,
    ``data_ate`` and the report use the target of ``iwelbo_split`` (the split shown).

    Parameters
    ----------
    screen
        The screen the model was trained on (for a run: ``load_run(...).screen``).
    model
        A trained model with the prediction protocol of
        :func:`cellpert.evaluate.model_ate` (and, for the default estimator,
        ``get_counterfactual_effects``) and ``get_iwelbo``; None computes the data ATE
        alone.
    key_added
        Prefix of the keys :func:`write_ate_results` writes (``varm["ate_<key_added>"]``,
        ``uns["cellpert"]["ate_metrics"][<key_added>]``; default: ``"model"`` with a model,
        ``"data"`` without).
    key
        Former name of ``key_added`` (kept for existing code).
    split
        Split per cell (array) or an obs column; default ``model.split_values()``, else
        ``obs["cellpert_split"]``, else none (only the ``"all"`` column is scored and no
        baselines are computed).
    data_cells
        ``"split"`` (default): split s is scored against the data ATE of its own cells;
        ``"all"`` (the SAMS-VAE paper's protocol): every split against the data ATE of
        all cells, training cells included.
    estimator
        ``"combined"`` (default): the posterior estimate combined with the training-cell
        average by one weight fitted on the validation cells
        (:func:`cellpert.evaluate.combine_with_average`; without validation cells, the
        posterior estimate alone; ``config["model_ate_combined"]`` records the weight).
        ``"posterior"``: :func:`cellpert.evaluate.posterior_ate`, each label's
        training cells against the training control cells, both denoised by the model
        (decoded at draws of their own posterior, at their own depth), an interval from
        the sampling of the cells; a label without training cells gets the
        counterfactual. ``"counterfactual"``: :func:`cellpert.evaluate.counterfactual_ate`
        on the training control cells. ``"prior"`` (the paper's):
        :func:`cellpert.evaluate.model_ate`, z^b from the prior, a Monte Carlo interval.
    n_particles, n_groups, library_size
        Options of the prior estimator.
    n_draws
        Draws of the posterior estimator (per cell) and of the counterfactual estimator
        (of the empirical shifts' bootstrap, or of the global latents).
    max_cells
        Cells the posterior estimator decodes per group (a label's training cells, the
        controls), drawn at random from larger groups (:func:`posterior_ate`); None: all.
    latent_shift
        The counterfactual estimator's shift of each label (:func:`counterfactual_ate`):
        ``"empirical"`` (default), measured where the label's training cells lie in the
        model's latent space, or ``"model"``, the model's own shift ``D (E ⊙ M)``.
    top_n
        Genes per perturbation of the "top" metrics.
    iwelbo_split
        The split shown: its cells give the IWELBO, its target the per-perturbation
        table, ``data_ate`` and the noise ceiling.
    iwelbo_samples
        Importance samples (the paper: 100).
    ceiling
        Compute the noise ceiling of the shown split's target
        (:func:`cellpert.evaluate.noise_ceiling`) and the expected r of the
        training-cell average.
    seed
        Seeds the model ATE, the IWELBO and the half splits of the ceiling.
    chunk_rows
        Rows per streamed chunk of the data ATE.
    level_key
        obs column of a covariate (e.g. the cell line or batch; docs/models.md,
        *Covariates*): every data ATE (targets, baselines) is computed within its levels
        and pooled, the model's ATE likewise (counterfactual estimator, each level's own
        control cells), and ``per_level`` scores every predictor within each level.
    pool
        How levels are pooled: ``"control"`` (weights = the levels' control cells) or
        ``"uniform"``.

    Returns
    -------
    AteEvaluation
    """
    key = key_added if key_added is not None else key
    if data_cells not in ("all", "split"):
        raise CellpertInputError(f"data_cells must be 'all' or 'split', not {data_cells!r}.")
    if estimator not in ESTIMATORS:
        raise CellpertInputError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}.")
    if latent_shift not in ("empirical", "model"):
        raise CellpertInputError(f"latent_shift must be 'empirical' or 'model', not {latent_shift!r}.")
    timings: dict[str, float] = {}
    levels = weights = None
    if level_key is not None:
        levels = level_values(screen.adata.obs, level_key)
        weights = level_weights(levels, screen.is_control, pool)

    def ate_of(cells: np.ndarray | None = None, *, standard_error: bool = False) -> pd.DataFrame:
        """The data ATE of a mask of cells (all cells: None), pooled within levels with ``level_key``."""
        if levels is None:
            return data_ate(screen, cells=cells, chunk_rows=chunk_rows, standard_error=standard_error)
        mask = np.ones(screen.n_cells, dtype=bool) if cells is None else np.asarray(cells, dtype=bool)
        return pooled_ate(
            lambda m: data_ate(screen, cells=m, chunk_rows=chunk_rows, standard_error=standard_error),
            levels=levels, weights=weights, cells=mask, is_control=screen.is_control,
        )  # fmt: skip

    t0 = time.perf_counter()
    ate_all = ate_of()
    timings["data_ate_s"] = time.perf_counter() - t0
    labels = list(ate_all.columns)
    split_values = _split_values(screen, model, split)
    splits = label_splits(screen.labels, split_values, screen.control_labels).reindex(labels)
    shown = iwelbo_split
    # the data ATE alone (no model) is over all cells: there is nothing to score
    held_out = data_cells == "split" and split_values is not None and model is not None
    targets: dict[str, pd.DataFrame] = {}
    if held_out:
        for s in EVAL_SPLITS:
            chosen = [c for c in labels if bool(splits.loc[c, s])]
            if chosen:
                targets[s] = _split_target(screen, split_values, s, chosen, ate_of)
    target_shown = targets.get(shown, ate_all) if held_out else ate_all
    per = pd.DataFrame(
        {
            "split": splits["split"].astype(str),
            "n_cells": [float(ate_all.attrs["n_cells"].get(c, np.nan)) for c in labels],
            "n_target_cells": [float(target_shown.attrs["n_cells"].get(c, np.nan)) for c in labels],
        },
        index=pd.Index(labels, name="label"),
    )
    if held_out and shown in targets:
        target_text = (
            f"data ATE of the {shown} cells of each label vs {targets[shown].attrs['controls']} "
            "(held-out cells: none was used for fitting)"
        )
    else:
        target_text = "data ATE of all cells of each label vs all control cells (training cells included)"
    config: dict[str, Any] = {
        "data_cells": data_cells,
        "target": target_text,
        "target_split": shown if held_out and shown in targets else "all",
        "space": "perturbseq",
        "top_n": int(top_n),
        "n_labels": len(labels),
        "n_control_cells": int(ate_all.attrs["n_control_cells"]),
        "n_target_control_cells": int(target_shown.attrs["n_control_cells"]),
        "data_ate": target_text,
    }
    if level_key is not None:
        config["level_key"] = level_key
        config["pool"] = pool
        config["level_weights"] = {str(k): float(v) for k, v in weights.items()}
        config["target"] = target_text = f"{target_text}, within each level of obs[{level_key!r}], pooled ({pool} weights)"
        config["data_ate"] = target_text
    if model is None:
        config["timings"] = timings
        return AteEvaluation(
            key=key or DATA_KEY, data_ate=target_shown, per_perturbation=per, summary=None, config=config
        )

    # --- model ATE for every label
    t0 = time.perf_counter()
    pred = _predict(
        screen, model, labels, split_values, estimator=estimator, n_particles=n_particles,
        n_groups=n_groups, n_draws=n_draws, library_size=library_size, seed=seed, levels=levels, weights=weights,
        latent_shift=latent_shift, max_cells=max_cells,
    )  # fmt: skip
    timings["model_ate_s"] = time.perf_counter() - t0
    config.update({f"model_ate_{k}": v for k, v in pred.config.items()})
    predictions: dict[str, pd.DataFrame] = {"model": pred.ate}

    # --- baselines from the training cells' data ATE
    baselines, train_ate, train_cells = _training_baselines(screen, split_values, labels, ate_of)
    if train_ate is not None:
        config["n_training_labels"] = int(train_ate.shape[1])
    predictions.update(baselines)
    if estimator == "combined" and "average" in baselines:
        # one weight, fitted on the validation cells' target (the test cells stay unseen)
        pred = combine_with_average(
            pred, baselines["average"], targets.get("val") if held_out else None,
            average_se=_training_standard_errors(train_ate, labels, screen),
            min_cells=train_ate.attrs.get("n_cells"),
        )  # fmt: skip
        predictions["model"] = pred.ate
        config["model_ate_combined"] = pred.config["combined"]
        config["model_ate_estimator"] = "combined"

    # --- per-perturbation metrics (against the shown split's target)
    for name, frame in predictions.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CellpertWarning)
            values, _ = ate_metrics(target_shown, frame, top_n=top_n)
        for m in METRIC_NAMES:
            per[f"{name}_{m}"] = values[m].reindex(labels).to_numpy()
    per["model_interval_width"] = (pred.hi - pred.lo).mean(axis=0).reindex(labels).to_numpy()

    # --- summary: metric x split
    summary = _summary(predictions, splits, labels, targets if held_out else None, ate_all, top_n)
    per_level = None
    if weights is not None:
        per_level = _per_level_summary(screen, target_shown, pred, train_ate, weights, top_n)

    # --- noise ceiling of the shown target, and what the training-cell average should reach
    if ceiling and held_out and shown in targets:
        t0 = time.perf_counter()
        _ceiling(screen, split_values, shown, list(target_shown.columns), train_cells, summary, config,
                 top_n=top_n, seed=seed, chunk_rows=chunk_rows, ate_of=None if levels is None else ate_of)  # fmt: skip
        timings["ceiling_s"] = time.perf_counter() - t0

    # --- intervals recalibrated on the validation cells (the test cells stay unseen)
    calibrated = None
    if held_out and "val" in targets:
        val = targets["val"]
        base = _training_standard_errors(train_ate, labels, screen) if train_cells is not None else None
        calibrated, info = calibrate_interval(pred, val, val.attrs["standard_error"], base_se=base)
        config["interval_calibration"] = {**info, "fitted_on": "val"}

    # --- held-out IWELBO
    iwelbo = float("nan")
    cells = np.flatnonzero(split_values == iwelbo_split) if split_values is not None else np.zeros(0, int)
    if len(cells) and hasattr(model, "get_iwelbo"):
        t0 = time.perf_counter()
        iwelbo = float(model.get_iwelbo(indices=cells, n_samples=int(iwelbo_samples), seed=seed))
        timings["iwelbo_s"] = time.perf_counter() - t0
        if iwelbo_split in summary.columns:
            summary.loc["iwelbo", iwelbo_split] = iwelbo
            summary.loc["n_iwelbo_cells", iwelbo_split] = float(len(cells))
    else:
        logger.warning("no %r cells: the held-out IWELBO is not computed", iwelbo_split)
    config.update(
        {
            "iwelbo_split": iwelbo_split,
            "iwelbo_samples": int(iwelbo_samples),
            "n_iwelbo_cells": int(len(cells)),
            "seed": int(seed),
            "timings": timings,
        }
    )
    return AteEvaluation(
        key=key or "model",
        data_ate=target_shown,
        per_perturbation=per,
        summary=summary,
        model_ate=pred,
        model_ate_calibrated=calibrated,
        baselines=baselines,
        iwelbo=iwelbo,
        config=config,
        per_level=per_level,
    )


# ---------------------------------------------------------------------- writing
def score_against_truth(evaluation: AteEvaluation, truth: pd.DataFrame, *, top_n: int | None = None) -> dict[str, Any]:
    r"""Every predictor of an evaluation scored against known true ATEs (a simulated screen).

    Parameters
    ----------
    evaluation
        A :func:`compute_ate_evaluation` result.
    truth
        genes x labels true ATEs (e.g. :func:`cellpert.data.simulate.sams_true_ate`), with
        the screen's gene names; the labels scored are those of ``evaluation.data_ate``
        that it holds.
    top_n
        Genes per label of the "top" metrics (default: the evaluation's ``top_n``), chosen
        by the largest \|true ATE\|.

    Returns
    -------
    dict
        ``labels`` (how many), ``<predictor>_<metric>`` for every predictor and metric of
        :data:`METRIC_NAMES`, and for the model ``coverage`` / ``interval_width`` of its
        90% intervals (``coverage_calibrated`` with recalibrated ones).
    """
    top_n = int(evaluation.config.get("top_n", 20) if top_n is None else top_n)
    labels = [c for c in evaluation.data_ate.columns if c in truth.columns]
    genes = evaluation.data_ate.index.intersection(truth.index)
    if not labels or not len(genes):
        raise CellpertInputError("the true ATEs share no label or gene with the evaluation; align their names.")
    truth = truth.loc[genes, labels]
    predictions = ({"model": evaluation.model_ate.ate} if evaluation.model_ate is not None else {}) | evaluation.baselines
    out: dict[str, Any] = {"labels": len(labels), "top_n": top_n}
    for name, frame in predictions.items():
        _, metrics = ate_metrics(truth, frame.loc[genes], top_n=top_n)
        out.update({f"{name}_{m}": float(metrics[m]) for m in METRIC_NAMES})
    if evaluation.model_ate is not None:
        cov = interval_coverage(truth, evaluation.model_ate.lo, evaluation.model_ate.hi)
        out.update(coverage=cov["coverage"], interval_width=cov["mean_width"])
        if evaluation.model_ate_calibrated is not None:
            cal = interval_coverage(truth, evaluation.model_ate_calibrated.lo, evaluation.model_ate_calibrated.hi)
            out["coverage_calibrated"] = cal["coverage"]
    return out


def _varm_frame(frame: pd.DataFrame, var_names: pd.Index) -> pd.DataFrame:
    """genes x labels frame on the file's genes (genes the run dropped get NaN)."""
    out = frame.reindex(pd.Index(var_names.astype(str))).astype(np.float64)
    out.index = var_names
    out.index.name = None
    out.columns = pd.Index([str(c) for c in out.columns])
    return out


def write_ate_results(adata: ad.AnnData, evaluation: AteEvaluation) -> list[str]:
    """Put an evaluation's results into an AnnData (in memory; no file is written).

    Writes
    ------
    ``varm["ate_data"]``
        genes x labels DataFrame: the data ATE (perturbseq space) the evaluation scored
        against, ``config["target"]`` (default: each label's cells of the shown split vs
        that split's control cells; with ``data_cells="all"``: all cells); genes the
        evaluated screen lacks get NaN.
    ``varm["ate_<key>"]``, ``varm["ate_<key>_lo"]``, ``varm["ate_<key>_hi"]``
        The model's ATE of every label and its 90% interval (counterfactual estimator:
        posterior interval over the global latents; prior estimator: Monte Carlo
        interval), same layout (only with a model).
    ``varm["ate_<key>_cal_lo"]``, ``varm["ate_<key>_cal_hi"]``
        The interval recalibrated on the validation cells
        (:func:`cellpert.evaluate.calibrate_interval`; only with validation cells).
    ``varm["ate_data_level_<level>"]``, ``varm["ate_<key>_level_<level>"]``
        With ``level_key``: the data ATE and the model's ATE within each level (the
        unsuffixed keys then hold the pooled ATEs).
    ``uns["cellpert"]["ate_metrics"][<key>]``
        ``per_level`` (with ``level_key``: :attr:`AteEvaluation.per_level`),
        ``per_perturbation`` (label x [``split``, ``n_cells``,
        ``<predictor>_<metric>``] DataFrame), ``summary`` (metric x split DataFrame; only
        with a model), ``config`` (the evaluation settings and timings) and, with a
        model, ``model`` (``name``, ``run_dir``, ``config`` of the run).
    ``uns["cellpert"]["ate_data_source"]``
        ``key`` and ``target`` of the evaluation ``varm["ate_data"]`` belongs to: each
        evaluation replaces it, so after evaluations under several keys it is the last
        one's (each key's own figures stay in ``ate_metrics[<key>]``).

    Returns
    -------
    list of str
        The keys written (``"varm/ate_data"``, ...).
    """
    written = []
    adata.varm["ate_data"] = _varm_frame(evaluation.data_ate, adata.var_names)
    written.append("varm/ate_data")
    if evaluation.model_ate is not None:
        for suffix, frame in (
            ("", evaluation.model_ate.ate),
            ("_lo", evaluation.model_ate.lo),
            ("_hi", evaluation.model_ate.hi),
        ):
            name = f"ate_{evaluation.key}{suffix}"
            adata.varm[name] = _varm_frame(frame, adata.var_names)
            written.append(f"varm/{name}")
    if evaluation.model_ate_calibrated is not None:
        for suffix, frame in (("_cal_lo", evaluation.model_ate_calibrated.lo), ("_cal_hi", evaluation.model_ate_calibrated.hi)):
            name = f"ate_{evaluation.key}{suffix}"
            adata.varm[name] = _varm_frame(frame, adata.var_names)
            written.append(f"varm/{name}")
    for lvl, frame in evaluation.data_ate.attrs.get("per_level", {}).items():
        name = f"ate_data_level_{lvl}"
        adata.varm[name] = _varm_frame(frame, adata.var_names)
        written.append(f"varm/{name}")
    if evaluation.model_ate is not None:
        for lvl, level_ate in evaluation.model_ate.per_level.items():
            name = f"ate_{evaluation.key}_level_{lvl}"
            adata.varm[name] = _varm_frame(level_ate.ate, adata.var_names)
            written.append(f"varm/{name}")
    uns = adata.uns.setdefault(UNS_KEY, {})
    metrics = uns.setdefault(METRICS_UNS_KEY, {})
    config = {k: v for k, v in evaluation.config.items() if k != "identity"}
    per = evaluation.per_perturbation.copy()
    per.index = per.index.astype(str)
    entry: dict[str, Any] = {"per_perturbation": per, "config": to_uns(config)}
    if evaluation.summary is not None:
        entry["summary"] = evaluation.summary.copy()
    if evaluation.per_level is not None:
        entry["per_level"] = evaluation.per_level.copy()
    if evaluation.config.get("identity"):
        entry["model"] = to_uns(evaluation.config["identity"])
    metrics[evaluation.key] = entry
    written.append(f"uns/{UNS_KEY}/{METRICS_UNS_KEY}/{evaluation.key}")
    # varm["ate_data"] holds the last evaluation's target: say whose
    uns[DATA_SOURCE_UNS_KEY] = to_uns({"key": evaluation.key, "target": str(evaluation.config.get("target", ""))})
    written.append(f"uns/{UNS_KEY}/{DATA_SOURCE_UNS_KEY}")
    return written
