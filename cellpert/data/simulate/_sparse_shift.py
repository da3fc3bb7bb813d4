"""The sVAE sparse mechanism-shift simulation (Lopez et al. 2023; docs/models.md, *Simulators*)."""

from __future__ import annotations

import logging
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
    check_probability,
    child_rngs,
    draw_library_size,
    perturbation_names,
    random_mlp,
    sample_counts,
    string_array,
)

__all__ = ["simulate_sparse_shift"]

logger = logging.getLogger(__name__)

#: Width and number of the hidden layers of the sVAE reference decoder.
HIDDEN_WIDTH = 40
N_HIDDEN_LAYERS = 3
#: Largest number of target draws per perturbation (k ~ Uniform{1, …, MAX_TARGETS}).
MAX_TARGETS = 3


def simulate_sparse_shift(
    *,
    seed: int = 0,
    n_perturbations: int = 100,
    n_latent: int = 15,
    n_cells_per_perturbation: int = 50,
    n_control_cells: int = 50,
    n_genes: int = 100,
    n_heldout: int = 20,
    mode: Literal["nb", "legacy"] = "nb",
    library_size: float = 2000.0,
    library_size_log_sd: float = 0.3,
    nb_theta: float = 10.0,
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    val_fraction: float = 0.2,
) -> ad.AnnData:
    """Simulate a screen with sparse mechanism shifts, as in the sVAE paper.

    Generative story (docs/models.md, *Simulators*):

    1. for each perturbation a, the number of target draws k_a ~ Uniform{1, 2, 3}; the k_a
       target dimensions are drawn uniformly **with replacement**, as in the reference
       implementation, so a perturbation has about 1.9 distinct targets on average
       (K = 15), not 2;
    2. sign ±1 with probability ½ and magnitude ~ N(``effect_mean``, ``effect_sd``²) per
       entry; μ_a = targets ⊙ magnitude ⊙ sign (T x K); control cells have μ = 0;
    3. z_i ~ N(μ_{a_i}, I_K);
    4. decoder: 3 leaky-ReLU (slope 0.2) layers of width 40, then a linear map to G genes,
       no biases; each weight Gaussian, orthogonalised and scaled by
       √(2/(1+0.2²)) · √(2/(fan_in+fan_out)); logits divided by their global standard
       deviation (over all cells and genes);
    5. counts. ``mode="nb"`` (default, corrected): library size ℓ_i ~
       LogNormal(log ``library_size``, ``library_size_log_sd``²), x_ig ~ NB(ℓ_i ·
       softmax_g(logits_i), θ = ``nb_theta``). ``mode="legacy"`` (the reference): exp(logits)
       is normalised over **cells** per gene so that each gene totals 1e6 expected counts
       over the data set, and x_ig ~ Poisson(1e6 · that); ``library_size``,
       ``library_size_log_sd`` and ``nb_theta`` are then unused.

    Cells are grouped: controls first, then the cells of P000, P001, …. The paper setting
    is ``n_cells_per_perturbation=250, n_genes=100`` (the defaults are smaller for speed).

    Parameters
    ----------
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives identical arrays.
    n_perturbations
        T, the number of perturbations (named ``P000``, ``P001``, …).
    n_latent
        K, the latent dimension.
    n_cells_per_perturbation
        Cells of each perturbation.
    n_control_cells
        Control cells (μ = 0), at least 1.
    n_genes
        G.
    n_heldout
        The last ``n_heldout`` perturbations are held out: their cells are ``"test"``.
    mode
        ``"nb"`` or ``"legacy"``, see above.
    library_size
        Median library size (``mode="nb"``).
    library_size_log_sd
        Standard deviation of log ℓ_i (``mode="nb"``).
    nb_theta
        Inverse dispersion θ of the negative binomial (``mode="nb"``).
    effect_mean, effect_sd
        Mean and standard deviation of the shift magnitudes.
    val_fraction
        Fraction of the non-held-out cells (and controls) assigned to ``"val"``.

    Returns
    -------
    AnnData with

    - ``X``: CSR float32 counts, cells x genes;
    - ``obs['perturbation']``: ``"control"`` or ``"P000"``… (categorical);
    - ``obs['cellpert_split']``: ``"train"`` / ``"val"`` (random, 1 - ``val_fraction`` /
      ``val_fraction``) for controls and the first T - ``n_heldout`` perturbations,
      ``"test"`` for the held-out ones;
    - ``obs['true_library_size']``: expected library size Σ_g E[x_ig] of each cell;
    - ``obsm['X_true_latent']``: z, cells x K (float32);
    - ``uns['cellpert']['screen']``: perturbation key and control label;
    - ``uns['cellpert']['ground_truth']``: ``simulator`` (``"sparse-shift"``), ``seed``,
      ``params`` (the arguments), ``perturbation_names`` (T), ``effects`` (μ, T x K
      float64), ``mask`` (T x K int8, 1 where μ ≠ 0), ``n_target_draws`` (k_a, T),
      ``heldout`` (names of the held-out perturbations) and ``decoder`` (``W0``…``W3``,
      ``negative_slope``, ``center``, ``scale``: logits = (z W … - center) / scale).

    Raises
    ------
    CellpertInputError
        For sizes or options out of range.
    """
    params = dict(
        seed=seed, n_perturbations=n_perturbations, n_latent=n_latent,
        n_cells_per_perturbation=n_cells_per_perturbation, n_control_cells=n_control_cells,
        n_genes=n_genes, n_heldout=n_heldout, mode=mode, library_size=library_size,
        library_size_log_sd=library_size_log_sd, nb_theta=nb_theta, effect_mean=effect_mean,
        effect_sd=effect_sd, val_fraction=val_fraction,
    )  # fmt: skip
    n_pert = check_int("n_perturbations", n_perturbations, minimum=1)
    n_latent = check_int("n_latent", n_latent, minimum=1)
    n_cells = check_int("n_cells_per_perturbation", n_cells_per_perturbation, minimum=1)
    n_control = check_int("n_control_cells", n_control_cells, minimum=1)
    n_genes = check_int("n_genes", n_genes, minimum=1)
    n_heldout = check_int("n_heldout", n_heldout, minimum=0, maximum=n_pert)
    mode = check_choice("mode", mode, ("nb", "legacy"))
    library_size = check_positive("library_size", library_size)
    library_size_log_sd = check_positive("library_size_log_sd", library_size_log_sd, allow_zero=True)
    nb_theta = check_positive("nb_theta", nb_theta)
    effect_sd = check_positive("effect_sd", effect_sd)
    effect_mean = float(effect_mean)
    val_fraction = check_probability("val_fraction", val_fraction)
    rng_effects, rng_decoder, rng_cells, rng_counts, rng_split = child_rngs(seed, 5)

    # --- perturbation effects μ_a (T x K)
    # number of target draws of each perturbation: k_a ~ Uniform{1, 2, 3}
    n_draws = rng_effects.integers(1, MAX_TARGETS + 1, size=n_pert)
    # target dimensions: k_a draws from Uniform{0, …, K-1} WITH replacement (reference quirk)
    targets = rng_effects.integers(0, n_latent, size=(n_pert, MAX_TARGETS))
    used = np.arange(MAX_TARGETS)[None, :] < n_draws[:, None]
    mask = np.zeros((n_pert, n_latent), dtype=np.int8)
    mask[np.nonzero(used)[0], targets[used]] = 1
    # sign of each shift: ±1 with probability 1/2
    sign = rng_effects.choice(np.array([-1.0, 1.0]), size=(n_pert, n_latent))
    # magnitude of each shift ~ N(effect_mean, effect_sd²)
    magnitude = rng_effects.normal(effect_mean, effect_sd, size=(n_pert, n_latent))
    effects = mask * magnitude * sign

    # --- cells: controls, then each perturbation's cells
    names = perturbation_names(n_pert)
    group_sizes = np.array([n_control] + [n_cells] * n_pert)
    group = np.repeat(np.arange(n_pert + 1), group_sizes)
    mu = np.vstack([np.zeros((1, n_latent)), effects])[group]
    # latent state z_i ~ N(μ_{a_i}, I_K)
    z = (mu + rng_cells.standard_normal(mu.shape)).astype(np.float32)

    # --- decoder f: K -> 40 -> 40 -> 40 -> G, logits divided by their global std
    sizes = [n_latent] + [HIDDEN_WIDTH] * N_HIDDEN_LAYERS + [n_genes]
    decoder = random_mlp(rng_decoder, sizes, negative_slope=LEAKY_SLOPE)
    decoder = decoder.standardised(z, per_output=False, center=False)

    # --- counts
    if mode == "legacy":
        counts, expected = sample_counts(rng_counts, z, decoder, normalise="cells", likelihood="poisson")
    else:
        library = draw_library_size(rng_cells, z.shape[0], median=library_size, log_sd=library_size_log_sd)
        counts, expected = sample_counts(
            rng_counts, z, decoder, normalise="genes", library_size=library, likelihood="nb", theta=nb_theta
        )

    # --- split: held-out perturbations are test, the rest train / val at random
    heldout = group > n_pert - n_heldout
    split = np.empty(len(group), dtype=object)
    split[heldout] = "test"
    split[~heldout] = random_split(
        int((~heldout).sum()),
        fractions=(1.0 - val_fraction, val_fraction, 0.0),
        seed=int(rng_split.integers(2**63 - 1)),
    )

    ground_truth = {
        "simulator": "sparse-shift",
        "seed": int(seed),
        "params": params,
        "perturbation_names": string_array(names),
        "effects": effects,
        "mask": mask,
        "n_target_draws": n_draws.astype(np.int64),
        "heldout": string_array(names[n_pert - n_heldout :]),
        "decoder": decoder.to_uns(),
    }
    return build_adata(
        counts=counts,
        group_labels=[CONTROL_LABEL, *names],
        group_of_cell=group,
        split=split,
        obsm={"X_true_latent": z},
        obs={"true_library_size": expected.astype(np.float32)},
        ground_truth=ground_truth,
    )
