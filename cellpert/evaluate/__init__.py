"""Average treatment effects, baselines, metrics, evaluation and identifiability (docs/models.md, *ATE space and data ATE*, *Evaluation*, *Identifiability metrics and ICA*)."""

from __future__ import annotations

from cellpert.evaluate._ate import (
    additive_baseline,
    ate_from_counts,
    ate_metrics,
    data_ate,
    interval_coverage,
    mean_baseline,
    noise_ceiling,
    perturbseq_transform,
)
from cellpert.evaluate._evaluate import (
    AteEvaluation,
    compute_ate_evaluation,
    label_splits,
    score_against_truth,
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
from cellpert.evaluate._levels import level_values, level_weights, pool_frames, pooled_ate
from cellpert.evaluate._model_ate import (
    ModelATE,
    calibrate_interval,
    combine_with_average,
    counterfactual_ate,
    model_ate,
    posterior_ate,
    posterior_interval,
)
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
    "calibrate_interval",
    "combine_with_average",
    "compute_ate_evaluation",
    "counterfactual_ate",
    "posterior_ate",
    "data_ate",
    "ica_masks",
    "ica_rotate",
    "interval_coverage",
    "label_splits",
    "level_values",
    "level_weights",
    "latent_shifts",
    "linear_r2",
    "mask_recovery",
    "match_latents",
    "mcc",
    "mean_baseline",
    "model_ate",
    "noise_ceiling",
    "pool_frames",
    "pooled_ate",
    "perturbseq_transform",
    "posterior_interval",
    "score_against_truth",
    "write_ate_report",
    "write_ate_results",
]
