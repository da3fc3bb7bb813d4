"""The application layer: runs of the command line, usable from a notebook too.

Layers go one way (checked by import-linter in ``make test``)::

    cellpert.data  <-  cellpert.models  <-  cellpert.evaluate  <-  cellpert.runs  <-  cli

- :data:`MODELS`, :func:`model_key`: the models ``cellpert train`` knows;
- :func:`resolve_run_config`, :func:`read_config_file`: options from defaults, a config
  file and the command line;
- :func:`train_run`, :func:`load_run`, :class:`TrainedRun`: train and save a run
  directory (checkpointed; ``resume=True`` continues an interrupted one,
  :class:`TrainingInterrupted` is what SIGINT / SIGTERM raise), load it back (checking
  the format version, the model file's checksum, genes and perturbations);
  :func:`read_run_manifest`: a run's provenance and status (``run.json``);
- :func:`export_latents` (file) and :func:`write_latents` (in memory): latents and global
  outputs into an AnnData;
- :func:`evaluate_ate`: the file-level ATE evaluation (in memory:
  :func:`cellpert.evaluate.compute_ate_evaluation` and
  :func:`cellpert.evaluate.write_ate_results`).
"""

from __future__ import annotations

from cellpert.runs._config import (
    DATA_OPTIONS,
    read_config_file,
    resolve_options,
    resolve_run_config,
)
from cellpert.runs._evaluate import evaluate_ate
from cellpert.runs._export import export_latents, write_latents
from cellpert.runs._registry import MODELS, ModelEntry, get_entry, model_key
from cellpert.runs._rundir import (
    RUN_FORMAT_VERSION,
    TrainedRun,
    checkpoint_path,
    load_run,
    read_run_config,
    read_run_manifest,
    write_run_directory,
)
from cellpert.runs._train import TrainingInterrupted, train_run

__all__ = [
    "DATA_OPTIONS",
    "MODELS",
    "ModelEntry",
    "RUN_FORMAT_VERSION",
    "TrainedRun",
    "TrainingInterrupted",
    "checkpoint_path",
    "evaluate_ate",
    "export_latents",
    "get_entry",
    "load_run",
    "model_key",
    "read_config_file",
    "read_run_config",
    "read_run_manifest",
    "resolve_options",
    "resolve_run_config",
    "train_run",
    "write_latents",
    "write_run_directory",
]
