"""Reading screens and writing results back into h5ad files, safely.

How a write into a user's file stays safe (:func:`atomic_path`, :func:`save_results`):

- *crash*: the data go to a temporary file ``.<name>.<host>.<pid>.<random>.tmp`` beside
  the target, which is flushed and atomically renamed over it, so a process killed at any
  moment (even by SIGKILL) leaves the original file intact. Only the temporary file can
  be left behind; the next write of the same target removes those whose writer process
  no longer runs.
- *disk full, permission denied, read-only file system*: the original is intact and the
  error is one line (:class:`~cellpert.CellpertInputError`) naming the file and the fix.
- *two writers*: every write holds an exclusive lock on ``<name>.lock`` beside the target
  (:func:`results_lock`: an ``flock`` through the ``filelock`` library), and
  :func:`save_results` holds it over the whole check-and-write. A second writer waits up
  to :func:`lock_timeout_seconds` and then fails with one line. The holder removes the
  lock file before it releases the lock when the installed ``filelock`` re-checks the
  file after locking (filelock >= 4.2 does); otherwise, and after a process was killed
  holding it, the empty lock file is left, which is harmless: an ``flock`` ends with its
  process, so a left-over lock file never blocks anyone.
- *lost updates*: :func:`save_results` refuses to replace a file that changed after the
  AnnData was read from it with :func:`read_h5ad` (another process wrote into it
  meanwhile; writing would drop that process's results).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout, UnixFileLock

from cellpert._errors import CellpertInputError

__all__ = [
    "atomic_path",
    "dense_memory_budget_bytes",
    "lock_timeout_seconds",
    "read_h5ad",
    "results_lock",
    "save_results",
    "to_uns",
    "write_h5ad_atomic",
]

logger = logging.getLogger(__name__)

#: Files larger than this get a log line when reading starts and when it ends.
LARGE_FILE_BYTES = 500_000_000

#: Environment variable that overrides the memory budget (in GiB) for dense count matrices.
DENSE_BUDGET_ENV = "CELLPERT_MAX_DENSE_GB"
#: Environment variable: seconds a writer waits for another process writing the same file.
LOCK_TIMEOUT_ENV = "CELLPERT_LOCK_TIMEOUT"
#: Seconds a writer waits for the lock of its target by default.
DEFAULT_LOCK_TIMEOUT_S = 5.0


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
    stamp = _file_stamp(path)
    if backed:
        adata = _read_anndata(path, backed=True)
        if adata.layers.keys():
            adata.file.close()
            raise CellpertInputError(
                f"{path} has layers ({', '.join(adata.layers.keys())}); --backed reads the counts from X "
                "only: write a file whose X holds the raw counts."
            )
        _remember_read(adata, path, stamp)
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
    adata = _read_anndata(path, backed=False)
    _remember_read(adata, path, stamp)
    return adata


def _read_anndata(path: Path, *, backed: bool) -> ad.AnnData:
    """``anndata.read_h5ad`` with one clear line for a malformed file."""
    size = path.stat().st_size
    if size > LARGE_FILE_BYTES:  # a long read should not look like a hang
        logger.info("reading %s (%.1f GB%s)...", path, size / 1e9, ", backed" if backed else "")
    start = time.perf_counter()
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
        if size > LARGE_FILE_BYTES:
            logger.info("read %s in %.0f s", path.name, time.perf_counter() - start)
        return adata
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


def _target_directory(path: Path) -> Path:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CellpertInputError(f"{directory}: no such directory; create it or choose another --out.")
    return directory


# ------------------------------------------------------------------------------ errors
#: errno values of a write that failed for want of space, and how to say so.
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
#: errno values of a write that the file system refused.
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: The errno values :func:`_write_error` explains.
_EXPLAINED = frozenset(_NO_SPACE) | _REFUSED
#: HDF5 reports the system errno inside its message (``errno = 28, error message = ...``).
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def _errno_of(err: BaseException) -> int | None:
    """The system errno behind ``err`` (or its cause / context), also when HDF5 only names it."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in _EXPLAINED:
            return node.errno
        for match in _HDF5_ERRNO.finditer(str(node)):
            if int(match.group(1)) in _EXPLAINED:
                return int(match.group(1))
        node = node.__cause__ or node.__context__
    return None


def _write_error(path: Path, err: BaseException, *, existed: bool) -> CellpertInputError | None:
    """The one-line error for a write of ``path`` that failed with ``err`` (None: not one we explain)."""
    code = _errno_of(err)
    if code is None:
        return None
    kept = f" ({path.name} is unchanged)" if existed else ""
    directory = path.parent if str(path.parent) else Path(".")
    if code in _NO_SPACE:
        return CellpertInputError(
            f"could not write {path}: {_NO_SPACE[code]}; free some space there or write elsewhere "
            f"with --out{kept}."
        )
    if code == errno.EROFS:
        return CellpertInputError(f"could not write {path}: read-only file system; write elsewhere with --out{kept}.")
    return CellpertInputError(
        f"could not write {path}: permission denied; make {directory} writable or write elsewhere "
        f"with --out{kept}."
    )


# ------------------------------------------------------------------------------- locks
def lock_timeout_seconds() -> float:
    """Seconds a writer waits for another process writing the same file.

    :data:`DEFAULT_LOCK_TIMEOUT_S`, or ``$CELLPERT_LOCK_TIMEOUT`` seconds when set.
    """
    env = os.environ.get(LOCK_TIMEOUT_ENV)
    if not env:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise CellpertInputError(
            f"${LOCK_TIMEOUT_ENV}={env!r} is not a number of seconds >= 0; set it e.g. to 30."
        )
    return value


#: Whether the installed filelock re-checks, after locking, that the file it locked still
#: has a name (filelock >= 4.2 does). Only then may a holder remove the lock file before
#: releasing: a waiter that locked the removed file notices and locks the new one.
_REMOVES_LOCK_FILE = hasattr(UnixFileLock, "_finalize_locked_fd")
#: One FileLock per lock file and process, so that nested holds re-enter it.
_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def results_lock(path: str | os.PathLike, *, timeout: float | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``path`` (the file ``<path>.lock`` beside it).

    Every cellpert write of ``path`` holds this lock (:func:`atomic_path`), so two
    processes never write the same file at once; hold it around a read-modify-write of
    ``path`` to make the whole of it exclusive. Re-entrant within a thread. The lock is
    an ``flock`` (``filelock.FileLock``): the kernel releases it when its process dies,
    even by SIGKILL. The holder removes the lock file before releasing (see the module
    docstring for when it is left instead).

    Parameters
    ----------
    path
        The file to be written.
    timeout
        Seconds to wait for another process holding the lock (default
        :func:`lock_timeout_seconds`).

    Yields
    ------
    The lock file.

    Raises
    ------
    CellpertInputError
        When another process holds the lock for longer than ``timeout``, or the lock file
        cannot be created (permission denied, no space left).
    """
    path = Path(path)
    _target_directory(path)
    lock_path = _lock_file(path)
    wait = lock_timeout_seconds() if timeout is None else float(timeout)
    key = os.path.abspath(lock_path)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, FileLock(key))
    try:
        lock.acquire(timeout=wait)
    except Timeout as err:
        raise CellpertInputError(
            f"{path} is being written by another cellpert process (its lock {lock_path.name} was held "
            f"for more than {wait:g} s); wait for that process to finish and run again, write elsewhere "
            f"with --out, or wait longer with ${LOCK_TIMEOUT_ENV}=<seconds>."
        ) from err
    except OSError as err:
        problem = _write_error(path, err, existed=path.exists())
        if problem is None:
            raise
        raise problem from err
    try:
        yield lock_path
    finally:
        # remove the file while still holding it: a waiter that locked it re-opens the new one
        if lock.lock_counter == 1 and _REMOVES_LOCK_FILE and isinstance(lock, UnixFileLock):
            with contextlib.suppress(OSError):
                os.unlink(key)
        lock.release()


# ------------------------------------------------------------------- temporary files
def _host_token() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", socket.gethostname().split(".")[0])[:32] or "host"


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """Names of :func:`atomic_path`'s temporary files for ``path``: ``.<name>.<host>.<pid>.<random>.tmp``."""
    return re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _process_exists(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, as another user
        return True
    return True


def _remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporary files of ``path`` left by writers of this host that no longer run.

    A process killed while writing (SIGKILL, power loss of the process, OOM killer)
    leaves its temporary file beside the target; its name holds the writer's host and
    process id. Files of live processes, of other hosts and of other targets are kept.

    Returns
    -------
    The files removed.
    """
    directory = path.parent if str(path.parent) else Path(".")
    pattern, host = _temporary_pattern(path), _host_token()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or match["host"] != host or _process_exists(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            (directory / name).unlink()
            removed.append(directory / name)
            logger.info("removed %s, left by a writer that no longer runs", directory / name)
    return removed


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, mode_from: Path | None = None, lock_timeout: float | None = None
) -> Iterator[Path]:
    """A temporary file beside ``path`` that becomes ``path`` when the block succeeds.

    The block writes the temporary file; it is then flushed to disk (``fsync``), given
    the mode of ``mode_from`` (else of an existing ``path``, else the umask's) and
    atomically renamed over ``path``. If the block or any step fails, the temporary file
    is removed and an existing ``path`` is untouched. This is the one way cellpert
    replaces a file.

    The whole of it holds the lock of ``path`` (:func:`results_lock`, waiting up to
    ``lock_timeout`` seconds), and first removes temporary files of ``path`` left by
    writers that were killed (:func:`_remove_stale_temporaries`).

    Raises
    ------
    CellpertInputError
        When the directory does not exist, another process holds the lock, or the write
        fails for want of space or permission (the error names the file and the fix;
        ``path`` is unchanged). Other errors of the block are raised as they are.
    """
    path = Path(path)
    directory = _target_directory(path)
    existed = path.exists()
    try:
        with results_lock(path, timeout=lock_timeout):
            _remove_stale_temporaries(path)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{path.name}.{_host_token()}.{os.getpid()}.", suffix=".tmp", dir=directory
            )
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
    except OSError as err:
        problem = _write_error(path, err, existed=existed)
        if problem is None:
            raise
        raise problem from err


def write_h5ad_atomic(
    adata: ad.AnnData, path: str | os.PathLike, *, lock_timeout: float | None = None
) -> Path:
    """Write ``adata`` to ``path`` so that ``path`` is never left half-written.

    The data go to a temporary file beside the target, which is flushed to disk
    (``fsync``) and then atomically renamed over the target (:func:`atomic_path`, which
    also holds the target's lock, waiting up to ``lock_timeout`` seconds). If anything
    fails, the temporary file is removed and an existing target is untouched.

    Returns
    -------
    The path written.
    """
    with atomic_path(path, lock_timeout=lock_timeout) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


# ------------------------------------------------------------------ lost updates
#: What :func:`read_h5ad` saw of the file each live AnnData was read from:
#: ``id(adata) -> (weakref to adata, real path, file stamp)``.
_READS: dict[int, tuple[weakref.ref, str, tuple[int, ...] | None]] = {}


def _file_stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (device, inode, size, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _remember_read(adata: ad.AnnData, path: Path, stamp: tuple[int, ...] | None) -> None:
    key = id(adata)
    ref = weakref.ref(adata, lambda _ref, key=key: _READS.pop(key, None))
    _READS[key] = (ref, os.path.realpath(path), stamp)


def _check_unchanged_since_read(adata: ad.AnnData, source: Path) -> None:
    """Refuse to replace ``source`` when it changed after ``adata`` was read from it."""
    entry = _READS.get(id(adata))
    if entry is None or entry[0]() is not adata or entry[1] != os.path.realpath(source):
        return
    if _file_stamp(source) != entry[2]:
        raise CellpertInputError(
            f"{source} changed after it was read (another cellpert command wrote into it "
            "meanwhile?); nothing was written, so that what was written meanwhile is kept: run "
            "this command again."
        )


def save_results(
    adata: ad.AnnData,
    source: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    lock_timeout: float | None = None,
) -> Path:
    """Write an AnnData holding new results, in place of ``source`` or to ``out``.

    This is the one path through which cellpert writes into a user's h5ad: callers read
    the whole file, add their fields (never remove any) and call this function, which
    writes atomically (:func:`write_h5ad_atomic`). A backed AnnData (counts on disk,
    ``read_h5ad(..., backed=True)``) is written without loading its counts: the file is
    copied and its in-memory elements rewritten in the copy, then renamed over the target.

    The target's lock (:func:`results_lock`) is held over the whole of it: the check
    that ``source`` did not change since ``adata`` was read with :func:`read_h5ad` (else
    writing it back would drop what another process wrote meanwhile), the copy of a
    backed source and the write. A process killed at any moment leaves the target intact.

    Parameters
    ----------
    adata
        The AnnData read from ``source`` with the new fields added.
    source
        The file the AnnData was read from (replaced when ``out`` is None).
    out
        Write to this new file instead and leave ``source`` as it was.
    lock_timeout
        Seconds to wait for another process writing the target (default
        :func:`lock_timeout_seconds`: ``$CELLPERT_LOCK_TIMEOUT``, else 5).

    Returns
    -------
    The path written.

    Raises
    ------
    CellpertInputError
        When another process is writing the target (after ``lock_timeout``), ``source``
        changed since it was read, or the write fails for want of space or permission;
        the target is then unchanged.
    """
    source = Path(source)
    target = Path(out) if out is not None else source
    in_place = os.path.realpath(target) == os.path.realpath(source)
    with results_lock(target, timeout=lock_timeout):
        if in_place:
            _check_unchanged_since_read(adata, source)
        if adata.isbacked:
            written = _write_backed_atomic(adata, source, target, lock_timeout=lock_timeout)
        else:
            written = write_h5ad_atomic(adata, target, lock_timeout=lock_timeout)
        if in_place and id(adata) in _READS:  # what this AnnData was read from is now this file
            _remember_read(adata, target, _file_stamp(target))
    return written


#: Elements of an h5ad that a backed AnnData holds in memory (X stays on disk).
_IN_MEMORY_ELEMENTS = ("obs", "var", "obsm", "varm", "obsp", "varp", "uns")


def _write_backed_atomic(
    adata: ad.AnnData, source: Path, target: Path, *, lock_timeout: float | None = None
) -> Path:
    """:func:`write_h5ad_atomic` for a backed AnnData, without loading its counts.

    The source file is copied (streamed) to a temporary file beside the target; the
    elements held in memory (obs, var, obsm, varm, obsp, varp, uns: every existing field
    plus the new ones) are rewritten in the copy; the copy is flushed and atomically
    renamed over the target. ``X`` (and any layer) is copied byte for byte.
    """
    from anndata.io import write_elem

    with atomic_path(target, mode_from=source, lock_timeout=lock_timeout) as tmp:
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
