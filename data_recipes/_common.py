"""Shared pieces of the data recipes: a resumable downloader, chunked HVG selection, CLI glue."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpert._errors import CellpertError

__all__ = [
    "RecipeError",
    "download",
    "iter_selected_rows",
    "read_mtx_cells",
    "read_name_list",
    "run_main",
    "select_genes_in_memory",
    "seurat_v3_from_moments",
    "seurat_v3_select",
]

logger = logging.getLogger("data_recipes")

#: Bytes read per network read.
CHUNK_BYTES = 1 << 20
#: Seconds between two progress lines.
PROGRESS_EVERY_S = 10.0


class RecipeError(CellpertError):
    """A recipe cannot go on (offline, bad checksum, unexpected file layout); one-line message."""


# --------------------------------------------------------------------------- download
def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _check_checksums(path: Path, checksums: dict[str, str]) -> str | None:
    """None when every given checksum matches, else a description of the mismatch."""
    for algorithm, expected in checksums.items():
        got = _digest(path, algorithm)
        if got.lower() != expected.lower():
            return f"{algorithm} is {got}, expected {expected}"
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    resume: bool = True,
    opener: Callable[..., Any] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` so that ``dest`` only ever exists complete.

    The bytes go to ``dest + ".part"``; only a finished (and, when checksums are given,
    verified) transfer is renamed to ``dest``. A ``.part`` left by an interrupted run is
    continued with an HTTP ``Range`` request when the server supports it, otherwise
    restarted. An existing ``dest`` is reused (after checking the checksums, if given).

    Parameters
    ----------
    url
        ``https://``, ``http://`` or ``file://`` URL.
    dest
        Final path of the file.
    sha256, md5
        Optional expected hex digests; a mismatch raises and keeps nothing.
    timeout
        Seconds to wait for the server on connect and on each read.
    resume
        Continue an existing ``.part`` file.
    opener
        Replacement for :func:`urllib.request.urlopen` (tests).

    Returns
    -------
    ``dest`` as a :class:`~pathlib.Path`.

    Raises
    ------
    RecipeError
        Offline / unreachable host, HTTP error, truncated transfer or checksum mismatch.
    """
    dest = Path(dest)
    checksums = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v}
    opener = opener or urllib.request.urlopen
    if dest.exists():
        bad = _check_checksums(dest, checksums) if checksums else None
        if bad is None:
            logger.info("%s: already downloaded", dest)
            return dest
        raise RecipeError(f"{dest} exists but its {bad}; delete it and run the recipe again.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if (resume and part.exists()) else 0

    request = urllib.request.Request(url, headers={"User-Agent": "cellpert-data-recipes"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    host = urlparse(url).netloc or url
    try:
        response = opener(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part is already complete (or longer): restart
            part.unlink()
            return download(url, dest, sha256=sha256, md5=md5, timeout=timeout, resume=False, opener=opener)
        raise RecipeError(f"{url}: HTTP {err.code} {err.reason}; check the URL or try again later.") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RecipeError(
            f"cannot download {url} ({reason}): this recipe needs internet access to {host}; run it "
            f"on a connected machine or put the file at {dest} yourself."
        ) from err

    with response:
        status = getattr(response, "status", None) or getattr(response, "code", None)
        if offset and status != 206:  # server ignored the Range header: start again
            logger.info("%s: server does not resume; restarting the download", dest.name)
            offset = 0
        length = response.headers.get("Content-Length") if response.headers else None
        total = offset + int(length) if length is not None and str(length).isdigit() else None
        done = offset
        last = time.monotonic()
        logger.info("downloading %s -> %s%s", url, dest, f" ({_fmt_bytes(total)})" if total else "")
        try:
            with open(part, "ab" if offset else "wb") as fh:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    fh.write(block)
                    done += len(block)
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY_S:
                        last = now
                        pct = f" ({100 * done / total:.1f}%)" if total else ""
                        logger.info("  %s: %s%s", dest.name, _fmt_bytes(done), pct)
                fh.flush()
                os.fsync(fh.fileno())
        except (urllib.error.URLError, OSError) as err:
            raise RecipeError(
                f"download of {url} broke off after {_fmt_bytes(done)} ({err}); run the recipe "
                f"again to resume from {part.name}."
            ) from err
    if total is not None and done != total:
        raise RecipeError(
            f"download of {url} is incomplete ({done:,} of {total:,} bytes); run the recipe again "
            f"to resume from {part.name}."
        )
    if checksums:
        bad = _check_checksums(part, checksums)
        if bad is not None:
            part.unlink()
            raise RecipeError(f"{url}: downloaded file's {bad}; the partial file was removed, try again.")
    os.replace(part, dest)
    logger.info("%s: done (%s)", dest, _fmt_bytes(done))
    return dest


# ------------------------------------------------------------------------- chunked reads
def iter_selected_rows(
    matrix, keep: np.ndarray, *, chunk_rows: int = 5_000, dense: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray | sp.csr_matrix]]:
    """Read contiguous row blocks of ``matrix`` and yield only the rows where ``keep`` is True.

    Blocks without a kept row are not read. Works on in-memory arrays, scipy sparse
    matrices and anndata backed matrices (h5py datasets, backed sparse datasets).

    Yields
    ------
    (indices of the kept rows in ``matrix``, those rows as float64 dense arrays when
    ``dense`` else float32 CSR).
    """
    keep = np.asarray(keep, dtype=bool)
    n = matrix.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        local = keep[start:stop]
        if not local.any():
            continue
        block = matrix[start:stop]
        if sp.issparse(block):
            block = sp.csr_matrix(block)[local]
            block = block.toarray().astype(np.float64) if dense else block.astype(np.float32)
        else:
            block = np.asarray(block)[local]
            block = block.astype(np.float64) if dense else sp.csr_matrix(block, dtype=np.float32)
        yield np.flatnonzero(local) + start, block


# ----------------------------------------------------------------------- Matrix Market
def _mtx_header(path: Path) -> tuple[int, tuple[int, int, int], str]:
    """Number of header lines, (rows, cols, nnz) and the field of a Matrix Market file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        banner = fh.readline()
        if not banner.startswith("%%MatrixMarket matrix coordinate"):
            raise RecipeError(f"{path.name} is not a Matrix Market coordinate file (first line {banner[:60]!r}).")
        n_lines = 1
        for line in fh:
            n_lines += 1
            if not line.startswith("%") and line.strip():
                rows, cols, nnz = (int(v) for v in line.split()[:3])
                return n_lines, (rows, cols, nnz), banner.split()[3]
    raise RecipeError(f"{path.name} has no size line; is the file complete?")


def read_mtx_cells(
    path: str | os.PathLike,
    cells: np.ndarray,
    *,
    n_genes: int,
    n_barcodes: int,
    chunk_lines: int = 20_000_000,
) -> sp.csr_matrix:
    """Read some cells of a 10x (genes x cells) Matrix Market file as a cells x genes CSR.

    The file is streamed ``chunk_lines`` entries at a time and only entries of ``cells``
    (column indices, 0-based) are kept, so memory scales with the kept counts, not the file.

    Returns
    -------
    ``len(cells)`` x ``n_genes`` CSR float32 matrix; row ``r`` is column ``cells[r]``.
    """
    path = Path(path)
    skip, (rows, cols, nnz), field = _mtx_header(path)
    if (rows, cols) != (n_genes, n_barcodes):
        raise RecipeError(
            f"{path.name} is {rows} x {cols} but there are {n_genes} genes and {n_barcodes} barcodes; "
            "the files do not belong together."
        )
    if field not in ("integer", "real"):
        raise RecipeError(f"{path.name} holds {field} values; integer counts are expected.")
    new_row = np.full(n_barcodes, -1, dtype=np.int64)
    new_row[np.asarray(cells)] = np.arange(len(cells))
    parts_r, parts_c, parts_v = [], [], []
    seen = 0
    reader = pd.read_csv(
        path,
        sep=r"\s+",
        header=None,
        skiprows=skip,
        names=["gene", "cell", "value"],
        dtype={"gene": np.int64, "cell": np.int64, "value": np.float64},
        chunksize=chunk_lines,
        engine="c",
    )
    for chunk in reader:
        seen += len(chunk)
        row = new_row[chunk["cell"].to_numpy() - 1]
        sel = row >= 0
        parts_r.append(row[sel].astype(np.int32))
        parts_c.append((chunk["gene"].to_numpy()[sel] - 1).astype(np.int32))
        parts_v.append(chunk["value"].to_numpy()[sel].astype(np.float32))
        logger.info("  %s: %d of %d entries read", path.name, seen, nnz)
    if seen != nnz:
        raise RecipeError(f"{path.name} has {seen:,} entries, its header says {nnz:,}; is the file complete?")
    r = np.concatenate(parts_r) if parts_r else np.zeros(0, np.int32)
    c = np.concatenate(parts_c) if parts_c else np.zeros(0, np.int32)
    v = np.concatenate(parts_v) if parts_v else np.zeros(0, np.float32)
    X = sp.csr_matrix((v, (r, c)), shape=(len(cells), n_genes), dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    return X


# ------------------------------------------------------------------ HVG (seurat_v3, chunked)
def seurat_v3_from_moments(
    mean: np.ndarray, var: np.ndarray, *, span: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Loess fit of Seurat v3: the regularised standard deviation and the clip value per gene.

    ``var`` is the unbiased (n - 1) variance of the raw counts. Returns ``(reg_std, mean)``
    where genes with zero variance get ``reg_std`` 1 (they are never selected).
    """
    from skmisc.loess import loess

    not_const = var > 0
    estimat_var = np.zeros(len(mean), dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    return np.sqrt(10**estimat_var), mean


def seurat_v3_select(
    matrix,
    keep: np.ndarray,
    n_top_genes: int,
    *,
    chunk_rows: int = 5_000,
    span: float = 0.3,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Seurat v3 highly variable genes on raw counts, two passes over row chunks.

    Reproduces ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` without a batch key
    (same loess fit, clipping at ``sqrt(n_cells)`` regularised SDs and normalised variance)
    while reading ``matrix`` (which may be backed on disk) one block of rows at a time.

    Parameters
    ----------
    matrix
        Cells x genes raw counts (in memory or backed).
    keep
        Boolean mask of the cells to use.
    n_top_genes
        Number of genes to select.
    moments
        Precomputed ``(mean, unbiased variance)`` over the kept cells, to skip the first pass.

    Returns
    -------
    DataFrame (one row per gene, in column order) with ``means``, ``variances``,
    ``variances_norm``, ``highly_variable_rank`` (0 = most variable) and ``highly_variable``.
    """
    keep = np.asarray(keep, dtype=bool)
    n = int(keep.sum())
    n_genes = matrix.shape[1]
    if moments is None:
        s1 = np.zeros(n_genes)
        s2 = np.zeros(n_genes)
        for _, block in iter_selected_rows(matrix, keep, chunk_rows=chunk_rows):
            s1 += block.sum(axis=0)
            s2 += np.square(block).sum(axis=0)
        mean = s1 / n
        var = np.maximum(s2 - n * mean**2, 0.0) / (n - 1)
    else:
        mean, var = (np.asarray(m, dtype=np.float64) for m in moments)
    reg_std, _ = seurat_v3_from_moments(mean, var, span=span)
    clip_val = reg_std * np.sqrt(n) + mean
    c1 = np.zeros(n_genes)
    c2 = np.zeros(n_genes)
    for _, block in iter_selected_rows(matrix, keep, chunk_rows=chunk_rows):
        np.minimum(block, clip_val, out=block)
        c1 += block.sum(axis=0)
        c2 += np.square(block).sum(axis=0)
    norm_var = (n * mean**2 + c2 - 2 * c1 * mean) / ((n - 1) * reg_std**2)
    rank = np.argsort(np.argsort(-norm_var))
    return pd.DataFrame(
        {
            "means": mean,
            "variances": var,
            "variances_norm": norm_var,
            "highly_variable_rank": rank,
            "highly_variable": rank < n_top_genes,
        }
    )


def select_genes_in_memory(adata, n_top_genes: int | None, *, also_keep: np.ndarray | None = None):
    """Keep scanpy's Seurat-v3 highly variable genes (and ``also_keep``) of an in-memory AnnData.

    Writes ``var["highly_variable"]`` and ``var["highly_variable_rank"]`` (all genes
    highly variable, rank NaN, when ``n_top_genes`` is None/0 or not below the number of
    genes) and returns the subset copy.
    """
    if not n_top_genes or n_top_genes >= adata.n_vars:
        adata.var["highly_variable"] = True
        adata.var["highly_variable_rank"] = np.nan
        return adata
    import scanpy as sc

    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=int(n_top_genes), inplace=False)
    adata.var["highly_variable"] = hvg["highly_variable"].to_numpy()
    adata.var["highly_variable_rank"] = hvg["highly_variable_rank"].to_numpy()
    keep = adata.var["highly_variable"].to_numpy().copy()
    if also_keep is not None:
        keep |= np.asarray(also_keep, dtype=bool)
    logger.info("keeping %d genes (%d highly variable)", int(keep.sum()), int(n_top_genes))
    return adata[:, keep].copy()


# ------------------------------------------------------------------------------- CLI glue
def read_name_list(path: str | os.PathLike) -> list[str]:
    """Names from a text file, one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such file; give a text file with one perturbation per line.")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def run_main(fn: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a recipe's CLI body; recipe and input errors become one ``error:`` line, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fn(argv)
    except CellpertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (a partial download is kept as .part and resumed next time)", file=sys.stderr)
        return 130
    return 0
