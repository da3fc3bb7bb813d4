"""The SAMS-VAE simulation (Bereket & Karaletsos 2023; docs/models.md, *Simulators*), with count noise."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError
from cellpert.data._layout import split_label
from cellpert.data.simulate._common import (
    CONTROL_LABEL,
    LEAKY_SLOPE,
    RandomMLP,
    build_adata,
    check_int,
    check_positive,
    check_probability,
    check_sizes,
    child_rngs,
    draw_library_size,
    gene_names,
    perturbation_names,
    random_mlp,
    sample_counts,
    string_array,
    write_in_blocks,
)

__all__ = ["sams_true_ate", "simulate_sams"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def simulate_sams(
    *,
    seed: int = 0,
    n_perturbations: int = 100,
    n_latent: int = 15,
    mask_prob: float = 2 / 15,
    n_cells_per_perturbation: Sequence[int] = (50, 10, 10),
    n_control_cells: Sequence[int] = (50, 10, 10),
    n_combinations: int = 0,
    n_genes: int = 100,
    library_size: float = 2000.0,
    library_size_log_sd: float = 0.3,
    nb_theta: float = 10.0,
    decoder_hidden: Sequence[int] = (50, 50, 50, 50),
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    n_batches: int = 1,
    batch_effect: float = 0.0,
    batch_space: str = "latent",
    batch_imbalance: float = 0.0,
    out: str | os.PathLike | None = None,
) -> ad.AnnData | Path:
    """Simulate a screen with sparse additive mechanism shifts, as in the SAMS-VAE paper.

    Generative story (docs/models.md, *SAMS-VAE*, *Simulators*):

    1. mask m_tk ~ Bernoulli(``mask_prob``) (T x K). A perturbation whose mask row came out
       all zero gets one dimension chosen uniformly, so that every perturbation acts; the
       expected mask density is therefore ``p + (1-p)^K / K`` (0.141 instead of 0.133 for
       p = 2/15, K = 15);
    2. embedding e_tk = sign · magnitude, sign ±1 with probability ½, magnitude ~
       N(``effect_mean``, ``effect_sd``²); the shift of perturbation t is m_t ⊙ e_t;
    3. basal state z^b_i ~ N(0, I_K); z_i = z^b_i + Σ_t D_it (m_t ⊙ e_t), where D_i has a 1
       for each perturbation cell i received (two for a combination "A+B");
    4. decoder: a random MLP K -> ``decoder_hidden`` -> G with leaky ReLUs (slope 0.2), no
       biases, orthogonal variance-scaled weights (as in :func:`simulate_sparse_shift`);
       its outputs are standardised per gene (mean 0, standard deviation 1 over all cells);
    5. library size ℓ_i ~ LogNormal(log ``library_size``, ``library_size_log_sd``²) and
       x_ig ~ NB(ℓ_i · softmax_g(logits_i), θ = ``nb_theta``). (The paper's continuous
       version adds Gaussian noise instead; this is the count version.)

    Batches (option, ``n_batches > 1``; docs/models.md, *Covariates*): each cell gets a
    batch ``b_i`` (``obs['batch']``, ``"b0"``, ``"b1"``…). Control cells are spread
    uniformly; the cells of perturbation group g (singles then combinations, in order)
    go to batch ``g mod n_batches`` with probability ``1/B + batch_imbalance (1 - 1/B)``
    and to the others uniformly, so ``batch_imbalance`` = 0 spreads every perturbation
    evenly and 1 puts each in one batch. Batch b shifts the cells by β_b ~
    N(0, ``batch_effect``² I): in the latent space (``batch_space="latent"``, the decoder
    sees ``z_i + β_{b_i}``) or in gene space (``"gene"``, ``logits_i + β_{b_i}``, one
    shift per gene). A perturbation's effect then differs between batches, and its naive
    data ATE (all its cells against all control cells) mixes in the batch shift; the
    true ATE (:func:`sams_true_ate`) pools the batches as the control cells do
    (uniformly), or is taken within one batch.

    Combinations: ``n_combinations`` distinct unordered pairs of distinct perturbations,
    drawn uniformly, labelled ``"P003+P045"`` (lower index first). Cells are grouped:
    controls, then P000, P001, …, then the combinations (in sorted order). Within each
    group the first cells are ``"train"``, the next ``"val"``, the last ``"test"`` (cells
    of a group are exchangeable, so this is a random split).

    Parameters
    ----------
    seed
        Seed of :func:`numpy.random.default_rng`; the same seed gives identical arrays.
    n_perturbations
        T, the number of single perturbations (``P000``, ``P001``, …).
    n_latent
        K, the latent dimension.
    mask_prob
        Probability of each mask entry, in (0, 1).
    n_cells_per_perturbation
        (train, val, test) cells of each perturbation and each combination (the paper
        uses (500, 100, 100)).
    n_control_cells
        (train, val, test) control cells (at least one in total).
    n_combinations
        Number of double perturbations "A+B" (at most T(T-1)/2).
    n_genes
        G.
    library_size
        Median library size.
    library_size_log_sd
        Standard deviation of log ℓ_i.
    nb_theta
        Inverse dispersion θ of the negative binomial.
    decoder_hidden
        Widths of the decoder's hidden layers.
    effect_mean, effect_sd
        Mean and standard deviation of the embedding magnitudes.
    n_batches, batch_effect, batch_space, batch_imbalance
        Batches (see above): their number, the standard deviation of their shifts,
        ``"latent"`` or ``"gene"``, and how unevenly perturbations spread over them
        (in [0, 1]).
    out
        Write the screen to this ``.h5ad`` file in row blocks instead of returning it,
        so that the count matrix is never in memory at once (per-cell latents, labels
        and library sizes are). The file is written to a temporary name and renamed
        when complete. The file holds the same screen as the AnnData returned without
        ``out`` (the same blocks are drawn in the same order).

    Returns
    -------
    The path written (with ``out``), else an AnnData with

    - ``X``: CSR float32 counts, cells x genes;
    - ``obs['perturbation']``: ``"control"``, ``"P000"``…, ``"P003+P045"``… (categorical);
    - ``obs['cellpert_split']``: train / val / test in the given numbers per label;
    - ``obs['true_library_size']``: ℓ_i;
    - ``obs['batch']``: the batch (with ``n_batches > 1``);
    - ``obsm['X_true_latent']``: z (cells x K, float32);
    - ``obsm['X_true_basal']``: z^b (cells x K, float32);
    - ``uns['cellpert']['screen']``: perturbation key and control label;
    - ``uns['cellpert']['ground_truth']``: ``simulator`` (``"sams"``), ``seed``, ``params``,
      ``perturbation_names`` (T), ``effects`` (E, T x K float64), ``mask`` (T x K int8),
      ``shift`` (mask ⊙ E, T x K float64), ``combinations`` (labels, C),
      ``combination_parts`` (C x 2 int64 row indices into ``perturbation_names``),
      ``batch_shift`` (B x K or B x G, with batches), ``batch_space`` and
      ``decoder`` (``W0``…, ``negative_slope``, ``center``, ``scale``).

    Raises
    ------
    CellpertInputError
        For sizes or options out of range.
    """
    params = dict(
        seed=seed, n_perturbations=n_perturbations, n_latent=n_latent, mask_prob=mask_prob,
        n_cells_per_perturbation=tuple(np.atleast_1d(n_cells_per_perturbation).tolist()),
        n_control_cells=tuple(np.atleast_1d(n_control_cells).tolist()),
        n_combinations=n_combinations, n_genes=n_genes, library_size=library_size,
        library_size_log_sd=library_size_log_sd, nb_theta=nb_theta,
        decoder_hidden=tuple(np.atleast_1d(decoder_hidden).tolist()), effect_mean=effect_mean,
        effect_sd=effect_sd, n_batches=n_batches, batch_effect=batch_effect, batch_space=batch_space,
        batch_imbalance=batch_imbalance,
    )  # fmt: skip
    n_pert = check_int("n_perturbations", n_perturbations, minimum=1)
    n_latent = check_int("n_latent", n_latent, minimum=1)
    mask_prob = check_probability("mask_prob", mask_prob)
    cells = check_sizes("n_cells_per_perturbation", n_cells_per_perturbation, n=3)
    controls = check_sizes("n_control_cells", n_control_cells, n=3)
    n_pairs = n_pert * (n_pert - 1) // 2
    n_combos = check_int("n_combinations", n_combinations, minimum=0, maximum=n_pairs)
    n_genes = check_int("n_genes", n_genes, minimum=1)
    library_size = check_positive("library_size", library_size)
    library_size_log_sd = check_positive("library_size_log_sd", library_size_log_sd, allow_zero=True)
    nb_theta = check_positive("nb_theta", nb_theta)
    effect_sd = check_positive("effect_sd", effect_sd)
    effect_mean = float(effect_mean)
    hidden = [check_int("decoder_hidden", h, minimum=1) for h in np.atleast_1d(decoder_hidden)]
    if not hidden:
        raise CellpertInputError("decoder_hidden (--decoder-hidden) needs at least one layer width, e.g. 50.")
    n_batches = check_int("n_batches", n_batches, minimum=1)
    batch_effect = check_positive("batch_effect", batch_effect, allow_zero=True)
    batch_imbalance = check_positive("batch_imbalance", batch_imbalance, allow_zero=True)
    if batch_imbalance > 1:
        raise CellpertInputError(f"batch_imbalance (--batch-imbalance) must be in [0, 1], got {batch_imbalance}.")
    if batch_space not in ("latent", "gene"):
        raise CellpertInputError(f"batch_space (--batch-space) must be 'latent' or 'gene', got {batch_space!r}.")
    # (the sixth stream, batches, leaves the first five as they were without batches)
    rng_effects, rng_decoder, rng_cells, rng_counts, rng_combos, rng_batches = child_rngs(seed, 6)

    # --- mechanism shifts (T x K)
    # sparse mask m_tk ~ Bernoulli(mask_prob)
    mask = rng_effects.random((n_pert, n_latent)) < mask_prob
    # a perturbation with an empty mask row gets one target dimension ~ Uniform{0, …, K-1}
    empty = np.flatnonzero(~mask.any(axis=1))
    mask[empty, rng_effects.integers(0, n_latent, size=len(empty))] = True
    # sign of each embedding entry: ±1 with probability 1/2
    sign = rng_effects.choice(np.array([-1.0, 1.0]), size=(n_pert, n_latent))
    # magnitude of each embedding entry ~ N(effect_mean, effect_sd²)
    magnitude = rng_effects.normal(effect_mean, effect_sd, size=(n_pert, n_latent))
    embedding = sign * magnitude
    mask = mask.astype(np.int8)
    shift = mask * embedding

    # --- combinations: distinct unordered pairs of distinct perturbations
    parts = _sample_pairs(rng_combos, n_pert, n_combos)
    names = perturbation_names(n_pert)
    combo_labels = [f"{names[a]}+{names[b]}" for a, b in parts]

    # --- cells: control, singles, combinations; shift of each group = D_group · shift
    group_shift = np.vstack([np.zeros((1, n_latent)), shift, shift[parts[:, 0]] + shift[parts[:, 1]]])
    n_groups = 1 + n_pert + n_combos
    group_sizes = np.array([sum(controls)] + [sum(cells)] * (n_pert + n_combos))
    group = np.repeat(np.arange(n_groups), group_sizes)
    # basal state z^b_i ~ N(0, I_K)
    z_basal = rng_cells.standard_normal((len(group), n_latent)).astype(np.float32)
    # latent state z_i = z^b_i + D_i (m ⊙ e)  (deterministic given z^b and D)
    z = (z_basal + group_shift[group]).astype(np.float32)
    # library size ℓ_i ~ LogNormal(log library_size, library_size_log_sd²)
    library = draw_library_size(rng_cells, len(group), median=library_size, log_sd=library_size_log_sd)

    # --- batches: b_i and the shifts β_b (none with one batch)
    batch, batch_shift = _draw_batches(
        rng_batches, group, n_batches=n_batches, imbalance=batch_imbalance, effect=batch_effect,
        width=n_latent if batch_space == "latent" else n_genes,
    )  # fmt: skip
    decoder_input = z if batch is None or batch_space == "gene" else (z + batch_shift[batch]).astype(np.float32)

    # --- decoder f: K -> hidden… -> G, outputs standardised per gene
    decoder = random_mlp(rng_decoder, [n_latent, *hidden, n_genes], negative_slope=LEAKY_SLOPE)
    decoder = decoder.standardised(decoder_input, per_output=True, center=True)
    count_decoder, count_input = decoder, decoder_input
    if batch is not None and batch_space == "gene":
        # gene-space shift: logits_i + β_{b_i}, the batch one-hot riding along with z
        count_decoder = _GeneShiftedDecoder(decoder, batch_shift)
        count_input = np.hstack([z, np.eye(n_batches, dtype=np.float32)[batch]])
    draw = {"rng": rng_counts, "latent": count_input, "decoder": count_decoder, "normalise": "genes",
            "library_size": library, "likelihood": "nb", "theta": nb_theta}  # fmt: skip
    counts = None if out is not None else sample_counts(**draw)[0]

    # --- split: the first cells of each group train, then val, then test
    split = np.concatenate(
        [np.repeat(SPLITS, controls)] + [np.repeat(SPLITS, cells)] * (n_pert + n_combos)
    ).astype(object)

    ground_truth = {
        "simulator": "sams",
        "seed": int(seed),
        "params": params,
        "perturbation_names": string_array(names),
        "effects": embedding,
        "mask": mask,
        "shift": shift,
        "combinations": string_array(combo_labels),
        "combination_parts": parts.astype(np.int64),
        "decoder": decoder.to_uns(),
    }
    obs = {"true_library_size": library.astype(np.float32)}
    if batch is not None:
        ground_truth["batch_shift"] = batch_shift
        ground_truth["batch_space"] = batch_space
        obs["batch"] = pd.Categorical.from_codes(batch, categories=[f"b{b}" for b in range(n_batches)])
    if out is not None:
        return write_in_blocks(
            Path(out), n_genes=n_genes, draw=draw, group_labels=[CONTROL_LABEL, *names, *combo_labels],
            group_of_cell=group, split=split, obsm={"X_true_latent": z, "X_true_basal": z_basal},
            obs=obs, ground_truth=ground_truth,
        )  # fmt: skip
    return build_adata(
        counts=counts,
        group_labels=[CONTROL_LABEL, *names, *combo_labels],
        group_of_cell=group,
        split=split,
        obsm={"X_true_latent": z, "X_true_basal": z_basal},
        obs=obs,
        ground_truth=ground_truth,
    )


def _draw_batches(
    rng: np.random.Generator, group: np.ndarray, *, n_batches: int, imbalance: float, effect: float, width: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Batch of each cell and the batch shifts (see :func:`simulate_sams`); (None, None) for one batch."""
    if n_batches == 1:
        return None, None
    batch = np.empty(len(group), dtype=np.int64)
    for g in np.unique(group):
        cells = np.flatnonzero(group == g)
        probs = np.full(n_batches, 1.0 / n_batches)
        if g > 0:  # group 0 is control: uniform; perturbation groups favour batch (g - 1) mod B
            probs *= 1.0 - imbalance
            probs[(g - 1) % n_batches] += imbalance
        # b_i ~ Categorical(probs of the cell's group)
        batch[cells] = rng.choice(n_batches, size=len(cells), p=probs)
    # batch shift β_b ~ N(0, effect² I)
    shift = rng.normal(0.0, effect, size=(n_batches, width))
    return batch, shift


class _GeneShiftedDecoder:
    """Decoder logits plus a per-batch gene shift; input ``[z, onehot(batch)]``."""

    def __init__(self, decoder: RandomMLP, shift: np.ndarray) -> None:
        self.decoder, self.shift = decoder, np.asarray(shift, dtype=np.float64)
        self.n_in = int(decoder.weights[0].shape[0])

    @property
    def n_out(self) -> int:
        return self.decoder.n_out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.decoder(x[:, : self.n_in]) + x[:, self.n_in :] @ self.shift


def _sample_pairs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``size`` distinct pairs (a, b), a < b < n, uniformly, sorted; shape (size, 2).

    Pairs are indexed k = b(b-1)/2 + a, so no list of all pairs is built.
    """
    if size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # indices of the chosen pairs, uniformly without replacement among n(n-1)/2
    k = rng.choice(n * (n - 1) // 2, size=size, replace=False).astype(np.int64)
    b = ((1 + np.sqrt(1 + 8 * k.astype(np.float64))) // 2).astype(np.int64)
    b -= (b * (b - 1) // 2) > k  # guard against rounding up
    b += ((b + 1) * b // 2) <= k  # guard against rounding down
    a = k - b * (b - 1) // 2
    pairs = np.column_stack([a, b])
    return pairs[np.lexsort((b, a))]


def sams_true_ate(
    ground_truth: dict | ad.AnnData,
    labels: Sequence[str],
    *,
    n_cells: int = 20_000,
    seed: int = 0,
    chunk_cells: int = 5_000,
    batch: int | str | None = None,
) -> pd.DataFrame:
    """True ATE of labels under the SAMS simulator's own generative model, at large n.

    For each label, ``n_cells`` cells are drawn from the generative model of
    :func:`simulate_sams` (z^b ~ N(0, I), z = z^b + D (m ⊙ e), ℓ ~ LogNormal, NB counts
    from the stored decoder) and put in the perturbseq space log2(1e4 x / Σx + 1); the
    same basal states and library sizes give the control cells (common random numbers),
    so the Monte Carlo error of the difference is small. The ground truth a model's ATE
    and its intervals are checked against.

    Parameters
    ----------
    ground_truth
        ``uns['cellpert']['ground_truth']`` of a simulated screen, or the AnnData itself.
    labels
        Labels such as ``"P003"`` or ``"P003+P045"``.
    n_cells
        Cells per label.
    seed
        Seeds the draws.
    chunk_cells
        Cells per block (bounds memory).
    batch
        A screen simulated with batches: the ATE within this batch (index or ``"b1"``);
        None pools the batches as the control cells are spread, uniformly.

    Returns
    -------
    pd.DataFrame
        genes (``gene0000``…, as the simulator names them) x labels.
    """
    if isinstance(ground_truth, ad.AnnData):
        ground_truth = ground_truth.uns["cellpert"]["ground_truth"]
    if str(ground_truth.get("simulator")) != "sams":
        raise CellpertInputError("sams_true_ate needs the ground truth of `cellpert simulate sams`.")
    params = ground_truth["params"]
    dec = ground_truth["decoder"]
    n_layers = len([k for k in dec if str(k).startswith("W")])
    decoder = RandomMLP(
        weights=tuple(np.asarray(dec[f"W{i}"], dtype=np.float64) for i in range(n_layers)),
        negative_slope=float(dec["negative_slope"]),
        center=np.atleast_1d(np.asarray(dec["center"], dtype=np.float64)),
        scale=np.atleast_1d(np.asarray(dec["scale"], dtype=np.float64)),
    )
    names = [str(n) for n in ground_truth["perturbation_names"]]
    shift = np.asarray(ground_truth["shift"], dtype=np.float64)
    col = {n: j for j, n in enumerate(names)}
    theta = float(params["nb_theta"])
    rng = np.random.default_rng(seed)
    batch_shift = ground_truth.get("batch_shift")
    gene_space = str(ground_truth.get("batch_space", "latent")) == "gene"
    if batch_shift is not None:
        batch_shift = np.asarray(batch_shift, dtype=np.float64)
        if batch is not None:
            b = int(str(batch).lstrip("b"))
            if not 0 <= b < batch_shift.shape[0]:
                raise CellpertInputError(f"batch {batch!r} is not a simulated batch (0..{batch_shift.shape[0] - 1}).")
            batch_shift = batch_shift[b : b + 1]
    elif batch is not None:
        raise CellpertInputError("batch is given but the screen was simulated without batches.")
    n_genes = decoder.n_out
    out = np.zeros((n_genes, len(labels)))

    def perturbseq(x: np.ndarray) -> np.ndarray:
        # the ATE space of cellpert.evaluate (docs/models.md, *ATE space and data ATE*); the data layer cannot import it
        lib = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
        return np.log2(1e4 * x / lib + 1.0)

    def draw(z: np.ndarray, library: np.ndarray, cell_batch: np.ndarray | None) -> np.ndarray:
        if cell_batch is not None and not gene_space:
            z = z + batch_shift[cell_batch]
        logits = decoder(z)
        if cell_batch is not None and gene_space:
            logits = logits + batch_shift[cell_batch]
        mean = library[:, None] * np.exp(logits - logits.max(1, keepdims=True))
        mean /= np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
        # NB(mean, θ) counts as a Gamma-Poisson mixture
        return perturbseq(rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float64))

    for j, label in enumerate(labels):
        parts = [p for p in split_label(label) if p]
        unknown = [p for p in parts if p not in col]
        if unknown:
            raise CellpertInputError(f"label {label!r}: {unknown[0]!r} is not a simulated perturbation.")
        delta = shift[[col[p] for p in parts]].sum(0)
        total = np.zeros(n_genes)
        for start in range(0, int(n_cells), int(chunk_cells)):
            m = min(int(chunk_cells), int(n_cells) - start)
            # basal state z^b ~ N(0, I); library size ℓ ~ LogNormal(log median, sd²)
            zb = rng.standard_normal((m, shift.shape[1]))
            library = draw_library_size(
                rng, m, median=float(params["library_size"]), log_sd=float(params["library_size_log_sd"])
            )
            # batch b ~ Uniform (as the control cells), or the one batch asked for
            cell_batch = None if batch_shift is None else rng.integers(0, batch_shift.shape[0], size=m)
            total += (draw(zb + delta, library, cell_batch) - draw(zb, library, cell_batch)).sum(0)
        out[:, j] = total / int(n_cells)
    genes = gene_names(n_genes).rename("gene")
    return pd.DataFrame(out, index=genes, columns=pd.Index(list(labels), name="label"))
