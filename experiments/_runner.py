"""Run experiments: configs × split seeds -> jobs, in parallel, cached, then the report.

``python -m experiments norman_ood --fast -j 2`` (or ``make reproduce-norman-ood FAST=1``).

- Each job is one (model config, sweep point, split seed); its result is cached as
  ``<cache-dir>/<experiment>/<hash>.json``, where the hash is that of the job's resolved
  config (task, data, split and seed, model and options, training, evaluation;
  :func:`experiments._config.job_key`). The file is written atomically when the job is
  done, so an interrupted run continues where it stopped and a changed config redoes
  exactly the jobs it changes. ``--force`` redoes them all.
- Jobs run in ``-j`` processes (spawned), each with ``--threads`` torch threads (default 1);
  with ``-j 1`` they run in this process. A job's own output (Lightning, warnings, logs)
  goes to ``<cache-dir>/<experiment>/logs/<hash>.log``; progress lines go to stderr.
- At the end each experiment's table (ours as mean ± sd over split seeds, next to the
  reference numbers of its configs) is printed and written to
  ``<report-dir>/<experiment>[.fast].md`` with a PNG figure.

Errors in the configs or missing data are one line on stderr (exit code 2), before any
job runs; a failed job is reported with its log and the others go on (exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments._config import (
    EXPERIMENTS_DIR,
    REPO,
    ConfigError,
    Experiment,
    Job,
    _rel,
    expand_jobs,
    expand_path,
    list_experiments,
    load_experiment,
)

DEFAULT_CACHE = REPO / "benchmarks" / "runs" / "experiments"
DEFAULT_REPORTS = REPO / "benchmarks" / "runs" / "reports"
#: Loggers whose INFO lines only clutter a job's log.
QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "anndata", "numba", "matplotlib")


# ----------------------------------------------------------------------------- cache
def cache_file(cache_dir: Path, job: Job) -> Path:
    return Path(cache_dir) / job.experiment / f"{job.key}.json"


def read_record(path: Path) -> dict | None:
    """A finished job's record, or None (missing, or unreadable: redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "result" in record else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _limit_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _die_with_runner(runner: int) -> None:  # pragma: no cover - runs in the workers
    """Linux: have the kernel send this worker SIGTERM when the runner dies, SIGKILL included.

    SIGTERM and Ctrl-C to the runner are handled in :func:`run`; a SIGKILLed runner (the
    out-of-memory killer, ``kill -9``) runs no code, so only the kernel can stop its workers
    (``prctl(PR_SET_PDEATHSIG)``; neither ``multiprocessing`` nor ``concurrent.futures``
    offers it). A training job stops on SIGTERM as it does when the runner terminates it.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl in this libc: keep the old behaviour
        return
    if os.getppid() != runner:  # the runner died before the call: nobody will send it
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_init(threads: int, runner: int | None = None) -> None:  # pragma: no cover - runs in the workers
    _limit_threads(threads)
    if runner is not None:
        _die_with_runner(runner)


@contextlib.contextmanager
def _job_output(log_path: Path):
    """Send everything a job prints or logs (file descriptors 1 and 2 too) to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "w") as log:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.captureWarnings(True)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            logging.captureWarnings(False)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            root.removeHandler(handler)
            root.setLevel(old_level)
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def execute_job(payload: dict) -> dict:
    """Run one job (in a worker or here), write its record; returns a short status.

    ``payload``: ``experiment``, ``key``, ``description``, ``config`` (the job's resolved
    config), ``cache_dir``, ``threads``, ``keep_runs``.
    """
    from experiments._tasks import TASKS

    cache_dir = Path(payload["cache_dir"])
    experiment, key, config = payload["experiment"], payload["key"], payload["config"]
    task = TASKS[config["task"]]
    workdir = cache_dir / experiment / "work" / key
    log_path = cache_dir / experiment / "logs" / f"{key}.log"
    t0 = time.perf_counter()
    try:
        with _job_output(log_path):
            if task.uses_torch:
                import torch

                torch.set_num_threads(int(payload["threads"]))
            result = task.run(config, workdir)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - reported per job, the others go on
        with open(log_path, "a") as log:
            traceback.print_exc(file=log)
        first = " ".join(str(err).split()) or type(err).__name__
        return {"key": key, "ok": False, "error": f"{type(err).__name__}: {first[:300]}", "log": str(log_path)}
    wall = time.perf_counter() - t0
    record = {
        "experiment": experiment,
        "job": payload["description"],
        "key": key,
        "config": config,
        "result": result,
        "wall_s": wall,
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    write_atomic(cache_dir / experiment / f"{key}.json", json.dumps(record, indent=1, default=str))
    if not payload.get("keep_runs"):
        shutil.rmtree(workdir, ignore_errors=True)
    return {"key": key, "ok": True, "wall_s": wall}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cellpert", "torch", "scvi-tools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- progress
def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``[done/total] experiment model seed=... : ok in 12s | elapsed, ETA`` lines on stderr."""

    def __init__(self, total: int, workers: int, stream=None):
        self.total, self.workers = total, max(1, workers)
        self.done = 0
        self.times: list[float] = []
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr

    def eta(self) -> str:
        left = self.total - self.done
        if left == 0:
            return "0s"
        if not self.times:
            return "?"
        mean = sum(self.times) / len(self.times)
        return _fmt_s(mean * left / min(self.workers, left))

    def finished(self, job: Job, status: dict) -> None:
        self.done += 1
        if status["ok"]:
            self.times.append(status["wall_s"])
            what = f"ok in {_fmt_s(status['wall_s'])}"
        else:
            what = f"FAILED ({status['error']}; log {_rel(Path(status['log']))})"
        print(
            f"[{self.done}/{self.total}] {job.experiment} {job.description}: {what} | "
            f"elapsed {_fmt_s(time.perf_counter() - self.start)}, ETA {self.eta()}",
            file=self.stream,
            flush=True,
        )


# ------------------------------------------------------------------------------- main
def _check_data(exp: Experiment, jobs: list[Job], fast: bool) -> None:
    """Every data file a job reads exists, else one line saying which recipe writes it."""
    for job in jobs:
        path = job.config["data"].get("path")
        if not path or expand_path(path).exists():
            continue
        data = job.config["data"]
        what = f" ({data['description']})" if data.get("description") else ""
        if data.get("recipe"):
            hint = f"run `{data['recipe']}` first"
            if not fast:
                hint += ", or FAST=1 for the small version on the shared subsets"
        else:
            hint = f"check data.path in the configs of {_rel(exp.folder)}"
        raise ConfigError(f"experiment {exp.name} needs {path}{what}, which is not there; {hint}.")


def run(
    experiments: Sequence[str],
    *,
    fast: bool = False,
    jobs: int = 1,
    threads: int = 1,
    config_dir: Path = EXPERIMENTS_DIR,
    cache_dir: Path = DEFAULT_CACHE,
    report_dir: Path = DEFAULT_REPORTS,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    force: bool = False,
    keep_runs: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    stream=None,
) -> dict[str, Any]:
    """Run the experiments (names of folders of ``config_dir``) and write their reports.

    Returns
    -------
    ``{"reports": {experiment: path}, "tables": {experiment: markdown}, "failed": [...],
    "ran": [job keys run now], "cached": [job keys read from the cache], "jobs": {experiment: [Job]}}``.

    Raises
    ------
    ConfigError
        A config problem or missing data (before any job runs).
    KeyboardInterrupt
        Interrupted; finished jobs are in the cache.
    """
    stream = stream or sys.stderr
    config_dir, cache_dir, report_dir = Path(config_dir), Path(cache_dir), Path(report_dir)
    known = list_experiments(config_dir)
    if not experiments:
        raise ConfigError(f"name an experiment: {', '.join(known)}.")
    loaded: list[tuple[Experiment, list[Job]]] = []
    for name in experiments:
        if name not in known:
            raise ConfigError(f"no experiment {name!r} in {_rel(config_dir)}; experiments: {', '.join(known)}.")
        exp = load_experiment(config_dir / name, fast=fast)
        exp_jobs = expand_jobs(exp, models=list(models) if models else None, seeds=list(seeds) if seeds else None)
        if not exp_jobs:
            raise ConfigError(f"experiment {name}: no job left after --models / --seeds.")
        _check_data(exp, exp_jobs, fast)
        loaded.append((exp, exp_jobs))
    records: dict[str, dict] = {}
    cached: set[str] = set()
    pending: list[Job] = []
    for exp, exp_jobs in loaded:
        for job in exp_jobs:
            record = None if force else read_record(cache_file(cache_dir, job))
            if record is not None:
                records[job.key] = record
                cached.add(job.key)
            elif job.key not in {p.key for p in pending}:
                pending.append(job)
        n_cached = sum(j.key in cached for j in exp_jobs)
        print(
            f"{exp.name}{' (FAST)' if fast else ''}: {len(exp_jobs)} jobs, {n_cached} in the cache, "
            f"{len(exp_jobs) - n_cached} to run",
            file=stream,
            flush=True,
        )
    if dry_run:
        for job in pending:
            print(f"  would run {job.experiment} {job.description} ({job.key})", file=stream)
        return {"reports": {}, "tables": {}, "failed": [], "ran": [], "cached": sorted(cached),
                "jobs": {e.name: j for e, j in loaded}}  # fmt: skip
    failed: list[tuple[Job, str]] = []
    ran: list[str] = []
    workers = max(1, min(jobs, len(pending)))
    if pending:
        print(f"running {len(pending)} jobs, {workers} at a time, {threads} torch thread(s) each; "
              f"logs in {_rel(cache_dir)}/<experiment>/logs/", file=stream, flush=True)  # fmt: skip
    progress = Progress(len(pending), workers, stream)
    payloads = {
        job.key: {"experiment": job.experiment, "key": job.key, "description": job.description, "config": job.config,
                  "cache_dir": str(cache_dir), "threads": threads, "keep_runs": keep_runs}  # fmt: skip
        for job in pending
    }

    def collect(job: Job, status: dict) -> None:
        progress.finished(job, status)
        if status["ok"]:
            record = read_record(cache_file(cache_dir, job))
            if record is not None:
                records[job.key] = record
                ran.append(job.key)
                return
            status = {**status, "error": "the job's record could not be read back"}
        failed.append((job, status["error"]))

    if workers == 1:
        _limit_threads(threads)
        for job in pending:
            collect(job, execute_job(payloads[job.key]))
    elif pending:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads, os.getpid())
        )
        try:
            futures = {pool.submit(execute_job, payloads[job.key]): job for job in pending}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    status = future.result()
                except Exception as err:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    status = {"key": job.key, "ok": False, "error": f"worker died: {type(err).__name__}: {err}",
                              "log": str(cache_dir / job.experiment / "logs" / f"{job.key}.log")}  # fmt: skip
                collect(job, status)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            # shutdown() leaves running jobs running: stop the workers, or they outlive the
            # runner and hold the cores (a training job saves its checkpoint and stops at
            # its next safe point on SIGTERM; the job is redone by the next run)
            for child in mp.active_children():
                child.terminate()
            raise
        pool.shutdown()
    reports, tables = {}, {}
    for exp, exp_jobs in loaded:
        path, text = write_report_for(exp, exp_jobs, records, report_dir=report_dir, command=command or "",
                                      failed=[f for f in failed if f[0].experiment == exp.name], cached=cached)  # fmt: skip
        reports[exp.name], tables[exp.name] = path, text
    return {"reports": reports, "tables": tables, "failed": failed, "ran": ran, "cached": sorted(cached),
            "jobs": {e.name: j for e, j in loaded}}  # fmt: skip


def write_report_for(exp, exp_jobs, records, **kwargs):
    from experiments._report import write_report

    return write_report(exp, exp_jobs, records, **kwargs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Reproduce the papers' experiments from the configs in experiments/<experiment>/.",
    )
    p.add_argument("experiments", nargs="*", help="experiment folders to run (see --list)")
    p.add_argument("--fast", action="store_true", default=None,
                   help="small settings (the configs' fast: sections); also FAST=1 in the environment")  # fmt: skip
    p.add_argument("-j", "--jobs", type=int, default=1, help="jobs run at the same time, in processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--models", default=None, help="comma-separated model configs to run (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these of the configs' split seeds")
    p.add_argument("--force", action="store_true", help="redo jobs that are in the cache")
    p.add_argument("--dry-run", action="store_true", help="list the jobs that would run, run nothing")
    p.add_argument("--list", action="store_true", help="list the experiments and their models")
    p.add_argument("--keep-runs", action="store_true", help="keep each job's run directory (default: removed)")
    p.add_argument("--config-dir", type=Path, default=EXPERIMENTS_DIR, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {_rel(DEFAULT_CACHE)}")
    p.add_argument("--report-dir", type=Path, default=DEFAULT_REPORTS, help=f"default {_rel(DEFAULT_REPORTS)}")
    args = p.parse_args(argv)
    if args.fast is None:
        args.fast = os.environ.get("FAST", "").strip().lower() not in ("", "0", "false", "no")
    if args.jobs < 1 or args.threads < 1:
        p.error("-j and --threads must be >= 1")
    return args


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 a job failed, 2 bad input, 130 interrupted).

    SIGTERM (``kill``, a scheduler cancelling the job) is handled as Ctrl-C: the running
    jobs' workers are stopped and the finished jobs stay in the cache.
    """
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        return _main(args, argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _main(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        if args.list:
            for name in list_experiments(args.config_dir):
                exp = load_experiment(args.config_dir / name, fast=args.fast)
                print(f"{name}: {exp.title}\n  models: {', '.join(m.model_id for m in exp.models)}")
            return 0
        command = "python -m experiments " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        if args.fast and "--fast" not in command:
            command = "FAST=1 " + command
        out = run(
            args.experiments,
            fast=args.fast,
            jobs=args.jobs,
            threads=args.threads,
            config_dir=args.config_dir,
            cache_dir=args.cache_dir,
            report_dir=args.report_dir,
            models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
            seeds=args.seeds,
            force=args.force,
            keep_runs=args.keep_runs,
            dry_run=args.dry_run,
            command=command,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished jobs are in the cache; run the same command again to continue.", file=sys.stderr)
        return 130
    for name, text in out["tables"].items():
        print(f"\n## {name}{' (FAST)' if args.fast else ''}\n\n{text}\n\nreport: {_rel(out['reports'][name])}")
    if out["failed"]:
        print(f"\n{len(out['failed'])} job(s) failed:", file=sys.stderr)
        for job, err in out["failed"]:
            print(f"  {job.experiment} {job.description}: {err}", file=sys.stderr)
        return 1
    return 0
