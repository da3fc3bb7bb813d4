"""Norman et al. 2019 (K562 CRISPRa, single and double perturbations; GEO GSE133344).

``python -m data_recipes.norman2019`` downloads the four raw GEO files (about 1.3 GB in
all; not checked here) into ``--raw-dir`` and writes a cellpert-ready screen: raw counts
(CSR float32) of single-identity, well-covered cells, labels such as ``"CEBPE"``,
``"CBL+UBASH3A"`` and ``"control"``, and the 5,000 Seurat-v3 highly variable genes (plus
the measured target genes). ``--input DIR`` uses the four files from a folder instead
(no network). :func:`preprocess_norman2019` is the offline part.

Checksums: GEO publishes none for supplementary files, so the first download records each
file's sha256 in ``<file>.sha256`` and later downloads (and reuses) are checked against it.
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

__all__ = [
    "FILES",
    "GEO_BASE",
    "REMOTE_FILES",
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
#: What is downloaded. No published checksums (GEO has none): verified against the sidecar.
REMOTE_FILES = tuple(
    RemoteFile(name=name, url=GEO_BASE + name, note="no published checksum (GEO)")
    for name in FILES.values()
)
CONTROL = "control"
#: Guide-identity parts starting with this mean "no target" (non-targeting guides).
NEG_CTRL_PREFIX = "NegCtrl"
DEFAULT_OUT = Path("data/norman2019.h5ad")
DEFAULT_RAW_DIR = Path("data/raw/norman2019")


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


def download_norman2019(
    raw_dir: str | os.PathLike,
    *,
    mirror: str | None = None,
    progress: bool = True,
    verify: bool = True,
    **kwargs,
) -> Path:
    """Download the four raw GEO files into ``raw_dir`` (reusing, after a check, those already there)."""
    for remote in REMOTE_FILES:
        fetch(remote, raw_dir, mirror=mirror, progress=progress, verify=verify, **kwargs)
    return Path(raw_dir)


def _read_table_lines(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def _as_bool(values: pd.Series) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]).to_numpy()


def raw_paths(raw_dir: str | os.PathLike) -> dict[str, Path]:
    """The four GSE133344 files in ``raw_dir`` (gzipped or not), by role."""
    raw_dir = Path(raw_dir)
    if raw_dir.is_file():  # --input pointing at one of the files: use its folder
        raw_dir = raw_dir.parent
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
    out: str | os.PathLike,
    *,
    n_top_genes: int | None = 5000,
    keep_target_genes: bool = True,
    chunk_lines: int = 10_000_000,
    write_rows: int = 10_000,
) -> RecipeSummary:
    """Build the cellpert screen from the raw GEO files of GSE133344 (no download).

    Steps: keep cells listed in ``cell_identities`` with exactly one guide identity
    (``number_of_cells == 1``) and ``good_coverage`` (barcodes listed twice are dropped
    as ambiguous; cells keep the matrix's order); map ``guide_identity`` to labels
    (:func:`guide_identity_to_label`); pick ``n_top_genes`` Seurat-v3 highly variable genes
    on the raw counts of the kept cells (the same genes as scanpy's
    ``highly_variable_genes(flavor="seurat_v3")``, computed from streamed passes over the
    Matrix Market file, which is never loaded whole); write the counts of the kept cells
    and genes in blocks of ``write_rows`` rows.

    Parameters
    ----------
    raw_dir
        Folder holding the four ``GSE133344_raw_*`` files (gzipped or not), or one of them.
    out
        The ``.h5ad`` to write (atomically: nothing is left there on error).
    n_top_genes
        Highly variable genes to keep (the SAMS-VAE paper used 5,000); None or 0 keeps
        every gene (and reads the matrix once instead of three times).
    keep_target_genes
        Also keep the perturbed genes that are measured, even when not highly variable
        (so the screen can have a few more than ``n_top_genes`` genes).
    chunk_lines
        Matrix Market entries parsed at a time (memory: about 40 bytes each).
    write_rows
        Rows per block written to ``out``.

    Returns
    -------
    :class:`~data_recipes._common.RecipeSummary`. The file holds

    - ``X``: raw counts, CSR float32;
    - ``obs["perturbation"]`` (``"A"``, ``"A+B"``, ``"control"``), ``obs["guide_identity"]``,
      ``obs["gemgroup"]``, ``obs["n_counts"]`` (library size over all genes, before gene
      selection), ``obs["UMI_count"]`` (guide UMIs);
    - ``var["gene_id"]`` (Ensembl), ``var["gene_symbol"]``, ``var["highly_variable"]``,
      ``var["highly_variable_rank"]``, ``var["is_target"]``; ``var_names`` are the symbols,
      made unique;
    - ``uns["cellpert"]["screen"]`` (perturbation key and control, see
      :func:`cellpert.data.record_screen_keys`) and ``uns["cellpert"]["recipe"]`` (source
      and options).
    """
    paths = raw_paths(raw_dir)
    genes = _read_table_lines(paths["genes"])
    gene_ids = [row[0] for row in genes]
    symbols = np.asarray([row[1] if len(row) > 1 else row[0] for row in genes], dtype=object)
    barcodes = [row[0] for row in _read_table_lines(paths["barcodes"])]
    try:
        ident = pd.read_csv(paths["identities"])
    except (OSError, EOFError, pd.errors.ParserError) as err:
        raise RecipeError(
            f"{paths['identities'].name} cannot be read ({err}); is the file complete?"
        ) from err
    need = {"cell_barcode", "guide_identity", "number_of_cells", "good_coverage"}
    if missing := need - set(ident.columns):
        raise RecipeError(
            f"{paths['identities'].name} lacks column(s) {', '.join(sorted(missing))}."
        )
    ident = ident.drop_duplicates("cell_barcode", keep=False).set_index("cell_barcode")
    good = (ident["number_of_cells"] == 1).to_numpy() & _as_bool(ident["good_coverage"])
    ident = ident[good]
    bc = pd.Index(barcodes)
    pos = bc.get_indexer(ident.index)
    cols = np.sort(pos[pos >= 0])  # keep the matrix's cell order
    if len(cols) == 0:
        raise RecipeError("no cell passes the filters (one guide identity, good coverage).")
    ident = ident.loc[bc[cols]]
    logger.info("%d of %d barcodes pass the filters", len(cols), len(barcodes))

    labels = [guide_identity_to_label(g) for g in ident["guide_identity"].astype(str)]
    targets = {p for lab in labels if lab != CONTROL for p in lab.split("+")}
    is_target = np.isin(symbols, list(targets))
    missing_targets = sorted(targets - set(symbols))
    if missing_targets:
        logger.info(
            "%d target(s) are not measured: %s",
            len(missing_targets),
            ", ".join(missing_targets[:10]),
        )

    if n_top_genes and n_top_genes < len(gene_ids):
        logger.info(
            "reading %s three times (moments, clipped moments, counts)", paths["matrix"].name
        )
    counts = count_matrix_from_mtx(
        [MtxSource(paths["matrix"], cols, len(barcodes))],
        n_genes=len(gene_ids),
        n_top_genes=n_top_genes,
        also_keep=is_target if keep_target_genes else None,
        chunk_lines=chunk_lines,
    )
    g = counts.genes

    obs = pd.DataFrame(index=pd.Index(ident.index.astype(str), name="cell_barcode"))
    obs["perturbation"] = pd.Categorical(labels)
    obs["guide_identity"] = pd.Categorical(ident["guide_identity"].astype(str))
    if "gemgroup" in ident.columns:
        obs["gemgroup"] = ident["gemgroup"].to_numpy()
    obs["n_counts"] = counts.n_counts
    if "UMI_count" in ident.columns:
        obs["UMI_count"] = ident["UMI_count"].to_numpy()
    var = pd.DataFrame(
        {"gene_id": np.asarray(gene_ids, dtype=object)[g], "gene_symbol": symbols[g]},
        index=ad.utils.make_index_unique(pd.Index(symbols.astype(str)))[g],
    )
    if counts.hvg is None:
        var["highly_variable"] = True
        var["highly_variable_rank"] = np.nan
    else:
        var["highly_variable"] = counts.hvg["highly_variable"].to_numpy()[g]
        var["highly_variable_rank"] = (
            counts.hvg["highly_variable_rank"].to_numpy()[g].astype(np.float64)
        )
    var["is_target"] = is_target[g]

    return write_screen(
        out,
        obs=obs,
        var=var,
        blocks=row_blocks(counts.X, write_rows),
        perturbation_key="perturbation",
        control=CONTROL,
        recipe={
            "name": "norman2019",
            "source": "GEO GSE133344 (Norman et al. 2019, Science)",
            "urls": [r.url for r in REMOTE_FILES],
            "cell_filter": "number_of_cells == 1 and good_coverage",
            "n_top_genes": int(n_top_genes or 0),
            "hvg_flavor": "seurat_v3",
            "keep_target_genes": bool(keep_target_genes),
        },
    )


def _cli(argv: Sequence[str] | None) -> RecipeSummary:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.norman2019",
        description="Download Norman 2019 (GEO GSE133344) and write a cellpert-ready .h5ad.",
    )
    add_io_arguments(
        parser,
        default_out=DEFAULT_OUT,
        default_raw_dir=DEFAULT_RAW_DIR,
        input_help="folder with the four GSE133344_raw_* files you already have (or one of them).",
    )
    parser.add_argument(
        "--n-top-genes", type=int, default=5000, help="highly variable genes (0 = all genes)"
    )
    parser.add_argument(
        "--no-keep-target-genes",
        dest="keep_target_genes",
        action="store_false",
        help="keep exactly the highly variable genes (drop measured target genes that are not HVGs)",
    )
    parser.add_argument(
        "--chunk-lines", type=int, default=10_000_000, help="matrix entries parsed at a time"
    )
    parser.add_argument(
        "--base-url", dest="mirror", help=argparse.SUPPRESS
    )  # older spelling of --mirror
    args = parser.parse_args(argv)
    if args.input is not None:
        paths = raw_paths(args.input)
        verify_inputs(paths.values(), verify=args.verify, progress=args.progress)
        raw_dir = paths["matrix"].parent
    else:
        raw_dir = download_norman2019(
            args.raw_dir,
            mirror=args.mirror,
            progress=args.progress,
            verify=args.verify,
            retries=args.retries,
        )
    return preprocess_norman2019(
        raw_dir,
        args.out,
        n_top_genes=args.n_top_genes,
        keep_target_genes=args.keep_target_genes,
        chunk_lines=args.chunk_lines,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
