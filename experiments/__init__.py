"""Reproductions of the papers' experiments, driven by versioned config files.

``experiments/<experiment>/_experiment.yaml`` holds what the models of an experiment share
(data, split and its seeds, training, evaluation, the report), ``<model>.yaml`` one model
(its options and the paper's numbers for it); each has a ``fast:`` section with the
``FAST=1`` overrides. ``python -m experiments <experiment> [--fast] [-j N]`` runs the jobs
(configs × sweep points × split seeds) in parallel, caches each finished job under
``benchmarks/runs/experiments/`` and writes the report to ``benchmarks/runs/reports/``.
See ``experiments/README.md``.
"""

from __future__ import annotations

from experiments._config import ConfigError, expand_jobs, job_key, list_experiments, load_experiment
from experiments._runner import main, run

__all__ = ["ConfigError", "expand_jobs", "job_key", "list_experiments", "load_experiment", "main", "run"]
