"""Kang et al. 2018 (human PBMCs, control vs interferon-beta; GEO GSE96583, batch 2).

``python -m data_recipes.kang2018`` downloads the two batch-2 10x matrices (control:
GSM2560248, stimulated: GSM2560249), their barcodes, the batch-2 gene list and cell
annotation table (on the order of 100 MB in all; not checked here) into ``--raw-dir`` and
writes a cellpert-ready file: raw counts of the annotated singlets, ``obs["condition"]``
(``control`` / ``stimulated``) and ``obs["cell_type"]``. ``--input DIR`` uses the six files
from a folder instead (no network). :func:`preprocess_kang2018` is the offline part.

The file names follow the GEO listing of GSE96583 but could not be checked from the machine
this recipe was written on; if GEO moved a file, download it by hand into ``--raw-dir``.
Checksums: GEO publishes none, so the first download records each file's sha256 in
``<file>.sha256`` and later downloads (and reuses) are checked against it.
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

from data_recipes._common import (
    MtxSource,
    RecipeError,
    RecipeSummary,
    RemoteFile,
    add_io_arguments,
    count_matrix_from_mtx,
    fetch,
    row_blocks,
    run_main,
    verify_inputs,
    write_screen,
)

__all__ = ["FILES", "REMOTE_FILES", "download_kang2018", "main", "preprocess_kang2018"]

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
#: What is downloaded. No published checksums (GEO has none): verified against the sidecar.
REMOTE_FILES = tuple(
    RemoteFile(name=n, url=u, note="no published checksum (GEO)") for n, u in FILES.items()
)
#: value of the annotation's ``stim`` column -> (matrix, barcodes, cellpert condition)
SAMPLES_BY_STIM = {
    "ctrl": ("GSM2560248_2.1.mtx.gz", "GSM2560248_barcodes.tsv.gz", "control"),
    "stim": ("GSM2560249_2.2.mtx.gz", "GSM2560249_barcodes.tsv.gz", "stimulated"),
}
CONTROL = "control"
#: Columns of the annotation table other than the barcode.
ANNOTATION_COLUMNS = ("tsne1", "tsne2", "ind", "stim", "cluster", "cell", "multiplets")
DEFAULT_OUT = Path("data/kang2018.h5ad")
DEFAULT_RAW_DIR = Path("data/raw/kang2018")


def download_kang2018(
    raw_dir: str | os.PathLike,
    *,
    mirror: str | None = None,
    progress: bool = True,
    verify: bool = True,
    **kwargs,
) -> Path:
    """Download the six GEO files into ``raw_dir`` (reusing, after a check, those already there)."""
    for remote in REMOTE_FILES:
        fetch(remote, raw_dir, mirror=mirror, progress=progress, verify=verify, **kwargs)
    return Path(raw_dir)


def _lines(path: Path) -> list[list[str]]:
    try:
        with gzip.open(path, "rt") as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except (OSError, EOFError) as err:
        raise RecipeError(f"{path.name} cannot be read ({err}); is the file complete?") from err


def _folder(raw_dir: str | os.PathLike) -> Path:
    raw_dir = Path(raw_dir)
    raw_dir = raw_dir.parent if raw_dir.is_file() else raw_dir
    for name in FILES:
        if not (raw_dir / name).exists():
            raise RecipeError(f"{raw_dir / name} is missing; download it from {FILES[name]}.")
    return raw_dir


def preprocess_kang2018(
    raw_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n_top_genes: int | None = 5000,
    singlets_only: bool = True,
    chunk_lines: int = 10_000_000,
    write_rows: int = 10_000,
) -> RecipeSummary:
    """Build the Kang 2018 control / IFN-beta screen from the GEO files (no download).

    Cells are matched to the annotation table (``GSE96583_batch2.total.tsne.df.tsv.gz``,
    columns ``ind``, ``stim``, ``cell``, ``multiplets``) by barcode within each sample
    (``stim == "ctrl"`` for GSM2560248, ``"stim"`` for GSM2560249); cells without an
    annotation are dropped, and so are doublets and ambiguous cells when ``singlets_only``.
    Seurat-v3 highly variable genes are computed on the kept cells of both samples together,
    from streamed passes over the two Matrix Market files (never loaded whole).

    Parameters
    ----------
    raw_dir
        Folder holding the six files of :data:`FILES` (or one of them).
    out
        The ``.h5ad`` to write (atomically: nothing is left there on error).
    n_top_genes
        Seurat-v3 highly variable genes on the kept cells (None/0: every gene).
    singlets_only
        Keep only cells annotated ``multiplets == "singlet"``.
    chunk_lines
        Matrix Market entries parsed at a time.
    write_rows
        Rows per block written to ``out``.

    Returns
    -------
    :class:`~data_recipes._common.RecipeSummary`. The file holds ``X`` (raw counts, CSR
    float32), ``obs["condition"]`` (``control`` / ``stimulated``), ``obs["cell_type"]``,
    ``obs["individual"]``, ``obs["barcode"]``, ``obs["n_counts"]`` (library size before gene
    selection); ``var_names`` gene symbols (unique) with ``var["gene_id"]``,
    ``var["highly_variable"]``, ``var["highly_variable_rank"]``; ``uns["cellpert"]["screen"]``
    (``perturbation_key="condition"``, control ``control``) and ``uns["cellpert"]["recipe"]``.
    """
    raw_dir = _folder(raw_dir)
    genes = _lines(raw_dir / "GSE96583_batch2.genes.tsv.gz")
    gene_ids = np.asarray([g[0] for g in genes], dtype=object)
    symbols = [g[1] if len(g) > 1 else g[0] for g in genes]
    try:
        annot = pd.read_csv(raw_dir / "GSE96583_batch2.total.tsne.df.tsv.gz", sep="\t")
    except (OSError, EOFError, pd.errors.ParserError) as err:
        raise RecipeError(
            f"the annotation table cannot be read ({err}); is the file complete?"
        ) from err
    if isinstance(annot.index, pd.RangeIndex) and annot.columns[0] not in ANNOTATION_COLUMNS:
        annot = annot.set_index(annot.columns[0])  # the barcode column has a name (or none)
    if missing := {"stim", "cell"} - set(annot.columns):
        raise RecipeError(f"the annotation table lacks column(s) {', '.join(sorted(missing))}.")
    if singlets_only and "multiplets" in annot.columns:
        annot = annot[annot["multiplets"].astype(str) == "singlet"]
    annot = annot[annot["cell"].notna()]

    sources, obs_parts = [], []
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
        sources.append(MtxSource(raw_dir / matrix, cols, len(barcodes)))
        obs = pd.DataFrame(index=[f"{b}_{stim}" for b in sub.index])
        obs["barcode"] = sub.index.astype(str).to_numpy()
        obs["condition"] = condition
        obs["cell_type"] = sub["cell"].astype(str).to_numpy()
        if "ind" in sub.columns:
            obs["individual"] = sub["ind"].astype(str).to_numpy()
        obs_parts.append(obs)
    obs = pd.concat(obs_parts)
    for col in ("condition", "cell_type", "individual"):
        if col in obs.columns:
            obs[col] = pd.Categorical(obs[col])
    counts = count_matrix_from_mtx(
        sources, n_genes=len(gene_ids), n_top_genes=n_top_genes, chunk_lines=chunk_lines
    )
    obs["n_counts"] = counts.n_counts
    g = counts.genes
    var = pd.DataFrame(
        {"gene_id": gene_ids[g]}, index=ad.utils.make_index_unique(pd.Index(symbols))[g]
    )
    if counts.hvg is None:
        var["highly_variable"] = True
        var["highly_variable_rank"] = np.nan
    else:
        var["highly_variable"] = counts.hvg["highly_variable"].to_numpy()[g]
        var["highly_variable_rank"] = (
            counts.hvg["highly_variable_rank"].to_numpy()[g].astype(np.float64)
        )

    return write_screen(
        out,
        obs=obs,
        var=var,
        blocks=row_blocks(counts.X, write_rows),
        perturbation_key="condition",
        control=CONTROL,
        recipe={
            "name": "kang2018",
            "source": "GEO GSE96583, batch 2 (Kang et al. 2018, Nat. Biotechnol.)",
            "urls": list(FILES.values()),
            "singlets_only": bool(singlets_only),
            "n_top_genes": int(n_top_genes or 0),
            "hvg_flavor": "seurat_v3",
        },
    )


def _cli(argv: Sequence[str] | None) -> RecipeSummary:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.kang2018",
        description="Download Kang 2018 (GEO GSE96583, batch 2) and write a cellpert-ready .h5ad.",
    )
    add_io_arguments(
        parser,
        default_out=DEFAULT_OUT,
        default_raw_dir=DEFAULT_RAW_DIR,
        input_help="folder with the six GSE96583 batch-2 files you already have (or one of them).",
    )
    parser.add_argument(
        "--n-top-genes", type=int, default=5000, help="highly variable genes (0 = all genes)"
    )
    parser.add_argument(
        "--keep-multiplets",
        dest="singlets_only",
        action="store_false",
        help="keep doublets and ambiguous cells",
    )
    parser.add_argument(
        "--chunk-lines", type=int, default=10_000_000, help="matrix entries parsed at a time"
    )
    args = parser.parse_args(argv)
    if args.input is not None:
        raw_dir = _folder(args.input)
        verify_inputs((raw_dir / name for name in FILES), verify=args.verify, progress=args.progress)
    else:
        raw_dir = download_kang2018(
            args.raw_dir,
            mirror=args.mirror,
            progress=args.progress,
            verify=args.verify,
            retries=args.retries,
        )
    return preprocess_kang2018(
        raw_dir,
        args.out,
        n_top_genes=args.n_top_genes,
        singlets_only=args.singlets_only,
        chunk_lines=args.chunk_lines,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
