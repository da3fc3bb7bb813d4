"""Shared pieces of the data recipes: resumable verified downloads, streamed reads, chunked writes.

- :func:`download` / :func:`fetch`: HTTP(S) download into ``<file>.part`` with a progress bar
  on stderr, resume by HTTP ``Range`` (with ``If-Range``, so a file changed on the server
  is restarted rather than spliced), automatic retries of a dropped connection, a check of
  the published checksum or, where none is known, of the ``<file>.sha256`` sidecar recorded
  by the first download; the final name only ever holds a complete, verified file.
- :func:`count_matrix_from_mtx`: cells x genes counts out of 10x Matrix Market files, with
  Seurat-v3 highly variable genes computed from streamed passes (never the whole matrix).
- :func:`seurat_v3_select`: the same gene selection over row blocks of a (backed) matrix.
- :func:`write_screen`: a cellpert screen written to ``.h5ad`` one block of rows at a time
  (through :func:`cellpert.data._io.atomic_path`), and the :class:`RecipeSummary` printed
  at the end of every recipe.

Why not ``pooch`` (or another download library)? It is not a dependency of cellpert, and
it does not resume a partial download: after a broken connection it starts again from
byte 0, which for the 60 GB Replogle file is not an option. The small HTTP code below
(standard library only) covers what the recipes need.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpert._errors import CellpertError, CellpertInputError

__all__ = [
    "MtxCounts",
    "MtxSource",
    "RecipeError",
    "RecipeSummary",
    "RemoteFile",
    "add_io_arguments",
    "categorical_obs",
    "check_integer_counts",
    "count_matrix_from_mtx",
    "download",
    "fetch",
    "fmt_bytes",
    "iter_mtx_entries",
    "iter_selected_rows",
    "read_name_list",
    "read_sidecar",
    "row_blocks",
    "run_main",
    "seurat_v3_from_moments",
    "seurat_v3_select",
    "sidecar_path",
    "verify_inputs",
    "verify_local",
    "write_screen",
]

logger = logging.getLogger("data_recipes")

#: Bytes read per network read and per checksum read.
CHUNK_BYTES = 1 << 20
#: Sent with every request (some servers refuse requests without a user agent).
USER_AGENT = "cellpert-data-recipes (+https://github.com/; python urllib)"
#: HTTP statuses worth retrying (the server is busy or failed, not the request).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RecipeError(CellpertInputError):
    """A recipe cannot go on (offline, bad checksum, unexpected file layout); one-line message."""


# --------------------------------------------------------------------------- formatting
def fmt_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _progress_bar(*, total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if interactive else 30.0,  # a log file gets a line every 30 s
        leave=interactive,
    )


# ----------------------------------------------------------------------------- checksums
def sidecar_path(path: str | os.PathLike) -> Path:
    """``<file>.sha256`` beside ``path``: the checksum recorded when the file was first fetched."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The sha256 recorded in the sidecar of ``path`` (``sha256sum`` format), or None."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    text = side.read_text().split()
    if not text or len(text[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text[0]):
        raise RecipeError(
            f"{side} is not a sha256 line ('<64 hex digits>  <name>'); delete it to record a new one."
        )
    return text[0].lower()


def _write_sidecar(path: Path, sha256: str) -> None:
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{sha256}  {path.name}\n")  # `sha256sum -c <file>.sha256` checks it
    os.replace(tmp, side)


def file_digests(
    path: Path, algorithms: Iterable[str], *, progress: bool = False
) -> dict[str, str]:
    """Hex digests of a file, read once in blocks."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    size = path.stat().st_size
    with (
        open(path, "rb") as fh,
        _progress_bar(
            total=size,
            initial=0,
            desc=f"checking {path.name}",
            enabled=progress and size > (64 << 20),
        ) as bar,
    ):
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            for h in hashers.values():
                h.update(block)
            bar.update(len(block))
    return {a: h.hexdigest() for a, h in hashers.items()}


def _expected_digests(
    dest: Path, sha256: str | None, md5: str | None, sidecar: bool
) -> dict[str, tuple[str, str]]:
    """``algorithm -> (hex digest, where it comes from)``: published digests, else the sidecar."""
    expected = {}
    if sha256:
        expected["sha256"] = (sha256.lower(), "the published sha256")
    if md5:
        expected["md5"] = (md5.lower(), "the published md5")
    if "sha256" not in expected and sidecar and (recorded := read_sidecar(dest)) is not None:
        expected["sha256"] = (
            recorded,
            f"the sha256 recorded at the first download ({sidecar_path(dest).name})",
        )
    return expected


def _mismatch(got: Mapping[str, str], expected: Mapping[str, tuple[str, str]]) -> str | None:
    for algorithm, (want, source) in expected.items():
        if got[algorithm] != want:
            return f"{algorithm} {got[algorithm]} differs from {source} {want}"
    return None


def verify_local(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> str:
    """Check a file the user already has against a published checksum or its sidecar.

    Returns a short description of what was checked (``"not verified: ..."`` when there is
    nothing to compare with). Never touches the network.

    Raises
    ------
    RecipeError
        The file is missing or its checksum differs.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such file.")
    expected = _expected_digests(path, sha256, md5, sidecar=True)
    if not expected:
        return f"{path.name}: not verified (no published checksum and no {sidecar_path(path).name})"
    got = file_digests(path, expected, progress=progress)
    if (bad := _mismatch(got, expected)) is not None:
        raise RecipeError(f"{path}: {bad}; the file is damaged or not the expected one.")
    return f"{path.name}: {', '.join(expected)} verified"


# ------------------------------------------------------------------------------ download
class _Interrupted(Exception):
    """The transfer stopped part-way (dropped connection, short body, server error): resumable."""


class _Restart(_Interrupted):
    """The ``.part`` cannot be continued and was emptied: start again at once (not a failure)."""


class _PartFile:
    """The ``.part`` file of a download and the running digests of its bytes."""

    def __init__(self, path: Path, algorithms: Sequence[str]):
        self.path = path
        self.algorithms = tuple(algorithms)
        self.hashers = {a: hashlib.new(a) for a in self.algorithms}
        self.size = 0

    def load(self, *, progress: bool) -> None:
        """Take the bytes of an earlier, interrupted run into the digests."""
        if self.path.exists():
            self.hashers = {a: hashlib.new(a) for a in self.algorithms}
            with (
                open(self.path, "rb") as fh,
                _progress_bar(
                    total=self.path.stat().st_size,
                    initial=0,
                    desc=f"re-reading {self.path.name}",
                    enabled=progress and self.path.stat().st_size > (64 << 20),
                ) as bar,
            ):
                for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                    for h in self.hashers.values():
                        h.update(block)
                    bar.update(len(block))
            self.size = self.path.stat().st_size

    def reset(self) -> None:
        """Start again from byte 0."""
        self.path.write_bytes(b"")
        self.hashers = {a: hashlib.new(a) for a in self.algorithms}
        self.size = 0

    def digests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)
    return None if value is None else str(value)


def _range_start(content_range: str | None) -> int | None:
    """``"bytes 100-999/1000"`` -> 100."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    spec = content_range[6:].split("/", 1)[0]
    try:
        return int(spec.split("-", 1)[0])
    except ValueError:
        return None


def _range_total(content_range: str | None) -> int | None:
    """``"bytes */1000"`` or ``"bytes 0-9/1000"`` -> 1000."""
    if not content_range or "/" not in content_range:
        return None
    tail = content_range.rsplit("/", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


def _offline_error(url: str, dest: Path, err: BaseException) -> RecipeError:
    host = urlparse(url).netloc or url
    reason = getattr(err, "reason", err)
    return RecipeError(
        f"cannot download {url} ({reason}): this recipe needs internet access to {host}; run it on "
        f"a connected machine, or fetch the file yourself and pass it with --input (or put it at {dest})."
    )


def _transfer(
    url: str,
    part: _PartFile,
    meta: Path,
    *,
    dest: Path,
    timeout: float,
    block_bytes: int,
    progress: bool,
    opener: Callable[..., Any],
) -> None:
    """One request: append the rest of ``url`` to ``part``. Raises :class:`_Interrupted` to retry."""
    offset = part.size
    saved = {}
    if offset and meta.exists():
        try:
            saved = json.loads(meta.read_text())
        except (OSError, ValueError):  # a damaged .part.json: resume without a validator
            saved = {}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        if saved.get("url") == url and saved.get("validator"):
            # If the file changed on the server since the .part was started, the server
            # answers 200 with the whole new file instead of 206: never splice two versions.
            request.add_header("If-Range", saved["validator"])
    try:
        response = opener(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            total = _range_total(_header(err.headers, "Content-Range"))
            if total == offset:
                return  # the .part already holds the whole file
            logger.info("%s: the server refused to resume; starting again", dest.name)
            part.reset()
            raise _Restart("range not satisfiable") from err
        if err.code in RETRY_STATUSES:
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from err
        raise RecipeError(
            f"{url}: HTTP {err.code} {err.reason}; check the URL or try again later."
        ) from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        if part.size:  # we had a connection before: a glitch worth retrying
            raise _Interrupted(str(getattr(err, "reason", err))) from err
        raise _offline_error(url, dest, err) from err

    with response:
        status = getattr(response, "status", None) or getattr(response, "code", None)
        headers = getattr(response, "headers", None)
        if offset:
            start = _range_start(_header(headers, "Content-Range"))
            if status != 206 or start != offset:
                logger.info(
                    "%s: the server sent the whole file (no resume, or it changed); starting again",
                    dest.name,
                )
                part.reset()
        if part.size == 0:
            validator = _header(headers, "ETag")
            if validator is None or validator.startswith("W/"):
                validator = _header(headers, "Last-Modified")
            tmp = meta.with_name(meta.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "validator": validator}))
            os.replace(tmp, meta)
        length = _header(headers, "Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        total = None if remaining is None else part.size + remaining
        if remaining is not None:
            free = shutil.disk_usage(part.path.parent).free
            if remaining > free:
                raise RecipeError(
                    f"not enough disk space for {dest.name} in {dest.parent}: {fmt_bytes(remaining)} "
                    f"still to download, {fmt_bytes(free)} free; free some space or choose another --raw-dir."
                )
        with (
            open(part.path, "ab") as fh,
            _progress_bar(total=total, initial=part.size, desc=dest.name, enabled=progress) as bar,
        ):
            try:
                while True:
                    block = response.read(block_bytes)
                    if not block:
                        break
                    fh.write(block)
                    for h in part.hashers.values():
                        h.update(block)
                    part.size += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException, urllib.error.URLError) as err:
                raise _Interrupted(f"{type(err).__name__}: {err}".rstrip(": ")) from err
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    if total is not None and part.size != total:
        raise _Interrupted(f"the server sent {part.size:,} of {total:,} bytes")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    sidecar: bool = True,
    verify_existing: bool = True,
    resume: bool = True,
    retries: int = 3,
    retry_wait: float = 5.0,
    timeout: float = 60.0,
    block_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    opener: Callable[..., Any] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` so that ``dest`` only ever exists complete and verified.

    The bytes go to ``dest + ".part"`` (with a progress bar on stderr); only a finished and
    verified transfer is renamed to ``dest``. A ``.part`` left by an interrupted run (or by
    a dropped connection, retried up to ``retries`` times) is continued with an HTTP
    ``Range`` request; the ``If-Range`` validator (``ETag`` / ``Last-Modified``) saved in
    ``dest + ".part.json"`` makes the server send the whole file instead if it changed
    meanwhile. Servers that ignore ranges are read again from byte 0.

    Verification: against ``sha256`` / ``md5`` when the publisher gives them; otherwise,
    with ``sidecar``, against the sha256 recorded in ``dest + ".sha256"`` by the first
    download (so a second download is checked against the first: "trust on first use").
    The sidecar is written after every successful download that did not have one.

    Parameters
    ----------
    url
        ``https://``, ``http://`` or ``file://`` URL.
    dest
        Final path of the file.
    sha256, md5
        Published hex digests; a mismatch removes the download and raises.
    sidecar
        Read and write the ``.sha256`` sidecar.
    verify_existing
        Check an existing ``dest`` (against the published digest or the sidecar) before
        reusing it; without a digest to compare with, record its sha256 in the sidecar.
    resume
        Continue an existing ``.part`` file (False: start again).
    retries, retry_wait
        Resumed retries after a dropped connection or a server error, waiting
        ``retry_wait * 2**k`` seconds before retry ``k``.
    timeout
        Seconds to wait for the server on connect and on each read.
    block_bytes
        Bytes per read.
    progress
        Show a progress bar on stderr.
    opener
        Replacement for :func:`urllib.request.urlopen` (tests).

    Returns
    -------
    ``dest`` as a :class:`~pathlib.Path`.

    Raises
    ------
    RecipeError
        Offline / unreachable host, HTTP error, disk full, a transfer that keeps breaking
        off (the ``.part`` is kept for the next run), or a checksum mismatch (nothing is
        kept). The message is one line.
    """
    dest = Path(dest)
    opener = opener or urllib.request.urlopen
    expected = _expected_digests(dest, sha256, md5, sidecar)
    if dest.exists():
        if verify_existing and expected:
            got = file_digests(dest, expected, progress=progress)
            if (bad := _mismatch(got, expected)) is not None:
                raise RecipeError(
                    f"{dest} exists but its {bad}; delete it (and {sidecar_path(dest).name} if the "
                    "source changed) and run the recipe again."
                )
            logger.info("%s: already downloaded, %s verified", dest, ", ".join(expected))
        elif verify_existing and sidecar:
            _write_sidecar(dest, file_digests(dest, ["sha256"], progress=progress)["sha256"])
            logger.info(
                "%s: already there; recorded its sha256 in %s", dest, sidecar_path(dest).name
            )
        else:
            logger.info("%s: already downloaded (not verified)", dest)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _PartFile(dest.with_name(dest.name + ".part"), sorted({"sha256", *expected}))
    meta = dest.with_name(dest.name + ".part.json")
    if resume:
        part.load(progress=progress)
        if part.size:
            logger.info("%s: resuming after %s", dest.name, fmt_bytes(part.size))
    elif part.path.exists():
        part.reset()
    logger.info("downloading %s -> %s", url, dest)
    failures = 0
    while True:
        try:
            _transfer(
                url,
                part,
                meta,
                dest=dest,
                timeout=timeout,
                block_bytes=block_bytes,
                progress=progress,
                opener=opener,
            )
            break
        except _Restart:
            continue
        except _Interrupted as err:
            failures += 1
            if failures > retries:
                raise RecipeError(
                    f"download of {url} broke off after {fmt_bytes(part.size)} ({err}); run the recipe "
                    f"again to resume from {part.path.name}."
                ) from err
            wait = retry_wait * 2 ** (failures - 1)
            logger.info(
                "%s: %s; resuming in %.0f s (retry %d of %d)",
                dest.name,
                err,
                wait,
                failures,
                retries,
            )
            time.sleep(wait)

    got = part.digests()
    if (bad := _mismatch(got, expected)) is not None:
        part.path.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise RecipeError(
            f"{url}: the downloaded file's {bad}; it was deleted, run the recipe again."
        )
    os.replace(part.path, dest)
    meta.unlink(missing_ok=True)
    if sidecar and read_sidecar(dest) is None:
        _write_sidecar(dest, got["sha256"])
    state = (
        ", ".join(expected) + " verified"
        if expected
        else f"sha256 recorded in {sidecar_path(dest).name}"
    )
    logger.info("%s: done, %s (%s)", dest, fmt_bytes(part.size), state)
    return dest


@dataclass(frozen=True)
class RemoteFile:
    """One file a recipe downloads.

    Attributes
    ----------
    name
        File name in the raw folder.
    url
        Where it comes from.
    sha256, md5
        Published digests, when the publisher gives them (None: verified against the
        sidecar of the first download instead).
    note
        What is known about the file (size, checksum status), for the README and logs.
    """

    name: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    note: str = ""


def fetch(
    remote: RemoteFile,
    raw_dir: str | os.PathLike,
    *,
    mirror: str | None = None,
    progress: bool = True,
    verify: bool = True,
    **kwargs: Any,
) -> Path:
    """Download ``remote`` into ``raw_dir`` (see :func:`download`); ``mirror`` replaces its URL.

    ``mirror`` is a base URL under which every file is found by its name
    (``<mirror>/<name>``): a local copy, an institute's HTTP mirror or ``file:///...``.
    """
    url = remote.url if mirror is None else mirror.rstrip("/") + "/" + remote.name
    return download(
        url,
        Path(raw_dir) / remote.name,
        sha256=remote.sha256,
        md5=remote.md5,
        verify_existing=verify,
        progress=progress,
        **kwargs,
    )


# ------------------------------------------------------------------------ row blocks
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


def row_blocks(X: sp.csr_matrix, chunk_rows: int) -> Iterator[sp.csr_matrix]:
    """Consecutive row blocks of an in-memory CSR matrix."""
    for start in range(0, X.shape[0], chunk_rows):
        yield X[start : start + chunk_rows]


def check_integer_counts(values: np.ndarray, where: str) -> None:
    """Raise unless ``values`` are non-negative whole numbers (raw counts)."""
    values = np.asarray(values)
    if values.size and (np.any(values < 0) or np.any(values != np.round(values))):
        raise RecipeError(
            f"{where} holds negative or non-integer values; the recipes need raw UMI counts "
            "(is this a normalised file?)."
        )


# ----------------------------------------------------------------------- Matrix Market
def _mtx_header(path: Path) -> tuple[int, tuple[int, int, int], str]:
    """Number of header lines, (rows, cols, nnz) and the field of a Matrix Market file."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            banner = fh.readline()
            if not banner.startswith("%%MatrixMarket matrix coordinate"):
                raise RecipeError(
                    f"{path.name} is not a Matrix Market coordinate file (first line {banner[:60]!r})."
                )
            n_lines = 1
            for line in fh:
                n_lines += 1
                if not line.startswith("%") and line.strip():
                    rows, cols, nnz = (int(v) for v in line.split()[:3])
                    return n_lines, (rows, cols, nnz), banner.split()[3]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path.name} cannot be read ({err}); is the download complete?") from err
    raise RecipeError(f"{path.name} has no size line; is the file complete?")


def iter_mtx_entries(
    path: str | os.PathLike, *, n_rows: int, n_cols: int, chunk_lines: int = 10_000_000
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a Matrix Market coordinate file ``chunk_lines`` entries at a time.

    Checks that the size line says ``n_rows x n_cols`` (e.g. genes x barcodes), that the
    values are integer counts, and, at the end, that the file has as many entries as its
    header says (a truncated download is caught here).

    Yields
    ------
    ``(row, col, value)``: 0-based int64 indices and float64 values of one chunk.
    """
    path = Path(path)
    skip, (rows, cols, nnz), fld = _mtx_header(path)
    if (rows, cols) != (n_rows, n_cols):
        raise RecipeError(
            f"{path.name} is {rows} x {cols} but {n_rows} genes and {n_cols} barcodes were listed; "
            "the files do not belong together."
        )
    if fld not in ("integer", "real"):
        raise RecipeError(f"{path.name} holds {fld} values; integer counts are expected.")
    seen = 0
    reader = pd.read_csv(
        path,
        sep=r"\s+",
        header=None,
        skiprows=skip,
        names=["row", "col", "value"],
        dtype={"row": np.int64, "col": np.int64, "value": np.float64},
        chunksize=chunk_lines,
        engine="c",
    )
    try:
        for chunk in reader:
            seen += len(chunk)
            value = chunk["value"].to_numpy()
            check_integer_counts(value, path.name)
            logger.debug("  %s: %d of %d entries read", path.name, seen, nnz)
            yield chunk["row"].to_numpy() - 1, chunk["col"].to_numpy() - 1, value
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(
            f"{path.name} cannot be parsed after {seen:,} entries ({err}); is the file complete?"
        ) from err
    if seen != nnz:
        raise RecipeError(
            f"{path.name} has {seen:,} entries, its header says {nnz:,}; is the file complete?"
        )


@dataclass(frozen=True)
class MtxSource:
    """Cells to take from one 10x (genes x barcodes) Matrix Market file.

    Attributes
    ----------
    path
        The ``.mtx`` / ``.mtx.gz`` file.
    cells
        0-based barcode (column) indices to keep, in the order of the output rows.
    n_barcodes
        Number of barcodes (columns) of the file.
    """

    path: Path
    cells: np.ndarray
    n_barcodes: int


@dataclass
class MtxCounts:
    """What :func:`count_matrix_from_mtx` returns.

    Attributes
    ----------
    X
        Cells x kept genes, CSR float32 (rows: the sources' cells, in order).
    n_counts
        Library size of each cell over all genes of the file (before gene selection).
    genes
        Indices of the kept genes.
    hvg
        Seurat-v3 table over all genes (``means``, ``variances``, ``variances_norm``,
        ``highly_variable_rank``, ``highly_variable``), or None without gene selection.
    """

    X: sp.csr_matrix
    n_counts: np.ndarray
    genes: np.ndarray
    hvg: pd.DataFrame | None = None


def _mapped_entries(source: MtxSource, n_genes: int, chunk_lines: int):
    """(gene, output row, value) of the entries of ``source``'s kept cells."""
    new_row = np.full(source.n_barcodes, -1, dtype=np.int64)
    new_row[np.asarray(source.cells, dtype=np.int64)] = np.arange(len(source.cells))
    for gene, cell, value in iter_mtx_entries(
        source.path, n_rows=n_genes, n_cols=source.n_barcodes, chunk_lines=chunk_lines
    ):
        row = new_row[cell]
        sel = row >= 0
        yield gene[sel], row[sel], value[sel]


def count_matrix_from_mtx(
    sources: Sequence[MtxSource],
    *,
    n_genes: int,
    n_top_genes: int | None,
    also_keep: np.ndarray | None = None,
    chunk_lines: int = 10_000_000,
    span: float = 0.3,
) -> MtxCounts:
    """Cells x genes raw counts out of 10x Matrix Market files, with streamed gene selection.

    With ``n_top_genes`` (below ``n_genes``), Seurat-v3 highly variable genes are computed
    on the kept cells of all sources together exactly as
    ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` would on the full matrix, in
    two streamed passes (per-gene moments, then clipped moments); a third pass keeps
    only the entries of the kept cells and genes. Memory: the output matrix plus
    ``chunk_lines`` entries, never the whole file.

    Parameters
    ----------
    sources
        The files and the cells to take from each (rows are stacked in this order).
    n_genes
        Number of genes (rows of every file).
    n_top_genes
        Highly variable genes to keep; None / 0 keeps every gene (one pass).
    also_keep
        Boolean mask of genes kept even when not highly variable (e.g. target genes).
    chunk_lines
        Entries parsed at a time (about 40 bytes each).
    span
        Loess span of the Seurat-v3 mean-variance fit.

    Returns
    -------
    :class:`MtxCounts`.
    """
    n = int(sum(len(s.cells) for s in sources))
    hvg = None
    genes = np.arange(n_genes)
    if n_top_genes and n_top_genes < n_genes:
        s1 = np.zeros(n_genes)
        s2 = np.zeros(n_genes)
        for source in sources:
            for gene, _, value in _mapped_entries(source, n_genes, chunk_lines):
                s1 += np.bincount(gene, weights=value, minlength=n_genes)
                s2 += np.bincount(gene, weights=value * value, minlength=n_genes)
        mean = s1 / n
        var = np.maximum(s2 - n * mean**2, 0.0) / (n - 1)
        reg_std, _ = seurat_v3_from_moments(mean, var, span=span)
        clip_val = reg_std * np.sqrt(n) + mean
        c1 = np.zeros(n_genes)
        c2 = np.zeros(n_genes)
        for source in sources:
            for gene, _, value in _mapped_entries(source, n_genes, chunk_lines):
                clipped = np.minimum(value, clip_val[gene])
                c1 += np.bincount(gene, weights=clipped, minlength=n_genes)
                c2 += np.bincount(gene, weights=clipped * clipped, minlength=n_genes)
        hvg = _seurat_v3_table(
            mean, var, c1, c2, n=n, reg_std=reg_std, n_top_genes=int(n_top_genes)
        )
        mask = hvg["highly_variable"].to_numpy().copy()
        if also_keep is not None:
            mask |= np.asarray(also_keep, dtype=bool)
        genes = np.flatnonzero(mask)
    new_col = np.full(n_genes, -1, dtype=np.int64)
    new_col[genes] = np.arange(len(genes))
    parts_r, parts_c, parts_v = [], [], []
    n_counts = np.zeros(n)
    offset = 0
    for source in sources:
        for gene, row, value in _mapped_entries(source, n_genes, chunk_lines):
            n_counts += np.bincount(row + offset, weights=value, minlength=n)
            col = new_col[gene]
            sel = col >= 0
            parts_r.append((row[sel] + offset).astype(np.int32))
            parts_c.append(col[sel].astype(np.int32))
            parts_v.append(value[sel].astype(np.float32))
        offset += len(source.cells)
    r = np.concatenate(parts_r) if parts_r else np.zeros(0, np.int32)
    c = np.concatenate(parts_c) if parts_c else np.zeros(0, np.int32)
    v = np.concatenate(parts_v) if parts_v else np.zeros(0, np.float32)
    del parts_r, parts_c, parts_v
    X = sp.csr_matrix((v, (r, c)), shape=(n, len(genes)), dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    return MtxCounts(X=X, n_counts=n_counts, genes=genes, hvg=hvg)


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
    if not_const.sum() < 10:
        raise RecipeError(
            f"only {int(not_const.sum())} genes vary across the kept cells; too few for highly "
            "variable gene selection (use --n-top-genes 0)."
        )
    estimat_var = np.zeros(len(mean), dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    return np.sqrt(10**estimat_var), mean


def _seurat_v3_table(
    mean: np.ndarray,
    var: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    *,
    n: int,
    reg_std: np.ndarray,
    n_top_genes: int,
) -> pd.DataFrame:
    """Seurat-v3 normalised variance and rank from the (clipped) moments."""
    norm_var = (n * mean**2 + c2 - 2 * c1 * mean) / ((n - 1) * reg_std**2)
    rank = np.argsort(np.argsort(-norm_var, kind="stable"), kind="stable")
    return pd.DataFrame(
        {
            "means": mean,
            "variances": var,
            "variances_norm": norm_var,
            "highly_variable_rank": rank,
            "highly_variable": rank < n_top_genes,
        }
    )


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
    chunk_rows
        Rows read per block.
    span
        Loess span.
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
    return _seurat_v3_table(mean, var, c1, c2, n=n, reg_std=reg_std, n_top_genes=n_top_genes)


# ------------------------------------------------------------------------ chunked writer
@dataclass(frozen=True)
class RecipeSummary:
    """What a recipe wrote, printed at the end of every run.

    Attributes
    ----------
    path
        The ``.h5ad`` written.
    n_cells, n_genes
        Its shape.
    perturbation_key
        obs column of the labels.
    control
        Control label.
    n_control_cells
        Cells labelled ``control``.
    n_perturbations
        Distinct non-control labels.
    n_combinations
        Of those, labels with ``"+"`` (several targets).
    file_bytes
        Size of the file.
    notes
        Extra lines (e.g. how a reconstruction compares with the published numbers).
    """

    path: Path
    n_cells: int
    n_genes: int
    perturbation_key: str
    control: str
    n_control_cells: int
    n_perturbations: int
    n_combinations: int
    file_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        """The summary as lines of text."""
        singles = self.n_perturbations - self.n_combinations
        out = [
            f"wrote {self.path} ({fmt_bytes(self.file_bytes)})",
            f"  cells:         {self.n_cells:,}",
            f"  genes:         {self.n_genes:,}",
            f"  perturbations: {self.n_perturbations:,} in obs[{self.perturbation_key!r}]"
            + (
                f" ({singles:,} single, {self.n_combinations:,} combinations)"
                if self.n_combinations
                else ""
            ),
            f"  controls:      {self.n_control_cells:,} cells labelled {self.control!r}",
        ]
        return out + [f"  {note}" for note in self.notes]


def write_screen(
    out: str | os.PathLike,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    blocks: Iterable[sp.spmatrix | tuple[sp.spmatrix, Mapping[str, np.ndarray]]],
    perturbation_key: str,
    control: str,
    recipe: Mapping[str, Any],
    uns: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> RecipeSummary:
    """Write a cellpert screen to ``out``, its counts appended one block of rows at a time.

    The screen without counts (``obs``, ``var``, ``uns``, an empty CSR ``X``) is written to
    a temporary file beside ``out`` (:func:`cellpert.data._io.atomic_path`); each block of
    ``blocks`` is appended to its ``X`` (``anndata.io.sparse_dataset(...).append``, 64-bit
    ``indptr`` so billions of entries fit); per-row columns that come with the blocks are
    added to obs at the end; then the file is flushed and renamed to ``out``. Memory: one
    block. On any error nothing is left at ``out``.

    Parameters
    ----------
    out
        Target ``.h5ad``.
    obs
        One row per output cell, in block order.
    var
        One row per output gene.
    blocks
        CSR row blocks (cells x ``len(var)``), or ``(block, {column: values})`` pairs whose
        values are per-row obs columns (e.g. library sizes computed while reading).
    perturbation_key, control
        Recorded with :func:`cellpert.data.record_screen_keys`.
    recipe
        Stored (via :func:`cellpert.data.to_uns`) in ``uns["cellpert"]["recipe"]``.
    uns
        Other top-level ``uns`` entries.
    notes
        Extra lines for the summary.

    Returns
    -------
    :class:`RecipeSummary` of the file written. The file holds ``X`` (raw counts, CSR
    float32), ``obs`` (with ``obs[perturbation_key]`` categorical), ``var``,
    ``uns["cellpert"]["screen"]`` and ``uns["cellpert"]["recipe"]``.
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    from cellpert.data import record_screen_keys, to_uns
    from cellpert.data._io import atomic_path

    out = Path(out)
    n_obs, n_vars = len(obs), len(var)
    if n_obs == 0:
        raise RecipeError("no cell passes the filters; nothing to write.")
    skeleton = ad.AnnData(X=sp.csr_matrix((n_obs, n_vars), dtype=np.float32), obs=obs, var=var)
    for key, value in (uns or {}).items():
        skeleton.uns[key] = to_uns(value)
    record_screen_keys(skeleton, perturbation_key=perturbation_key, control=control)
    skeleton.uns["cellpert"]["recipe"] = to_uns(dict(recipe))
    labels = obs[perturbation_key].astype(str).to_numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        skeleton.write_h5ad(tmp)
        del skeleton
        extra: dict[str, list[np.ndarray]] = {}
        with h5py.File(tmp, "r+") as f:
            del f["X"]
            rows = 0
            for item in blocks:
                block, columns = item if isinstance(item, tuple) else (item, {})
                block = sp.csr_matrix(block, dtype=np.float32)
                if block.shape[1] != n_vars:
                    raise RuntimeError(f"a block has {block.shape[1]} columns, expected {n_vars}")
                for name, values in columns.items():
                    extra.setdefault(name, []).append(np.asarray(values))
                if block.shape[0] == 0:
                    continue
                block.sort_indices()
                if rows == 0:
                    write_elem(f, "X", block, dataset_kwargs={"indptr_dtype": np.int64})
                else:
                    sparse_dataset(f["X"]).append(block)
                rows += block.shape[0]
            if rows != n_obs:
                raise RuntimeError(f"wrote {rows} rows for {n_obs} cells")
            if extra:
                full = obs.copy()
                for name, parts in extra.items():
                    full[name] = np.concatenate(parts)
                del f["obs"]
                write_elem(f, "obs", full)
    is_control = labels == control
    perts = np.unique(labels[~is_control])
    return RecipeSummary(
        path=out,
        n_cells=n_obs,
        n_genes=n_vars,
        perturbation_key=perturbation_key,
        control=control,
        n_control_cells=int(is_control.sum()),
        n_perturbations=len(perts),
        n_combinations=int(sum("+" in p for p in perts)),
        file_bytes=out.stat().st_size,
        notes=tuple(notes),
    )


def categorical_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """Drop unused categories of categorical obs columns (after subsetting)."""
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            obs[c] = obs[c].cat.remove_unused_categories()
    return obs


# ------------------------------------------------------------------------------- CLI glue
def read_name_list(path: str | os.PathLike) -> list[str]:
    """Names from a text file, one per line or comma-separated (blank lines, ``#`` comments ignored)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such file; give a text file with one name per line.")
    names = []
    for line in path.read_text().splitlines():
        names += [n.strip() for n in line.split("#", 1)[0].split(",") if n.strip()]
    return list(dict.fromkeys(names))


def verify_inputs(paths: Iterable[Path], *, verify: bool, progress: bool, **checksums: str | None) -> None:
    """Check files the user gave with ``--input`` (:func:`verify_local`; ``--no-verify``:
    only say they were not checked), one log line each."""
    for path in paths:
        path = Path(path)
        logger.info(verify_local(path, progress=progress, **checksums) if verify else f"{path.name}: not verified")


def add_io_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_out: Path | None,
    default_raw_dir: Path,
    input_help: str,
    out_help: str | None = None,
) -> None:
    """The options every recipe has: ``--input``, ``--out``, ``--raw-dir``, ``--mirror``, ..."""
    parser.add_argument("--input", type=Path, help=input_help + " No network access at all then.")
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help=out_help or f"output .h5ad (default {default_out})",
    )
    parser.add_argument(
        "--raw-dir",
        "--cache-dir",
        dest="raw_dir",
        type=Path,
        default=default_raw_dir,
        help=f"where downloads go and are reused (default {default_raw_dir})",
    )
    parser.add_argument(
        "--mirror",
        metavar="URL",
        help="download every file as URL/<file name> (a local or institute mirror, file:///...)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="resumed retries of a download whose connection drops (default 3)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not re-check the checksum of files already on disk",
    )
    parser.add_argument("--debug", action="store_true", help="log every step; show tracebacks")


def run_main(
    fn: Callable[[Sequence[str] | None], RecipeSummary | None], argv: Sequence[str] | None = None
) -> int:
    """Run a recipe's CLI body and print its summary.

    Logging goes to stderr (with the progress bars); the summary to stdout. Recipe and
    input errors become one ``error:`` line on stderr and exit code 2.
    """
    debug = argv is not None and "--debug" in argv or argv is None and "--debug" in sys.argv[1:]
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        summary = fn(argv)
    except CellpertError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (a partial download is kept as .part and resumed next time)",
            file=sys.stderr,
        )
        return 130
    if summary is not None:
        print("\n".join(summary.lines()))
    return 0
