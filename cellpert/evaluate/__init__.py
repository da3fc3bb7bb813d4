"""Average treatment effects, baselines, metrics, evaluation and identifiability (MODELS.md §3, §6, §7)."""

from __future__ import annotations

from cellpert.evaluate._ate import (
    additive_baseline,
    ate_from_counts,
    ate_metrics,
    data_ate,
    mean_baseline,
    perturbseq_transform,
)
from cellpert.evaluate._evaluate import (
    AteEvaluation,
    compute_ate_evaluation,
    evaluate_ate,
    label_splits,
    write_ate_results,
)
from cellpert.evaluate._identifiability import (
    MCCResult,
    align_latents,
    block_leakage,
    ica_masks,
    ica_rotate,
    latent_shifts,
    linear_r2,
    mask_recovery,
    match_latents,
    mcc,
)
from cellpert.evaluate._model_ate import ModelATE, model_ate
from cellpert.evaluate._report import ate_report_figure, write_ate_report

__all__ = [
    "AteEvaluation",
    "MCCResult",
    "ModelATE",
    "additive_baseline",
    "align_latents",
    "ate_report_figure",
    "ate_from_counts",
    "ate_metrics",
    "block_leakage",
    "compute_ate_evaluation",
    "data_ate",
    "evaluate_ate",
    "ica_masks",
    "ica_rotate",
    "label_splits",
    "latent_shifts",
    "linear_r2",
    "mask_recovery",
    "match_latents",
    "mcc",
    "mean_baseline",
    "model_ate",
    "perturbseq_transform",
    "write_ate_report",
    "write_ate_results",
]
