"""Replogle et al. 2022 (K562 CRISPRi Perturb-seq; figshare+ article 20029387).

Run ``python -m data_recipes.replogle2022 --dataset essential --out data/replogle_essential.h5ad``
(about 10 GB download) or ``--dataset gwps`` (about 60 GB) to download the raw single-cell
file into ``--cache-dir`` and write a cellpert-ready screen. The input is read in backed
mode and processed one block of rows at a time, so memory holds the output (and a few
per-perturbation summaries), never the whole input. :func:`preprocess_replogle2022` does
the same on a file already on disk.

``--preset filtered`` is a *reconstruction* of the "Replogle filtered" sets used by sVAE+ and
SAMS-VAE (perturbations with a strong transcriptional phenotype); see the README.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm

from cellpert.data import record_screen_keys, to_uns, write_h5ad_atomic
from data_recipes._common import (
    RecipeError,
    download,
    iter_selected_rows,
    read_name_list,
    run_main,
    seurat_v3_select,
)

__all__ = [
    "DATASETS",
    "PRESETS",
    "download_replogle2022",
    "main",
    "preprocess_replogle2022",
]

logger = logging.getLogger("data_recipes.replogle2022")

FIGSHARE_DOWNLOAD = "https://plus.figshare.com/ndownloader/files/"
ARTICLE = "https://plus.figshare.com/articles/dataset/20029387"


@dataclass(frozen=True)
class _Dataset:
    file_id: int
    file_name: str
    size: str


#: Raw single-cell files of the figshare+ article 20029387.
DATASETS = {
    "essential": _Dataset(35773219, "K562_essential_raw_singlecell_01.h5ad", "about 10 GB"),
    "gwps": _Dataset(35775507, "K562_gwps_raw_singlecell_01.h5ad", "about 60 GB"),
}
#: Label column and control label of the source files.
SOURCE_LABEL_KEY = "gene"
SOURCE_CONTROL = "non-targeting"


@dataclass(frozen=True)
class _Preset:
    min_cells_per_perturbation: int = 0
    min_de_genes: int | None = None
    n_top_genes: int | None = None


#: Named option sets. "filtered" is our reconstruction, not the papers' exact list.
PRESETS = {
    "none": _Preset(),
    "filtered": _Preset(min_cells_per_perturbation=50, min_de_genes=25, n_top_genes=None),
}


def download_replogle2022(dataset: str, cache_dir: str | os.PathLike) -> Path:
    """Download one raw single-cell file (``"essential"`` or ``"gwps"``) into ``cache_dir``."""
    if dataset not in DATASETS:
        raise RecipeError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    info = DATASETS[dataset]
    return download(f"{FIGSHARE_DOWNLOAD}{info.file_id}", Path(cache_dir) / info.file_name)


def _sorted_group_sums(codes: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of ``block`` per code: (distinct codes, their row sums)."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    return sorted_codes[starts], np.add.reduceat(block[order], starts, axis=0)


def _log_normalise(block: np.ndarray) -> np.ndarray:
    """log1p of counts per 10,000 (rows are cells)."""
    lib = block.sum(axis=1, keepdims=True)
    return np.log1p(block * (1e4 / np.maximum(lib, 1.0)))


def _de_gene_counts(
    X, keep: np.ndarray, codes: np.ndarray, n_labels: int, control_code: int, *, alpha: float, chunk_rows: int
) -> np.ndarray:
    """Per label, the number of genes whose mean log-normalised expression differs from control.

    A Welch z statistic per (label, gene) on log1p(CP10k) values, two-sided, Bonferroni
    over genes at level ``alpha``. One pass over the kept cells.
    """
    n_genes = X.shape[1]
    s1 = np.zeros((n_labels, n_genes))
    s2 = np.zeros((n_labels, n_genes))
    n = np.bincount(codes[keep], minlength=n_labels).astype(np.float64)
    for rows, block in iter_selected_rows(X, keep, chunk_rows=chunk_rows):
        y = _log_normalise(block)
        uniq, sums = _sorted_group_sums(codes[rows], y)
        s1[uniq] += sums
        _, sq = _sorted_group_sums(codes[rows], y * y)
        s2[uniq] += sq
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n[:, None]
        var = np.maximum(s2 - n[:, None] * mean**2, 0.0) / np.maximum(n[:, None] - 1, 1.0)
        se = np.sqrt(var / n[:, None] + var[control_code] / n[control_code])
        z = (mean - mean[control_code]) / se
    threshold = norm.isf(alpha / 2 / n_genes)
    hits = np.nan_to_num(np.abs(z), nan=0.0) > threshold
    return hits.sum(axis=1)


def preprocess_replogle2022(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    min_cells_per_perturbation: int = 0,
    max_cells_per_perturbation: int | None = None,
    keep_perturbations: Sequence[str] | None = None,
    min_de_genes: int | None = None,
    de_alpha: float = 0.05,
    n_top_genes: int | None = None,
    keep_target_genes: bool = True,
    control_label: str = "control",
    chunk_rows: int = 5_000,
    seed: int = 0,
) -> ad.AnnData:
    """Turn a Replogle 2022 raw single-cell ``.h5ad`` into a cellpert screen (no download).

    The file is opened in backed mode and read in blocks of ``chunk_rows`` rows; only the
    kept cells and genes are held in memory, as CSR.

    Cell and perturbation filters, applied in this order (controls are always kept):

    1. ``keep_perturbations``: keep only these labels (values of obs ``gene``).
    2. ``min_cells_per_perturbation``: drop labels with fewer cells.
    3. ``max_cells_per_perturbation``: subsample larger labels (controls too) with ``seed``.
    4. ``min_de_genes``: drop labels with fewer differentially expressed genes than this
       (Welch z on log1p(CP10k) vs control, Bonferroni over genes at ``de_alpha``).

    Parameters
    ----------
    path
        ``K562_essential_raw_singlecell_01.h5ad``, ``K562_gwps_raw_singlecell_01.h5ad`` or a
        file of the same layout (raw counts in ``X``, obs ``gene`` with ``non-targeting``
        controls, var ``gene_name``).
    out
        Write the screen here (atomically); None only returns it.
    n_top_genes
        Seurat-v3 highly variable genes to keep (computed in chunks on the kept cells,
        equal to scanpy's ``flavor="seurat_v3"``); None keeps every gene.
    keep_target_genes
        With ``n_top_genes``, also keep the measured target genes.
    control_label
        Label given to ``non-targeting`` cells (use ``"non-targeting"`` to keep it).
    chunk_rows
        Rows read per block.

    Returns
    -------
    AnnData with ``X`` (raw counts, CSR float32), ``obs["perturbation"]`` (target gene
    symbol, or ``control_label``), the source obs columns (``gene`` renamed
    ``source_gene``), ``obs["n_counts"]`` (library size over all genes of the file),
    ``var_names`` = gene symbols (made unique) with ``var["gene_id"]``,
    ``var["is_target"]`` (and ``var["highly_variable"]``, ``var["highly_variable_rank"]``
    with ``n_top_genes``), ``uns["cellpert"]["screen"]`` and ``uns["cellpert"]["recipe"]``;
    ``uns["cellpert"]["recipe"]["n_de_genes"]`` holds the DE counts per kept label when
    ``min_de_genes`` is used.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such file; download it first (python -m data_recipes.replogle2022).")
    src = ad.read_h5ad(path, backed="r")
    try:
        return _preprocess_backed(
            src,
            path,
            out,
            min_cells_per_perturbation=min_cells_per_perturbation,
            max_cells_per_perturbation=max_cells_per_perturbation,
            keep_perturbations=keep_perturbations,
            min_de_genes=min_de_genes,
            de_alpha=de_alpha,
            n_top_genes=n_top_genes,
            keep_target_genes=keep_target_genes,
            control_label=control_label,
            chunk_rows=chunk_rows,
            seed=seed,
        )
    finally:
        src.file.close()


def _preprocess_backed(src: ad.AnnData, path: Path, out, **opt) -> ad.AnnData:
    if SOURCE_LABEL_KEY not in src.obs.columns:
        raise RecipeError(
            f"{path.name}: obs has no {SOURCE_LABEL_KEY!r} column (columns: "
            f"{', '.join(map(str, src.obs.columns[:12]))}); is this a Replogle 2022 raw single-cell file?"
        )
    raw_labels = src.obs[SOURCE_LABEL_KEY].astype(str).to_numpy()
    if not (raw_labels == SOURCE_CONTROL).any():
        raise RecipeError(f"{path.name}: no {SOURCE_CONTROL!r} cells in obs[{SOURCE_LABEL_KEY!r}].")
    if any("+" in lab for lab in raw_labels):
        raise RecipeError(f"{path.name}: labels contain '+', which cellpert reads as a combination.")
    labels = np.where(raw_labels == SOURCE_CONTROL, opt["control_label"], raw_labels)
    control = opt["control_label"]
    is_control = labels == control
    keep = np.ones(len(labels), dtype=bool)
    summary: dict = {}

    if opt["keep_perturbations"] is not None:
        wanted = set(map(str, opt["keep_perturbations"]))
        absent = sorted(wanted - set(raw_labels))
        if absent:
            logger.info("%d requested perturbation(s) are not in the file: %s", len(absent), ", ".join(absent[:10]))
        keep &= is_control | np.isin(raw_labels, list(wanted))
    uniq, codes = np.unique(labels, return_inverse=True)
    control_code = int(np.flatnonzero(uniq == control)[0])
    if opt["min_cells_per_perturbation"]:
        n_cells = np.bincount(codes[keep], minlength=len(uniq))
        small = n_cells < opt["min_cells_per_perturbation"]
        small[control_code] = False
        keep &= ~small[codes]
    if opt["max_cells_per_perturbation"]:
        rng = np.random.default_rng(opt["seed"])
        cap = int(opt["max_cells_per_perturbation"])
        for c in np.unique(codes[keep]):
            idx = np.flatnonzero(keep & (codes == c))
            if len(idx) > cap:
                keep[rng.choice(idx, size=len(idx) - cap, replace=False)] = False
    if opt["min_de_genes"] is not None:
        n_de = _de_gene_counts(
            src.X, keep, codes, len(uniq), control_code, alpha=opt["de_alpha"], chunk_rows=opt["chunk_rows"]
        )
        strong = n_de >= opt["min_de_genes"]
        strong[control_code] = True
        present = np.unique(codes[keep])
        logger.info(
            "%d of %d perturbations have >= %d DE genes",
            int(strong[present].sum()) - 1,
            len(present) - 1,
            opt["min_de_genes"],
        )
        keep &= strong[codes]
        kept_codes = [c for c in np.unique(codes[keep]) if c != control_code]
        summary["n_de_genes"] = pd.DataFrame(
            {"perturbation": uniq[kept_codes].astype(str), "n_de_genes": n_de[kept_codes]}
        )
    if not (keep & ~is_control).any():
        raise RecipeError("no perturbed cell passes the filters; relax --min-cells-per-perturbation / --min-de-genes.")

    var = src.var.copy()
    symbols = var["gene_name"].astype(str).to_numpy() if "gene_name" in var.columns else var.index.astype(str).to_numpy()
    targets = set(labels[keep & ~is_control])
    is_target = np.isin(symbols, list(targets))
    gene_keep = np.ones(src.n_vars, dtype=bool)
    hvg = None
    if opt["n_top_genes"] and opt["n_top_genes"] < src.n_vars:
        logger.info("selecting %d highly variable genes (two passes)", opt["n_top_genes"])
        hvg = seurat_v3_select(src.X, keep, int(opt["n_top_genes"]), chunk_rows=opt["chunk_rows"])
        gene_keep = hvg["highly_variable"].to_numpy().copy()
        if opt["keep_target_genes"]:
            gene_keep |= is_target
    cols = np.flatnonzero(gene_keep)

    blocks, n_counts = [], np.zeros(int(keep.sum()))
    done = 0
    for _, block in iter_selected_rows(src.X, keep, chunk_rows=opt["chunk_rows"], dense=False):
        n_counts[done : done + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        done += block.shape[0]
        blocks.append(block[:, cols])
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    X.sort_indices()

    obs = src.obs.loc[keep].copy()
    obs = obs.rename(columns={SOURCE_LABEL_KEY: "source_gene"})
    obs["perturbation"] = pd.Categorical(labels[keep])
    obs["n_counts"] = n_counts
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            obs[c] = obs[c].cat.remove_unused_categories()
    out_var = pd.DataFrame(index=ad.utils.make_index_unique(pd.Index(symbols[cols])))
    out_var["gene_id"] = var.index.astype(str).to_numpy()[cols]
    for c in var.columns:
        if c != "gene_name":
            out_var[c] = var[c].to_numpy()[cols]
    out_var["is_target"] = is_target[cols]
    if hvg is not None:
        out_var["highly_variable"] = hvg["highly_variable"].to_numpy()[cols]
        out_var["highly_variable_rank"] = hvg["highly_variable_rank"].to_numpy()[cols]
    adata = ad.AnnData(X=X, obs=obs, var=out_var)

    record_screen_keys(adata, perturbation_key="perturbation", control=control)
    options = {k: v for k, v in opt.items() if k != "keep_perturbations"}
    options["keep_perturbations"] = "None" if opt["keep_perturbations"] is None else len(opt["keep_perturbations"])
    adata.uns["cellpert"]["recipe"] = to_uns(
        {
            "name": "replogle2022",
            "source": f"Replogle et al. 2022, figshare+ article 20029387 ({path.name})",
            "url": ARTICLE,
            "source_control": SOURCE_CONTROL,
            "options": options,
            **summary,
        }
    )
    n_pert = adata.obs["perturbation"].nunique() - 1
    logger.info("%d cells, %d perturbations, %d genes", adata.n_obs, n_pert, adata.n_vars)
    if out is not None:
        write_h5ad_atomic(adata, out)
        logger.info("wrote %s", out)
    return adata


def _cli(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.replogle2022",
        description="Download a Replogle 2022 K562 screen (figshare+ 20029387) and write a cellpert-ready .h5ad.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .h5ad")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="essential", help="which raw file (default essential)")
    parser.add_argument("--input", type=Path, help="use this already downloaded raw .h5ad instead of downloading")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/raw/replogle2022"), help="where the raw file goes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="none", help="option set; 'filtered' is a reconstruction (README)")
    parser.add_argument("--min-cells-per-perturbation", type=int, help="drop perturbations with fewer cells")
    parser.add_argument("--max-cells-per-perturbation", type=int, help="subsample larger groups (seeded)")
    parser.add_argument("--keep-perturbations", type=Path, help="text file, one target gene per line: keep only these")
    parser.add_argument("--min-de-genes", type=int, help="drop perturbations with fewer DE genes vs control")
    parser.add_argument("--de-alpha", type=float, default=0.05, help="family-wise level of the DE count (default 0.05)")
    parser.add_argument("--n-top-genes", type=int, help="Seurat-v3 highly variable genes (default: all genes)")
    parser.add_argument("--no-keep-target-genes", dest="keep_target_genes", action="store_false", help="with --n-top-genes, do not add measured target genes")
    parser.add_argument("--control-label", default="control", help="label of non-targeting cells (default control)")
    parser.add_argument("--chunk-rows", type=int, default=5_000, help="rows read per block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = asdict(PRESETS[args.preset])
    for key in preset:
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    path = args.input if args.input is not None else download_replogle2022(args.dataset, args.cache_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    preprocess_replogle2022(
        path,
        args.out,
        min_cells_per_perturbation=preset["min_cells_per_perturbation"],
        max_cells_per_perturbation=args.max_cells_per_perturbation,
        keep_perturbations=read_name_list(args.keep_perturbations) if args.keep_perturbations else None,
        min_de_genes=preset["min_de_genes"],
        de_alpha=args.de_alpha,
        n_top_genes=preset["n_top_genes"],
        keep_target_genes=args.keep_target_genes,
        control_label=args.control_label,
        chunk_rows=args.chunk_rows,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
