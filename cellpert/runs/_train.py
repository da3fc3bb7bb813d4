"""Training runs: what ``cellpert train`` does (resolve options, load, split, train, save)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cellpert import __version__
from cellpert._errors import CellpertInputError
from cellpert.data import PerturbationScreen, as_list
from cellpert.models import prepare_anndata
from cellpert.runs._config import apply_split, resolve_run_config, screen_from_options
from cellpert.runs._registry import get_entry
from cellpert.runs._rundir import TrainedRun, write_run_directory

__all__ = ["train_run"]

logger = logging.getLogger(__name__)


def train_run(
    screen_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress_bar: bool = True,
    **options: Any,
) -> TrainedRun:
    """Train a model on a screen and save the run directory (see module docstring).

    Parameters
    ----------
    screen_path
        The screen (``.h5ad``); it is only read.
    out_dir
        Run directory to create.
    config_file
        YAML or TOML file with any option (``options`` override it).
    overwrite
        Replace an existing run directory's model.
    **options
        ``model`` (required), data options (:data:`DATA_OPTIONS`), and any argument of
        the model class's constructor or ``train`` method.
    """
    data, setup_kwargs, model_kwargs, train_kwargs = resolve_run_config(config_file=config_file, cli_options=options)
    out = Path(out_dir)
    if (out / "model").exists() and not overwrite:
        raise CellpertInputError(f"{out} already holds a model; choose another --out or pass --overwrite.")
    entry = get_entry(data["model"])
    cls = entry.load_class()
    screen = screen_from_options(screen_path, data)
    split_key = apply_split(screen, data)
    adata = prepare_anndata(screen, split_key=split_key)
    setup_kwargs = _complete_setup(setup_kwargs, screen)
    cls.setup_anndata(adata, layer=screen.layer, split_key=split_key, **setup_kwargs)
    model = cls(adata, **model_kwargs)
    train_kwargs.setdefault("enable_progress_bar", progress_bar)
    logger.info("training %s on %d cells x %d genes", entry.name, screen.n_cells, screen.n_genes)
    start = time.perf_counter()
    model.train(**train_kwargs)
    training = _training_summary(model, time.perf_counter() - start)
    rank = int(getattr(getattr(model, "trainer", None), "global_rank", 0) or 0)

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
    config["training"] = training
    if rank != 0:  # DDP: the other ranks trained the same model; rank 0 writes it
        return TrainedRun(model=model, screen=screen, directory=out, config=config, rank=rank)
    write_run_directory(out, model=model, screen=screen, split_key=split_key, config=config, training=training)
    return TrainedRun(model=model, screen=screen, directory=out, config=config, rank=rank)


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
