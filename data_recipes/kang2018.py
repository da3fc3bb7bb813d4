"""Kang et al. 2018 (human PBMCs, control vs interferon-beta; GEO GSE96583, batch 2).

Run ``python -m data_recipes.kang2018 --out data/kang2018.h5ad`` to download the two batch-2
10x matrices (control: GSM2560248, stimulated: GSM2560249), their barcodes, the batch-2
gene list and cell annotation table, and write a cellpert-ready file: raw counts of the
annotated singlets, ``obs["condition"]`` (``control`` / ``stimulated``) and
``obs["cell_type"]``. :func:`preprocess_kang2018` does the same offline.

The file names follow the GEO listing of GSE96583 but could not be checked from the machine
this recipe was written on; if GEO moved a file, download it by hand into ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpert.data import record_screen_keys, to_uns, write_h5ad_atomic
from data_recipes._common import (
    RecipeError,
    download,
    read_mtx_cells,
    run_main,
    select_genes_in_memory,
)

__all__ = ["FILES", "download_kang2018", "main", "preprocess_kang2018"]

logger = logging.getLogger("data_recipes.kang2018")

SERIES = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE96nnn/GSE96583/suppl/"
SAMPLES = "https://ftp.ncbi.nlm.nih.gov/geo/samples/GSM2560nnn/"
#: file name -> URL
FILES = {
    "GSE96583_batch2.genes.tsv.gz": SERIES + "GSE96583_batch2.genes.tsv.gz",
    "GSE96583_batch2.total.tsne.df.tsv.gz": SERIES + "GSE96583_batch2.total.tsne.df.tsv.gz",
    "GSM2560248_2.1.mtx.gz": SAMPLES + "GSM2560248/suppl/GSM2560248_2.1.mtx.gz",
    "GSM2560248_barcodes.tsv.gz": SAMPLES + "GSM2560248/suppl/GSM2560248_barcodes.tsv.gz",
    "GSM2560249_2.2.mtx.gz": SAMPLES + "GSM2560249/suppl/GSM2560249_2.2.mtx.gz",
    "GSM2560249_barcodes.tsv.gz": SAMPLES + "GSM2560249/suppl/GSM2560249_barcodes.tsv.gz",
}
#: value of the annotation's ``stim`` column -> (matrix, barcodes, cellpert condition)
SAMPLES_BY_STIM = {
    "ctrl": ("GSM2560248_2.1.mtx.gz", "GSM2560248_barcodes.tsv.gz", "control"),
    "stim": ("GSM2560249_2.2.mtx.gz", "GSM2560249_barcodes.tsv.gz", "stimulated"),
}
CONTROL = "control"
#: Columns of the annotation table other than the barcode.
ANNOTATION_COLUMNS = ("tsne1", "tsne2", "ind", "stim", "cluster", "cell", "multiplets")


def download_kang2018(cache_dir: str | os.PathLike) -> Path:
    """Download the six GEO files into ``cache_dir`` (skipping those already there)."""
    cache_dir = Path(cache_dir)
    for name, url in FILES.items():
        download(url, cache_dir / name)
    return cache_dir


def _lines(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def preprocess_kang2018(
    raw_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    n_top_genes: int | None = 5000,
    singlets_only: bool = True,
) -> ad.AnnData:
    """Build the Kang 2018 control / IFN-beta screen from the GEO files (no download).

    Cells are matched to the annotation table (``GSE96583_batch2.total.tsne.df.tsv.gz``,
    columns ``ind``, ``stim``, ``cell``, ``multiplets``) by barcode within each sample
    (``stim == "ctrl"`` for GSM2560248, ``"stim"`` for GSM2560249); cells without an
    annotation are dropped, and so are doublets and ambiguous cells when ``singlets_only``.

    Parameters
    ----------
    raw_dir
        Folder holding the six files of :data:`FILES`.
    out
        Write the screen here (atomically); None only returns it.
    n_top_genes
        Seurat-v3 highly variable genes on the kept cells (None/0: every gene).
    singlets_only
        Keep only cells annotated ``multiplets == "singlet"``.

    Returns
    -------
    AnnData with ``X`` (raw counts, CSR float32), ``obs["condition"]`` (``control`` /
    ``stimulated``), ``obs["cell_type"]``, ``obs["individual"]``, ``obs["barcode"]``,
    ``obs["n_counts"]`` (library size before gene selection); ``var_names`` gene symbols
    (unique) with ``var["gene_id"]``, ``var["highly_variable"]``; ``uns["cellpert"]["screen"]``
    (``perturbation_key="condition"``, control ``control``) and ``uns["cellpert"]["recipe"]``.
    """
    raw_dir = Path(raw_dir)
    for name in FILES:
        if not (raw_dir / name).exists():
            raise RecipeError(f"{raw_dir / name} is missing; download it from {FILES[name]}.")
    genes = _lines(raw_dir / "GSE96583_batch2.genes.tsv.gz")
    gene_ids = [g[0] for g in genes]
    symbols = [g[1] if len(g) > 1 else g[0] for g in genes]
    annot = pd.read_csv(raw_dir / "GSE96583_batch2.total.tsne.df.tsv.gz", sep="\t")
    if isinstance(annot.index, pd.RangeIndex) and annot.columns[0] not in ANNOTATION_COLUMNS:
        annot = annot.set_index(annot.columns[0])  # the barcode column has a name (or none)
    if missing := {"stim", "cell"} - set(annot.columns):
        raise RecipeError(f"the annotation table lacks column(s) {', '.join(sorted(missing))}.")
    if singlets_only and "multiplets" in annot.columns:
        annot = annot[annot["multiplets"].astype(str) == "singlet"]
    annot = annot[annot["cell"].notna()]

    blocks, obs_parts = [], []
    for stim, (matrix, barcode_file, condition) in SAMPLES_BY_STIM.items():
        barcodes = pd.Index([b[0] for b in _lines(raw_dir / barcode_file)])
        sub = annot[annot["stim"].astype(str) == stim]
        sub = sub[~sub.index.duplicated(keep=False)]
        pos = barcodes.get_indexer(sub.index)
        cols = np.sort(pos[pos >= 0])
        if len(cols) == 0:
            raise RecipeError(f"no annotated {stim!r} cell matches a barcode of {barcode_file}.")
        sub = sub.loc[barcodes[cols]]
        logger.info("%s: %d of %d barcodes annotated", condition, len(cols), len(barcodes))
        blocks.append(read_mtx_cells(raw_dir / matrix, cols, n_genes=len(gene_ids), n_barcodes=len(barcodes)))
        obs = pd.DataFrame(index=[f"{b}_{stim}" for b in sub.index])
        obs["barcode"] = sub.index.astype(str).to_numpy()
        obs["condition"] = condition
        obs["cell_type"] = sub["cell"].astype(str).to_numpy()
        if "ind" in sub.columns:
            obs["individual"] = sub["ind"].astype(str).to_numpy()
        obs_parts.append(obs)
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    obs = pd.concat(obs_parts)
    for col in ("condition", "cell_type", "individual"):
        if col in obs.columns:
            obs[col] = pd.Categorical(obs[col])
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    var = pd.DataFrame({"gene_id": gene_ids}, index=ad.utils.make_index_unique(pd.Index(symbols)))
    adata = select_genes_in_memory(ad.AnnData(X=X, obs=obs, var=var), n_top_genes)

    record_screen_keys(adata, perturbation_key="condition", control=CONTROL)
    adata.uns["cellpert"]["recipe"] = to_uns(
        {
            "name": "kang2018",
            "source": "GEO GSE96583, batch 2 (Kang et al. 2018, Nat. Biotechnol.)",
            "urls": list(FILES.values()),
            "singlets_only": bool(singlets_only),
            "n_top_genes": int(n_top_genes or 0),
        }
    )
    if out is not None:
        write_h5ad_atomic(adata, out)
        logger.info("wrote %s (%d cells x %d genes)", out, adata.n_obs, adata.n_vars)
    return adata


def _cli(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.kang2018",
        description="Download Kang 2018 (GEO GSE96583, batch 2) and write a cellpert-ready .h5ad.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .h5ad")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/raw/kang2018"), help="where the GEO files go")
    parser.add_argument("--n-top-genes", type=int, default=5000, help="highly variable genes (0 = all genes)")
    parser.add_argument("--keep-multiplets", dest="singlets_only", action="store_false", help="keep doublets and ambiguous cells")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    download_kang2018(args.cache_dir)
    preprocess_kang2018(args.cache_dir, args.out, n_top_genes=args.n_top_genes, singlets_only=args.singlets_only)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
