"""Training runs: what ``cellpert train`` does (resolve options, load, split, train, save).

The run directory (:mod:`cellpert.runs._rundir`) is created before training starts, with
the resolved config, the split and the screen's checksum, so that training can write its
checkpoint there (``DIR/checkpoints/last.ckpt``, every ``checkpoint_every`` steps at an
epoch end, and on SIGINT / SIGTERM) and so that ``train_run(out_dir=DIR, resume=True)``
(``cellpert train --resume DIR``) can rebuild the same screen, split and model and
continue from the checkpoint through Lightning's ``ckpt_path``. On one CPU process the
result equals that of an uninterrupted run (same parameters and history; see
:mod:`cellpert.models._checkpoint` for what the checkpoint holds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cellpert import __version__
from cellpert._errors import CellpertInputError, CellpertWarning
from cellpert.data import PerturbationScreen, as_list, covariate_spread, find_covariate_columns
from cellpert.models import prepare_anndata
from cellpert.models._checkpoint import TrainingInterrupted
from cellpert.models._training import check_checkpoint
from cellpert.runs._config import DATA_OPTIONS, apply_split, resolve_run_config, screen_from_options
from cellpert.runs._registry import get_entry
from cellpert.runs._rundir import (
    CHECKPOINT_DIR,
    TrainedRun,
    _apply_recorded_split,
    check_run_matches,
    check_screen_file,
    checkpoint_path,
    load_run,
    package_versions,
    read_run_config,
    read_run_manifest,
    record_session,
    start_run_directory,
    write_run_directory,
)

__all__ = ["TrainingInterrupted", "train_run"]

logger = logging.getLogger(__name__)

#: Training arguments a run directory sets itself (not run options).
_RUN_OWNED = ("checkpoint_dir", "ckpt_path")


def train_run(
    screen_path: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress_bar: bool = True,
    **options: Any,
) -> TrainedRun:
    """Train a model on a screen and save the run directory (see module docstring).

    Parameters
    ----------
    screen_path
        The screen (``.h5ad``); it is only read. With ``resume``: None for the path
        recorded in the run, or the screen's new path if it moved.
    out_dir
        Run directory to create (with ``resume``: the run to continue).
    config_file
        YAML or TOML file with any option (``options`` override it).
    overwrite
        Replace an existing run directory's model (or an unfinished run).
    resume
        Continue the unfinished run in ``out_dir`` from its checkpoint, with the options
        recorded there (no other option may be given). A run with no checkpoint yet
        starts again from the beginning; a run that already finished is loaded and
        returned (``status="finished"``), nothing is trained.
    progress_bar
        Show Lightning's progress bar.
    **options
        ``model`` (required), data options (:data:`DATA_OPTIONS`), and any argument of
        the model class's constructor or ``train`` method (e.g. ``checkpoint_every``).

    Returns
    -------
    TrainedRun
        ``status`` ``"trained"``, ``"resumed"`` or ``"finished"``.

    Raises
    ------
    TrainingInterrupted
        On SIGINT or SIGTERM during training, after the checkpoint was saved; its
        message says how to continue (``cellpert train --resume DIR``) and
        ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM).
    """
    out = Path(out_dir)
    if resume:
        given = sorted(k for k, v in options.items() if v is not None)
        if config_file is not None or overwrite or given:
            extra = ", ".join([*(["config file"] if config_file else []), *(["overwrite"] if overwrite else []), *given])
            raise CellpertInputError(
                f"a resumed run takes its options from {out / 'config.yaml'}; remove {extra} (only the run "
                "directory, and the screen if it moved, may be given)."
            )
        rank = _launch_rank()
        with _run_lock(out, rank, resume=True):
            return _resume(out, screen_path, progress_bar=progress_bar)
    if screen_path is None:
        raise CellpertInputError("give the screen to train on (or resume a run: cellpert train --resume DIR).")
    data, setup_kwargs, model_kwargs, train_kwargs = resolve_run_config(config_file=config_file, cli_options=options)
    owned = [k for k in _RUN_OWNED if k in train_kwargs]
    if owned:
        raise CellpertInputError(f"{', '.join(owned)} is set by the run directory ({out / CHECKPOINT_DIR}); remove it.")
    rank = _launch_rank()
    with _run_lock(out, rank):
        if rank == 0:
            _check_out(out, overwrite)
        return _train_new(out, screen_path, data, setup_kwargs, model_kwargs, train_kwargs, rank=rank,
                          progress_bar=progress_bar)  # fmt: skip


def _train_new(
    out: Path, screen_path: str | os.PathLike, data: dict[str, Any], setup_kwargs: dict[str, Any],
    model_kwargs: dict[str, Any], train_kwargs: dict[str, Any], *, rank: int, progress_bar: bool,
) -> TrainedRun:  # fmt: skip
    """A new run in ``out`` (see :func:`train_run`)."""
    entry = get_entry(data["model"])
    screen = screen_from_options(screen_path, data)
    split_key = apply_split(screen, data)
    setup_kwargs = _complete_setup(setup_kwargs, screen)
    model = _build_model(entry.load_class(), screen, split_key, setup_kwargs, model_kwargs)
    config = {
        "cellpert_version": __version__,
        "screen": str(Path(screen_path).resolve()),
        **data,
        "split_key": split_key,
        "setup_kwargs": setup_kwargs,
        "model_kwargs": model_kwargs,
        "train_kwargs": {k: v for k, v in train_kwargs.items() if k != "enable_progress_bar"},
        "n_cells": screen.n_cells,
        "n_genes": screen.n_genes,
        "n_perturbations": screen.n_perturbations,
    }
    if rank == 0:
        start_run_directory(
            out, config=config, screen=screen, split_key=split_key, screen_path=Path(screen_path),
            seed=train_kwargs.get("seed") if train_kwargs.get("seed") is not None else getattr(model, "seed", None),
        )  # fmt: skip
        record_session(out, from_step=0)
    if rank == 0:
        for line in covariate_hints(screen, setup_kwargs):
            warnings.warn(line, CellpertWarning, stacklevel=2)
    logger.info("training %s on %d cells x %d genes", entry.name, screen.n_cells, screen.n_genes)
    return _fit(out, model, screen, split_key, config, train_kwargs, ckpt=None, progress_bar=progress_bar)


def covariate_hints(screen: PerturbationScreen, setup_kwargs: dict[str, Any]) -> list[str]:
    """One line per obs column that looks like a covariate (cell line, batch, donor, ...;
    :func:`cellpert.data.find_covariate_columns`) with control cells in two or more of its
    levels, when the run models no covariate: the model would have to learn the levels'
    differences from the counts. On the shared McFaline subset (three glioma lines), SAMS-VAE
    with the line as a covariate is ahead of the training-cell average on held-out cells
    on every metric, without it level on top-20 r (benchmarks/RESULTS_ate.md, session 18).
    """
    if setup_kwargs.get("batch_key") or setup_kwargs.get("categorical_covariate_keys"):
        return []
    given = {setup_kwargs.get(k) for k in ("background_key", "perturbation_key")} | {screen.perturbation_key}
    lines = []
    for key in find_covariate_columns(screen.adata.obs, exclude=[k for k in given if k]):
        spread = covariate_spread(screen, key)
        with_controls = [k for k, v in spread["control_cells_per_level"].items() if v > 0 and k != "<missing>"]
        if len(with_controls) >= 2 and not spread["missing"]:
            lines.append(
                f"obs[{key!r}] has {len(with_controls)} levels with control cells and the model is given no "
                f"covariate, so it must learn their differences from the counts; to model them, train with "
                f"--covariate-keys {key} (or --batch-key {key} for a technical batch)."
            )
    return lines


def _resume(out: Path, screen_path: str | os.PathLike | None, *, progress_bar: bool) -> TrainedRun:
    """Continue the run in ``out`` (see :func:`train_run`)."""
    manifest = read_run_manifest(out)
    config = read_run_config(out, finished=False)
    path = Path(screen_path) if screen_path is not None else Path(config["screen"])
    if not path.exists():
        raise CellpertInputError(
            f"the screen {path} recorded in {out / 'config.yaml'} is not there; give its new path: "
            f"cellpert train SCREEN --resume {out}."
        )
    if manifest.get("status") == "finished":
        logger.info("%s already finished training; nothing to resume", out)
        run = load_run(path, out)
        run.status = "finished"
        return run
    data = {k: config.get(k, default) for k, default in DATA_OPTIONS.items()}
    split_key = config["split_key"]
    screen = screen_from_options(path, data)
    check_run_matches(screen, out)
    check_screen_file(path, out, manifest, screen)
    _apply_recorded_split(screen, out, split_key)
    rank = _launch_rank()
    now = package_versions()
    changed = {k: f"{v} -> {now.get(k)}" for k, v in (manifest.get("versions") or {}).items() if now.get(k) != v}
    if changed and rank == 0:
        logger.warning(
            "resuming with other package versions than the run started with (%s); the result may differ "
            "slightly from an uninterrupted run", ", ".join(f"{k} {v}" for k, v in changed.items()),
        )  # fmt: skip
    entry = get_entry(config["model"])
    model = _build_model(entry.load_class(), screen, split_key, config.get("setup_kwargs") or {},
                         config.get("model_kwargs") or {})  # fmt: skip
    ckpt, step = checkpoint_path(out), 0
    if ckpt.is_file():
        step = check_checkpoint(ckpt, model.module)["global_step"]
    else:
        logger.warning("%s has no checkpoint yet: training starts again from the beginning", out)
        ckpt = None
    train_kwargs = dict(config.get("train_kwargs") or {})
    if rank == 0:
        record_session(out, from_step=step, **({"versions": now} if changed else {}))
    logger.info("resuming %s on %d cells x %d genes at step %d", entry.name, screen.n_cells, screen.n_genes, step)
    run = _fit(out, model, screen, split_key, config, train_kwargs, ckpt=ckpt, progress_bar=progress_bar)
    run.status = "resumed"
    return run


def _fit(
    out: Path, model: Any, screen: PerturbationScreen, split_key: str, config: dict[str, Any],
    train_kwargs: dict[str, Any], *, ckpt: Path | None, progress_bar: bool,
) -> TrainedRun:  # fmt: skip
    """Train ``model`` with checkpoints in ``out`` and write the run directory."""
    kwargs = {**train_kwargs, "checkpoint_dir": out / CHECKPOINT_DIR, "ckpt_path": ckpt}
    kwargs.setdefault("enable_progress_bar", progress_bar)
    start = time.perf_counter()
    rank = _launch_rank()
    try:
        with _interruptible(step=0 if ckpt is None else check_checkpoint(ckpt, model.module)["global_step"]):
            model.train(**kwargs)
    except TrainingInterrupted as err:
        err.resume_hint = f"cellpert train --resume {out}"
        if err.checkpoint is None and ckpt is not None:  # stopped before training went on
            err.checkpoint = ckpt
        if rank == 0:
            record_session(out, outcome=err.signal_name, step=err.step)
        raise
    except BaseException as err:
        if rank == 0 and (out / "run.json").is_file():
            record_session(out, outcome=type(err).__name__, step=_trainer_step(model))
        raise
    training = _training_summary(model, time.perf_counter() - start)
    rank = int(getattr(getattr(model, "trainer", None), "global_rank", 0) or 0)
    config = {**config, "training": training}
    if rank != 0:  # DDP: the other ranks trained the same model; rank 0 writes it
        return TrainedRun(model=model, screen=screen, directory=out, config=config, rank=rank)
    write_run_directory(out, model=model, screen=screen, split_key=split_key, config=config, training=training)
    return TrainedRun(model=model, screen=screen, directory=out, config=config, rank=rank)


#: Lock file of a run directory while a process trains into it.
_LOCK_NAME = ".cellpert.lock"


@contextlib.contextmanager
def _run_lock(out: Path, rank: int, *, resume: bool = False) -> Iterator[None]:
    """Hold ``out/.cellpert.lock`` while this process trains into ``out`` (rank 0 of a DDP
    launch: the other ranks are the same command), so that a second ``cellpert train`` or
    ``--resume`` into the same directory (e.g. a scheduler's requeue while the first job
    still runs) stops at once instead of mixing its files with the first one's."""
    if rank != 0 or (resume and not out.is_dir()):  # (a missing run is reported by the resume)
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / _LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout as err:
        raise CellpertInputError(
            f"another process is training into {out} (it holds {out / _LOCK_NAME}); wait for it to finish, "
            "or choose another --out."
        ) from err
    try:
        yield
    finally:
        lock.release()
        if created and [p.name for p in out.iterdir()] == [_LOCK_NAME]:  # failed before writing anything
            (out / _LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()


@contextlib.contextmanager
def _interruptible(*, step: int) -> Iterator[None]:
    """SIGINT or SIGTERM before training runs (Lightning's setup) raise
    :class:`TrainingInterrupted` at once, with nothing new to save; once training runs,
    :class:`~cellpert.models._checkpoint.RunCheckpoint` handles them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise TrainingInterrupted(signum, step=step, checkpoint=None)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: handler for signum, handler in previous.items() if handler is not signal.SIG_IGN}
    for signum in previous:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _build_model(
    cls: type, screen: PerturbationScreen, split_key: str, setup_kwargs: dict[str, Any], model_kwargs: dict[str, Any]
) -> Any:
    adata = prepare_anndata(screen, split_key=split_key)
    cls.setup_anndata(adata, layer=screen.layer, split_key=split_key, **setup_kwargs)
    return cls(adata, **model_kwargs)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to train into a directory that holds a model, or an unfinished run with a
    checkpoint (one without a checkpoint has nothing to lose and starts again)."""
    if overwrite:
        return
    if (out / "model").exists():
        raise CellpertInputError(f"{out} already holds a model; choose another --out or pass --overwrite.")
    if checkpoint_path(out).is_file():
        raise CellpertInputError(
            f"{out} holds an unfinished run with a checkpoint; continue it with `cellpert train --resume {out}`, "
            "or pass --overwrite to start again."
        )


def _launch_rank() -> int:
    """This process's rank among the processes of a DDP launch, from the environment (as
    Lightning reads it): Lightning starts ranks > 0 by running the same command again,
    and those must not write the run directory or check it."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def _trainer_step(model: Any) -> int | None:
    trainer = getattr(model, "trainer", None)
    return int(trainer.global_step) if trainer is not None else None


def _training_summary(model: Any, wall_s: float) -> dict[str, Any]:
    """Steps, wall time and steps/s of a finished ``model.train`` (any family)."""
    summary = dict(getattr(model, "training_summary_", None) or {})
    trainer = getattr(model, "trainer", None)
    steps = summary.get("steps", int(trainer.global_step) if trainer is not None else None)
    summary.setdefault("steps", steps)
    summary.setdefault("epochs", int(trainer.current_epoch) if trainer is not None else None)
    summary.setdefault("wall_time_s", round(wall_s, 3))
    if steps and summary.get("steps_per_s") is None and wall_s > 0:
        summary["steps_per_s"] = round(steps / wall_s, 3)
    return summary


def _complete_setup(setup_kwargs: dict[str, Any], screen: PerturbationScreen) -> dict[str, Any]:
    """Background values without a column refer to the screen's perturbation labels, and a
    background column equal to the perturbation column defaults to the control labels."""
    out = dict(setup_kwargs)
    if out.get("background") is not None and not out.get("background_key"):
        out["background_key"] = screen.perturbation_key
    if out.get("background_key") and out.get("background") is None and out["background_key"] == screen.perturbation_key:
        out["background"] = list(screen.control_labels)
    if isinstance(out.get("background"), str):
        out["background"] = as_list(out["background"])
    return out
