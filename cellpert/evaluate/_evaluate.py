"""End-to-end ATE evaluation: data ATE, model ATE, baselines, metrics per split, IWELBO.

This is what ``cellpert evaluate-ate`` runs (MODELS.md §3, §6). The computation
(:func:`compute_ate_evaluation`) works on an in-memory screen and model; the file-level
function (:func:`evaluate_ate`) loads a screen (and a ``cellpert train`` run), computes,
and writes the results back through :func:`cellpert.data.save_results` — the input file
is only replaced, atomically, once everything has been computed, so a failing evaluation
leaves it untouched.

Conventions
-----------
- **Data ATE** (``varm["ate_data"]``, the per-perturbation metrics): by default each
  label's ATE is computed over *all* its cells against *all* control cells of the screen
  (or of the run's ``subset``), whatever their split — the setting of the SAMS-VAE
  paper's notebooks and of the reference numbers. ``data_cells="split"`` instead scores
  split s against the data ATE of the label's cells in split s (minus the mean of the
  control cells of split s, or of all control cells when split s has none).
- **Label splits.** A label belongs to split s when at least one of its cells is in s
  (``"unused"`` cells are ignored). Under the combination split the held-out
  combinations are exactly the ``test`` labels and singles are ``train`` and ``val``
  labels; under a random cell split every label belongs to every split, so with
  ``data_cells="all"`` the ``train``, ``val`` and ``test`` columns of the summary are the
  same numbers (use ``data_cells="split"`` to score on held-out cells). The
  per-perturbation table lists each label's splits (``"test"``, ``"train+val"``,
  ``"train+val+test"``).
- **Baselines** are computed from the data ATE of the *training* cells (split
  ``"train"``, control included): additive (the sum of the parts' training effects) and
  mean (the mean training effect), :func:`cellpert.evaluate.additive_baseline` and
  :func:`cellpert.evaluate.mean_baseline`.
- **Held-out IWELBO**: ``model.get_iwelbo(split=iwelbo_split, n_samples=100)``, the mean
  over that split's cells (MODELS.md §6).
"""

from __future__ import annotations

import logging
import os
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
from cellpert.data import UNS_KEY, PerturbationScreen, load_screen, read_h5ad, save_results, to_uns
from cellpert.data._validate import DEFAULT_CHUNK_ROWS
from cellpert.evaluate._ate import additive_baseline, ate_metrics, data_ate, mean_baseline
from cellpert.evaluate._model_ate import LibrarySize, ModelATE, model_ate

__all__ = [
    "METRIC_NAMES",
    "AteEvaluation",
    "compute_ate_evaluation",
    "evaluate_ate",
    "label_splits",
    "write_ate_results",
]

logger = logging.getLogger(__name__)

#: Metrics of :func:`cellpert.evaluate.ate_metrics` reported per predictor.
METRIC_NAMES = ("pearson", "r2", "pearson_top", "r2_top")
#: Splits reported in the summary (plus ``"all"``: every label).
EVAL_SPLITS = ("train", "val", "test")
#: uns key (under ``uns["cellpert"]``) of the evaluation results.
METRICS_UNS_KEY = "ate_metrics"
#: Key of a data-only evaluation (no model).
DATA_KEY = "data"


@dataclass
class AteEvaluation:
    """Everything an ATE evaluation computed (see :func:`compute_ate_evaluation`)."""

    key: str
    """Output key: the model key (``samsvae``, ``cpa_vae``) or ``"data"``."""
    data_ate: pd.DataFrame
    """genes x labels data ATE over all cells of each label vs all control cells."""
    per_perturbation: pd.DataFrame
    """One row per label: ``split``, ``n_cells`` and ``<predictor>_<metric>``."""
    summary: pd.DataFrame | None
    """``<predictor>_<metric>``, ``n_perturbations``, ``iwelbo`` x splits (None without model)."""
    model_ate: ModelATE | None = None
    """The model's ATEs and intervals (None for a data-only evaluation)."""
    baselines: dict[str, pd.DataFrame] = field(default_factory=dict)
    """``additive`` and ``mean`` predictions (genes x labels) from the training cells."""
    iwelbo: float = float("nan")
    """Mean held-out IWELBO per cell (NaN without model or held-out cells)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Evaluation settings, timings and the model's identity."""
    path: Path | None = None
    """The file written (set by :func:`evaluate_ate`)."""

    @property
    def predictors(self) -> list[str]:
        """Predictors scored: ``model`` (when present), ``additive``, ``mean``."""
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


def _training_ate(screen: PerturbationScreen, split_values: np.ndarray, chunk_rows: int) -> pd.DataFrame:
    train = split_values == "train"
    if not (train & screen.is_control).any():
        logger.warning("no control cell in the training split; the baselines use all control cells")
        train = train | screen.is_control
    return data_ate(screen, cells=train, chunk_rows=chunk_rows)


def _split_target(
    screen: PerturbationScreen, split_values: np.ndarray, s: str, labels: list[str], chunk_rows: int
) -> pd.DataFrame:
    """Data ATE of the labels' split-s cells vs the split's control cells (else all controls)."""
    in_split = split_values == s
    controls = screen.is_control & in_split
    if not controls.any():
        logger.info("split %r has no control cells; its data ATE uses all control cells", s)
        controls = screen.is_control
    cells = (in_split & np.isin(screen.labels, labels)) | controls
    target = data_ate(screen, cells=cells, chunk_rows=chunk_rows)
    return target[[c for c in labels if c in target.columns]]


# ------------------------------------------------------------------ computation
def compute_ate_evaluation(
    screen: PerturbationScreen,
    model: Any = None,
    *,
    key: str | None = None,
    split: np.ndarray | str | None = None,
    data_cells: Literal["all", "split"] = "all",
    n_particles: int = 2500,
    n_groups: int = 50,
    library_size: LibrarySize | float = "fixed",
    top_n: int = 20,
    iwelbo_split: str = "test",
    iwelbo_samples: int = 100,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> AteEvaluation:
    """Data ATE, model ATE, baselines, metrics per split and held-out IWELBO, in memory.

    See the module docstring for the conventions (data ATE over all cells by default,
    label splits, baselines from training cells).

    Parameters
    ----------
    screen
        The screen the model was trained on (for a run: ``load_run(...).screen``).
    model
        A trained model with the prediction protocol of
        :func:`cellpert.evaluate.model_ate` and ``get_iwelbo``; None computes the data
        ATE alone.
    key
        Output key (default: ``"model"`` with a model, ``"data"`` without).
    split
        Split per cell (array) or an obs column; default ``model.split_values()``, else
        ``obs["cellpert_split"]``, else none (only the ``"all"`` column is scored and no
        baselines are computed).
    data_cells
        ``"all"`` (default) or ``"split"``: the data ATE each split is scored against.
    n_particles, n_groups, library_size
        Model ATE options (:func:`cellpert.evaluate.model_ate`).
    top_n
        Genes per perturbation of the "top" metrics.
    iwelbo_split
        Split whose cells the IWELBO is computed on.
    iwelbo_samples
        Importance samples (MODELS.md: 100).
    seed
        Seeds the model ATE and the IWELBO.
    chunk_rows
        Rows per streamed chunk of the data ATE.

    Returns
    -------
    AteEvaluation
    """
    if data_cells not in ("all", "split"):
        raise CellpertInputError(f"data_cells must be 'all' or 'split', not {data_cells!r}.")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ate_all = data_ate(screen, chunk_rows=chunk_rows)
    timings["data_ate_s"] = time.perf_counter() - t0
    labels = list(ate_all.columns)
    split_values = _split_values(screen, model, split)
    splits = label_splits(screen.labels, split_values, screen.control_labels).reindex(labels)
    per = pd.DataFrame(
        {
            "split": splits["split"].astype(str),
            "n_cells": [float(ate_all.attrs["n_cells"].get(c, np.nan)) for c in labels],
        },
        index=pd.Index(labels, name="label"),
    )
    config: dict[str, Any] = {
        "data_cells": data_cells,
        "space": "perturbseq",
        "top_n": int(top_n),
        "n_labels": len(labels),
        "n_control_cells": int(ate_all.attrs["n_control_cells"]),
        "data_ate": "all cells of each label vs all control cells"
        if data_cells == "all"
        else "per split: the label's cells in the split vs the split's control cells",
    }
    if model is None:
        config["timings"] = timings
        return AteEvaluation(
            key=key or DATA_KEY, data_ate=ate_all, per_perturbation=per, summary=None, config=config
        )

    # --- model ATE for every label
    t0 = time.perf_counter()
    pred = model_ate(
        model,
        labels,
        control=screen.control_labels,
        n_particles=n_particles,
        n_groups=n_groups,
        library_size=library_size,
        control_library_sizes=screen.library_size[screen.is_control],
        seed=seed,
        gene_names=screen.gene_names,
    )
    timings["model_ate_s"] = time.perf_counter() - t0
    config.update({f"model_ate_{k}": v for k, v in pred.config.items()})
    predictions: dict[str, pd.DataFrame] = {"model": pred.ate}

    # --- baselines from the training cells' data ATE
    baselines: dict[str, pd.DataFrame] = {}
    if split_values is not None and (split_values == "train").any():
        train_ate = _training_ate(screen, split_values, chunk_rows)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CellpertWarning)
            baselines["additive"] = additive_baseline(train_ate, labels, parts_of=screen.label_parts)
        for w in caught:
            logger.warning("%s", w.message)
        baselines["mean"] = mean_baseline(train_ate, labels)
        config["n_training_labels"] = int(train_ate.shape[1])
    else:
        logger.warning("no training split: the additive and mean baselines are not computed")
    predictions.update(baselines)

    # --- per-perturbation metrics (against the all-cells data ATE)
    for name, frame in predictions.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CellpertWarning)
            values, _ = ate_metrics(ate_all, frame, top_n=top_n)
        for m in METRIC_NAMES:
            per[f"{name}_{m}"] = values[m].to_numpy()

    # --- summary: metric x split
    rows = [f"{name}_{m}" for name in predictions for m in METRIC_NAMES]
    rows += [f"{name}_n_perturbations" for name in predictions] + ["iwelbo", "n_iwelbo_cells"]
    columns = [*EVAL_SPLITS, "all"]
    summary = pd.DataFrame(np.nan, index=pd.Index(rows, name="metric"), columns=pd.Index(columns, name="split"))
    for s in columns:
        chosen = labels if s == "all" else [c for c in labels if bool(splits.loc[c, s])]
        if not chosen:
            continue
        if data_cells == "split" and s != "all":
            target = _split_target(screen, split_values, s, chosen, chunk_rows)
        else:
            target = ate_all[chosen]
        for name, frame in predictions.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CellpertWarning)
                _, values = ate_metrics(target, frame, top_n=top_n)
            for m in METRIC_NAMES:
                summary.loc[f"{name}_{m}", s] = values[m]
            summary.loc[f"{name}_n_perturbations", s] = values["n_perturbations"]

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
        data_ate=ate_all,
        per_perturbation=per,
        summary=summary,
        model_ate=pred,
        baselines=baselines,
        iwelbo=iwelbo,
        config=config,
    )


# ---------------------------------------------------------------------- writing
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
        genes x labels DataFrame: the data ATE (perturbseq space) of each label over all
        its cells vs all control cells; genes the evaluated screen lacks get NaN.
    ``varm["ate_<key>"]``, ``varm["ate_<key>_lo"]``, ``varm["ate_<key>_hi"]``
        The model's ATE and its 90% Monte Carlo interval (see
        :func:`cellpert.evaluate.model_ate`), same layout (only with a model).
    ``uns["cellpert"]["ate_metrics"][<key>]``
        ``per_perturbation`` (label x [``split``, ``n_cells``,
        ``<predictor>_<metric>``] DataFrame), ``summary`` (metric x split DataFrame; only
        with a model), ``config`` (the evaluation settings and timings) and, with a
        model, ``model`` (``name``, ``run_dir``, ``config`` of the run).

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
    uns = adata.uns.setdefault(UNS_KEY, {})
    metrics = uns.setdefault(METRICS_UNS_KEY, {})
    config = {k: v for k, v in evaluation.config.items() if k != "identity"}
    per = evaluation.per_perturbation.copy()
    per.index = per.index.astype(str)
    entry: dict[str, Any] = {"per_perturbation": per, "config": to_uns(config)}
    if evaluation.summary is not None:
        entry["summary"] = evaluation.summary.copy()
    if evaluation.config.get("identity"):
        entry["model"] = to_uns(evaluation.config["identity"])
    metrics[evaluation.key] = entry
    written.append(f"uns/{UNS_KEY}/{METRICS_UNS_KEY}/{evaluation.key}")
    return written


# ------------------------------------------------------------------------- file
def evaluate_ate(
    screen_path: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    key_added: str | None = None,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    layer: str | None = None,
    subset: str | None = None,
    drop_zero_genes: bool = False,
    data_cells: Literal["all", "split"] = "all",
    n_particles: int = 2500,
    n_groups: int = 50,
    library_size: LibrarySize | float = "fixed",
    top_n: int = 20,
    split: str = "test",
    iwelbo_samples: int = 100,
    seed: int = 0,
    write: bool = True,
) -> AteEvaluation:
    """Evaluate a trained run's ATEs on its screen and write the results into the h5ad.

    With ``model_dir`` the screen is loaded with the run's options (subset, control,
    layer, genes; :func:`cellpert.models._workflow.load_run`) and the split recorded by
    the run is used; without it only the data ATE is computed (with the screen options
    given here).

    Parameters
    ----------
    screen_path
        The screen (``.h5ad``).
    model_dir
        A ``cellpert train`` run directory, or None for the data ATE alone.
    out
        Write to this new file instead of updating ``screen_path`` in place.
    key_added
        Output key (default: the run's model key, e.g. ``samsvae``, ``cpa_vae``).
    perturbation_key, control, layer, subset, drop_zero_genes
        Screen options when there is no ``model_dir`` (ignored otherwise).
    data_cells, n_particles, n_groups, library_size, top_n, iwelbo_samples, seed
        See :func:`compute_ate_evaluation`.
    split
        Split the IWELBO is computed on (and that the command shows first).
    write
        False: compute only.

    Writes
    ------
    See :func:`write_ate_results` (``varm["ate_data"]``, ``varm["ate_<key>"]`` with
    ``_lo`` / ``_hi``, ``uns["cellpert"]["ate_metrics"][<key>]``), through
    :func:`cellpert.data.save_results`. Nothing is written when anything fails.

    Returns
    -------
    AteEvaluation
        With ``path`` set to the file written.
    """
    identity: dict[str, Any] = {}
    if model_dir is not None:
        from cellpert.models._workflow import load_run, model_key

        run = load_run(screen_path, model_dir)
        screen, model = run.screen, run.model
        key = key_added or model_key(str(run.config["model"]))
        identity = {
            "model": str(run.config["model"]),
            "class": type(model).__name__,
            "run_dir": str(Path(run.directory).resolve()),
            "run_config": run.config,
        }
    else:
        if isinstance(control, str):
            control = [c.strip() for c in control.split(",") if c.strip()]
        screen = load_screen(
            screen_path,
            perturbation_key=perturbation_key,
            control=control,
            layer=layer,
            subset=subset,
            drop_zero_genes=drop_zero_genes,
            warn=False,
        )
        model = None
        key = key_added or DATA_KEY
    t0 = time.perf_counter()
    evaluation = compute_ate_evaluation(
        screen,
        model,
        key=key,
        data_cells=data_cells,
        n_particles=n_particles,
        n_groups=n_groups,
        library_size=library_size,
        top_n=top_n,
        iwelbo_split=split,
        iwelbo_samples=iwelbo_samples,
        seed=seed,
    )
    evaluation.config["timings"]["total_s"] = time.perf_counter() - t0
    evaluation.config["identity"] = identity
    evaluation.config["screen"] = str(Path(screen_path).resolve())
    if not write:
        return evaluation
    full = read_h5ad(screen_path)
    write_ate_results(full, evaluation)
    evaluation.path = save_results(full, screen_path, out=out)
    return evaluation
