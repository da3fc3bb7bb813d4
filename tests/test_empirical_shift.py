"""The counterfactual estimator's empirical latent shift (docs/models.md, *ATE space and
data ATE*): each label's shift measured where its training cells lie in the latent space."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cellpert.data import load_screen, read_split
from cellpert.data.simulate import sams_true_ate, simulate_sams
from cellpert.evaluate import ate_metrics, compute_ate_evaluation, counterfactual_ate
from cellpert.models import CPAVAE, SAMSVAE, SVAE, ConditionalVAE, prepare_anndata
from cellpert.models.svae import prepare_labels


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def screen():
    adata = simulate_sams(
        seed=3, n_perturbations=4, n_latent=3, n_genes=30, n_combinations=2,
        n_cells_per_perturbation=(60, 10, 30), n_control_cells=(80, 10, 40),
    )  # fmt: skip
    s = load_screen(adata, warn=False)
    read_split(s, "cellpert_split")
    return s


def _model(screen, cls, **kw):
    adata = prepare_anndata(screen)
    if cls is SVAE:
        prepare_labels(screen)
        cls.setup_anndata(adata, layer=screen.layer, split_key="cellpert_split")
        return cls(adata, n_latent=3, n_hidden=8, **kw)
    cls.setup_anndata(adata, layer=screen.layer)
    return cls(adata, n_latent=3, n_hidden=8, seed=0, **kw)


def _train_cells(screen, model):
    train = model.split_values() == "train"
    return {lab: np.flatnonzero(train & (screen.labels == lab)) for lab in np.unique(screen.labels[train])}


@pytest.mark.parametrize("cls", [SAMSVAE, CPAVAE, ConditionalVAE])
def test_empirical_shift_is_the_difference_of_mean_latent_positions(screen, cls):
    """point = mean position of the label's cells − mean position of the controls, with the
    positions computed here from the module; a combination without cells sums its parts'."""
    model = _model(screen, cls, **({"guide": "mean_field"} if cls is SAMSVAE else {}))
    with torch.no_grad():  # global latents with (almost) no spread: positions are deterministic
        if cls is not ConditionalVAE:
            model.module.embedding_loc.normal_(0, 1.0)
            model.module.embedding_scale_raw.fill_(-20.0)
        if cls is SAMSVAE:
            model.module.mask_logits.fill_(20.0)
    cells = _train_cells(screen, model)
    ctrl = cells["control"]
    groups = [[cells["P000"]], [cells["P001"], cells["P002"]], []]
    dosage = model.dosage_from_labels(["P000", "P001+P002", "P003"])
    out = model.get_empirical_shifts(groups, control_cells=ctrl, dosage=dosage, n_draws=400, seed=1)
    m = model.module
    x = torch.as_tensor(screen.counts.toarray(), dtype=torch.float32)
    d_all = torch.as_tensor(model.dosage_from_labels(list(screen.labels)), dtype=torch.float32)

    def mean_pos(idx):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return m.latent_position(x[idx], d_all[idx], n_draws=200).double().numpy().mean(0)

    c = mean_pos(ctrl)
    expected0 = mean_pos(cells["P000"]) - c
    expected1 = mean_pos(cells["P001"]) + mean_pos(cells["P002"]) - 2 * c
    np.testing.assert_allclose(out["point"][0], expected0, atol=1e-4)
    np.testing.assert_allclose(out["point"][1], expected1, atol=1e-4)
    assert list(out["n_cells"]) == [len(cells["P000"]), len(cells["P001"]) + len(cells["P002"]), 0]
    # a row without cells gets the model's own shift (zero for the conditional VAE)
    if cls is ConditionalVAE:
        assert np.all(out["point"][2] == 0)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            own = (torch.as_tensor(dosage[2]) @ m.sample_globals(400)["effect"].mean(0)).detach().numpy()
        np.testing.assert_allclose(out["point"][2], own, atol=1e-4)
        assert np.abs(out["point"][2]).max() > 0
    # the draws: a bootstrap of the means, centred on the point, with the spread of a mean
    draws = out["draws"]
    assert draws.shape == (400, 3, 3)
    np.testing.assert_allclose(draws.mean(0)[:2], out["point"][:2], atol=0.05)
    sd = draws[:, 0].std(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pos_p = m.latent_position(x[cells["P000"]], d_all[cells["P000"]], n_draws=200).double().numpy()
        pos_c = m.latent_position(x[ctrl], d_all[ctrl], n_draws=200).double().numpy()
    expected_sd = np.sqrt(pos_p.var(0) / len(pos_p) + pos_c.var(0) / len(pos_c))
    np.testing.assert_allclose(sd, expected_sd, rtol=0.2)


def test_counterfactual_with_given_shifts_matches_a_direct_computation(screen):
    """shifts replace D (E ⊙ M): every draw's effect is the cells' average of
    log2(1e4 ρ(z^b + s_p) + 1) − log2(1e4 ρ(z^b) + 1)."""
    model = _model(screen, CPAVAE)
    ctrl = np.flatnonzero(screen.is_control)[:13]
    dosage = model.dosage_from_labels(["P000", "P001"])
    rng = np.random.default_rng(0)
    shifts = rng.normal(0, 2, size=(4, 2, 3)).astype(np.float32)
    out = model.get_counterfactual_effects(
        dosage, indices=ctrl, n_draws=4, transform="rho", basal="mean", cells_per_draw=None, shifts=shifts
    )
    m = model.module
    x = torch.as_tensor(screen.counts[ctrl].toarray(), dtype=torch.float32)
    with torch.no_grad():
        zb = m.encode_basal(x, sample=False)
        base = torch.log2(1e4 * m.decoder(zb) + 1)
        for p in range(4):
            for r in range(2):
                moved = torch.log2(1e4 * m.decoder(zb + torch.as_tensor(shifts[p, r])) + 1)
                np.testing.assert_allclose(out["effects"][p, r], (moved - base).double().mean(0).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="shifts must be"):
        model.get_counterfactual_effects(dosage, indices=ctrl, n_draws=3, shifts=shifts)


def test_empirical_shift_recovers_a_shift_the_model_misses(screen):
    """A model whose own shifts are zero (untrained embeddings set to 0) still predicts the
    effects with the empirical shift, and the default evaluation uses it."""
    model = _model(screen, CPAVAE)
    model.train(max_steps=300, lr=2e-2, batch_size=128, enable_model_summary=False)
    with torch.no_grad():
        model.module.embedding_loc.zero_()
        model.module.embedding_scale_raw.fill_(-20.0)
    cells = _train_cells(screen, model)
    labels = ["P000", "P001", "P002", "P003"]
    kw = {"cells": cells["control"], "n_draws": 10, "gene_names": screen.gene_names}
    own = counterfactual_ate(model, labels, latent_shift="model", **kw)
    emp = counterfactual_ate(model, labels, latent_shift="empirical", label_cells=cells, **kw)
    # no shift, no effect (count noise only): far smaller than the measured effects
    assert np.abs(own.ate.to_numpy()).mean() < 0.2 * np.abs(emp.ate.to_numpy()).mean()
    truth = sams_true_ate(screen.adata, labels, n_cells=4000)
    _, m = ate_metrics(truth, emp.ate.loc[truth.index], top_n=10)
    assert m["pearson"] > 0.8, m
    assert emp.config["latent_shift"] == "empirical" and "bootstrap" in emp.config["interval_kind"]
    # the interval is that of the sampling of the cells: not zero
    assert float((emp.hi - emp.lo).to_numpy().mean()) > 0.01
    ev = compute_ate_evaluation(screen, model, n_draws=10, ceiling=False, iwelbo_samples=2)
    assert ev.config["model_ate_latent_shift"] == "empirical"
    assert ev.summary["test"]["model_pearson"] > 0.5
    with pytest.raises(Exception, match="latent_shift"):
        compute_ate_evaluation(screen, model, latent_shift="mean")


def test_svae_has_latent_positions(screen):
    """sVAE's positions are q(z | x)'s means: the empirical shift of a label is the mean of
    its cells' minus the controls'."""
    model = _model(screen, SVAE)
    cells = _train_cells(screen, model)
    out = model.get_empirical_shifts([[cells["P000"]]], control_cells=cells["control"], n_draws=5)
    m = model.module
    x = torch.as_tensor(screen.counts.toarray(), dtype=torch.float32)
    with torch.no_grad():
        qz = m.inference(x)["qz_m"].double().numpy()
    np.testing.assert_allclose(out["point"][0], qz[cells["P000"]].mean(0) - qz[cells["control"]].mean(0), atol=1e-5)
