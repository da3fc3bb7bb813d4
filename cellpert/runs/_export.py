"""Exports: what a trained model learned, written into the screen's AnnData.

:func:`write_latents` works in memory on any AnnData (a notebook needs no run directory);
:func:`export_latents` is ``cellpert export-latents``: load a run, write, save safely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from cellpert._errors import CellpertInputError
from cellpert.data import UNS_KEY, read_h5ad, save_results, to_uns
from cellpert.evaluate import ica_rotate, mask_recovery, mcc
from cellpert.runs._registry import model_key
from cellpert.runs._rundir import load_run
from cellpert.runs._validate import EXPORT_OPTIONS, validate_options

__all__ = ["export_latents", "write_latents"]


def write_latents(
    adata: ad.AnnData,
    model: Any,
    *,
    key_added: str,
    ica: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    rows: np.ndarray | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a fitted model's cell-level and global outputs into an AnnData (in memory).

    Parameters
    ----------
    adata
        The AnnData to write into: the model's own (``rows=None``), or a larger one whose
        rows ``rows`` are the model's cells, in the model's order.
    model
        A trained cellpert model (any family: it provides ``export_fields``).
    key_added
        Prefix of the keys written (e.g. ``"samsvae"``).
    ica
        Also write the ICA rotation of the ``latent`` output (and, for SAMS-VAE and
        CPA-VAE, the masks in the ICA basis).
    seed
        FastICA's seed.
    batch_size
        Minibatch size of the encoder passes.
    rows
        Rows of ``adata`` holding the model's cells; other rows get NaN.
    config
        Stored as ``uns["cellpert"]["models"][key_added]["config"]`` (e.g. the run's options).

    Writes
    ------
    ``obsm["X_<key>_<name>"]``
        For each cell-level output of the model (SAMS-VAE family: ``basal`` z^b and
        ``latent`` z, posterior means); rows outside ``rows`` get NaN.
    ``obsm["X_<key>_ica"]``
        With ``ica=True``: the ``latent`` output whitened and rotated by FastICA
        (docs/models.md, *Identifiability metrics and ICA*).
    ``uns["cellpert"]["models"]["<key>"]``
        The model's global outputs (e.g. ``embeddings``, ``mask_probabilities`` as
        perturbation x latent DataFrames), ``config`` and, with ``ica=True`` on a screen
        with ground truth (``obsm["X_true_latent"]``), ``ica_mcc`` (MCC before and after
        ICA). With ``ica=True`` for SAMS-VAE and CPA-VAE also ``ica_shifts`` and
        ``ica_masks`` (perturbation x ICA dimension: each perturbation's latent shift in
        the ICA basis and its support, see :meth:`~cellpert.models.SAMSVAE.get_ica_masks`)
        and, when the screen holds the simulator's true mask, ``ica_mask_f1`` (mask F1 of
        q(M) before and of the ICA masks after).

    Returns
    -------
    What was written: ``{"obsm": [...], "uns": [...]}``, plus ``"ica_mcc"`` and
    ``"ica_mask_f1"`` when computed.
    """
    key = key_added
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    fields = model.export_fields(batch_size=batch_size)
    written: dict[str, Any] = {"obsm": [], "uns": []}

    def put(obsm_key: str, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.shape[0] != len(rows):
            raise CellpertInputError(
                f"the model has {values.shape[0]} cells but {len(rows)} rows were given; pass rows= "
                "with the model's cells."
            )
        array = np.full((adata.n_obs, values.shape[1]), np.nan, dtype=np.float32)
        array[rows] = values
        adata.obsm[obsm_key] = array
        written["obsm"].append(obsm_key)

    for name, values in fields.get("obsm", {}).items():
        put(f"X_{key}_{name}", values)
    entry = {name: to_uns(value) for name, value in fields.get("uns", {}).items()}
    if config is not None:
        entry["config"] = to_uns(config)
    if ica:
        latent = np.asarray(fields.get("obsm", {}).get("latent"))
        if latent.ndim != 2:
            raise CellpertInputError(f"--ica needs a latent representation; {type(model).__name__} exports none.")
        found = None
        if "embeddings" in fields.get("uns", {}):  # SAMS-VAE and CPA-VAE: masks in the ICA basis
            found = model.get_ica_masks(seed=seed, latent=latent)
            rotated = found["latent"]
            entry["ica_shifts"] = to_uns(found["shifts"])
            entry["ica_masks"] = to_uns(found["masks"])
        else:
            rotated = ica_rotate(latent, seed=seed)
        put(f"X_{key}_ica", rotated)
        if "X_true_latent" in adata.obsm:
            truth = np.asarray(adata.obsm["X_true_latent"])[rows]
            before, after = mcc(truth, latent), mcc(truth, rotated)
            entry["ica_mcc"] = {"before": float(before), "after": float(after)}
            written["ica_mcc"] = entry["ica_mcc"]
            true_mask = _true_mask(adata, model)
            if found is not None and true_mask is not None:
                f1 = {"after": mask_recovery(true_mask, found["masks"].to_numpy(), matching=after)["f1"]}
                if "mask_probabilities" in fields["uns"]:
                    probs = fields["uns"]["mask_probabilities"].to_numpy()
                    f1["before"] = mask_recovery(true_mask, probs, matching=before)["f1"]
                entry["ica_mask_f1"] = f1
                written["ica_mask_f1"] = f1
    uns = adata.uns.setdefault(UNS_KEY, {})
    models = uns.setdefault("models", {})
    models[key] = entry
    written["uns"] = [f"uns/{UNS_KEY}/models/{key}/{name}" for name in entry]
    return written


def export_latents(
    screen_path: str | os.PathLike,
    *,
    model_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    batch_size: int | None = None,
    ica: bool = False,
    seed: int = 0,
    backed: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write what a trained run learned into the screen's h5ad (through the safe writer).

    Loads the run (:func:`cellpert.runs.load_run`), writes with :func:`write_latents`
    (keys prefixed by the run's model key; cells outside the run's ``subset`` get NaN;
    ``config`` is the run's resolved options) and saves with
    :func:`cellpert.data.save_results` (a temporary file, then an atomic replace).
    ``backed``: read the counts from disk (default: as the run was trained); the
    file is then written back without loading them.

    Returns
    -------
    The path written, and what was written (see :func:`write_latents`).
    """
    checked = validate_options({"batch_size": batch_size, "ica": ica, "seed": seed, "backed": backed}, table=EXPORT_OPTIONS)
    batch_size, seed = checked["batch_size"], checked["seed"]
    run = load_run(screen_path, model_dir, backed=backed)
    # a backed screen is written back without loading its counts (cellpert.data.save_results)
    full = read_h5ad(screen_path, backed=bool(run.screen.adata.isbacked))
    written = write_latents(
        full, run.model, key_added=model_key(run.config["model"]), ica=ica, seed=seed, batch_size=batch_size,
        rows=_subset_rows(full, run.config.get("subset")), config=run.config,
    )  # fmt: skip
    path = save_results(full, screen_path, out=out)
    return path, written


def _true_mask(adata: ad.AnnData, model: Any) -> np.ndarray | None:
    """The simulator's perturbation x latent mask, rows in the model's perturbation order."""
    truth = adata.uns.get(UNS_KEY, {}).get("ground_truth", {})
    if "mask" not in truth or "perturbation_names" not in truth:
        return None
    names = [str(n) for n in truth["perturbation_names"]]
    wanted = [str(n) for n in getattr(model, "perturbation_names", [])]
    if not wanted or not set(wanted) <= set(names):
        return None
    return np.asarray(truth["mask"])[[names.index(n) for n in wanted]]


def _subset_rows(adata: ad.AnnData, subset: str | None) -> np.ndarray:
    if not subset:
        return np.arange(adata.n_obs)
    return np.flatnonzero(np.asarray(adata.obs.eval(subset), dtype=bool))
