"""The three-stage out-of-distribution protocol of sVAE for held-out perturbations (docs/models.md, *sVAE and sVAE+*)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellpert._errors import CellpertInputError
from cellpert.models.svae._model import SVAE

__all__ = ["out_of_distribution"]

logger = logging.getLogger(__name__)

STAGES = {
    1: "after training (held-out μ untrained)",
    2: "masks frozen, retrained on training labels",
    3: "held-out μ fitted, networks frozen",
}


def _heldout_default(model: SVAE) -> list[str]:
    """Non-control labels with no training cells but some test cells."""
    codes = model._label_codes()
    train = set(codes[model.split_indices("train")].tolist())
    test = set(codes[model.split_indices("test")].tolist())
    return [
        model.labels_[c]
        for c in sorted(test - train)
        if model.labels_[c] not in model.control_labels_
    ]


@torch.inference_mode()
def _fit_shift_means(model: SVAE, label_codes: np.ndarray, indices: np.ndarray, batch_size: int | None) -> None:
    """Stage 3: the minimiser of the stage-3 objective over μ of the held-out labels.

    With the encoder, decoder and dispersion frozen and the masks fixed, the objective
    ``Σ_i E_q[log p(x_i | z)] − KL(q(z | x_i) ‖ N(m_a ⊙ μ_a, I))`` depends on μ_a only
    through the analytic KL, ``½ Σ_i Σ_k m_ak (μ_ak − E_q[z_ik])² + const``, whose
    minimiser is the mean of the posterior means of the label's cells on its active
    dimensions (μ of inactive dimensions does not enter and is set to 0). With covariates
    this still holds: they enter the decoder (and, with ``encode_covariates``, the
    encoder, whose means are then taken at each cell's own covariates), never the prior.
    """
    module = model.module
    latent = model.get_latent_representation(indices=indices, batch_size=batch_size)
    codes = model._label_codes()[indices]
    for c in label_codes:
        rows = codes == c
        if not rows.any():
            continue
        mean = torch.as_tensor(latent[rows].mean(0), device=module.shift_mean.device)
        module.shift_mean[c] = mean * module.frozen_mask[c]


def out_of_distribution(
    model: SVAE,
    heldout_labels: Sequence[str] | None = None,
    *,
    n_samples_iwelbo: int = 1000,
    n_samples_elbo: int = 10,
    stage2_train_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Three-stage out-of-distribution evaluation of held-out perturbations (docs/models.md, *sVAE and sVAE+*).

    1. ELBO / IWELBO of the held-out cells right after training (their μ untrained);
    2. reset μ and log_alpha of the held-out labels, freeze every mask at its thresholded
       value ``1[log_alpha > 0]`` (held-out masks, reset to the initial logits, are all
       on), and continue training on the training labels;
    3. freeze encoder, decoder and dispersion and fit only the held-out labels' μ on the
       held-out cells (exactly, see below), then score them again.

    Stage 3's fit is the exact optimum: with frozen networks and fixed masks the
    objective depends on μ_a only through the analytic KL, minimised by the mean of the
    posterior means of the label's cells on its active dimensions. A plain VAE
    (``prior="standard"``) runs the same stages (its μ-related steps do nothing). A model
    set up with covariates scores every cell at its own covariates.

    The model is modified in place (save it first to keep the trained state); its
    ``history`` becomes stage 2's.

    Parameters
    ----------
    model
        A trained :class:`SVAE` / :class:`SVAEPlus`.
    heldout_labels
        Labels to evaluate. Default: the non-control labels that have test cells but no
        training cells.
    n_samples_iwelbo
        Importance samples of the IWELBO (1,000).
    n_samples_elbo
        Monte Carlo samples of the ELBO's reconstruction term (the KL is analytic).
    stage2_train_kwargs
        Arguments of :meth:`SVAE.train` for stage 2 (default ``max_epochs=50``, no KL
        warm-up, early stopping on the validation ELBO).
    batch_size
        Evaluation minibatch size.
    seed
        Seeds the evaluation draws (stage 2 training uses the model's seed unless given
        in ``stage2_train_kwargs``).

    Returns
    -------
    DataFrame with one row per stage: ``stage`` (1, 2, 3), ``description``, ``elbo`` and
    ``iwelbo`` (means over the held-out cells), ``n_cells``, ``n_labels``.
    """
    if not isinstance(model, SVAE):
        raise CellpertInputError("out_of_distribution needs an SVAE or SVAEPlus model.")
    if not model.is_trained_:
        raise CellpertInputError("train the model before running the out-of-distribution protocol.")
    labels = _heldout_default(model) if heldout_labels is None else [str(x) for x in heldout_labels]
    if not labels:
        raise CellpertInputError("no held-out labels: pass heldout_labels or hold perturbations out in the split.")
    controls = set(model.control_labels_) & set(labels)
    if controls:
        raise CellpertInputError(f"control label(s) {sorted(controls)} cannot be held out.")
    idx = model.label_indices(labels)
    codes = np.array([model.labels_.index(lab) for lab in labels], dtype=np.int64)
    module = model.module
    rows = []

    def score(stage: int) -> None:
        elbo = model.get_elbo(indices=idx, n_samples=n_samples_elbo, batch_size=batch_size, seed=seed)
        iwelbo = model.get_iwelbo(indices=idx, n_samples=n_samples_iwelbo, batch_size=batch_size, seed=seed)
        rows.append(
            {"stage": stage, "description": STAGES[stage], "elbo": elbo, "iwelbo": iwelbo,
             "n_cells": len(idx), "n_labels": len(labels)}
        )  # fmt: skip
        logger.info("OOD stage %d: ELBO %.3f, IWELBO %.3f on %d cells", stage, elbo, iwelbo, len(idx))

    # --- stage 1
    score(1)
    # --- stage 2: reset held-out parameters, freeze masks, retrain on training labels
    if module.prior == "shift":
        with torch.no_grad():
            module.shift_mean[codes] = 0.0
            module.log_alpha[codes] = module.mask_logits_init
    module.freeze_masks()
    kwargs = {"max_epochs": 50, "n_epochs_kl_warmup": None}
    kwargs.update(stage2_train_kwargs or {})
    model.train(**kwargs)
    score(2)
    # --- stage 3: freeze networks, fit held-out μ on the held-out cells
    module.networks_frozen = True
    module.eval()
    if module.prior == "shift":
        _fit_shift_means(model, codes, idx, batch_size)
    score(3)
    return pd.DataFrame(rows)

