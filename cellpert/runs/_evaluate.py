"""File-level ATE evaluation: what ``cellpert evaluate-ate`` does.

Loads a screen (and a ``cellpert train`` run), computes with
:func:`cellpert.evaluate.compute_ate_evaluation`, and writes the results back with
:func:`cellpert.evaluate.write_ate_results` through :func:`cellpert.data.save_results` —
the input file is only replaced, atomically, once everything has been computed, so a
failing evaluation leaves it untouched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellpert._errors import CellpertInputError
from cellpert.data import UNS_KEY, as_list, load_screen, read_h5ad, results_lock, save_results
from cellpert.evaluate import (
    AteEvaluation,
    compute_ate_evaluation,
    score_against_truth,
    write_ate_results,
)
from cellpert.evaluate._evaluate import DATA_KEY
from cellpert.runs._registry import model_key
from cellpert.runs._rundir import load_run
from cellpert.runs._validate import EVALUATE_OPTIONS, validate_options

__all__ = ["evaluate_ate"]


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
    split: str = "test",
    write: bool = True,
    backed: bool | None = None,
    level_key: str | None = "auto",
    truth: bool = False,
    truth_cells: int = 20_000,
    **options: Any,
) -> AteEvaluation:
    """Evaluate a trained run's ATEs on its screen and write the results into the h5ad.

    With ``model_dir`` the screen is loaded with the run's options (subset, control,
    layer, genes; :func:`cellpert.runs.load_run`) and the split recorded by
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
    split
        The split shown: its cells give the IWELBO, its target the per-perturbation
        table, ``varm["ate_data"]`` and the noise ceiling.
    write
        False: compute only.
    backed
        Read the counts from disk (default: as the run was trained; without a run, in
        memory); every pass over the cells streams, and the file is written back
        without loading the counts.
    level_key
        ATEs within the levels of this obs column, pooled (see
        :func:`cellpert.evaluate.compute_ate_evaluation`). ``"auto"`` (default): the
        run's ``batch_key``, else its first categorical covariate, else none; None: none.
    truth
        The screen was simulated by ``cellpert simulate sams``: also score every predictor
        against the simulator's true ATE (:func:`cellpert.data.simulate.sams_true_ate`,
        ``truth_cells`` cells per label; :func:`cellpert.evaluate.score_against_truth`),
        into ``config["truth"]``. An error for any other screen.
    truth_cells
        Cells per label of the true ATE's Monte Carlo average.
    **options
        Options of :func:`cellpert.evaluate.compute_ate_evaluation` (``data_cells``,
        ``estimator``, ``n_particles``, ``n_groups``, ``n_draws``, ``max_cells``, ``library_size``,
        ``top_n``, ``iwelbo_samples``, ``ceiling``, ``seed``, ``latent_shift``), passed on unchanged.

    Writes
    ------
    See :func:`cellpert.evaluate.write_ate_results` (``varm["ate_data"]``, ``varm["ate_<key>"]`` with
    ``_lo`` / ``_hi``, ``uns["cellpert"]["ate_metrics"][<key>]``), through
    :func:`cellpert.data.save_results`. Nothing is written when anything fails.

    Returns
    -------
    AteEvaluation
        With ``path`` set to the file written.
    """
    # every option checked before anything is read
    checked = validate_options(
        {**options, "split": split, "backed": backed, "level_key": None if level_key == "auto" else level_key},
        table=EVALUATE_OPTIONS,
    )
    options = {k: checked[k] for k in options}
    identity: dict[str, Any] = {}
    if model_dir is not None:
        run = load_run(screen_path, model_dir, backed=backed)
        screen, model = run.screen, run.model
        key = key_added or model_key(str(run.config["model"]))
        identity = {
            "model": str(run.config["model"]),
            "class": type(model).__name__,
            "run_dir": str(Path(run.directory).resolve()),
            "run_config": run.config,
        }
    else:
        screen = load_screen(
            screen_path,
            perturbation_key=perturbation_key,
            control=as_list(control),
            layer=layer,
            subset=subset,
            drop_zero_genes=drop_zero_genes,
            warn=False,
            backed=bool(backed),
        )
        model = None
        key = key_added or DATA_KEY
    if level_key == "auto":
        level_key = _default_level_key(model)
    ground_truth = screen.adata.uns.get(UNS_KEY, {}).get("ground_truth", {}) if truth else {}
    if truth and (str(ground_truth.get("simulator")) != "sams" or model is None):
        raise CellpertInputError(
            "--truth needs a trained model and a screen from `cellpert simulate sams` (its true ATE is "
            "computed from uns['cellpert']['ground_truth']); drop --truth for this screen."
        )
    if truth and int(truth_cells) < 100:
        raise CellpertInputError(f"truth_cells must be at least 100, not {truth_cells}.")
    t0 = time.perf_counter()
    evaluation = compute_ate_evaluation(
        screen, model, key_added=key, iwelbo_split=split, level_key=level_key, **options
    )
    if truth:
        from cellpert.data.simulate import sams_true_ate

        t1 = time.perf_counter()
        true_ate = sams_true_ate(
            ground_truth, list(evaluation.data_ate.columns), n_cells=int(truth_cells), seed=int(options.get("seed", 0))
        )
        evaluation.config["truth"] = {**score_against_truth(evaluation, true_ate), "n_cells_per_label": int(truth_cells)}
        evaluation.config["timings"]["truth_s"] = time.perf_counter() - t1
    evaluation.config["timings"]["total_s"] = time.perf_counter() - t0
    evaluation.config["identity"] = identity
    evaluation.config["screen"] = str(Path(screen_path).resolve())
    if not write:
        return evaluation
    # a backed screen is written back without loading its counts (cellpert.data.save_results)
    # the read-modify-write holds the file's lock: a second writer waits instead of failing
    with results_lock(screen_path):
        full = read_h5ad(screen_path, backed=bool(screen.adata.isbacked))
        write_ate_results(full, evaluation)
        evaluation.path = save_results(full, screen_path, out=out)
    return evaluation


def _default_level_key(model: Any) -> str | None:
    """The covariate a model's ATEs are reported by: its batch, else its first categorical covariate."""
    levels = getattr(model, "covariate_levels", None) or {}
    setup = model.adata_manager.registry.get("setup_args", {}) if levels else {}
    if setup.get("batch_key"):
        return str(setup["batch_key"])
    return next(iter(levels), None)
