"""The comparative (background / target) simulation (Lopez et al. 2024; docs/models.md, *Comparative VAE*, *Simulators*)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np

from cellpert.data._splits import random_split
from cellpert.data.simulate._common import (
    CONTROL_LABEL,
    LEAKY_SLOPE,
    build_adata,
    check_choice,
    check_int,
    check_positive,
    child_rngs,
    draw_library_size,
    random_mlp,
    sample_counts,
    string_array,
)

__all__ = ["TARGET_LABEL", "simulate_comparative"]

logger = logging.getLogger(__name__)

#: Label of the target (perturbed) condition.
TARGET_LABEL = "target"
#: Fractions of cells in train / val / test.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def simulate_comparative(
    *,
    seed: int = 0,
    n_background: int = 500,
    n_target: int = 500,
    n_background_latent: int = 5,
    n_salient_latent: int = 2,
    n_genes: int = 100,
    library_size: float = 2000.0,
    library_size_log_sd: float = 0.3,
    likelihood: Literal["nb", "poisson"] = "nb",
    nb_theta: float = 10.0,
    decoder_hidden: Sequence[int] = (40, 40),
) -> ad.AnnData:
    """Simulate a background and a target condition for comparative models.

    Generative story (docs/models.md, *Comparative VAE*, *Simulators*):

    1. every cell has a background latent z_i ~ N(0, I_{d_z});
    2. target cells have a salient latent t_i ~ N(0, I_{d_t}); background cells have t_i = 0;
    3. decoder f: a random MLP [z, t] -> ``decoder_hidden`` -> G with leaky ReLUs (slope
       0.2), no biases, orthogonal variance-scaled weights (as in
       :func:`simulate_sparse_shift`); logits = f / (global standard deviation of f);
    4. library size ℓ_i ~ LogNormal(log ``library_size``, ``library_size_log_sd``²) and
       x_ig ~ NB(ℓ_i · softmax_g(logits_i), θ = ``nb_theta``) (or Poisson).

    Cells are grouped: background first, then target.

    Parameters
    ----------
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives identical arrays.
    n_background
        Background (control) cells, at least 1.
    n_target
        Target cells, at least 1.
    n_background_latent
        d_z, dimension of the shared latent z.
    n_salient_latent
        d_t, dimension of the salient latent t.
    n_genes
        G.
    library_size
        Median library size.
    library_size_log_sd
        Standard deviation of log ℓ_i.
    likelihood
        ``"nb"`` or ``"poisson"``.
    nb_theta
        Inverse dispersion θ (``likelihood="nb"``).
    decoder_hidden
        Widths of the decoder's hidden layers.

    Returns
    -------
    AnnData with

    - ``X``: CSR float32 counts, cells x genes;
    - ``obs['perturbation']``: ``"control"`` (background) or ``"target"`` (categorical);
    - ``obs['cellpert_split']``: random train / val / test, 80 / 10 / 10;
    - ``obs['true_library_size']``: ℓ_i;
    - ``obsm['X_true_background']``: z (cells x d_z, float32);
    - ``obsm['X_true_salient']``: t (cells x d_t, float32; zeros for background rows);
    - ``obsm['X_true_latent']``: [z, t] (cells x (d_z + d_t), the decoder input);
    - ``uns['cellpert']['screen']``: perturbation key and control label;
    - ``uns['cellpert']['ground_truth']``: ``simulator`` (``"comparative"``), ``seed``,
      ``params``, ``perturbation_names`` (``["target"]``) and ``decoder`` (``W0``…,
      ``negative_slope``, ``center``, ``scale``).

    Raises
    ------
    CellpertInputError
        For sizes or options out of range.
    """
    params = dict(
        seed=seed, n_background=n_background, n_target=n_target,
        n_background_latent=n_background_latent, n_salient_latent=n_salient_latent,
        n_genes=n_genes, library_size=library_size, library_size_log_sd=library_size_log_sd,
        likelihood=likelihood, nb_theta=nb_theta,
        decoder_hidden=tuple(np.atleast_1d(decoder_hidden).tolist()),
    )  # fmt: skip
    n_bg = check_int("n_background", n_background, minimum=1)
    n_tg = check_int("n_target", n_target, minimum=1)
    d_z = check_int("n_background_latent", n_background_latent, minimum=1)
    d_t = check_int("n_salient_latent", n_salient_latent, minimum=1)
    n_genes = check_int("n_genes", n_genes, minimum=1)
    library_size = check_positive("library_size", library_size)
    library_size_log_sd = check_positive("library_size_log_sd", library_size_log_sd, allow_zero=True)
    likelihood = check_choice("likelihood", likelihood, ("nb", "poisson"))
    nb_theta = check_positive("nb_theta", nb_theta)
    hidden = [check_int("decoder_hidden", h, minimum=1) for h in np.atleast_1d(decoder_hidden)]
    rng_decoder, rng_cells, rng_counts, rng_split = child_rngs(seed, 4)

    n_cells = n_bg + n_tg
    group = np.repeat([0, 1], [n_bg, n_tg])
    # background latent z_i ~ N(0, I_dz), every cell
    z = rng_cells.standard_normal((n_cells, d_z)).astype(np.float32)
    # salient latent t_i ~ N(0, I_dt) for target cells; t_i = 0 for background cells
    t = np.zeros((n_cells, d_t), dtype=np.float32)
    t[n_bg:] = rng_cells.standard_normal((n_tg, d_t))
    # library size ℓ_i ~ LogNormal(log library_size, library_size_log_sd²)
    library = draw_library_size(rng_cells, n_cells, median=library_size, log_sd=library_size_log_sd)

    # decoder f on [z, t], logits divided by their global std
    latent = np.hstack([z, t])
    decoder = random_mlp(rng_decoder, [d_z + d_t, *hidden, n_genes], negative_slope=LEAKY_SLOPE)
    decoder = decoder.standardised(latent, per_output=False, center=False)
    counts, _ = sample_counts(
        rng_counts, latent, decoder, normalise="genes", library_size=library,
        likelihood=likelihood, theta=nb_theta,
    )  # fmt: skip

    # split: cells assigned at random to train / val / test, 80 / 10 / 10
    split = random_split(n_cells, fractions=SPLIT_FRACTIONS, seed=int(rng_split.integers(2**63 - 1)))
    ground_truth = {
        "simulator": "comparative",
        "seed": int(seed),
        "params": params,
        "perturbation_names": string_array([TARGET_LABEL]),
        "decoder": decoder.to_uns(),
    }
    return build_adata(
        counts=counts,
        group_labels=[CONTROL_LABEL, TARGET_LABEL],
        group_of_cell=group,
        split=split,
        obsm={"X_true_latent": latent, "X_true_background": z, "X_true_salient": t},
        obs={"true_library_size": library.astype(np.float32)},
        ground_truth=ground_truth,
    )
