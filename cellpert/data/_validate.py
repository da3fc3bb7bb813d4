"""Chunked checks of count matrices: never densify the whole matrix."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cellpert._errors import CellpertInputError

__all__ = ["CountSummary", "iter_row_chunks", "summarise_counts", "gene_log1p_stats"]

#: Rows per chunk in whole-matrix passes (a 10k x 5k float32 dense chunk is 200 MB).
DEFAULT_CHUNK_ROWS = 10_000


#: A streamed pass over at least this many cells shows a progress bar on stderr (when
#: stderr is a terminal, or with ``CELLPERT_PROGRESS=1``; ``CELLPERT_PROGRESS=0``: never).
PROGRESS_MIN_ROWS = 200_000


def _show_progress(n_rows: int) -> bool:
    setting = os.environ.get("CELLPERT_PROGRESS", "").strip()
    if setting == "0":
        return False
    if n_rows < PROGRESS_MIN_ROWS:
        return False
    return setting == "1" or sys.stderr.isatty()


def iter_row_chunks(
    matrix, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, rows: np.ndarray | None = None, desc: str = "reading cells"
) -> Iterator[tuple[np.ndarray, np.ndarray | sp.csr_matrix]]:
    """Iterate over blocks of rows of a (sparse or dense) matrix.

    A pass over many cells (:data:`PROGRESS_MIN_ROWS`) shows a progress bar (``desc``)
    on stderr, so that a long read of a large file is not mistaken for a hang.

    Parameters
    ----------
    matrix
        Cells x genes matrix (scipy sparse, numpy array, or anything that supports
        row slicing such as an h5py-backed anndata matrix).
    chunk_rows
        Rows per block.
    rows
        Only these row indices (in this order); default all rows.

    Yields
    ------
    (row indices, block), the block being CSR when ``matrix`` is sparse.
    """
    n = matrix.shape[0]
    index = np.arange(n) if rows is None else np.asarray(rows)
    bar = None
    if _show_progress(len(index)):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(index), desc=desc, unit="cells", unit_scale=True, leave=False, file=sys.stderr)
    for start in range(0, len(index), chunk_rows):
        idx = index[start : start + chunk_rows]
        if rows is None:
            block = matrix[int(idx[0]) : int(idx[-1]) + 1]
        else:
            block = matrix[idx]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
        else:
            block = np.asarray(block)
        if bar is not None:
            bar.update(len(idx))
        yield idx, block
    if bar is not None:
        bar.close()


@dataclass
class CountSummary:
    """What one pass over a count matrix learns."""

    library_size: np.ndarray
    """Total counts per cell."""
    gene_total: np.ndarray
    """Total counts per gene."""
    nnz: int
    """Number of non-zero entries."""

    @property
    def n_cells(self) -> int:
        return len(self.library_size)

    @property
    def n_genes(self) -> int:
        return len(self.gene_total)

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries."""
        total = self.n_cells * self.n_genes
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def all_zero_genes(self) -> np.ndarray:
        """Boolean mask of genes with zero counts in every cell."""
        return self.gene_total == 0

    @property
    def empty_cells(self) -> np.ndarray:
        """Boolean mask of cells with zero total counts (library size 0)."""
        return self.library_size == 0


def _values(block) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


def summarise_counts(
    matrix, *, where: str = "X", chunk_rows: int = DEFAULT_CHUNK_ROWS, fix_hint: str = ""
) -> CountSummary:
    """Check that ``matrix`` holds raw counts and summarise it, one row chunk at a time.

    Raises :class:`~cellpert.CellpertInputError` for NaN, infinite, negative or
    non-integer values, naming the first offending cell row.

    Parameters
    ----------
    matrix
        Cells x genes matrix.
    where
        Name of the matrix in messages (``"X"``, ``"layers['counts']"``).
    fix_hint
        Appended to the non-integer message (e.g. the available layers).
    """
    n_cells, n_genes = matrix.shape
    library = np.zeros(n_cells, dtype=np.float64)
    gene_total = np.zeros(n_genes, dtype=np.float64)
    nnz = 0
    for idx, block in iter_row_chunks(matrix, chunk_rows=chunk_rows):
        values = _values(block)
        if values.size and not np.issubdtype(values.dtype, np.number):
            raise CellpertInputError(f"{where} has non-numeric values ({values.dtype}); raw counts are expected.")
        bad = ~np.isfinite(values)
        if bad.any():
            kind = "NaN" if np.isnan(values[bad]).any() else "infinite"
            raise CellpertInputError(
                f"{where} contains {kind} values (first in cell row {_first_row(block, bad, idx)}); "
                "raw integer counts are expected: fix or drop those cells."
            )
        neg = values < 0
        if neg.any():
            raise CellpertInputError(
                f"{where} contains negative values (e.g. {values[neg][0]:g} in cell row "
                f"{_first_row(block, neg, idx)}); raw counts are expected: this looks like "
                f"scaled or centred data.{fix_hint}"
            )
        frac = values != np.round(values)
        if frac.any():
            raise CellpertInputError(
                f"{where} contains non-integer values (e.g. {values[frac][0]:.4g} in cell row "
                f"{_first_row(block, frac, idx)}); raw integer counts are expected, not "
                f"log-normalised data.{fix_hint}"
            )
        if sp.issparse(block):
            library[idx] = np.asarray(block.sum(axis=1)).ravel()
            gene_total += np.bincount(block.indices, weights=block.data, minlength=n_genes)
            nnz += int(np.count_nonzero(block.data))
        else:
            library[idx] = block.sum(axis=1)
            gene_total += block.sum(axis=0)
            nnz += int(np.count_nonzero(block))
    return CountSummary(library_size=library, gene_total=gene_total, nnz=nnz)


def _first_row(block, mask: np.ndarray, idx: np.ndarray) -> int:
    """Row (in the full matrix) of the first flagged value of a block."""
    first = int(np.argmax(mask))
    if sp.issparse(block):
        row = int(np.searchsorted(block.indptr, first, side="right") - 1)
    else:
        row = first // block.shape[1]
    return int(idx[row])


def gene_log1p_stats(
    matrix, *, rows: np.ndarray | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation of ``log(x + 1)``, streamed over row chunks.

    Genes that are constant over the chosen rows (e.g. all-zero genes) get a standard
    deviation of 1 instead of 0, so that standardising by these statistics never
    divides by zero.

    Parameters
    ----------
    matrix
        Cells x genes counts.
    rows
        Only these cells (e.g. the training split).

    Returns
    -------
    (mean, std), float32 arrays of length n_genes.
    """
    n_genes = matrix.shape[1]
    s1 = np.zeros(n_genes, dtype=np.float64)
    s2 = np.zeros(n_genes, dtype=np.float64)
    n = 0
    for _, block in iter_row_chunks(matrix, chunk_rows=chunk_rows, rows=rows):
        if sp.issparse(block):
            logged = block.copy()
            logged.data = np.log1p(logged.data.astype(np.float64))
            s1 += np.asarray(logged.sum(axis=0)).ravel()
            logged.data **= 2
            s2 += np.asarray(logged.sum(axis=0)).ravel()
        else:
            logged = np.log1p(block.astype(np.float64))
            s1 += logged.sum(axis=0)
            s2 += (logged**2).sum(axis=0)
        n += block.shape[0]
    if n == 0:
        raise CellpertInputError("no cells to compute gene statistics from; check the split.")
    mean = s1 / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
