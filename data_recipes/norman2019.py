"""Norman et al. 2019 (K562 CRISPRa, single and double perturbations; GEO GSE133344).

Run ``python -m data_recipes.norman2019 --out data/norman2019.h5ad`` to download the four
raw GEO files (about 1.3 GB in all) into ``--cache-dir`` and write a cellpert-ready screen:
raw counts (CSR float32) of single-identity, well-covered cells, labels such as ``"CEBPE"``,
``"CBL+UBASH3A"`` and ``"control"``, and the 5,000 Seurat-v3 highly variable genes (plus
the measured target genes). :func:`preprocess_norman2019` does the same offline.
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

from cellpert.data import record_screen_keys, to_uns, write_h5ad_atomic
from data_recipes._common import (
    RecipeError,
    download,
    read_mtx_cells,
    run_main,
    select_genes_in_memory,
)

__all__ = [
    "FILES",
    "GEO_BASE",
    "download_norman2019",
    "guide_identity_to_label",
    "main",
    "preprocess_norman2019",
]

logger = logging.getLogger("data_recipes.norman2019")

GEO_BASE = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE133nnn/GSE133344/suppl/"
PREFIX = "GSE133344_raw_"
#: role -> file name on GEO.
FILES = {
    "matrix": f"{PREFIX}matrix.mtx.gz",
    "genes": f"{PREFIX}genes.tsv.gz",
    "barcodes": f"{PREFIX}barcodes.tsv.gz",
    "identities": f"{PREFIX}cell_identities.csv.gz",
}
CONTROL = "control"
#: Guide-identity parts starting with this mean "no target" (non-targeting guides).
NEG_CTRL_PREFIX = "NegCtrl"


def guide_identity_to_label(identity: str, *, control: str = CONTROL) -> str:
    """Turn a Norman 2019 guide identity into a cellpert label.

    ``"CBL_UBASH3A__CBL_UBASH3A"`` -> ``"CBL+UBASH3A"``, ``"CEBPE_NegCtrl0__CEBPE_NegCtrl0"``
    -> ``"CEBPE"``, ``"NegCtrl10_NegCtrl0__NegCtrl10_NegCtrl0"`` -> ``control``. The part
    before ``"__"`` names the two guide positions, joined by ``"_"``; ``NegCtrl*`` parts
    mean nothing. Targets are sorted, so ``"UBASH3A_CBL"`` gives ``"CBL+UBASH3A"`` too.
    """
    head = str(identity).split("__", 1)[0]
    targets = sorted({p for p in head.split("_") if p and not p.startswith(NEG_CTRL_PREFIX)})
    return "+".join(targets) if targets else control


def download_norman2019(cache_dir: str | os.PathLike, *, base_url: str = GEO_BASE) -> Path:
    """Download the four raw GEO files into ``cache_dir`` (skipping those already there)."""
    cache_dir = Path(cache_dir)
    for name in FILES.values():
        download(base_url + name, cache_dir / name)
    return cache_dir


def _read_table_lines(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def _as_bool(values: pd.Series) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]).to_numpy()


def _raw_paths(raw_dir: Path) -> dict[str, Path]:
    paths = {}
    for role, name in FILES.items():
        path = raw_dir / name
        if not path.exists() and (raw_dir / name.removesuffix(".gz")).exists():
            path = raw_dir / name.removesuffix(".gz")
        if not path.exists():
            raise RecipeError(
                f"{raw_dir / name} is missing; download it from {GEO_BASE}{name} "
                "(or run python -m data_recipes.norman2019 with internet access)."
            )
        paths[role] = path
    return paths


def preprocess_norman2019(
    raw_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    n_top_genes: int | None = 5000,
    keep_target_genes: bool = True,
    chunk_lines: int = 20_000_000,
) -> ad.AnnData:
    """Build the cellpert screen from the raw GEO files of GSE133344 (no download).

    Steps: read the 10x matrix (genes x cells) and transpose it to cells x genes; keep
    cells listed in ``cell_identities`` with exactly one guide identity
    (``number_of_cells == 1``) and ``good_coverage``; map ``guide_identity`` to labels
    (:func:`guide_identity_to_label`); pick ``n_top_genes`` highly variable genes with
    scanpy's Seurat-v3 method on the raw counts of the kept cells; store integer counts.

    Parameters
    ----------
    raw_dir
        Folder holding the four ``GSE133344_raw_*`` files (gzipped or not).
    out
        Write the screen here (atomically); None only returns it.
    n_top_genes
        Highly variable genes to keep (the SAMS-VAE paper used 5,000); None or 0 keeps
        every gene.
    keep_target_genes
        Also keep the perturbed genes that are measured, even when not highly variable
        (so the screen can have a few more than ``n_top_genes`` genes).
    chunk_lines
        Matrix Market lines parsed at a time (memory: about 40 bytes per line).

    Returns
    -------
    AnnData (cells x genes) with

    - ``X``: raw counts, CSR float32;
    - ``obs["perturbation"]`` (``"A"``, ``"A+B"``, ``"control"``), ``obs["guide_identity"]``,
      ``obs["gemgroup"]``, ``obs["n_counts"]`` (library size over all genes, before gene
      selection), ``obs["UMI_count"]``;
    - ``var["gene_id"]`` (Ensembl), ``var["gene_symbol"]``, ``var["highly_variable"]``,
      ``var["highly_variable_rank"]``, ``var["is_target"]``; ``var_names`` are the symbols,
      made unique;
    - ``uns["cellpert"]["screen"]`` (perturbation key and control, see
      :func:`cellpert.data.record_screen_keys`) and ``uns["cellpert"]["recipe"]`` (source
      and options).
    """
    raw_dir = Path(raw_dir)
    paths = _raw_paths(raw_dir)

    genes = _read_table_lines(paths["genes"])
    gene_ids = [row[0] for row in genes]
    symbols = [row[1] if len(row) > 1 else row[0] for row in genes]
    barcodes = [row[0] for row in _read_table_lines(paths["barcodes"])]
    ident = pd.read_csv(paths["identities"])
    need = {"cell_barcode", "guide_identity", "number_of_cells", "good_coverage"}
    if missing := need - set(ident.columns):
        raise RecipeError(f"{paths['identities'].name} lacks column(s) {', '.join(sorted(missing))}.")
    ident = ident.drop_duplicates("cell_barcode", keep=False).set_index("cell_barcode")
    good = (ident["number_of_cells"] == 1).to_numpy() & _as_bool(ident["good_coverage"])
    ident = ident[good]
    bc = pd.Index(barcodes)
    pos = bc.get_indexer(ident.index)
    ident = ident[pos >= 0]
    cols = np.sort(pos[pos >= 0])  # keep the matrix's cell order
    ident = ident.loc[bc[cols]]
    if len(cols) == 0:
        raise RecipeError("no cell passes the filters (one guide identity, good coverage).")
    logger.info("%d of %d barcodes pass the filters; reading %s", len(cols), len(barcodes), paths["matrix"])

    X = read_mtx_cells(paths["matrix"], cols, n_genes=len(gene_ids), n_barcodes=len(barcodes), chunk_lines=chunk_lines)
    n_counts = np.asarray(X.sum(axis=1)).ravel()

    labels = [guide_identity_to_label(g) for g in ident["guide_identity"].astype(str)]
    obs = pd.DataFrame(index=pd.Index(ident.index.astype(str), name="cell_barcode"))
    obs["perturbation"] = pd.Categorical(labels)
    obs["guide_identity"] = pd.Categorical(ident["guide_identity"].astype(str))
    if "gemgroup" in ident.columns:
        obs["gemgroup"] = ident["gemgroup"].to_numpy()
    obs["n_counts"] = n_counts.astype(np.float64)
    if "UMI_count" in ident.columns:
        obs["UMI_count"] = ident["UMI_count"].to_numpy()
    var_names = ad.utils.make_index_unique(pd.Index(symbols))
    var = pd.DataFrame({"gene_id": gene_ids, "gene_symbol": symbols}, index=var_names)
    adata = ad.AnnData(X=X, obs=obs, var=var)

    targets = {p for lab in labels if lab != CONTROL for p in lab.split("+")}
    adata.var["is_target"] = adata.var["gene_symbol"].isin(targets).to_numpy()
    missing_targets = sorted(targets - set(adata.var["gene_symbol"]))
    if missing_targets:
        logger.info("%d target(s) are not measured: %s", len(missing_targets), ", ".join(missing_targets[:10]))

    adata = select_genes_in_memory(
        adata, n_top_genes, also_keep=adata.var["is_target"].to_numpy() if keep_target_genes else None
    )

    record_screen_keys(adata, perturbation_key="perturbation", control=CONTROL)
    adata.uns["cellpert"]["recipe"] = to_uns(
        {
            "name": "norman2019",
            "source": "GEO GSE133344 (Norman et al. 2019, Science)",
            "urls": [GEO_BASE + name for name in FILES.values()],
            "cell_filter": "number_of_cells == 1 and good_coverage",
            "n_top_genes": int(n_top_genes or 0),
            "hvg_flavor": "seurat_v3",
            "keep_target_genes": bool(keep_target_genes),
        }
    )
    if out is not None:
        write_h5ad_atomic(adata, out)
        logger.info("wrote %s (%d cells x %d genes)", out, adata.n_obs, adata.n_vars)
    return adata


def _cli(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.norman2019",
        description="Download Norman 2019 (GEO GSE133344) and write a cellpert-ready .h5ad.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .h5ad")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/raw/norman2019"), help="where the raw GEO files go")
    parser.add_argument("--n-top-genes", type=int, default=5000, help="highly variable genes (0 = all genes)")
    parser.add_argument(
        "--no-keep-target-genes",
        dest="keep_target_genes",
        action="store_false",
        help="keep exactly the highly variable genes (drop measured target genes that are not HVGs)",
    )
    parser.add_argument("--base-url", default=GEO_BASE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.out.parent.exists():
        args.out.parent.mkdir(parents=True)
    download_norman2019(args.cache_dir, base_url=args.base_url)
    preprocess_norman2019(args.cache_dir, args.out, n_top_genes=args.n_top_genes, keep_target_genes=args.keep_target_genes)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
