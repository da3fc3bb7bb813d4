"""From a :class:`~cellpert.data.PerturbationScreen` to an AnnData ready for ``setup_anndata``."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellpert._errors import CellpertInputError
from cellpert.data import DEFAULT_SPLIT_KEY, PerturbationScreen, read_split

__all__ = [
    "DEFAULT_DOSAGE_KEY",
    "DEFAULT_LIBRARY_SIZE_KEY",
    "dosage_names_key",
    "prepare_anndata",
]

logger = logging.getLogger(__name__)

#: obsm key of the sparse dosage matrix written by :func:`prepare_anndata`.
DEFAULT_DOSAGE_KEY = "cellpert_dosage"
#: obs column of the observed library size written by :func:`prepare_anndata`.
DEFAULT_LIBRARY_SIZE_KEY = "cellpert_library_size"


def dosage_names_key(dosage_key: str) -> str:
    """Top-level ``uns`` key holding the perturbation names of ``obsm[dosage_key]``."""
    return f"{dosage_key}_names"


def prepare_anndata(
    screen: PerturbationScreen,
    *,
    split_key: str | None = DEFAULT_SPLIT_KEY,
    dosage_key: str = DEFAULT_DOSAGE_KEY,
    library_size_key: str = DEFAULT_LIBRARY_SIZE_KEY,
) -> ad.AnnData:
    """Write the dosage matrix and library size of a screen into its AnnData.

    The result is ready for ``SAMSVAE.setup_anndata(adata, layer=screen.layer)`` (and
    the other models of :mod:`cellpert.models`) with the default keys.

    Parameters
    ----------
    screen
        From :func:`~cellpert.data.load_screen`.
    split_key
        obs column of the train / val / test split (e.g. written by
        :func:`~cellpert.data.make_split`); checked here. ``None`` skips the check.
    dosage_key
        obsm key to write D into.
    library_size_key
        obs column to write ℓ into.

    Returns
    -------
    ``screen.adata`` itself (modified in place), with

    - ``obsm[dosage_key]``: D as a CSR matrix (cells × perturbations, float32; never
      densified, so a 2M × 2,000 screen costs only its non-zeros);
    - ``uns[dosage_key + "_names"]``: the perturbation names (columns of D), as an array
      of strings;
    - ``obs[library_size_key]``: ``Σ_g x_ig`` (float32).
    """
    adata = screen.adata
    if split_key is not None:
        read_split(screen, split_key)
    dosage = sp.csr_matrix(screen.dosage, dtype=np.float32)
    if dosage.shape[0] != adata.n_obs:
        raise CellpertInputError(
            f"the screen's dosage matrix has {dosage.shape[0]} rows but its AnnData {adata.n_obs} cells; "
            "load the screen again."
        )
    adata.obsm[dosage_key] = dosage
    adata.uns[dosage_names_key(dosage_key)] = np.asarray(screen.perturbation_names, dtype=str)
    adata.obs[library_size_key] = np.asarray(screen.library_size, dtype=np.float32)
    logger.info(
        "prepared %d cells x %d genes, %d perturbations (obsm[%r], obs[%r])",
        adata.n_obs,
        adata.n_vars,
        dosage.shape[1],
        dosage_key,
        library_size_key,
    )
    return adata
