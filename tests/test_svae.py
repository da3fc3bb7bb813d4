"""sVAE / sVAE+: loss terms by hand, options, save/load, determinism, target recovery, OOD."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, gammaln
from scipy.stats import beta as beta_dist
from scvi import REGISTRY_KEYS

from cellpert import CellpertInputError
from cellpert.data import load_screen
from cellpert.data.simulate import simulate_sparse_shift
from cellpert.evaluate import mask_recovery, mcc
from cellpert.models import prepare_anndata
from cellpert.models.svae import SVAE, SVAEModule, SVAEPlus, out_of_distribution, prepare_labels

SMALL = {"n_latent": 3, "n_hidden": 16}
QUIET = {"enable_progress_bar": False}


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)  # tiny networks: extra threads only contend on shared cores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _screen(seed=0, n_perturbations=10, n_latent=3, n_cells=40, n_genes=30, n_heldout=2):
    adata = simulate_sparse_shift(
        seed=seed,
        n_perturbations=n_perturbations,
        n_latent=n_latent,
        n_cells_per_perturbation=n_cells,
        n_control_cells=n_cells,
        n_genes=n_genes,
        n_heldout=n_heldout,
    )
    screen = load_screen(adata, perturbation_key="perturbation", warn=False)
    prepare_anndata(screen)
    prepare_labels(screen)
    return screen.adata


@pytest.fixture(scope="module")
def small_adata():
    return _screen()


# ------------------------------------------------------------------ by hand
def _nb_logpmf(x, mu, theta):
    return (
        gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
        + theta * np.log(theta / (theta + mu))
        + x * np.log(mu / (theta + mu))
    )


def _kl_normal(qm, qs, pm):
    """KL(N(qm, qs²) ‖ N(pm, 1)) summed over the last axis."""
    return (0.5 * (qs**2 + (qm - pm) ** 2 - 1.0) - np.log(qs)).sum(-1)


def _module(sparsity, **kw):
    torch.manual_seed(0)
    m = SVAEModule(7, 4, n_latent=3, n_hidden=8, sparsity=sparsity, **kw)
    with torch.no_grad():
        m.log_alpha.copy_(torch.randn(4, 3) * 3)
        m.shift_mean.copy_(torch.randn(4, 3))
    m.is_control.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # label 0: control
    m.penalised.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0]))  # label 3: held out
    return m


def test_l1_penalty_by_hand():
    m = _module("l1", sparsity_weight=2.5)
    q = expit(m.log_alpha.detach().numpy().astype(np.float64))
    expected = 2.5 * q[1:3].mean()  # non-control labels with training cells
    assert float(m.sparsity_penalty()) == pytest.approx(expected, rel=1e-5)


def test_beta_penalty_by_hand():
    m = _module("beta", beta_k=5.0)
    q = expit(m.log_alpha.detach().numpy().astype(np.float64))[1:3]
    by_formula = -(math.log(5.0) + 4.0 * np.log1p(-q)).sum()
    by_scipy = -beta_dist.logpdf(q, 1.0, 5.0).sum()
    assert float(m.sparsity_penalty()) == pytest.approx(by_formula, rel=1e-5)
    assert by_formula == pytest.approx(by_scipy, rel=1e-9)


@pytest.mark.parametrize("sparsity", ["l1", "beta"])
def test_loss_scaling_by_hand(sparsity):
    """sVAE: mean[rec + β w KL] + λ mean σ; sVAE+: n_obs mean[rec + β w KL] + w G."""
    m = _module(sparsity, sparsity_weight=0.7, beta_k=3.0, kl_beta=1.5)
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(5, 7)).astype(np.float64)
    mu = rng.uniform(0.5, 5.0, size=(5, 7))
    theta = rng.uniform(0.5, 2.0, size=7)
    qm, qs, pm = rng.normal(size=(5, 3)), rng.uniform(0.3, 1.5, size=(5, 3)), rng.normal(size=(5, 3))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    tensors = {REGISTRY_KEYS.X_KEY: t(x)}
    out = m.loss(tensors, {"qz_m": t(qm), "qz_s": t(qs)}, {"log_mu": t(np.log(mu)), "log_theta": t(np.log(theta)), "pz_m": t(pm)},
                 kl_weight=0.4, n_obs=1000)  # fmt: skip
    rec = -_nb_logpmf(x, mu, theta).sum(-1)
    kl = _kl_normal(qm, qs, pm)
    per_cell = (rec + 1.5 * 0.4 * kl).mean()
    q = expit(m.log_alpha.detach().numpy().astype(np.float64))[1:3]
    if sparsity == "l1":
        expected = per_cell + 0.7 * q.mean()
    else:
        expected = 1000 * per_cell + 0.4 * -(math.log(3.0) + 2.0 * np.log1p(-q)).sum()
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(out.reconstruction_loss["reconstruction_loss"].numpy(), rec, rtol=1e-4)
    np.testing.assert_allclose(out.kl_local["kl_local"].numpy(), kl, rtol=1e-4)


def test_prior_mean_masks_and_control():
    m = _module("l1")
    m.eval()
    label = torch.tensor([0, 1, 2, 3])
    la, mu = m.log_alpha.detach(), m.shift_mean.detach()
    expected = (la > 0).float() * mu
    expected[0] = 0.0  # control: μ = 0 whatever its mask
    torch.testing.assert_close(m.prior_mean(label), expected)
    # the decoder sees only z (K inputs): no label leaks around the latent shift
    assert m.decoder_body.fc_layers[0][0].in_features == 3
    assert m.encoder.encoder.fc_layers[0][0].in_features == 7


def test_training_masks_are_hard_and_straight_through():
    m = _module("l1")
    m.train()
    label = torch.tensor([1, 1, 2, 2] * 50)
    pm = m.prior_mean(label)
    mask = pm / m.shift_mean[label]
    assert set(torch.unique(mask.detach().round()).tolist()) <= {0.0, 1.0}
    pm.sum().backward()
    assert m.log_alpha.grad is not None and m.log_alpha.grad[1:3].abs().sum() > 0


# ------------------------------------------------------------------ options
def test_k_beta_and_lambda_validated(small_adata):
    SVAEPlus.setup_anndata(small_adata)
    for bad in (1, 1.0, 0.5):
        with pytest.raises(CellpertInputError, match="no sparsity"):
            SVAEPlus(small_adata, beta_k=bad, **SMALL)
    SVAE.setup_anndata(small_adata)
    with pytest.raises(CellpertInputError, match="λ"):
        SVAE(small_adata, sparsity_weight=-0.1, **SMALL)


def test_setup_needs_labels(small_adata):
    adata = small_adata.copy()
    with pytest.raises(CellpertInputError, match="prepare_labels"):
        SVAE.setup_anndata(adata, label_key="nope")
    # the default column is rebuilt from prepare_anndata's dosage matrix when missing
    del adata.obs["cellpert_label"]
    SVAE.setup_anndata(adata)
    np.testing.assert_array_equal(adata.obs["cellpert_label"].astype(str), small_adata.obs["cellpert_label"].astype(str))
    assert SVAE(adata, **SMALL).control_labels_ == ["control"]


def test_controls_and_penalised_labels(small_adata):
    SVAE.setup_anndata(small_adata)
    model = SVAE(small_adata, **SMALL)
    assert model.control_labels_ == ["control"]
    penalised = dict(zip(model.labels, model.module.penalised.numpy(), strict=True))
    assert penalised["P000"] == 1 and penalised["P009"] == 0  # P009 held out: no training cells


# ------------------------------------------------- API, save/load, determinism
def _train(cls, adata, seed=0, epochs=2, **kw):
    cls.setup_anndata(adata)
    model = cls(adata, seed=seed, **SMALL, **kw)
    model.train(max_epochs=epochs, n_epochs_kl_warmup=1, **QUIET)
    return model


def test_export_fields_and_getters(small_adata):
    model = _train(SVAEPlus, small_adata, beta_k=2.0)
    fields = model.export_fields()
    assert fields["obsm"]["latent"].shape == (small_adata.n_obs, 3)
    for key in ("shift_means", "mask_probabilities"):
        frame = fields["uns"][key]
        assert isinstance(frame, pd.DataFrame) and frame.shape == (len(model.labels), 3)
        assert list(frame.index) == model.labels
    assert (fields["uns"]["shift_means"].loc["control"] == 0).all()
    lat = model.get_latent_representation(indices=[0, 1, 2], batch_size=2)
    np.testing.assert_allclose(lat, fields["obsm"]["latent"][:3], rtol=1e-5, atol=1e-6)
    test = model.split_indices("test")
    # IWELBO >= ELBO with the same 50 draws (same seed): per cell log mean_s w_s >= mean_s log w_s,
    # and the ELBO differs from mean_s log w_s only by its analytic KL in place of the sampled
    # one, a Monte Carlo error of mean 0 whose average over the 80 test cells has SD ~0.01
    # nats (measured), far below the gap (~0.2 nats per cell here)
    iwelbo = model.get_iwelbo(indices=test, n_samples=50, return_mean=False)
    elbo = model.get_elbo(indices=test, n_samples=50, return_mean=False)
    assert (iwelbo - elbo).mean() > 0.05, (iwelbo - elbo).mean()
    assert "elbo_validation" in model.history


def test_plain_vae_exports_latent_only(small_adata):
    model = _train(SVAE, small_adata, prior="standard")
    assert model.export_fields()["uns"] == {}
    with pytest.raises(CellpertInputError):
        model.get_mask_probabilities()


def test_an_empty_split_is_a_clear_error_not_a_nan(small_adata):
    model = _train(SVAE, small_adata, prior="standard")
    assert model.split_indices("unused").size == 0
    with pytest.raises(CellpertInputError, match="'unused' split has no cells"):
        model.get_iwelbo(split="unused", n_samples=2)
    with pytest.raises(CellpertInputError, match="no cells"):
        model.get_latent_representation(split="unused")


def test_save_load_round_trip(small_adata, tmp_path):
    model = _train(SVAE, small_adata, sparsity_weight=3.0)
    model.save(tmp_path / "m", overwrite=True)
    loaded = SVAE.load(tmp_path / "m", adata=small_adata)
    np.testing.assert_array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    pd.testing.assert_frame_equal(model.get_mask_probabilities(), loaded.get_mask_probabilities())
    pd.testing.assert_frame_equal(model.get_shift_means(), loaded.get_shift_means())
    assert loaded.module.sparsity_weight == 3.0 and loaded.control_labels_ == ["control"]
    assert model.get_iwelbo(n_samples=20) == loaded.get_iwelbo(n_samples=20)


def test_seeded_determinism(small_adata):
    a = _train(SVAE, small_adata, seed=3).get_latent_representation()
    b = _train(SVAE, small_adata, seed=3).get_latent_representation()
    c = _train(SVAE, small_adata, seed=4).get_latent_representation()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_epoch_logging_matches_scvi_per_step_logging(small_adata, monkeypatch):
    """Metrics summed per epoch and logged once give scvi-tools' per-minibatch logged values."""
    from scvi.train import TrainingPlan

    from cellpert.models._trainingplan import CellpertTrainingPlan

    # the stock plan's Adam is torch's default loop; ours is fused, rounded differently
    # (1e-5 relative after 3 epochs on some CPUs): compare the logging, not the optimiser
    monkeypatch.setattr(CellpertTrainingPlan, "_fused_optimizer", lambda self: False)
    ours = _train(SVAE, small_adata, seed=5, epochs=3, sparsity_weight=2.0).history
    monkeypatch.setattr(SVAE, "_training_plan_cls", TrainingPlan)
    stock = _train(SVAE, small_adata, seed=5, epochs=3, sparsity_weight=2.0).history
    assert set(stock) <= set(ours)  # plus the epoch mean of the KL warm-up weight
    for key in ("train_loss", "validation_loss", "elbo_train", "elbo_validation", "kl_local_train",
                "sparsity_penalty_train", "mask_on_fraction_validation"):  # fmt: skip
        assert len(ours[key]) == 3
        np.testing.assert_allclose(ours[key].to_numpy(float), stock[key].to_numpy(float), rtol=1e-5)


# ------------------------------------------------------------------ recovery
def test_penalty_switches_edges_off_in_training(small_adata):
    """A strong penalty turns the masks of trained labels off; λ = 0 leaves them on."""
    on = {}
    for lam in (0.0, 200.0):
        SVAE.setup_anndata(small_adata)
        model = SVAE(small_adata, sparsity_weight=lam, **SMALL)
        model.train(max_epochs=4, n_epochs_kl_warmup=None, perturbation_lr=0.5, early_stopping=False, **QUIET)
        trained = [f"P{i:03d}" for i in range(8)]
        on[lam] = model.get_masks().loc[trained].to_numpy().mean()
        # held-out labels are not penalised: untouched at the initial logits
        assert (model.get_mask_probabilities().loc[["P008", "P009"]].to_numpy() > 0.99).all()
    assert on[0.0] == 1.0
    assert on[200.0] < 0.5


@pytest.fixture(scope="module")
def recovery_adata():
    return _screen(seed=2, n_perturbations=12, n_latent=4, n_cells=100, n_genes=80, n_heldout=2)


def _target_f1(adata, sparsity_weight):
    """Target-recovery F1 of a trained sVAE and of the all-on mask, on the trained labels."""
    SVAE.setup_anndata(adata)
    model = SVAE(adata, n_latent=4, n_hidden=32, sparsity_weight=sparsity_weight, seed=0)
    model.train(
        max_epochs=60, batch_size=64, lr=1e-2, n_epochs_kl_warmup=1, early_stopping=False, **QUIET
    )
    gt = adata.uns["cellpert"]["ground_truth"]
    names = [str(n) for n in gt["perturbation_names"]][:10]  # trained perturbations
    truth = np.asarray(gt["mask"])[:10]
    matching = mcc(adata.obsm["X_true_latent"], model.get_latent_representation())
    probs = model.get_mask_probabilities().loc[names].to_numpy()
    all_on = mask_recovery(truth, np.ones_like(probs), matching=matching)["f1"]
    return mask_recovery(truth, probs, matching=matching)["f1"], all_on


@pytest.mark.slow
def test_sparsity_recovers_targets_and_lambda_zero_does_not(recovery_adata):
    """λ = 2 recovers the targets clearly better than the all-on mask; λ = 0 is the all-on mask.

    The all-on mask's F1 is 2p / (1 + p) for a true-edge density p: 0.545 on this screen
    (15 of 40 edges). Measured with λ = 2: F1 0.71 in an earlier checkout, 0.647 in a fresh
    one and on CI with the same sVAE code (the environment differs; not traced); one edge of
    40 moves F1 by about 0.03, so the margin
    asked for (0.05, under two edges) leaves room for such changes and still fails a penalty
    that switches off nothing or switches edges off at random.
    """
    f1_sparse, all_on = _target_f1(recovery_adata, sparsity_weight=2.0)
    f1_dense, _ = _target_f1(recovery_adata, sparsity_weight=0.0)
    assert all_on == pytest.approx(0.545, abs=0.001)
    assert f1_sparse >= all_on + 0.05, (f1_sparse, all_on)
    assert f1_dense == pytest.approx(all_on), (f1_dense, all_on)


# ------------------------------------------------------------------------ OOD
def test_out_of_distribution_three_stages(small_adata):
    model = _train(SVAE, small_adata, epochs=3)
    heldout = ["P008", "P009"]
    before = model.get_shift_means().loc["P000"].to_numpy()
    table = out_of_distribution(
        model, n_samples_iwelbo=30, stage2_train_kwargs={"max_epochs": 2, **QUIET}
    )
    assert list(table["stage"]) == [1, 2, 3]
    assert np.isfinite(table[["elbo", "iwelbo"]].to_numpy()).all()
    assert (table["n_cells"] == len(model.label_indices(heldout))).all()
    # masks frozen at their thresholded values; held-out masks reset (all on)
    assert bool(model.module.mask_frozen)
    assert (model.get_masks().loc[heldout].to_numpy() == 1).all()
    # stage 3 fits the held-out μ exactly: the mean posterior mean of their cells
    idx = model.label_indices(["P009"])
    np.testing.assert_allclose(
        model.get_shift_means().loc["P009"].to_numpy(),
        model.get_latent_representation(indices=idx).mean(0),
        rtol=1e-4,
        atol=1e-5,
    )
    # stage 3 cannot be worse than stage 2 on the held-out cells' ELBO
    assert table["elbo"].iloc[2] >= table["elbo"].iloc[1] - 1e-3
    assert not np.allclose(before, 0.0)


def test_dosage_rows_match_a_combination_whatever_the_order_of_its_parts():
    # the screen may spell a combination "B+A" where sVAE's label column has "A+B"
    # (labels written from the dosage matrix follow its column order)
    model = object.__new__(SVAE)
    model.labels_ = ["A", "A+B", "C", "control"]
    model.control_labels_ = ["control"]
    rows = model.dosage_from_labels(["B+A", "A+B", "A", "A+C", "control"], control=["control"])
    names = model.perturbation_names  # ["A", "A+B", "C"]
    assert names == ["A", "A+B", "C"]
    np.testing.assert_array_equal(
        rows,
        [[0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]],  # unseen "A+C": its parts' shifts added
    )
