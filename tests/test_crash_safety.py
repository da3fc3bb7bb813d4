"""Writes into a user's h5ad survive SIGKILL, a full disk, refused permissions and a second writer.

Every write goes through :func:`cellpert.data.save_results` / :func:`write_h5ad_atomic`
(``cellpert/data/_io.py``): a temporary file renamed over the target, under the target's
lock. The tests check the original file byte for byte (sha256) and that anndata still
reads it. The multi-process tests (a writer killed with SIGKILL, two writers at once)
are slow (a subprocess importing anndata each); the unit versions run by default.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from filelock import FileLock

from cellpert import CellpertInputError
from cellpert.data import _io, read_h5ad, save_results, write_h5ad_atomic
from cellpert.data._io import results_lock

from conftest import REPO, file_digest, make_toy_adata


@pytest.fixture
def screen_file(tmp_path) -> Path:
    adata = make_toy_adata()
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
    adata.uns["user_notes"] = {"lab": "x"}
    path = tmp_path / "data" / "screen.h5ad"  # alone in its directory (tmp_path holds the tests' own files)
    path.parent.mkdir()
    adata.write_h5ad(path)
    return path


def _intact(path: Path, digest: str) -> None:
    """``path`` is byte-identical to before, anndata reads it and it holds no new result."""
    assert file_digest(path) == digest
    back = ad.read_h5ad(path)
    assert back.uns["user_notes"]["lab"] == "x" and "new" not in back.uns


def _others(path: Path) -> list[str]:
    """Files beside ``path`` other than itself (temporary files, lock files)."""
    return sorted(p.name for p in path.parent.iterdir() if p != path)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, CellpertInputError)
    return msg


# --------------------------------------------------------------- disk full / refused
@pytest.mark.parametrize(
    ("error", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device; free some space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        # h5py's form: the system errno only inside HDF5's message
        (OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"),
         "no space left on device"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "hdf5-message"],
)
@pytest.mark.parametrize("backed", [False, True], ids=["in-memory", "backed"])
def test_full_disk_keeps_the_original_and_says_so_in_one_line(screen_file, monkeypatch, error, says, backed):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file, backed=backed)
    adata.uns["new"] = 1

    def half_written_then_full(tmp):
        Path(tmp).write_bytes(b"\x89HDF\r\n" + b"\0" * 1000)  # part of a file, then the disk is full
        raise error

    if backed:  # the backed writer first copies the source into the temporary file
        monkeypatch.setattr(_io.shutil, "copyfile", lambda src, dst: half_written_then_full(dst))
    else:
        monkeypatch.setattr(ad.AnnData, "write_h5ad", lambda self, filename, **kw: half_written_then_full(filename))
    with pytest.raises(CellpertInputError) as err:
        save_results(adata, screen_file)
    msg = _one_line(err)
    assert msg.startswith(f"could not write {screen_file}: ") and says in msg
    assert "screen.h5ad is unchanged" in msg
    _intact(screen_file, before)
    assert _others(screen_file) == []  # no temporary file, no lock file


@pytest.mark.parametrize("where", ["lock file", "temporary file", "rename"])
def test_permission_denied_keeps_the_original_and_says_so_in_one_line(screen_file, monkeypatch, where):
    """What a read-only directory refuses first: the lock file, the temporary file or the rename."""
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    if where == "lock file":
        monkeypatch.setattr(FileLock, "acquire", refuse)
    elif where == "temporary file":
        monkeypatch.setattr(_io.tempfile, "mkstemp", refuse)
    else:
        monkeypatch.setattr(_io.os, "replace", refuse)
    with pytest.raises(CellpertInputError) as err:
        save_results(adata, screen_file)
    assert _one_line(err) == (
        f"could not write {screen_file}: permission denied; make {screen_file.parent} writable or "
        "write elsewhere with --out (screen.h5ad is unchanged)."
    )
    monkeypatch.undo()
    _intact(screen_file, before)
    assert _others(screen_file) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_directory_is_one_line(screen_file):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1
    screen_file.parent.chmod(0o555)
    try:
        with pytest.raises(CellpertInputError, match="permission denied; make .* writable") as err:
            save_results(adata, screen_file)
        _one_line(err)
    finally:
        screen_file.parent.chmod(0o755)
    _intact(screen_file, before)


def test_other_failures_are_raised_as_they_are(screen_file, monkeypatch):
    """Only space and permission errors are translated; others keep their type (original intact)."""
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)

    def broken(self, filename, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="Input/output error"):
        save_results(adata, screen_file)
    assert file_digest(screen_file) == before and _others(screen_file) == []


# ------------------------------------------------------------------------ the lock
def test_a_held_lock_makes_the_second_writer_fail_in_one_line(screen_file, monkeypatch):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1
    other = FileLock(str(screen_file) + ".lock")  # another holder: its own descriptor, as another process
    other.acquire()
    try:
        t0 = time.perf_counter()
        with pytest.raises(CellpertInputError) as err:
            save_results(adata, screen_file, lock_timeout=0.3)
        waited = time.perf_counter() - t0
        monkeypatch.setenv("CELLPERT_LOCK_TIMEOUT", "0.2")
        with pytest.raises(CellpertInputError, match="for more than 0.2 s"):
            write_h5ad_atomic(adata, screen_file)
    finally:
        other.release()
    assert _one_line(err) == (
        f"{screen_file} is being written by another cellpert process (its lock screen.h5ad.lock was "
        "held for more than 0.3 s); wait for that process to finish and run again, write elsewhere "
        "with --out, or wait longer with $CELLPERT_LOCK_TIMEOUT=<seconds>."
    )
    assert 0.3 <= waited < 3
    _intact(screen_file, before)
    save_results(adata, screen_file)  # free again: the write goes through
    assert ad.read_h5ad(screen_file).uns["new"] == 1
    assert _others(screen_file) == ([] if _io._REMOVES_LOCK_FILE else ["screen.h5ad.lock"])


def test_lock_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv("CELLPERT_LOCK_TIMEOUT", "soon")
    with pytest.raises(CellpertInputError, match=r"\$CELLPERT_LOCK_TIMEOUT='soon' is not a number"):
        _io.lock_timeout_seconds()
    monkeypatch.setenv("CELLPERT_LOCK_TIMEOUT", "12.5")
    assert _io.lock_timeout_seconds() == 12.5
    monkeypatch.delenv("CELLPERT_LOCK_TIMEOUT")
    assert _io.lock_timeout_seconds() == _io.DEFAULT_LOCK_TIMEOUT_S


def test_the_lock_is_reentrant_and_serialises_threads(screen_file):
    """A read-modify-write under ``results_lock`` nests the writer's own hold; a second thread waits."""
    order = []
    with results_lock(screen_file) as lock_file:
        assert lock_file == screen_file.with_name("screen.h5ad.lock") and lock_file.exists()
        adata = read_h5ad(screen_file)
        adata.uns["new"] = 1

        def second_writer():
            with results_lock(screen_file, timeout=10):
                order.append("second")

        thread = threading.Thread(target=second_writer)
        thread.start()
        save_results(adata, screen_file)  # re-enters the lock this thread holds
        time.sleep(0.2)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    assert ad.read_h5ad(screen_file).uns["new"] == 1


def test_results_read_before_another_write_are_refused(screen_file):
    """Two commands that read the file, then write one after the other: the second would drop
    the first one's results, so it fails (the lock alone orders the writes, not the reads)."""
    first, second = read_h5ad(screen_file), read_h5ad(screen_file)
    first.uns["first"] = 1
    second.uns["second"] = 1
    save_results(first, screen_file)
    after_first = file_digest(screen_file)
    with pytest.raises(CellpertInputError) as err:
        save_results(second, screen_file)
    assert _one_line(err) == (
        f"{screen_file} changed after it was read (another cellpert command wrote into it meanwhile?); "
        "nothing was written, so that what was written meanwhile is kept: run this command again."
    )
    assert file_digest(screen_file) == after_first
    first.uns["again"] = 1  # the AnnData that wrote the file may write it again
    save_results(first, screen_file)
    assert {"first", "again"} <= set(ad.read_h5ad(screen_file).uns)
    out = screen_file.with_name("elsewhere.h5ad")  # a stale AnnData may still go to a new file
    save_results(second, screen_file, out=out)
    assert "second" in ad.read_h5ad(out).uns


# ------------------------------------------------------------- stray temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_next_write_removes_temporary_files_of_killed_writers(screen_file):
    host = _io._host_token()
    directory = screen_file.parent
    stale = directory / f".screen.h5ad.{host}.{_dead_pid()}.abc123_x.tmp"
    kept = [
        directory / f".screen.h5ad.{host}.1.live0001.tmp",  # pid 1 runs: maybe still writing
        directory / f".screen.h5ad.{host}.{os.getpid()}.mine0001.tmp",  # this process's (another thread)
        directory / f".screen.h5ad.otherhost.{_dead_pid()}.far00001.tmp",  # another host's process ids
        directory / f".other.h5ad.{host}.{_dead_pid()}.notours1.tmp",  # another target's
    ]
    for p in [stale, *kept]:
        p.write_bytes(b"half a file")
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1
    save_results(adata, screen_file)
    assert not stale.exists() and all(p.exists() for p in kept)
    assert ad.read_h5ad(screen_file).uns["new"] == 1


# ------------------------------------------------------------ other processes (slow)
#: A writer process: reads the screen, adds ``uns[<key>]`` and writes it back with
#: save_results, pausing mid-write for ``<pause>`` seconds after writing the temporary
#: file's name into ``<ready>`` (with ``<half>``, only half of that file is on disk then:
#: what a crash mid-write leaves; such a writer must be killed).
_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import anndata as ad
    import anndata.io
    from cellpert.data import read_h5ad, save_results

    path, ready, pause, key = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    backed, half = sys.argv[5] == "1", sys.argv[6] == "1"

    def pause_mid_write(tmp):
        if half:
            size = Path(tmp).stat().st_size
            with open(tmp, "r+b") as fh:
                fh.truncate(size // 2)
        ready.write_text(str(tmp))
        time.sleep(pause)

    if backed:  # the backed writer copies the file, then rewrites obs, var, ... , uns in the copy
        real_write_elem = anndata.io.write_elem

        def write_elem(f, name, value, *args, **kwargs):
            real_write_elem(f, name, value, *args, **kwargs)
            if name == "uns":
                f.flush()
                pause_mid_write(f.filename)

        anndata.io.write_elem = write_elem
    else:
        real_write = ad.AnnData.write_h5ad

        def write_h5ad(self, filename, *args, **kwargs):
            real_write(self, filename, *args, **kwargs)
            pause_mid_write(filename)

        ad.AnnData.write_h5ad = write_h5ad
    adata = read_h5ad(path, backed=backed)
    adata.uns[key] = 1
    save_results(adata, path, lock_timeout=30)
    print("written")
    """
)


def _start_writer(
    path: Path, ready: Path, *, pause: float, key: str = "new", backed: bool = False, half: bool = False
) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    flags = ["1" if backed else "0", "1" if half else "0"]
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(ready), str(pause), key, *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(ready: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the writer never reached the middle of its write")
        time.sleep(0.05)
    return Path(ready.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("backed", [False, True], ids=["in-memory", "backed"])
def test_sigkill_mid_write_leaves_the_original_intact(screen_file, tmp_path, backed):
    before = file_digest(screen_file)
    ready = tmp_path / "ready"
    proc = _start_writer(screen_file, ready, pause=120, backed=backed, half=True)
    tmp = _wait_for(ready, proc)
    # mid-write: half a temporary file beside the target, and the target's lock held
    assert tmp.parent == screen_file.parent and tmp.name.startswith(".screen.h5ad.") and tmp.exists()
    assert f".{proc.pid}." in tmp.name
    with pytest.raises(CellpertInputError, match="being written by another cellpert process"):
        save_results(read_h5ad(screen_file), screen_file, lock_timeout=0.1)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    _intact(screen_file, before)
    assert tmp.exists()  # what SIGKILL cannot avoid: the killed writer's temporary file
    # the next run: the kernel released the lock, and the stray temporary file goes
    t0 = time.perf_counter()
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 2
    save_results(adata, screen_file, lock_timeout=1)
    assert time.perf_counter() - t0 < 5
    assert ad.read_h5ad(screen_file).uns["new"] == 2
    assert not [p for p in _others(screen_file) if p.endswith(".tmp")]
    # the killed writer's empty lock file was the only thing left; this write's holder removed it
    assert _others(screen_file) == ([] if _io._REMOVES_LOCK_FILE else ["screen.h5ad.lock"])


@pytest.mark.slow
def test_two_processes_cannot_interleave(screen_file, tmp_path):
    """A second writer fails after its timeout while the first writes; one that takes the lock
    around its read waits and keeps the first one's result; a stale one is refused."""
    read_before = read_h5ad(screen_file)  # read before the other process writes
    read_before.uns["stale"] = 1
    ready = tmp_path / "ready"
    proc = _start_writer(screen_file, ready, pause=3, key="first")
    _wait_for(ready, proc)
    # 1. the lock is held: a writer that cannot wait long fails with the lock's one line
    t0 = time.perf_counter()
    with pytest.raises(CellpertInputError) as err:
        save_results(read_h5ad(screen_file), screen_file, lock_timeout=0.5)
    assert time.perf_counter() - t0 >= 0.5
    assert _one_line(err).startswith(f"{screen_file} is being written by another cellpert process")
    # 2. a read-modify-write under the lock waits for the first writer and reads its result
    with results_lock(screen_file, timeout=60):
        adata = read_h5ad(screen_file)
        assert adata.uns["first"] == 1  # the first writer finished before we got the lock
        adata.uns["second"] = 1
        save_results(adata, screen_file)
    out, errs = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "written" in out, errs
    # 3. what was read before the first write cannot overwrite it
    with pytest.raises(CellpertInputError, match="changed after it was read"):
        save_results(read_before, screen_file)
    back = ad.read_h5ad(screen_file)
    assert back.uns["first"] == 1 and back.uns["second"] == 1 and "stale" not in back.uns
    assert _others(screen_file) == ([] if _io._REMOVES_LOCK_FILE else ["screen.h5ad.lock"])
