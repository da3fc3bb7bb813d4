"""Average treatment effects, baselines, metrics and identifiability (MODELS.md §3, §6, §7)."""

from __future__ import annotations

from cellpert.evaluate._ate import (
    additive_baseline,
    ate_from_counts,
    ate_metrics,
    data_ate,
    mean_baseline,
    perturbseq_transform,
)
from cellpert.evaluate._identifiability import (
    MCCResult,
    align_latents,
    block_leakage,
    ica_rotate,
    linear_r2,
    mask_recovery,
    match_latents,
    mcc,
)

__all__ = [
    "MCCResult",
    "additive_baseline",
    "align_latents",
    "ate_from_counts",
    "ate_metrics",
    "block_leakage",
    "data_ate",
    "ica_rotate",
    "linear_r2",
    "mask_recovery",
    "match_latents",
    "mcc",
    "mean_baseline",
    "perturbseq_transform",
]
