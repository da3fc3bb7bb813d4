"""Torch pieces shared by every cellpert model family.

- :class:`ResidualMLP` / :class:`MultiInputLinear`: the residual LeakyReLU body
  (no batch norm, no dropout) and a concatenation-free first layer;
- :class:`GaussianHead`: Normal heads with variance ``exp(·) + 1e-4``;
- :class:`NBDecoder`, :func:`nb_log_prob_log_mean`, :func:`nb_sample`: the negative-binomial
  likelihood ``GammaPoisson(θ, θ/μ)`` with per-gene θ = exp(param) (init 1) and observed
  library size (:func:`log_mean_counts`), computed from log μ, as is
  :func:`poisson_log_prob_log_mean`; :func:`chunked_predictive_mean` (predictive
  particles); :func:`perturbseq_transform` (the ATE space);
- :class:`CovariateInput`: batch / categorical / continuous covariates as one vector;
- :func:`sample_straight_through_bernoulli`, :func:`bernoulli_log_prob`: hard masks with
  relaxed gradients and exact Bernoulli log-probabilities.
"""

from __future__ import annotations

from cellpert.models._components._covariates import CovariateInput, CovariateModuleMixin
from cellpert.models._components._likelihood import (
    NBDecoder,
    chunked_predictive_mean,
    counterfactual_effect_sums,
    log_mean_counts,
    nb_log_prob_log_mean,
    nb_sample,
    perturbseq_transform,
    poisson_log_prob_log_mean,
)
from cellpert.models._components._masks import bernoulli_log_prob, sample_straight_through_bernoulli
from cellpert.models._components._nn import GaussianHead, MultiInputLinear, ResidualMLP

__all__ = [
    "CovariateInput",
    "CovariateModuleMixin",
    "GaussianHead",
    "MultiInputLinear",
    "NBDecoder",
    "chunked_predictive_mean",
    "counterfactual_effect_sums",
    "ResidualMLP",
    "bernoulli_log_prob",
    "log_mean_counts",
    "nb_log_prob_log_mean",
    "nb_sample",
    "perturbseq_transform",
    "poisson_log_prob_log_mean",
    "sample_straight_through_bernoulli",
]
