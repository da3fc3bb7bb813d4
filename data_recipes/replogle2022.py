"""Replogle et al. 2022 (K562 CRISPRi Perturb-seq; figshare+ article 20029387).

``python -m data_recipes.replogle2022 --dataset essential`` (about 10 GB download) or
``--dataset gwps`` (about 60 GB) downloads a raw single-cell file into ``--raw-dir`` and
writes a cellpert-ready screen; ``--input FILE`` uses a file you already have (no network).
The input is read in backed mode one block of rows at a time and the output is written one
block at a time, so memory never holds the input, nor the output's counts.

``--dataset gwps --preset filtered`` makes the "Replogle filtered" set of sVAE+ (Lopez et al.
2023) and SAMS-VAE (Bereket & Karaletsos 2023): the perturbations and measured genes listed
in the sVAE+ preprocessing notebook (taken from Replogle et al.'s Table S3), which the recipe
downloads from GitHub at a pinned commit (or reads from ``--svae-notebook``), plus the
non-targeting cells as controls. ``--dataset samsvae`` downloads the copy of that set that
SAMS-VAE's code uses instead (about 550 MB). See ``data_recipes/README.md``.

Checksums: figshare shows an MD5 for each file on its page, but it is not known here, so the
first download records the sha256 in ``<file>.sha256`` and later downloads are checked
against it; pass ``--md5`` with figshare's value to check the first download too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.stats import norm

from data_recipes._common import (
    RecipeError,
    RecipeSummary,
    RemoteFile,
    add_io_arguments,
    categorical_obs,
    check_integer_counts,
    fetch,
    iter_selected_rows,
    read_name_list,
    run_main,
    seurat_v3_select,
    verify_inputs,
    write_screen,
)

__all__ = [
    "DATASETS",
    "PRESETS",
    "SVAE_NOTEBOOK",
    "download_replogle2022",
    "main",
    "preprocess_replogle2022",
    "read_svae_lists",
]

logger = logging.getLogger("data_recipes.replogle2022")

FIGSHARE_DOWNLOAD = "https://plus.figshare.com/ndownloader/files/"
ARTICLE = "https://plus.figshare.com/articles/dataset/20029387"

#: Raw single-cell files of figshare+ article 20029387, and SAMS-VAE's filtered copy.
#: No checksum is known here for any of them (see the module docstring).
DATASETS = {
    "essential": RemoteFile(
        name="K562_essential_raw_singlecell_01.h5ad",
        url=FIGSHARE_DOWNLOAD + "35773219",
        note="figshare file 35773219, about 10 GB; md5 on figshare's page, not known here",
    ),
    "gwps": RemoteFile(
        name="K562_gwps_raw_singlecell_01.h5ad",
        url=FIGSHARE_DOWNLOAD + "35775507",
        note="figshare file 35775507, about 60 GB, 1,989,578 cells x 8,248 genes; md5 not known here",
    ),
    "samsvae": RemoteFile(
        name="replogle.h5ad",
        # s3://insitro-research-2023-sams-vae/data/replogle.h5ad (read with --no-sign-request
        # in SAMS-VAE's code) through S3's public HTTPS endpoint; not checked from here.
        url="https://insitro-research-2023-sams-vae.s3.amazonaws.com/data/replogle.h5ad",
        note="SAMS-VAE's filtered copy, about 550 MB (their README); URL and layout not checked here",
    ),
}
#: Label column and control label of the source files.
SOURCE_LABEL_KEY = "gene"
SOURCE_CONTROL = "non-targeting"

#: The sVAE+ preprocessing notebook, at a pinned commit of github.com/Genentech/sVAE.
SVAE_COMMIT = "ad70d8e3ecc4e39407907e7e576d7a2f16d9056e"
SVAE_NOTEBOOK = RemoteFile(
    name="sVAE_replogle-preprocessing.ipynb",
    url=f"https://raw.githubusercontent.com/Genentech/sVAE/{SVAE_COMMIT}/entry_points/replogle-preprocessing.ipynb",
    note="lists of the sVAE+ 'filtered' perturbations and genes; no published checksum",
)
#: Shape of the sVAE+ filtered set as printed in that notebook (no control cells in it).
SVAE_EXPECTED = (116_641, 1_187)
#: Variables of the notebook that hold the two lists.
SVAE_PERTURBATIONS_VAR, SVAE_GENES_VAR = "string", "string_genes"
#: Marker for "take this list from the sVAE+ notebook" in a preset.
FROM_SVAE = "svae"


@dataclass(frozen=True)
class _Preset:
    min_cells_per_perturbation: int = 0
    min_de_genes: int | None = None
    n_top_genes: int | None = None
    keep_perturbations: str | None = None
    keep_genes: str | None = None
    keep_target_genes: bool = True


#: Named option sets; any option given on the command line overrides the preset's value.
PRESETS = {
    "none": _Preset(),
    # The sVAE+ / SAMS-VAE "Replogle filtered" cut (plus the non-targeting controls).
    "filtered": _Preset(
        keep_perturbations=FROM_SVAE, keep_genes=FROM_SVAE, keep_target_genes=False
    ),
    # Our own cut: perturbations with many cells and a clear transcriptional effect.
    "strong": _Preset(min_cells_per_perturbation=50, min_de_genes=25),
}


def download_replogle2022(
    dataset: str,
    raw_dir: str | os.PathLike,
    *,
    mirror: str | None = None,
    progress: bool = True,
    verify: bool = True,
    md5: str | None = None,
    sha256: str | None = None,
    **kwargs,
) -> Path:
    """Download one file (``"essential"``, ``"gwps"`` or ``"samsvae"``) into ``raw_dir``.

    ``md5`` / ``sha256``: the digest shown by the publisher, when you have it.
    """
    if dataset not in DATASETS:
        raise RecipeError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    remote = DATASETS[dataset]
    if md5 or sha256:
        remote = RemoteFile(
            name=remote.name, url=remote.url, md5=md5, sha256=sha256, note=remote.note
        )
    return fetch(remote, raw_dir, mirror=mirror, progress=progress, verify=verify, **kwargs)


def read_svae_lists(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The perturbation and gene lists of the sVAE+ Replogle preprocessing notebook.

    The notebook assigns them as triple-quoted, comma- and newline-separated strings to
    ``string`` (target genes to keep) and ``string_genes`` (measured genes to keep).
    Duplicates are dropped, order kept.

    Raises
    ------
    RecipeError
        The file is not a notebook or does not hold the two lists.
    """
    path = Path(path)
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecipeError(
            f"{path}: not a Jupyter notebook ({err}); give the sVAE+ replogle-preprocessing.ipynb."
        ) from err
    code = "\n".join(
        "".join(c.get("source", []))
        if isinstance(c.get("source"), list)
        else str(c.get("source", ""))
        for c in cells
        if c.get("cell_type") == "code"
    )
    found = dict(re.findall(r'^(\w+)\s*=\s*"""(.*?)"""', code, flags=re.S | re.M))
    lists = []
    for var in (SVAE_PERTURBATIONS_VAR, SVAE_GENES_VAR):
        if var not in found:
            raise RecipeError(
                f'{path.name} has no {var} = """...""" list; the notebook changed, pass '
                "--keep-perturbations / --keep-genes files instead."
            )
        names = [n.strip() for n in found[var].replace("\n", ",").split(",")]
        lists.append(list(dict.fromkeys(n for n in names if n)))
    return lists[0], lists[1]


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
    X,
    keep: np.ndarray,
    codes: np.ndarray,
    n_labels: int,
    control_code: int,
    *,
    alpha: float,
    chunk_rows: int,
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
    out: str | os.PathLike,
    *,
    min_cells_per_perturbation: int = 0,
    max_cells_per_perturbation: int | None = None,
    keep_perturbations: Sequence[str] | None = None,
    keep_genes: Sequence[str] | None = None,
    min_de_genes: int | None = None,
    de_alpha: float = 0.05,
    n_top_genes: int | None = None,
    keep_target_genes: bool = True,
    control_label: str = "control",
    chunk_rows: int = 5_000,
    seed: int = 0,
    expected_shape: tuple[int, int] | None = None,
) -> RecipeSummary:
    """Turn a Replogle 2022 raw single-cell ``.h5ad`` into a cellpert screen (no download).

    The file is opened in backed mode and read in blocks of ``chunk_rows`` rows; each block's
    kept cells and genes are appended to ``out`` (:func:`~data_recipes._common.write_screen`),
    so neither the input nor the output counts are ever in memory whole.

    Cell and perturbation filters, applied in this order (controls are always kept):

    1. ``keep_perturbations``: keep only these labels (values of obs ``gene``).
    2. ``min_cells_per_perturbation``: drop labels with fewer cells.
    3. ``max_cells_per_perturbation``: subsample larger labels (controls too) with ``seed``.
    4. ``min_de_genes``: drop labels with fewer differentially expressed genes than this
       (Welch z on log1p(CP10k) vs control, Bonferroni over genes at ``de_alpha``).

    Gene selection: ``keep_genes`` (these measured genes, by var ``gene_name``) or
    ``n_top_genes`` Seurat-v3 highly variable genes on the kept cells (computed in chunks,
    equal to scanpy's ``flavor="seurat_v3"``), or every gene.

    Parameters
    ----------
    path
        ``K562_essential_raw_singlecell_01.h5ad``, ``K562_gwps_raw_singlecell_01.h5ad`` or a
        file of the same layout (raw counts in ``X``, dense or sparse; obs ``gene`` with
        ``non-targeting`` controls; var ``gene_name``).
    out
        The ``.h5ad`` to write (atomically: nothing is left there on error).
    keep_genes
        Measured genes to keep (cannot be combined with ``n_top_genes``).
    n_top_genes
        Highly variable genes to keep; None keeps every gene.
    keep_target_genes
        With ``keep_genes`` or ``n_top_genes``, also keep the measured target genes.
    control_label
        Label given to ``non-targeting`` cells (use ``"non-targeting"`` to keep it).
    chunk_rows
        Rows read (and written) per block.
    expected_shape
        Published ``(perturbed cells, genes)`` of the set being reconstructed; the summary
        says how the output compares.

    Returns
    -------
    :class:`~data_recipes._common.RecipeSummary`. The file holds ``X`` (raw counts, CSR
    float32), ``obs["perturbation"]`` (target gene symbol, or ``control_label``), the source
    obs columns (``gene`` renamed ``source_gene``), ``obs["n_counts"]`` (library size over all
    genes of the file), ``var_names`` = gene symbols (made unique) with ``var["gene_id"]``,
    the source var columns, ``var["is_target"]`` (and ``var["highly_variable"]``,
    ``var["highly_variable_rank"]`` with ``n_top_genes``), ``uns["cellpert"]["screen"]``,
    ``uns["cellpert"]["recipe"]`` (with ``n_de_genes``, the DE counts per kept label, when
    ``min_de_genes`` is used), and the source's ``uns["pathways"]`` when it has one.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(
            f"{path}: no such file; download it first (python -m data_recipes.replogle2022)."
        )
    if keep_genes is not None and n_top_genes:
        raise RecipeError(
            "keep_genes (--keep-genes) and n_top_genes (--n-top-genes) cannot be combined; choose one."
        )
    try:
        src = ad.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError) as err:
        raise RecipeError(
            f"{path} cannot be read as .h5ad ({err}); is the download complete?"
        ) from err
    try:
        return _preprocess_backed(
            src,
            path,
            out,
            min_cells_per_perturbation=min_cells_per_perturbation,
            max_cells_per_perturbation=max_cells_per_perturbation,
            keep_perturbations=keep_perturbations,
            keep_genes=keep_genes,
            min_de_genes=min_de_genes,
            de_alpha=de_alpha,
            n_top_genes=n_top_genes,
            keep_target_genes=keep_target_genes,
            control_label=control_label,
            chunk_rows=chunk_rows,
            seed=seed,
            expected_shape=expected_shape,
        )
    finally:
        src.file.close()


def _preprocess_backed(src: ad.AnnData, path: Path, out, **opt) -> RecipeSummary:
    if SOURCE_LABEL_KEY not in src.obs.columns:
        raise RecipeError(
            f"{path.name}: obs has no {SOURCE_LABEL_KEY!r} column (columns: "
            f"{', '.join(map(str, src.obs.columns[:12]))}); is this a Replogle 2022 raw single-cell file?"
        )
    raw_labels = src.obs[SOURCE_LABEL_KEY].astype(str).to_numpy()
    if not (raw_labels == SOURCE_CONTROL).any():
        raise RecipeError(
            f"{path.name}: no {SOURCE_CONTROL!r} cells in obs[{SOURCE_LABEL_KEY!r}]; cellpert needs controls."
        )
    if any("+" in lab for lab in raw_labels):
        raise RecipeError(
            f"{path.name}: labels contain '+', which cellpert reads as a combination."
        )
    control = opt["control_label"]
    labels = np.where(raw_labels == SOURCE_CONTROL, control, raw_labels)
    is_control = labels == control
    keep = np.ones(len(labels), dtype=bool)
    summary: dict = {}

    if opt["keep_perturbations"] is not None:
        wanted = set(map(str, opt["keep_perturbations"]))
        absent = sorted(wanted - set(raw_labels))
        if absent:
            logger.info(
                "%d requested perturbation(s) are not in the file: %s",
                len(absent),
                ", ".join(absent[:10]),
            )
        summary["n_requested_perturbations_absent"] = len(absent)
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
        logger.info("counting DE genes per perturbation (one pass over the file)")
        n_de = _de_gene_counts(
            src.X,
            keep,
            codes,
            len(uniq),
            control_code,
            alpha=opt["de_alpha"],
            chunk_rows=opt["chunk_rows"],
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
        raise RecipeError(
            "no perturbed cell passes the filters; relax --min-cells-per-perturbation / --min-de-genes."
        )

    var = src.var.copy()
    symbols = (
        var["gene_name"].astype(str).to_numpy()
        if "gene_name" in var.columns
        else var.index.astype(str).to_numpy()
    )
    targets = set(labels[keep & ~is_control])
    is_target = np.isin(symbols, list(targets))
    gene_keep = np.ones(src.n_vars, dtype=bool)
    hvg = None
    if opt["keep_genes"] is not None:
        wanted_genes = set(map(str, opt["keep_genes"]))
        gene_keep = np.isin(symbols, list(wanted_genes))
        summary["n_requested_genes_absent"] = len(wanted_genes - set(symbols))
        if opt["keep_target_genes"]:
            gene_keep |= is_target
        if not gene_keep.any():
            raise RecipeError(
                "none of the requested genes (--keep-genes) is measured in this file."
            )
    elif opt["n_top_genes"] and opt["n_top_genes"] < src.n_vars:
        logger.info(
            "selecting %d highly variable genes (two passes over the file)", opt["n_top_genes"]
        )
        hvg = seurat_v3_select(src.X, keep, int(opt["n_top_genes"]), chunk_rows=opt["chunk_rows"])
        gene_keep = hvg["highly_variable"].to_numpy().copy()
        if opt["keep_target_genes"]:
            gene_keep |= is_target
    cols = np.flatnonzero(gene_keep)
    all_genes = len(cols) == src.n_vars

    obs = src.obs.loc[keep].copy()
    obs = obs.rename(columns={SOURCE_LABEL_KEY: "source_gene"})
    obs.index.name = obs.index.name or "cell_barcode"
    obs["perturbation"] = pd.Categorical(labels[keep])
    obs = categorical_obs(obs)
    out_var = pd.DataFrame(index=ad.utils.make_index_unique(pd.Index(symbols[cols])))
    out_var["gene_id"] = var.index.astype(str).to_numpy()[cols]
    for c in var.columns:
        if c != "gene_name":
            out_var[c] = var[c].to_numpy()[cols]
    out_var["is_target"] = is_target[cols]
    if hvg is not None:
        out_var["highly_variable"] = hvg["highly_variable"].to_numpy()[cols]
        out_var["highly_variable_rank"] = (
            hvg["highly_variable_rank"].to_numpy()[cols].astype(np.float64)
        )

    def blocks():
        n_blocks = 0
        for _, block in iter_selected_rows(src.X, keep, chunk_rows=opt["chunk_rows"], dense=False):
            check_integer_counts(block.data, path.name)
            n_counts = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
            n_blocks += 1
            if n_blocks % 20 == 0:
                logger.info("  %s: %d blocks written", path.name, n_blocks)
            yield (block if all_genes else block[:, cols]), {"n_counts": n_counts}

    n_pert_cells = int((keep & ~is_control).sum())
    notes = []
    if opt["expected_shape"] is not None:
        exp_cells, exp_genes = opt["expected_shape"]
        same = (n_pert_cells, len(cols)) == (exp_cells, exp_genes)
        notes.append(
            f"published set: {exp_cells:,} perturbed cells x {exp_genes:,} genes; this file: "
            f"{n_pert_cells:,} perturbed cells (+ {int((keep & is_control).sum()):,} controls) x "
            f"{len(cols):,} genes"
            + (" (same)" if same else " (differs: see data_recipes/README.md)")
        )
    options = {k: v for k, v in opt.items() if k not in ("keep_perturbations", "keep_genes")}
    for key in ("keep_perturbations", "keep_genes"):
        options[key] = "None" if opt[key] is None else len(opt[key])
    logger.info("writing %d cells x %d genes to %s", int(keep.sum()), len(cols), out)
    extra_uns = {"pathways": src.uns["pathways"]} if "pathways" in src.uns else None
    return write_screen(
        out,
        obs=obs,
        var=out_var,
        blocks=blocks(),
        perturbation_key="perturbation",
        control=control,
        recipe={
            "name": "replogle2022",
            "source": f"Replogle et al. 2022, figshare+ article 20029387 ({path.name})",
            "url": ARTICLE,
            "source_control": SOURCE_CONTROL,
            "options": options,
            **summary,
        },
        uns=extra_uns,
        notes=notes,
    )


def _cli(argv: Sequence[str] | None) -> RecipeSummary:
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes.replogle2022",
        description="Download a Replogle 2022 K562 screen (figshare+ 20029387) and write a cellpert-ready .h5ad.",
    )
    add_io_arguments(
        parser,
        default_out=None,
        default_raw_dir=Path("data/raw/replogle2022"),
        input_help="a raw single-cell .h5ad you already have (any --dataset layout).",
        out_help="output .h5ad (default data/replogle2022_<dataset>[_<preset>].h5ad)",
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="essential",
        help="which file (default essential)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="none",
        help="option set (README); 'filtered' = the sVAE+/SAMS-VAE cut",
    )
    parser.add_argument(
        "--md5", help="figshare's md5 of the file, to verify the download against it"
    )
    parser.add_argument(
        "--sha256", help="a published sha256 of the file, to verify the download against it"
    )
    parser.add_argument(
        "--svae-notebook",
        type=Path,
        help="the sVAE+ replogle-preprocessing.ipynb (else downloaded)",
    )
    parser.add_argument(
        "--min-cells-per-perturbation", type=int, help="drop perturbations with fewer cells"
    )
    parser.add_argument(
        "--max-cells-per-perturbation", type=int, help="subsample larger groups (seeded)"
    )
    parser.add_argument(
        "--keep-perturbations",
        type=Path,
        help="text file, one target gene per line: keep only these",
    )
    parser.add_argument(
        "--keep-genes", type=Path, help="text file, one measured gene per line: keep only these"
    )
    parser.add_argument(
        "--min-de-genes", type=int, help="drop perturbations with fewer DE genes vs control"
    )
    parser.add_argument(
        "--de-alpha",
        type=float,
        default=0.05,
        help="family-wise level of the DE count (default 0.05)",
    )
    parser.add_argument(
        "--n-top-genes", type=int, help="Seurat-v3 highly variable genes (default: all genes)"
    )
    parser.add_argument(
        "--no-keep-target-genes",
        dest="keep_target_genes",
        action="store_const",
        const=False,
        help="with --n-top-genes / --keep-genes, do not add measured target genes",
    )
    parser.add_argument(
        "--control-label", default="control", help="label of non-targeting cells (default control)"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=5_000, help="rows read and written per block"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = asdict(PRESETS[args.preset])
    for key in preset:
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    if args.n_top_genes is not None and args.keep_genes is None:
        preset["keep_genes"] = None  # the user's gene selection replaces the preset's list
    lists: dict[str, list[str] | None] = {}
    for key in ("keep_perturbations", "keep_genes"):
        value = preset[key]
        lists[key] = (
            None if value is None else (FROM_SVAE if value == FROM_SVAE else read_name_list(value))
        )
    if FROM_SVAE in lists.values():
        notebook = args.svae_notebook
        if notebook is None:
            notebook = fetch(
                SVAE_NOTEBOOK,
                args.raw_dir,
                progress=args.progress,
                verify=args.verify,
                retries=args.retries,
            )
        svae_perts, svae_genes = read_svae_lists(notebook)
        logger.info("sVAE+ lists: %d perturbations, %d genes", len(svae_perts), len(svae_genes))
        for key, names in (("keep_perturbations", svae_perts), ("keep_genes", svae_genes)):
            if lists[key] == FROM_SVAE:
                lists[key] = names

    if args.input is not None:
        path = args.input
        verify_inputs([path], verify=args.verify, progress=args.progress, md5=args.md5, sha256=args.sha256)
    else:
        path = download_replogle2022(
            args.dataset,
            args.raw_dir,
            mirror=args.mirror,
            progress=args.progress,
            verify=args.verify,
            md5=args.md5,
            sha256=args.sha256,
            retries=args.retries,
        )
    out = args.out
    if out is None:
        out = (
            Path("data")
            / f"replogle2022_{args.dataset}{'' if args.preset == 'none' else '_' + args.preset}.h5ad"
        )
    expected = SVAE_EXPECTED if (args.preset == "filtered" and args.dataset == "gwps") else None
    return preprocess_replogle2022(
        path,
        out,
        min_cells_per_perturbation=preset["min_cells_per_perturbation"],
        max_cells_per_perturbation=args.max_cells_per_perturbation,
        keep_perturbations=lists["keep_perturbations"],
        keep_genes=lists["keep_genes"],
        min_de_genes=preset["min_de_genes"],
        de_alpha=args.de_alpha,
        n_top_genes=preset["n_top_genes"],
        keep_target_genes=preset["keep_target_genes"],
        control_label=args.control_label,
        chunk_rows=args.chunk_rows,
        seed=args.seed,
        expected_shape=expected,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_main(_cli, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
