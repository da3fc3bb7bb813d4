"""Reading screens and writing results back into h5ad files, safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError

__all__ = [
    "dense_memory_budget_bytes",
    "read_h5ad",
    "save_results",
    "to_uns",
    "write_h5ad_atomic",
]

#: Environment variable that overrides the memory budget (in GiB) for dense count matrices.
DENSE_BUDGET_ENV = "CELLPERT_MAX_DENSE_GB"


def dense_memory_budget_bytes() -> int:
    """Largest dense matrix (in bytes) cellpert agrees to load into memory.

    Half of the machine's physical memory, or ``$CELLPERT_MAX_DENSE_GB`` GiB when set.
    """
    env = os.environ.get(DENSE_BUDGET_ENV)
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError as err:
            raise CellpertInputError(
                f"${DENSE_BUDGET_ENV}={env!r} is not a number; set it to a size in GiB, e.g. 8."
            ) from err
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * 2**30
    return total // 2


def _check_path_is_h5ad(path: Path) -> None:
    if not path.exists():
        raise CellpertInputError(f"{path}: no such file; check the path (an .h5ad file is expected).")
    if path.is_dir():
        raise CellpertInputError(f"{path} is a directory; give the path of an .h5ad file.")
    if not h5py.is_hdf5(path):
        raise CellpertInputError(
            f"{path} is not an HDF5/.h5ad file; convert it to .h5ad first "
            "(e.g. with scanpy.read_10x_mtx(...).write_h5ad(...))."
        )


def _dense_matrices(path: Path) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Dense 2-D matrices stored in ``X`` and ``layers`` (name, shape, dtype)."""
    found = []
    with h5py.File(path, "r") as f:
        candidates = [("X", f.get("X"))]
        layers = f.get("layers")
        if isinstance(layers, h5py.Group):
            candidates += [(f"layers/{k}", layers[k]) for k in layers]
        for name, node in candidates:
            if isinstance(node, h5py.Dataset) and node.ndim == 2:
                found.append((name, node.shape, node.dtype))
    return found


def read_h5ad(
    path: str | os.PathLike, *, max_dense_bytes: int | None = None, backed: bool = False
) -> ad.AnnData:
    """Read an ``.h5ad`` file, with one-line errors for unusable files.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    max_dense_bytes
        Refuse dense count matrices larger than this (default:
        :func:`dense_memory_budget_bytes`). Sparse matrices are always accepted.
    backed
        Open ``X`` in backed mode (read-only, rows read from disk when used); obs, var,
        obsm, varm and uns are still read into memory. ``X`` must then be a sparse CSR
        matrix or a dense array on disk.

    Returns
    -------
    The AnnData object (fully in memory unless ``backed``; sparse matrices stay sparse).
    """
    path = Path(path)
    _check_path_is_h5ad(path)
    if backed:
        adata = _read_anndata(path, backed=True)
        if adata.layers.keys():
            adata.file.close()
            raise CellpertInputError(
                f"{path} has layers ({', '.join(adata.layers.keys())}); --backed reads the counts from X "
                "only: write a file whose X holds the raw counts."
            )
        return adata
    budget = dense_memory_budget_bytes() if max_dense_bytes is None else max_dense_bytes
    try:
        dense = _dense_matrices(path)
    except OSError as err:
        raise CellpertInputError(f"{path} cannot be opened as HDF5 ({err}); is it complete?") from err
    for name, shape, dtype in dense:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > budget:
            raise CellpertInputError(
                f"{path}: {name} is a dense {shape[0]:,} x {shape[1]:,} {dtype} matrix "
                f"({nbytes / 2**30:.1f} GiB), more than the {budget / 2**30:.1f} GiB memory budget; "
                "store the counts as a sparse CSR matrix (convert in row chunks, e.g. with "
                "anndata.experimental.read_elem_lazy / backed mode) or raise "
                f"${DENSE_BUDGET_ENV} if the machine has the memory."
            )
    return _read_anndata(path, backed=False)


def _read_anndata(path: Path, *, backed: bool) -> ad.AnnData:
    """``anndata.read_h5ad`` with one clear line for a malformed file."""
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # anndata raises many types for malformed files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellpertInputError(
            f"{path} is HDF5 but not a readable AnnData file ({msg}); re-write it with anndata."
        ) from err


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system supports it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode_from: Path | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` that becomes ``path`` when the block succeeds.

    The block writes the temporary file; it is then flushed to disk (``fsync``), given
    the mode of ``mode_from`` (else of an existing ``path``, else the umask's) and
    atomically renamed over ``path``. If the block or any step fails, the temporary file
    is removed and an existing ``path`` is untouched. This is the one way cellpert
    replaces a file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CellpertInputError(f"{directory}: no such directory; create it or choose another --out.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        reference = mode_from if mode_from is not None else (path if path.exists() else None)
        if reference is not None:
            shutil.copymode(reference, tmp)
        else:  # mkstemp creates 0600; a new result file gets the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` so that ``path`` is never left half-written.

    The data go to a temporary file beside the target, which is flushed to disk
    (``fsync``) and then atomically renamed over the target (:func:`atomic_path`). If
    anything fails, the temporary file is removed and an existing target is untouched.

    Returns
    -------
    The path written.
    """
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def save_results(
    adata: ad.AnnData, source: str | os.PathLike, *, out: str | os.PathLike | None = None
) -> Path:
    """Write an AnnData holding new results, in place of ``source`` or to ``out``.

    This is the one path through which cellpert writes into a user's h5ad: callers read
    the whole file, add their fields (never remove any) and call this function, which
    writes atomically (:func:`write_h5ad_atomic`). A backed AnnData (counts on disk,
    ``read_h5ad(..., backed=True)``) is written without loading its counts: the file is
    copied and its in-memory elements rewritten in the copy, then renamed over the target.

    Parameters
    ----------
    adata
        The AnnData read from ``source`` with the new fields added.
    source
        The file the AnnData was read from (replaced when ``out`` is None).
    out
        Write to this new file instead and leave ``source`` as it was.
    """
    target = Path(out) if out is not None else Path(source)
    if adata.isbacked:
        return _write_backed_atomic(adata, Path(source), target)
    return write_h5ad_atomic(adata, target)


#: Elements of an h5ad that a backed AnnData holds in memory (X stays on disk).
_IN_MEMORY_ELEMENTS = ("obs", "var", "obsm", "varm", "obsp", "varp", "uns")


def _write_backed_atomic(adata: ad.AnnData, source: Path, target: Path) -> Path:
    """:func:`write_h5ad_atomic` for a backed AnnData, without loading its counts.

    The source file is copied (streamed) to a temporary file beside the target; the
    elements held in memory (obs, var, obsm, varm, obsp, varp, uns: every existing field
    plus the new ones) are rewritten in the copy; the copy is flushed and atomically
    renamed over the target. ``X`` (and any layer) is copied byte for byte.
    """
    from anndata.io import write_elem

    with atomic_path(target, mode_from=source) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as f:
            for name in _IN_MEMORY_ELEMENTS:
                value = getattr(adata, name)
                if name in ("obsm", "varm", "obsp", "varp", "uns"):
                    value = dict(value)
                if name in f:
                    del f[name]
                write_elem(f, name, value)
    return target


def to_uns(obj: Any) -> Any:
    """Convert a nested structure into something h5ad can store in ``uns``.

    ``None`` becomes the string ``"None"``, paths become strings, tuples and sets
    become lists (arrays when homogeneous), mappings are converted recursively.
    DataFrames and arrays are kept as they are.
    """
    if obj is None:
        return "None"
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (pd.DataFrame, np.ndarray, str, bool, int, float, np.generic)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_uns(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [to_uns(v) for v in obj]
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object) if items else np.asarray([], dtype=str)
        if all(isinstance(v, (int, float, bool, np.generic)) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    return str(obj)
