"""ICA post-processing of latents (docs/models.md, *Identifiability metrics and ICA*): whitening + FastICA, latent shifts, ICA masks.

Used by the models (:meth:`cellpert.models.SAMSVAE.get_ica_masks`) and by the evaluation
(:mod:`cellpert.evaluate`, which re-exports these functions).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning

from cellpert._errors import CellpertInputError, CellpertWarning

__all__ = ["as_matrix", "ica_masks", "ica_rotate", "latent_shifts"]

logger = logging.getLogger(__name__)


def as_matrix(x: Any, name: str) -> np.ndarray:
    """A finite float64 matrix (rows x columns); 1-D input becomes one column."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CellpertInputError(f"{name} must be a numeric matrix (cells x dimensions).") from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise CellpertInputError(f"{name} must be 2-D (cells x dimensions), got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CellpertInputError(f"{name} is empty (shape {arr.shape}).")
    if not np.isfinite(arr).all():
        raise CellpertInputError(f"{name} contains NaN or infinite values; drop or fix those rows.")
    return arr


# ------------------------------------------------------------------------------- ICA
def ica_rotate(
    latent: Any, *, seed: int = 0, max_iter: int = 1000, tol: float = 1e-4
) -> np.ndarray:
    """Whiten latent means and rotate them with FastICA (docs/models.md, *Identifiability metrics and ICA*).

    Latents identifiable only up to a linear map are brought back to (near) independent
    axes; compare :func:`cellpert.evaluate.mcc` before and after. Whitening is done here (PCA on the
    centred latents) so that directions with no variance (constant or collinear
    dimensions) are dropped instead of producing NaN.

    Parameters
    ----------
    latent
        Latent means, cells x K.
    seed
        ``random_state`` of :class:`sklearn.decomposition.FastICA`.
    max_iter, tol
        Passed to FastICA. Non-convergence gives a :class:`~cellpert.CellpertWarning`.

    Returns
    -------
    np.ndarray
        Independent components, cells x r (r = rank of the centred latents, at most K),
        each with zero mean and unit variance. Their order and signs are arbitrary: use
        :func:`cellpert.evaluate.match_latents` against the truth.

    Raises
    ------
    CellpertInputError
        When the latents are constant (nothing to rotate) or not finite.
    """
    x = as_matrix(latent, "latent")
    if x.shape[0] < 3:
        raise CellpertInputError(f"ICA needs at least 3 cells (got {x.shape[0]}).")
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / (x.shape[0] - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    keep = eigval > max(eigval.max(), 0.0) * 1e-10
    if not keep.any() or eigval.max() <= 0:
        raise CellpertInputError("the latents are constant: there is nothing for ICA to rotate.")
    if (~keep).any():
        logger.info("ICA: dropping %d latent direction(s) with no variance", int((~keep).sum()))
    white = xc @ (eigvec[:, keep] / np.sqrt(eigval[keep]))
    if white.shape[1] == 1:
        return white
    ica = FastICA(whiten=False, random_state=seed, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(white)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        warnings.warn(
            f"FastICA did not converge in {max_iter} iterations; the rotation may be rough "
            "(raise max_iter or check the latents).",
            CellpertWarning,
            stacklevel=2,
        )
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # FastICA on white data returns unit-variance sources up to numerical error
    sources = sources - sources.mean(axis=0)
    sources /= sources.std(axis=0, ddof=1)
    return sources


def latent_shifts(latent: Any, dosage: Any) -> np.ndarray:
    """Each perturbation's additive shift of the latents: least squares ``z_i ≈ c + D_i S``.

    The SAMS-VAE family's latent is ``z_i = z^b_i + D_i (E ⊙ M)`` with ``E[z^b] = 0``, so the
    regression of the latent means on ``[1, D]`` estimates ``E ⊙ M`` (rows of ``S``) in
    whatever basis the latents are expressed in; combinations count additively.

    Parameters
    ----------
    latent
        Latent means, cells x K.
    dosage
        D, cells x T (dense or scipy sparse; control rows all zero).

    Returns
    -------
    np.ndarray
        ``S``, T x K. A perturbation that no cell received gets a zero row.
    """
    import scipy.sparse as sp

    z = as_matrix(latent, "latent")
    d = sp.csr_matrix(dosage, dtype=np.float64)
    if d.shape[0] != z.shape[0]:
        raise CellpertInputError(f"dosage has {d.shape[0]} rows but the latents have {z.shape[0]} cells.")
    design = sp.hstack([np.ones((z.shape[0], 1)), d], format="csr")
    gram = (design.T @ design).toarray()
    rhs = np.asarray(design.T @ z)
    seen = np.diag(gram) > 0
    shifts = np.zeros((d.shape[1], z.shape[1]))
    solution = np.linalg.lstsq(gram[np.ix_(seen, seen)], rhs[seen], rcond=None)[0]
    shifts[seen[1:]] = solution[1:]
    return shifts


def ica_masks(
    latent: Any, dosage: Any, *, threshold: float = 0.5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Perturbation-to-latent masks in the ICA basis of the latents.

    A model whose priors are (nearly) invariant under linear maps of the latent space, as
    SAMS-VAE's are (N(0, I) basal state and embeddings; only the weak Bernoulli mask prior
    prefers sparse axes), learns its latent only up to such a map, and its q(M) then lives
    in a mixed basis where every perturbation's effect is dense. This option un-mixes the
    latents with :func:`ica_rotate`, estimates each perturbation's shift in the un-mixed
    basis with :func:`latent_shifts`, and keeps, per perturbation, the dimensions whose
    shift exceeds ``threshold`` times that perturbation's largest absolute shift.

    Parameters
    ----------
    latent
        Latent means (cells x K), e.g. SAMS-VAE's ``latent`` z.
    dosage
        D, cells x T.
    threshold
        Fraction of each perturbation's largest absolute shift above which a dimension
        counts as targeted.
    seed
        FastICA's seed.

    Returns
    -------
    ``{"latent": cells x r ICA latents, "shifts": T x r shifts, "masks": T x r 0/1 floats}``.
    """
    if not 0.0 < threshold < 1.0:
        raise CellpertInputError(f"threshold must be in (0, 1), got {threshold}.")
    rotated = ica_rotate(latent, seed=seed)
    shifts = latent_shifts(rotated, dosage)
    largest = np.abs(shifts).max(axis=1, keepdims=True)
    masks = ((np.abs(shifts) > threshold * largest) & (largest > 0)).astype(np.float64)
    return {"latent": rotated, "shifts": shifts, "masks": masks}
