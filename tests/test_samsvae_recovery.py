"""SAMS-VAE's masks carry the true sparse structure of the SAMS simulator.

A small screen (12 perturbations, K = 4, mask density 0.25) trained for 400 steps with
the paper's model and guide (mean field here, for speed). After matching learned to true
latent dimensions (Hungarian matching of |corr|, MODELS.md §7), q(M) must rank the true
mask entries above the false ones: ROC AUC >= 0.7 (the correct model reaches about 0.8
for model seeds 0 and 1). A model whose masks are disabled (all on, or logits that never
learn) has constant probabilities and an AUC of 0.5.

Thresholded F1 at 0.5 is reported in benchmarks/RESULTS_samsvae.md rather than tested: at
this budget it varies between about 0.55 and 0.77 across model seeds.

The second test is the issue's setting (T = 100, K = 15): the paper's q(M) fails there,
and the documented option :meth:`SAMSVAE.get_ica_masks` recovers the masks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cellpert.data import load_screen
from cellpert.data.simulate import simulate_sams
from cellpert.evaluate import mcc
from cellpert.models import SAMSVAE, prepare_anndata

AUC_THRESHOLD = 0.7


@pytest.fixture(scope="module")
def screen_adata():
    adata = simulate_sams(
        seed=3,
        n_perturbations=12,
        n_latent=4,
        mask_prob=0.25,
        n_cells_per_perturbation=(60, 10, 10),
        n_control_cells=(60, 10, 10),
        n_genes=60,
    )
    gt = adata.uns["cellpert"]["ground_truth"]
    screen = load_screen(adata, perturbation_key="perturbation", warn=False)
    return prepare_anndata(screen), gt


def _mask_auc(probs: np.ndarray, truth: np.ndarray, perm: np.ndarray) -> float:
    return float(roc_auc_score(truth.ravel(), probs[:, perm].ravel()))


@pytest.mark.slow
def test_mask_probabilities_rank_true_entries(screen_adata):
    adata, gt = screen_adata
    torch.set_num_threads(1)  # the calibration above used one thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SAMSVAE.setup_anndata(adata)
        model = SAMSVAE(adata, n_latent=4, n_hidden=64, guide="mean_field", mask_prior_prob=0.25, seed=0)
        model.train(max_steps=400, batch_size=256, lr=3e-3)
    test = model.split_indices("test")
    matching = mcc(adata.obsm["X_true_latent"][test], model.get_latent_representation(indices=test, kind="latent"))
    truth = np.asarray(gt["mask"]) != 0
    probs = model.get_mask_probabilities().loc[list(gt["perturbation_names"])].to_numpy()
    auc = _mask_auc(probs, truth, matching.perm)
    assert auc >= AUC_THRESHOLD, f"mask AUC {auc:.3f}, latent MCC {float(matching):.3f}"
    # broken models: masks disabled (all on) or never learned (logits stay at 0)
    assert _mask_auc(np.ones_like(probs), truth, matching.perm) < AUC_THRESHOLD - 0.15
    assert _mask_auc(np.full_like(probs, 0.5), truth, matching.perm) < AUC_THRESHOLD - 0.15


# --------------------------------------------------- masks in the ICA basis (option)
ICA_F1_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def paper_screen():
    """The issue's setting: T = 100, K = 15, mask density 2/15; 60 training cells each."""
    adata = simulate_sams(seed=0, n_cells_per_perturbation=(60, 10, 10), n_control_cells=(60, 10, 10), n_genes=100)
    gt = adata.uns["cellpert"]["ground_truth"]
    screen = load_screen(adata, perturbation_key="perturbation", warn=False)
    return prepare_anndata(screen), gt


@pytest.mark.slow
def test_ica_masks_recover_the_simulators_masks(paper_screen):
    """ICA-basis masks of the paper's SAMS-VAE reach F1 >= 0.6 (0.74 when calibrated, 1,500
    steps); its q(M) (0.30) and a model whose latent carries no perturbation shift (the
    conditional VAE, 0.24) stay far below."""
    from cellpert.evaluate import ica_masks, mask_recovery
    from cellpert.models import ConditionalVAE

    adata, gt = paper_screen
    truth = np.asarray(gt["mask"])
    names = list(gt["perturbation_names"])
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SAMSVAE.setup_anndata(adata)
        model = SAMSVAE(adata, n_latent=15, mask_prior_prob=2 / 15, seed=0)
        # the paper's training: fixed length, mask logits at the common lr (with cellpert's
        # defaults, early stopping and mask-logit lr 3e-2, the ICA-mask F1 here is 0.53)
        model.train(max_steps=1500, early_stopping=False, mask_logits_lr=None)
        found = model.get_ica_masks()
        ConditionalVAE.setup_anndata(adata)
        broken = ConditionalVAE(adata, n_latent=15, seed=0)
        broken.train(max_steps=1500, early_stopping=False)
    z = adata.obsm["X_true_latent"]
    assert list(found["masks"].index) == model.perturbation_names
    f1 = mask_recovery(truth, found["masks"].loc[names].to_numpy(), matching=mcc(z, found["latent"]))["f1"]
    assert f1 >= ICA_F1_THRESHOLD, f"ICA-mask F1 {f1:.3f}"
    raw = mcc(z, model.get_latent_representation(kind="latent"))
    f1_qm = mask_recovery(truth, model.get_mask_probabilities().loc[names].to_numpy(), matching=raw)["f1"]
    assert f1_qm < ICA_F1_THRESHOLD - 0.15
    lat = broken.get_latent_representation(kind="latent")
    other = ica_masks(lat, model._dosage())
    f1_broken = mask_recovery(truth, other["masks"], matching=mcc(z, other["latent"]))["f1"]
    assert f1_broken < ICA_F1_THRESHOLD - 0.15
