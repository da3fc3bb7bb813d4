"""Comparative VAE on Kang et al. 2018 (PBMCs, control vs interferon-beta): do the latents split?

Fits :class:`cellpert.models.comparative.ComparativeVAE` (background = control cells,
target = stimulated cells) on the real Kang 2018 subset shipped in ``../shared/data``
(1,975 cells, 7 cell types) and measures, on held-out cells, whether

- the **salient** space t separates stimulated from control cells, and
- the **background** space z mixes the two conditions while keeping cell types apart.

Methods (one row each):

- ``standard``, ``multi-objective``, ``constrained``: the three fitting modes;
- ``standard+mmd``: standard mode with an MMD between control and stimulated cells' z
  (``--mmd-weight``), which pushes z to mix the conditions;
- ``contrastivevi``: scvi-tools' :class:`scvi.external.ContrastiveVI` (its defaults, d_z = 10,
  d_t = 2), a reference;
- ``pca``: 50 principal components of log-normalised expression (one space, no t).

Data: the counts of the ``--n-genes`` most variable genes (scanpy's ``seurat_v3`` flavour
on the raw counts of all cells; the file on disk is not modified) and a seeded random
64/16/20 train/val/test split of the cells (:func:`cellpert.data.make_split`). The models
are fitted on the training cells (validation cells for monitoring only). Measures, with
classifiers fitted on the training cells' latents and scored on the test cells:

- condition and cell-type accuracy from z and from t of a logistic regression
  (standardised inputs) and of a 15-nearest-neighbour classifier (Euclidean, raw
  coordinates: standardising would blow up collapsed latent dimensions and PCA's small
  components); cell-type accuracy from t also on the stimulated cells alone;
- ``cond. acc z within type``: condition accuracy of one logistic regression per cell type
  on z, i.e. what z knows about the condition beyond the cell type. Its chance level is
  the row ``cell type only`` (the majority condition of each cell type), not 0.5: the
  cell-type mix differs between the conditions (e.g. CD14+ monocytes are 25% of the
  control and 8% of the stimulated cells);
- mixing: the mean fraction of same-condition cells among each test cell's 15 nearest
  neighbours in z (test cells only), against its value under perfect mixing within cell
  types (printed below the table);
- leakage: mean ``‖t‖²`` of the control cells' salient means (the model decodes them with
  t = 0), training and test cells, against that of the stimulated test cells.

Chance levels (majority class of the test cells, condition from the cell-type label alone)
are rows of their own. A 2 × 2 figure of ``--figure-method`` (UMAP of z and the 2-D t as
is, all cells, coloured by condition and by cell type) is written to ``--figure``. Run from
the repository root (``make bench-kang BENCH_ARGS=...`` runs the same script)::

    python benchmarks/kang_comparative.py --quick                  # smoke run, about a minute
    python benchmarks/kang_comparative.py --out-csv kang.csv       # 200 epochs, about 6 minutes on 2 cores
    python benchmarks/kang_comparative.py --seed 1 --figure /tmp/kang_seed1.png
    python benchmarks/kang_comparative.py --methods standard+mmd --mmd-weight 100
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellpert.data import load_screen, make_split
from cellpert.models import prepare_anndata
from cellpert.models.comparative import ComparativeVAE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kang2018_pbmc_ifnb_subset.h5ad"
DEFAULT_FIGURE = REPO / "benchmarks" / "figures" / "kang_comparative.png"
ALL_METHODS = ["standard", "multi-objective", "constrained", "standard+mmd", "contrastivevi", "pca"]
SPLIT_KEY = "cellpert_split"
N_NEIGHBOURS = 15

logger = logging.getLogger("kang_comparative")


# ------------------------------------------------------------------------- data
def load_kang(path: Path, n_genes: int, seed: int, n_cells: int | None = None) -> ad.AnnData:
    """Read the Kang subset, keep ``n_genes`` highly variable genes, split the cells.

    Parameters
    ----------
    path
        The ``.h5ad`` file (raw integer counts in ``X``, ``obs['condition']``,
        ``obs['cell_type']``).
    n_genes
        Genes kept (scanpy ``seurat_v3`` on the counts of all cells, among the genes
        detected in at least 3 cells).
    seed
        Seed of the random train/val/test split (and of the cell subsample).
    n_cells
        Keep a seeded random subsample of this many cells (``None``: all; for ``--quick``).

    Returns
    -------
    A new AnnData (raw counts of the selected genes, CSR float32) prepared for cellpert:
    ``obs['cellpert_split']``, the dosage matrix and the library size (of the selected genes).
    """
    import scanpy as sc

    full = ad.read_h5ad(path)
    if n_cells is not None and n_cells < full.n_obs:
        keep = np.sort(np.random.default_rng(seed).choice(full.n_obs, n_cells, replace=False))
        full = full[keep]
    counts = sp.csr_matrix(full.X, dtype=np.float32)
    # seurat_v3's loess fails on genes seen in (almost) no cell, e.g. in --quick subsamples
    detected = np.flatnonzero(np.asarray((counts > 0).sum(axis=0)).ravel() >= 3)
    counts = counts[:, detected]
    probe = ad.AnnData(
        counts.copy(), obs=full.obs[[]].copy(), var=full.var.iloc[detected][[]].copy()
    )
    try:
        sc.pp.highly_variable_genes(probe, flavor="seurat_v3", n_top_genes=n_genes)
    except (ImportError, ValueError) as err:  # seurat_v3 needs scikit-misc; its loess can fail
        logger.info(
            "seurat_v3 gene selection failed (%s); using 'seurat' on log-normalised counts", err
        )
        probe = ad.AnnData(counts.copy(), obs=probe.obs, var=probe.var[[]].copy())
        sc.pp.normalize_total(probe, target_sum=1e4)
        sc.pp.log1p(probe)
        sc.pp.highly_variable_genes(probe, flavor="seurat", n_top_genes=n_genes)
    genes = np.flatnonzero(probe.var["highly_variable"].to_numpy())
    adata = ad.AnnData(
        counts[:, genes],
        obs=full.obs[["condition", "cell_type"]].astype(str).astype("category").copy(),
        var=probe.var.iloc[genes][[]].copy(),
    )
    screen = load_screen(adata, perturbation_key="condition", control="control", warn=False)
    make_split(screen, "random", seed=seed)
    return prepare_anndata(screen)


def log_normalised(adata: ad.AnnData) -> np.ndarray:
    """Dense ``log1p(1e4 x / Σ_g x)`` of the counts."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    size = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(1e4 / np.maximum(size, 1.0)) @ x
    return np.log1p(x.toarray())


# ---------------------------------------------------------------------- methods
def fit_comparative(
    adata: ad.AnnData, method: str, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit one mode of :class:`ComparativeVAE`; the posterior means of z and t of every cell."""
    mode = "standard" if method == "standard+mmd" else method
    ComparativeVAE.setup_anndata(adata)  # control cells (the all-zero dosage rows) = background
    model = ComparativeVAE(
        adata, n_background_latent=args.d_z, n_salient_latent=args.d_t, seed=args.seed
    )
    model.train(
        max_epochs=args.epochs,
        mode=mode,
        penalty_weight=args.penalty_weight,
        mmd_weight=args.mmd_weight if method == "standard+mmd" else 0.0,
        constraint_level=args.constraint_level,
        enable_progress_bar=False,
    )
    z = model.get_latent_representation()
    t = model.get_latent_representation(kind="salient")
    extra = {"final_penalty_weight": float(model.final_penalty_weight_)}
    history = model.history
    if "wasserstein_train" in history:
        extra["final_wasserstein_train"] = float(history["wasserstein_train"].iloc[-1, 0])
    return z, t, extra


def fit_contrastivevi(
    adata: ad.AnnData, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit scvi-tools' ContrastiveVI on the training cells; z and t means of every cell."""
    import scvi
    from scvi.external import ContrastiveVI

    data = ad.AnnData(adata.X.copy(), obs=adata.obs[["condition"]].copy(), var=adata.var[[]].copy())
    scvi.settings.seed = args.seed
    ContrastiveVI.setup_anndata(data)
    model = ContrastiveVI(data, n_background_latent=args.d_z, n_salient_latent=args.d_t)
    train = (adata.obs[SPLIT_KEY] == "train").to_numpy()
    control = (adata.obs["condition"] == "control").to_numpy()
    model.train(
        background_indices=np.flatnonzero(train & control).tolist(),
        target_indices=np.flatnonzero(train & ~control).tolist(),
        max_epochs=args.epochs,
        train_size=1.0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    z = model.get_latent_representation(representation_kind="background")
    t = model.get_latent_representation(representation_kind="salient")
    return z, t, {}


def fit_pca(adata: ad.AnnData, n_components: int = 50) -> np.ndarray:
    """PCA of the log-normalised expression (standardised genes), fitted on the training cells."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = log_normalised(adata)
    train = (adata.obs[SPLIT_KEY] == "train").to_numpy()
    scaler = StandardScaler().fit(x[train])
    pca = PCA(n_components=min(n_components, int(train.sum()) - 1, x.shape[1]), random_state=0)
    pca.fit(np.clip(scaler.transform(x[train]), -10, 10))
    return pca.transform(np.clip(scaler.transform(x), -10, 10))


# ------------------------------------------------------------------------ measures
def accuracies(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray
) -> tuple[float, float]:
    """Test accuracy of a logistic regression and of a kNN classifier trained on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y[train])) < 2:
        majority = pd.Series(y[train]).mode().iloc[0]
        acc = float(np.mean(y[test] == majority))
        return acc, acc
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x[train], y[train])
    k = min(N_NEIGHBOURS, int(train.sum()))
    knn = KNeighborsClassifier(k).fit(x[train], y[train])
    return float(lr.score(x[test], y[test])), float(knn.score(x[test], y[test]))


def condition_given_type(
    x: np.ndarray, condition: np.ndarray, cell_type: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    """Condition accuracy on the test cells of one logistic regression per cell type."""
    correct = 0
    for ct in np.unique(cell_type[test]):
        rows = cell_type == ct
        lr_acc, _ = accuracies(x, condition, train & rows, test & rows)
        correct += lr_acc * int((test & rows).sum())
    return correct / int(test.sum())


def type_only_condition_accuracy(
    condition: np.ndarray, cell_type: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    """Condition accuracy of the majority condition of each cell type (training cells)."""
    table = pd.crosstab(cell_type[train], condition[train])
    guess = table.idxmax(axis=1)
    return float(np.mean(guess.reindex(cell_type[test]).to_numpy() == condition[test]))


def mixing(
    x: np.ndarray, condition: np.ndarray, cell_type: np.ndarray
) -> tuple[float, float, float]:
    """Same-condition fraction among each cell's kNN in ``x``, and two expected values.

    Returns
    -------
    ``(observed, expected_global, expected_within_type)``: the observed mean fraction;
    its value for neighbours drawn at random from all cells; and from the cell's own
    cell type (what a z that keeps cell types apart but mixes conditions within them
    would give).
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(N_NEIGHBOURS, len(x) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    observed = float(np.mean(condition[idx[:, 1:]] == condition[:, None]))
    cond = pd.Series(condition)
    n_c = cond.map(cond.value_counts()).to_numpy()
    expected_global = float(np.mean((n_c - 1) / (len(x) - 1)))
    frame = pd.DataFrame({"c": condition, "t": cell_type})
    n_ct = frame.groupby(["t", "c"])["c"].transform("size").to_numpy()
    n_t = frame.groupby("t")["c"].transform("size").to_numpy()
    expected_type = float(np.mean((n_ct - 1) / np.maximum(n_t - 1, 1)))
    return observed, expected_global, expected_type


def measure(z: np.ndarray, t: np.ndarray | None, adata: ad.AnnData) -> dict:
    """Every measure of one method (see the module docstring)."""
    split = adata.obs[SPLIT_KEY].astype(str).to_numpy()
    train, test = split == "train", split == "test"
    condition = adata.obs["condition"].astype(str).to_numpy()
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    row: dict = {}
    row["cond_z_lr"], row["cond_z_knn"] = accuracies(z, condition, train, test)
    row["type_z_lr"], row["type_z_knn"] = accuracies(z, cell_type, train, test)
    row["cond_given_type_z_lr"] = condition_given_type(z, condition, cell_type, train, test)
    row["mix_z"], row["mix_expected_global"], row["mix_expected_type"] = mixing(
        z[test], condition[test], cell_type[test]
    )
    if t is not None:
        row["cond_t_lr"], row["cond_t_knn"] = accuracies(t, condition, train, test)
        row["type_t_lr"], row["type_t_knn"] = accuracies(t, cell_type, train, test)
        stim = condition == "stimulated"
        row["type_t_stim_lr"], row["type_t_stim_knn"] = accuracies(
            t, cell_type, train & stim, test & stim
        )
        sq = (t**2).sum(1)
        row["t_sq_control_train"] = float(sq[train & ~stim].mean())
        row["t_sq_control"] = float(sq[test & ~stim].mean())
        row["t_sq_stimulated"] = float(sq[test & stim].mean())
    return row


def chance_rows(adata: ad.AnnData) -> list[dict]:
    """Reference rows: majority classes on the test cells, condition from the cell type."""
    split = adata.obs[SPLIT_KEY].astype(str).to_numpy()
    train, test = split == "train", split == "test"
    condition = adata.obs["condition"].astype(str).to_numpy()
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    stim = condition == "stimulated"

    def majority(values: np.ndarray) -> float:
        return float(pd.Series(values).value_counts(normalize=True).iloc[0])

    cond_major, type_major = majority(condition[test]), majority(cell_type[test])
    from_type = type_only_condition_accuracy(condition, cell_type, train, test)
    chance = {"method": "chance (majority class)", "cond_z_lr": cond_major, "type_z_lr": type_major}
    chance.update({"cond_t_lr": cond_major, "cond_t_knn": cond_major, "type_t_lr": type_major})
    chance["type_t_stim_lr"] = majority(cell_type[test & stim])
    typed = {"method": "cell type only", "cond_z_lr": from_type, "cond_given_type_z_lr": from_type}
    return [chance, typed]


# ------------------------------------------------------------------------ output
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "cond. acc z": ("cond_z_lr",),
    "cond. acc z within type": ("cond_given_type_z_lr",),
    "type acc z": ("type_z_lr",),
    "same-cond. nbrs z": ("mix_z",),
    "cond. acc t (LR / kNN)": ("cond_t_lr", "cond_t_knn"),
    "type acc t": ("type_t_lr",),
    "type acc t, stim. cells": ("type_t_stim_lr",),
    "‖t‖² ctrl train / ctrl test / stim test": (
        "t_sq_control_train",
        "t_sq_control",
        "t_sq_stimulated",
    ),
    "fit (s)": ("fit_s",),
}


def to_markdown(rows: list[dict], columns: dict[str, tuple[str, ...]] = TABLE_COLUMNS) -> str:
    """A GitHub table of the rows (without the optional ``tabulate`` dependency).

    Each column shows one or more measures (joined by " / "); missing ones are "—".
    """

    def fmt(key: str, value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "—"
        return (
            f"{value:.0f}"
            if key == "fit_s"
            else f"{value:.3f}"
            if abs(value) < 10
            else f"{value:.1f}"
        )

    header = ["method", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["method"])]
        for keys in columns.values():
            values = [fmt(k, row.get(k)) for k in keys]
            cells.append("—" if all(v == "—" for v in values) else " / ".join(values))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    z: np.ndarray, t: np.ndarray, adata: ad.AnnData, title: str, path: Path, seed: int
) -> None:
    """2 × 2 figure: UMAP of z and the salient means t, coloured by condition and cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    try:
        import umap

        z2 = umap.UMAP(n_neighbors=N_NEIGHBOURS, random_state=seed).fit_transform(z)
        z_label = "UMAP of z"
    except Exception as err:  # pragma: no cover - umap missing or broken
        logger.info("UMAP failed (%s); plotting PCA of z", err)
        zc = z - z.mean(0)
        z2 = zc @ np.linalg.svd(zc, full_matrices=False)[2][:2].T
        z_label = "PCA of z"
    if t.shape[1] > 2:
        tc = t - t.mean(0)
        t = tc @ np.linalg.svd(tc, full_matrices=False)[2][:2].T
    colourings = {
        "condition": adata.obs["condition"].astype(str).to_numpy(),
        "cell type": adata.obs["cell_type"].astype(str).to_numpy(),
    }
    palettes = {"condition": {"control": "#1f77b4", "stimulated": "#d62728"}}
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    order = np.random.default_rng(seed).permutation(len(z))  # no class drawn on top of another
    for i, (coords, label) in enumerate(
        ((z2, z_label), (t, "salient t (posterior means; 99% of cells shown)"))
    ):
        for j, (name, values) in enumerate(colourings.items()):
            ax = axes[i, j]
            cats = sorted(np.unique(values))
            cmap = palettes.get(name) or {c: plt.get_cmap("tab10")(k) for k, c in enumerate(cats)}
            colours = np.array([cmap[v] for v in values], dtype=object)
            ax.scatter(
                coords[order, 0],
                coords[order, 1],
                c=list(colours[order]),
                s=4,
                linewidths=0,
                rasterized=True,
            )
            for c in cats:
                ax.scatter([], [], c=[cmap[c]], s=15, label=c)
            ax.legend(fontsize=7, markerscale=1.2, frameon=False, loc="best")
            if i == 1:  # a few far-out salient means would squash the rest
                lo, hi = np.percentile(coords, [0.5, 99.5], axis=0)
                pad = 0.05 * (hi - lo)
                ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
                ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_title(f"{label}, by {name}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    plt.close(fig)
    buffer.seek(0)
    # a 128-colour palette keeps the file small (about a quarter of the RGBA size)
    Image.open(buffer).convert("RGB").quantize(colors=128).save(path, optimize=True)


# -------------------------------------------------------------------------- main
def main() -> None:
    """Parse the options, fit every method, print the table, write the CSV and figure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Kang 2018 subset (.h5ad)")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="split, model and training seed")
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes kept")
    p.add_argument("--d-z", type=int, default=10, help="background latent dimension")
    p.add_argument("--d-t", type=int, default=2, help="salient latent dimension")
    p.add_argument(
        "--penalty-weight", type=float, default=1.0, help="Wasserstein weight (λ₀ when constrained)"
    )
    p.add_argument(
        "--mmd-weight", type=float, default=10.0, help="MMD weight of the standard+mmd row"
    )
    p.add_argument("--constraint-level", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="smoke run: 400 cells, 300 genes, 3 epochs")
    p.add_argument(
        "--figure", type=Path, default=None, help=f"default {DEFAULT_FIGURE.relative_to(REPO)}"
    )
    p.add_argument(
        "--figure-method", default="standard+mmd", choices=[m for m in ALL_METHODS if m != "pca"]
    )
    p.add_argument(
        "--out-csv", type=Path, default=None, help="write every measure of every method here"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady under CPU contention)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    n_cells = None
    if args.quick:
        n_cells, args.n_genes, args.epochs = 400, 300, 3
    if args.figure is None:
        args.figure = (
            Path(tempfile.gettempdir()) / "kang_comparative_quick.png"
            if args.quick
            else DEFAULT_FIGURE
        )
    torch.set_num_threads(args.threads)
    t_start = time.time()
    adata = load_kang(args.data, args.n_genes, args.seed, n_cells)
    split = adata.obs[SPLIT_KEY].astype(str)
    logger.info(
        "%d cells x %d genes; split %s; test cells by condition %s",
        adata.n_obs,
        adata.n_vars,
        split.value_counts().to_dict(),
        adata.obs.loc[split == "test", "condition"].value_counts().to_dict(),
    )
    rows, spaces = chance_rows(adata), {}
    for method in args.methods:
        t0 = time.time()
        if method == "pca":
            z, t, extra = fit_pca(adata), None, {}
        elif method == "contrastivevi":
            z, t, extra = fit_contrastivevi(adata, args)
        else:
            z, t, extra = fit_comparative(adata, method, args)
        fit_s = time.time() - t0
        row = {"method": method, "fit_s": fit_s, **measure(z, t, adata), **extra}
        if t is not None:
            spaces[method] = (z, t)
        rows.append(row)
        logger.info(
            "%s (%.0f s): %s",
            method,
            fit_s,
            {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
        )
    table = to_markdown(rows)
    print(table)
    print(
        f"\nsame-cond. nbrs z: expected {rows[-1].get('mix_expected_type', float('nan')):.3f} under mixing "
        f"within cell types, {rows[-1].get('mix_expected_global', float('nan')):.3f} over all test cells."
    )
    if args.out_csv is not None:
        args.out_csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out_csv, index=False)
        logger.info("wrote %s", args.out_csv)
    figure_method = args.figure_method if args.figure_method in spaces else next(iter(spaces), None)
    if figure_method is not None:
        z, t = spaces[figure_method]
        label = (
            f"{figure_method} (MMD weight {args.mmd_weight:g})"
            if figure_method == "standard+mmd"
            else figure_method
        )
        title = f"Kang 2018, {label}: {adata.n_obs} cells, {adata.n_vars} genes, {args.epochs} epochs, seed {args.seed}"
        plot(z, t, adata, title, args.figure, args.seed)
        logger.info("wrote %s", args.figure)
    logger.info("total %.0f s", time.time() - t_start)


if __name__ == "__main__":
    main()
