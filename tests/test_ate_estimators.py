"""The default ATE evaluation: counterfactual estimator, posterior interval, coverage,
noise ceiling, held-out scoring, sVAE ATEs, early stopping (docs/models.md, "Evaluation")."""

from __future__ import annotations

import copy
import shutil
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellpert.data import load_screen, read_split
from cellpert.data.simulate import sams_true_ate, simulate_sams
from cellpert.evaluate import (
    ModelATE,
    ate_metrics,
    combine_with_average,
    compute_ate_evaluation,
    counterfactual_ate,
    data_ate,
    interval_coverage,
    noise_ceiling,
    posterior_ate,
    posterior_interval,
)
from cellpert.evaluate import _evaluate as evaluate_module
from cellpert.models import CPAVAE, SAMSVAE, SVAE, ConditionalVAE, prepare_anndata
from cellpert.models.samsvae._module import DOSAGE_KEY
from cellpert.models.svae import prepare_labels


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def sim_screen():
    adata = simulate_sams(
        seed=1, n_perturbations=5, n_latent=3, n_genes=30, n_combinations=2,
        n_cells_per_perturbation=(40, 10, 20), n_control_cells=(60, 15, 30),
    )  # fmt: skip
    return load_screen(adata, warn=False)


def _setup(screen, cls):
    from cellpert.data import read_split

    read_split(screen, "cellpert_split")
    adata = prepare_anndata(screen)
    cls.setup_anndata(adata, layer=screen.layer)
    return adata


@pytest.fixture(scope="module")
def cpa(sim_screen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = _setup(sim_screen, CPAVAE)
        model = CPAVAE(adata, n_latent=3, n_hidden=16, seed=0)
        model.train(max_steps=150, lr=2e-2, batch_size=128, enable_model_summary=False)
    return model


# ----------------------------------------------------------- counterfactual estimator
@pytest.mark.parametrize("cls", [CPAVAE, ConditionalVAE])
def test_counterfactual_effects_match_a_direct_computation(sim_screen, cls):
    """basal='mean', transform='rho': every draw's effect is the cells' average of
    log2(1e4 ρ(z^b + shift) + 1) − log2(1e4 ρ(z^b) + 1), computed here by hand."""
    adata = _setup(sim_screen, cls)
    model = cls(adata, n_latent=3, n_hidden=8, seed=0)
    with torch.no_grad():  # an untrained model with non-trivial embeddings
        if hasattr(model.module, "embedding_loc"):
            model.module.embedding_loc.normal_(0, 1.0)
    ctrl = np.flatnonzero(sim_screen.is_control)[:17]
    labels = ["P000", "P001+P002"]
    dosage = model.dosage_from_labels(labels, control=sim_screen.control_labels)
    out = model.get_counterfactual_effects(
        dosage, indices=ctrl, n_draws=3, transform="rho", basal="mean", seed=5, cells_per_draw=None
    )
    m = model.module
    x = torch.as_tensor(sim_screen.counts[ctrl].toarray(), dtype=torch.float32)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        effect = m.sample_globals(3)["effect"]
        if cls is CPAVAE:
            h = m.encoder(m.standardise(x), torch.zeros(len(ctrl), 3))
        else:
            h = m.encoder(m.standardise(x), torch.zeros(len(ctrl), dosage.shape[1]))
        zb = m.encoder_head(h)[0]
        expected = np.zeros((3, len(labels), x.shape[1]))
        expected_var = np.zeros_like(expected)
        for p in range(3):
            for r in range(len(labels)):
                d = torch.as_tensor(dosage[r : r + 1])
                if cls is CPAVAE:
                    moved = m.decoder(zb + d @ effect[p])
                    base = m.decoder(zb)
                else:
                    moved = m.decoder(zb, d.expand(len(ctrl), -1))
                    base = m.decoder(zb, torch.zeros_like(d).expand(len(ctrl), -1))
                diff = (torch.log2(1e4 * moved + 1) - torch.log2(1e4 * base + 1)).double().numpy()
                expected[p, r] = diff.mean(0)
                expected_var[p, r] = diff.var(0, ddof=1) / len(ctrl)
    np.testing.assert_allclose(out["effects"], expected, rtol=1e-4, atol=1e-5)
    assert out["n_cells"] == len(ctrl)
    # the per-draw Monte Carlo variance is the spread over cells / C (sample variance; every
    # cell in every draw here); rtol 1e-3 because the library forms it as E[d²] − E[d]²
    # (float64 sums of float32 differences), which loses digits when the spread is small
    assert out["mc_var"].shape == expected.shape
    assert expected_var.max() > 1e-6
    np.testing.assert_allclose(out["mc_var"], expected_var, rtol=1e-3, atol=1e-9)


def test_counterfactual_ate_is_seeded_and_close_to_the_truth(sim_screen, cpa):
    labels = ["P000", "P003", "P000+P001"]
    ctrl = np.flatnonzero(sim_screen.is_control & (cpa.split_values() == "train"))
    kw = {"control": sim_screen.control_labels, "cells": ctrl, "n_draws": 20, "gene_names": sim_screen.gene_names}
    a = counterfactual_ate(cpa, labels, seed=3, **kw)
    b = counterfactual_ate(cpa, labels, seed=3, **kw)
    pd.testing.assert_frame_equal(a.ate, b.ate)
    assert a.config["estimator"] == "counterfactual" and a.config["n_basal_cells"] == len(ctrl)
    assert (a.lo.to_numpy() <= a.ate.to_numpy() + 1e-12).all() and (a.hi.to_numpy() >= a.ate.to_numpy() - 1e-12).all()
    truth = sams_true_ate(sim_screen.adata, labels, n_cells=4000)
    r = np.corrcoef(truth.to_numpy().ravel(), a.ate.loc[truth.index].to_numpy().ravel())[0, 1]
    assert r > 0.8, r
    with pytest.raises(Exception, match="n_draws"):
        counterfactual_ate(cpa, labels, **{**kw, "n_draws": 1})


def test_true_ate_of_the_simulator_matches_a_large_simulated_data_ate():
    big = simulate_sams(
        seed=2, n_perturbations=3, n_latent=3, n_genes=20, n_cells_per_perturbation=(3000, 0, 0),
        n_control_cells=(3000, 0, 0),
    )  # fmt: skip
    screen = load_screen(big, warn=False)
    observed = data_ate(screen)
    truth = sams_true_ate(big, list(observed.columns), n_cells=20000)
    diff = np.abs(observed.to_numpy() - truth.loc[observed.index].to_numpy())
    assert diff.max() < 0.15, diff.max()  # sampling error of 3,000 cells per group
    assert np.corrcoef(observed.to_numpy().ravel(), truth.to_numpy().ravel())[0, 1] > 0.99


# ---------------------------------------------------------------- intervals, coverage
def test_posterior_interval_removes_the_monte_carlo_spread():
    rng = np.random.default_rng(0)
    post_sd, mc_sd, n = 1.0, 2.0, 4000
    draws = rng.normal(0, post_sd, (n, 50)) + rng.normal(0, mc_sd, (n, 50))
    mean, lo, hi = posterior_interval(draws, np.full((n, 50), mc_sd**2), interval=0.9)
    half = (hi - lo) / 2
    np.testing.assert_allclose(half.mean(), 1.645 * post_sd, rtol=0.05)
    _, lo_raw, hi_raw = posterior_interval(draws, None, interval=0.9)
    np.testing.assert_allclose(((hi_raw - lo_raw) / 2).mean(), 1.645 * np.hypot(post_sd, mc_sd), rtol=0.05)


def test_interval_coverage_on_a_known_case():
    idx = pd.Index([f"g{i}" for i in range(4)])
    truth = pd.DataFrame({"A": [0.0, 1.0, 2.0, 3.0], "B": [0.0, 0.0, 0.0, 0.0]}, index=idx)
    lo = pd.DataFrame({"A": [-1.0, 1.5, 1.0, 2.0], "B": [-1.0, 0.5, -1.0, -1.0]}, index=idx)
    hi = lo + 2.0
    out = interval_coverage(truth, lo, hi)
    # A: inside, outside (1 < 1.5), inside, inside; B: inside, outside, inside, inside
    assert out["coverage"] == pytest.approx(6 / 8)
    assert out["per_label"].to_dict() == {"A": 0.75, "B": 0.75}
    assert out["mean_width"] == pytest.approx(2.0)


# ---------------------------------------------------------------------- noise ceiling
def _ceiling_screen(effect: float, noise: float, seed: int = 0, n_genes: int = 30):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["control", "A", "B", "C"], 200)
    base = rng.uniform(5, 50, size=n_genes)
    shifts = {"control": 0.0, "A": 1.0, "B": -1.0, "C": 0.5}
    rows = []
    for lab in labels:
        mean = base * np.exp(effect * shifts[lab] * np.sign(np.arange(n_genes) % 3 - 1))
        rows.append(rng.poisson(rng.gamma(1 / noise**2, mean * noise**2)) if noise > 0 else np.round(mean))
    return sp.csr_matrix(np.asarray(rows, dtype=np.float32)), labels


def test_noise_ceiling_is_one_without_noise_and_near_zero_without_effects():
    counts, labels = _ceiling_screen(effect=1.0, noise=0.0)
    cells = np.ones(len(labels), dtype=bool)
    exact = noise_ceiling(counts, labels, control="control", cells=cells, top_n=5)
    assert exact["pearson"] == pytest.approx(1.0) and exact["pearson_top"] == pytest.approx(1.0)
    counts, labels = _ceiling_screen(effect=0.0, noise=0.5, n_genes=300)
    null = noise_ceiling(counts, labels, control="control", cells=cells, top_n=5, n_repeats=5)
    # the labels of one half share its control cells, so a single split's r is noisy
    assert abs(null["r_half"]) < 0.12 and null["pearson"] < 0.5
    counts, labels = _ceiling_screen(effect=0.3, noise=0.5)
    some = noise_ceiling(counts, labels, control="control", cells=cells, top_n=5, n_repeats=5)
    # Spearman–Brown by hand
    assert some["reliability"] == pytest.approx(2 * some["r_half"] / (1 + some["r_half"]))
    assert some["pearson"] == pytest.approx(np.sqrt(some["reliability"]))
    assert null["pearson"] < some["pearson"] < 1.0


# ------------------------------------------------------------------- honest scoring
def test_default_scoring_never_uses_a_cell_twice(sim_screen, cpa, monkeypatch):
    """Under a random cell split the test target uses test cells only, the baselines
    training cells only, the posterior estimator decodes training cells only and the
    counterfactual encodes training control cells."""
    seen: list[np.ndarray] = []
    real = evaluate_module.data_ate

    def spy(screen, *, cells=None, **kw):
        seen.append(np.zeros(screen.n_cells, bool) if cells is None else np.asarray(cells, dtype=bool))
        return real(screen, cells=cells, **kw)

    monkeypatch.setattr(evaluate_module, "data_ate", spy)
    encoded: list[np.ndarray] = []
    real_cf = type(cpa).get_counterfactual_effects

    def spy_cf(self, dosage, *, indices, **kw):
        encoded.append(np.asarray(indices))
        return real_cf(self, dosage, indices=indices, **kw)

    monkeypatch.setattr(type(cpa), "get_counterfactual_effects", spy_cf)
    decoded: list[np.ndarray] = []
    real_post = type(cpa).get_posterior_expression

    def spy_post(self, indices, **kw):
        decoded.append(np.asarray(indices))
        return real_post(self, indices, **kw)

    monkeypatch.setattr(type(cpa), "get_posterior_expression", spy_post)
    ev = compute_ate_evaluation(sim_screen, cpa, n_draws=5, iwelbo_samples=5, ceiling=False)
    split = cpa.split_values()
    every = np.concatenate(decoded)
    assert len(decoded) > 1 and (split[every] == "train").all()  # one call per group of cells
    assert sim_screen.is_control[every].any() and not sim_screen.is_control[every].all()
    assert len(every) == len(np.unique(every))  # each cell decoded once
    compute_ate_evaluation(sim_screen, cpa, estimator="counterfactual", n_draws=5, iwelbo_samples=5, ceiling=False)
    test_target = next(c for c in seen if c.any() and (split[c] == "test").all())
    train_base = next(c for c in seen if c.any() and (split[c] == "train").all())
    assert not (test_target & train_base).any()
    assert (split[encoded[0]] == "train").all() and sim_screen.is_control[encoded[0]].all()
    assert ev.config["target_split"] == "test" and "test cells" in ev.config["target"]
    # the table, the key and the summary use the same target
    expected = real(sim_screen, cells=test_target)
    pd.testing.assert_frame_equal(ev.data_ate, expected[ev.data_ate.columns], check_exact=False)
    assert ev.per_perturbation["n_target_cells"].max() == 20


def test_ceiling_and_expected_train_average_are_reported(sim_screen, cpa):
    ev = compute_ate_evaluation(sim_screen, cpa, n_draws=5, iwelbo_samples=5)
    # the training-cell average: each seen label's own training effect
    train_ate = data_ate(sim_screen, cells=cpa.split_values() == "train")
    combo = next(c for c in ev.data_ate.columns if "+" in c)
    np.testing.assert_allclose(ev.baselines["average"][combo], train_ate[combo], atol=1e-12)
    s = ev.summary
    # the ceiling is noise_ceiling of the shown target: the test cells (seed 0, top 20 genes)
    test_cells = cpa.split_values() == "test"
    kw = {"control": sim_screen.control_labels, "top_n": 20, "seed": 0}
    ceil = noise_ceiling(sim_screen.counts, sim_screen.labels, cells=test_cells, **kw)
    assert s.loc["ceiling_pearson", "test"] == pytest.approx(ceil["pearson"], rel=1e-12)
    assert s.loc["ceiling_pearson_top", "test"] == pytest.approx(ceil["pearson_top"], rel=1e-12)
    # the training-cell average's expected r: sqrt(reliability of train x reliability of test)
    train_ceil = noise_ceiling(sim_screen.counts, sim_screen.labels, cells=cpa.split_values() == "train", **kw)
    expected = np.sqrt(train_ceil["reliability"] * ceil["reliability"])
    assert s.loc["expected_train_average_pearson", "test"] == pytest.approx(expected, rel=1e-12)
    # expected = ceiling x sqrt(reliability of train) < ceiling (the training ATE is noisy
    # too); both near 0.99 here, where the simulated effects are strong (measured 0.986, 0.990)
    assert 0.9 < s.loc["expected_train_average_pearson", "test"] < s.loc["ceiling_pearson", "test"] < 1
    assert np.isnan(s.loc["ceiling_pearson", "train"])
    # the paper's protocol stays available
    paper = compute_ate_evaluation(
        sim_screen, cpa, data_cells="all", estimator="prior", n_particles=50, n_groups=5, iwelbo_samples=5
    )
    assert paper.config["model_ate_estimator"] == "prior" and paper.config["target_split"] == "all"
    assert paper.data_ate.shape[1] == len(paper.per_perturbation)


# ----------------------------------------------------------------------- sVAE ATEs
def test_svae_has_ates_through_its_learned_shifts(sim_screen):
    from cellpert.data import read_split

    read_split(sim_screen, "cellpert_split")
    adata = prepare_anndata(sim_screen)
    prepare_labels(sim_screen)
    assert adata is sim_screen.adata
    SVAE.setup_anndata(adata, layer=sim_screen.layer, split_key="cellpert_split")
    model = SVAE(adata, n_latent=3, n_hidden=16, sparsity_weight=0.1)
    model.train(max_epochs=3, n_epochs_kl_warmup=None, enable_model_summary=False)
    # every label is its own column; an unseen combination is the sum of its parts
    assert set(model.perturbation_names) == set(sim_screen.labels[~sim_screen.is_control])
    seen = next(lab for lab in model.perturbation_names if "+" in lab)
    unseen = next(f"P00{a}+P00{b}" for a in range(5) for b in range(a + 1, 5) if f"P00{a}+P00{b}" not in model.labels)
    rows = model.dosage_from_labels(["P000", seen, unseen, "control"], control=sim_screen.control_labels)
    assert rows.sum(1).tolist() == [1.0, 1.0, 2.0, 0.0]
    ev = compute_ate_evaluation(sim_screen, model, estimator="posterior", n_draws=4, iwelbo_samples=5)
    assert ev.config["model_ate_estimator"] == "posterior"  # sVAE has the posterior estimator too
    cf_ev = compute_ate_evaluation(sim_screen, model, estimator="counterfactual", n_draws=4, iwelbo_samples=5)
    assert cf_ev.config["model_ate_estimator"] == "counterfactual"
    # the ATEs move through the learned shifts: a copy whose shifts are zeroed predicts no
    # effect at all (each draw's effect is exactly 0 on rho), the trained model does not
    ctrl = np.flatnonzero(sim_screen.is_control)[:20]
    kw = {"indices": ctrl, "n_draws": 2, "transform": "rho", "basal": "mean", "seed": 0}
    effects = model.get_counterfactual_effects(rows, **kw)["effects"]  # rows: P000, seen, unseen, control
    assert np.abs(effects[:, :3]).max() > 0 and np.all(effects[:, 3] == 0.0)
    still = copy.deepcopy(model)
    with torch.no_grad():
        still.module.shift_mean.zero_()
    np.testing.assert_array_equal(still.get_counterfactual_effects(rows, **kw)["effects"], 0.0)
    # the scores are ate_metrics of that table against the test cells' data ATE
    _, by_hand = ate_metrics(ev.data_ate, ev.model_ate.ate, top_n=20)
    assert ev.summary.loc["model_pearson", "test"] == pytest.approx(by_hand["pearson"], rel=1e-12)
    prior = compute_ate_evaluation(sim_screen, model, estimator="prior", n_particles=20, n_groups=4, iwelbo_samples=5)
    _, by_hand = ate_metrics(prior.data_ate, prior.model_ate.ate, top_n=20)
    assert prior.summary.loc["model_pearson", "test"] == pytest.approx(by_hand["pearson"], rel=1e-12)


# ------------------------------------------------------------------ early stopping
def test_training_stops_early_and_records_its_timing(sim_screen):
    adata = _setup(sim_screen, SAMSVAE)
    model = SAMSVAE(adata, guide="mean_field", n_latent=3, n_hidden=8, seed=0)
    start = time.perf_counter()
    model.train(max_steps=3000, lr=5e-2, batch_size=256, early_stopping_patience=3, enable_model_summary=False)
    outer = time.perf_counter() - start
    summary = model.training_summary_
    assert summary["stopped_early"] and summary["steps"] < 3000
    # the recorded time is the fit's own, inside the time measured around train(); the rate
    # is steps / time (both rounded to 3 decimals: the tolerance is that rounding)
    assert 0 < summary["wall_time_s"] <= outer + 1e-3
    assert summary["steps_per_s"] == pytest.approx(summary["steps"] / summary["wall_time_s"], rel=2e-3)
    assert summary["best_step"] <= summary["steps"]
    assert DOSAGE_KEY == "dosage"


def test_calibrated_interval_reaches_its_level_on_the_truth():
    """A model whose intervals are 4x too narrow: calibration on a noisy held-out target
    (noise accounted for) restores about 90% coverage of the truth."""
    from cellpert.evaluate import ModelATE, calibrate_interval

    rng = np.random.default_rng(0)
    shape = (400, 30)
    idx, cols = pd.Index([f"g{i}" for i in range(shape[0])]), pd.Index([f"L{j}" for j in range(shape[1])])
    truth = rng.normal(0, 1, shape)
    err_sd = rng.uniform(0.1, 0.3, shape)
    ate = truth + rng.normal(0, err_sd)
    half = 1.645 * err_sd / 4  # over-confident
    frame = lambda a: pd.DataFrame(a, index=idx, columns=cols)  # noqa: E731
    pred = ModelATE(ate=frame(ate), lo=frame(ate - half), hi=frame(ate + half), config={"interval": 0.9})
    se = np.full(shape, 0.2)
    val = truth + rng.normal(0, se)
    cal, info = calibrate_interval(pred, frame(val), frame(se))
    assert info["coverage_before"] < 0.8 and info["coverage_after"] == pytest.approx(0.9, abs=0.01)
    assert info["factor"] == pytest.approx(4.0, rel=0.15)
    after = interval_coverage(frame(truth), cal.lo, cal.hi)["coverage"]
    before = interval_coverage(frame(truth), pred.lo, pred.hi)["coverage"]
    assert before < 0.45 and 0.85 < after < 0.95


def test_data_ate_standard_error_by_hand(sim_screen):
    ate = data_ate(sim_screen, standard_error=True)
    se = ate.attrs["standard_error"]
    from cellpert.evaluate import perturbseq_transform

    y = np.asarray(perturbseq_transform(sim_screen.counts).todense())
    a = y[sim_screen.labels == "P001"]
    c = y[sim_screen.is_control]
    expected = np.sqrt(a.var(0, ddof=1) / len(a) + c.var(0, ddof=1) / len(c))
    np.testing.assert_allclose(se["P001"].to_numpy(), expected, rtol=1e-8)


def test_evaluate_ate_runs_on_an_svae_run(svae_run, tmp_path):
    """The failure of the issue: `evaluate-ate` on an sVAE run directory (conftest.svae_run,
    a `cellpert train -m svae` run on a sparse-shift screen)."""
    import anndata as ad

    from cellpert.runs import evaluate_ate

    path = tmp_path / "s.h5ad"
    shutil.copy(svae_run.path, path)  # evaluate-ate writes into the screen: never the shared one
    ev = evaluate_ate(path, model_dir=svae_run.run_dir, n_draws=4, iwelbo_samples=5)
    assert ev.key == "svae"
    back = ad.read_h5ad(path)
    assert {"ate_svae", "ate_svae_lo", "ate_svae_hi", "ate_svae_cal_lo"} <= set(back.varm)
    # what was written is what was computed: the ATE table and the summary round-trip
    np.testing.assert_allclose(back.varm["ate_svae"].loc[ev.model_ate.ate.index, ev.model_ate.ate.columns], ev.model_ate.ate)
    stored = back.uns["cellpert"]["ate_metrics"]["svae"]["summary"]
    for split in ("train", "test", "all"):
        assert stored.loc["model_pearson", split] == pytest.approx(ev.summary.loc["model_pearson", split], rel=1e-12)
    # and the summary is ate_metrics of the ATE table against all cells' data ATE
    _, by_hand = ate_metrics(data_ate(load_screen(path, warn=False)), ev.model_ate.ate, top_n=20)
    assert ev.summary.loc["model_pearson", "all"] == pytest.approx(by_hand["pearson"], rel=1e-9)
    assert (svae_run.run_dir / "training.json").is_file()


@pytest.mark.slow
def test_samsvae_on_its_simulator_against_the_truth_and_the_baselines():
    """With the defaults (combined estimator, early stopping, mask-logit lr), SAMS-VAE's
    ATE recovers the simulator's true ATE better than every baseline, each label's own
    training-cell average included (r and squared error), and its recalibrated intervals
    cover the truth at close to their level; the counterfactual's empirical latent shift
    does better than the model's own shift. The posterior estimate alone does *not* beat
    the training-cell average (truth r 0.9914 vs 0.9918 at seed 0): its error (the model's)
    and the average's (count noise) are of a size and partly independent, which is why
    their combination beats both. The test pins that gap so that a change shows."""
    from cellpert.data import read_split
    from cellpert.evaluate import ate_metrics

    adata = simulate_sams(seed=0, n_perturbations=30, n_latent=8, n_combinations=6)
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    ad2 = prepare_anndata(screen)
    SAMSVAE.setup_anndata(ad2)
    model = SAMSVAE(ad2, n_latent=8, seed=0)
    model.train(max_steps=8000, lr=3e-3, batch_size=256, enable_model_summary=False)
    assert model.training_summary_["stopped_early"]
    ev = compute_ate_evaluation(screen, model, iwelbo_samples=10)
    assert ev.config["model_ate_estimator"] == "combined"
    s = ev.summary["test"]
    assert s["model_pearson"] > s["additive_pearson"] and s["model_r2"] > s["additive_r2"]
    truth = sams_true_ate(screen.adata, list(ev.data_ate.columns), n_cells=20000)
    truth.index = screen.gene_names

    def mse(frame):
        return float(((frame[truth.columns] - truth) ** 2).to_numpy().mean())

    vs = {name: ate_metrics(truth, frame)[1] for name, frame in {"model": ev.model_ate.ate, **ev.baselines}.items()}
    assert vs["model"]["pearson"] > vs["additive"]["pearson"] + 0.01
    assert vs["model"]["r2"] > vs["additive"]["r2"] and vs["model"]["r2"] > vs["mean"]["r2"]
    # the default beats each label's own training-cell average against the truth
    assert vs["model"]["pearson"] > vs["average"]["pearson"] + 0.0005, (vs["model"], vs["average"])
    assert mse(ev.model_ate.ate) < 0.95 * mse(ev.baselines["average"])
    assert 0.2 < ev.config["model_ate_combined"]["weight"] < 0.9
    post = compute_ate_evaluation(screen, model, iwelbo_samples=2, ceiling=False, estimator="posterior")
    post_vs = ate_metrics(truth, post.model_ate.ate)[1]
    gap = vs["average"]["pearson"] - post_vs["pearson"]
    assert 0.0 < gap < 0.01, gap
    cf = compute_ate_evaluation(screen, model, iwelbo_samples=2, ceiling=False, estimator="counterfactual")
    own = compute_ate_evaluation(screen, model, iwelbo_samples=2, ceiling=False, estimator="counterfactual",
                                 latent_shift="model")  # fmt: skip
    cf_vs, own_vs = (ate_metrics(truth, e.model_ate.ate)[1] for e in (cf, own))
    assert cf_vs["pearson"] > own_vs["pearson"] + 0.005 and cf_vs["r2"] > own_vs["r2"]
    assert abs(post_vs["pearson"] - cf_vs["pearson"]) < 0.003  # posterior and counterfactual alike here
    # the combined estimate's own 90% intervals (they carry the average's sampling error)
    # cover the truth at about their level (0.87 at seed 0; 0.869 +- 0.005 over 3 seeds);
    # recalibrated on the validation cells 0.80 (0.84 +- 0.07)
    raw = interval_coverage(truth, ev.model_ate.lo, ev.model_ate.hi)["coverage"]
    assert 0.8 < raw < 0.95, raw
    coverage = interval_coverage(truth, ev.model_ate_calibrated.lo, ev.model_ate_calibrated.hi)["coverage"]
    assert 0.75 < coverage < 0.97, coverage
    # the posterior estimate's alone are over-confident (0.70 at seed 0; the counterfactual's
    # 0.49 with the empirical shift, 0.24 with the model's: they leave out the decoder's
    # error), and the report says so; recalibrated they cover 0.87
    post_raw = interval_coverage(truth, post.model_ate.lo, post.model_ate.hi)["coverage"]
    assert 0.4 < post_raw < 0.8, post_raw
    # Known limitation (issue 12): the validation cells' check of those intervals has
    # little power when the validation noise dominates. With the model's shift it said
    # < 85% (flagged); with the empirical shift's wider intervals it said 89% while the truth
    # coverage was 51%. Pinned so that a fix of the check shows.
    before = cf.config["interval_calibration"]["coverage_before"]
    cf_raw = interval_coverage(truth, cf.model_ate.lo, cf.model_ate.hi)["coverage"]
    assert before > cf_raw + 0.2 and before > 0.85, before


# ------------------------------------------------ empirical latent shift (the default)
def _shift_model(screen, cls, **kw):
    read_split(screen, "cellpert_split")
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
def test_empirical_shift_is_the_difference_of_mean_latent_positions(sim_screen, cls):
    """point = mean position of the label's cells − mean position of the controls, with the
    positions computed here from the module; a combination without cells sums its parts'."""
    screen = sim_screen
    model = _shift_model(screen, cls, **({"guide": "mean_field"} if cls is SAMSVAE else {}))
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


def test_counterfactual_with_given_shifts_matches_a_direct_computation(sim_screen):
    """shifts replace D (E ⊙ M): every draw's effect is the cells' average of
    log2(1e4 ρ(z^b + s_p) + 1) − log2(1e4 ρ(z^b) + 1)."""
    screen = sim_screen
    model = _shift_model(screen, CPAVAE)
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


def test_empirical_shift_recovers_a_shift_the_model_misses(sim_screen):
    """A model whose own shifts are zero (untrained embeddings set to 0) still predicts the
    effects with the empirical shift, and the default evaluation uses it."""
    screen = sim_screen
    model = _shift_model(screen, CPAVAE)
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
    ev = compute_ate_evaluation(screen, model, estimator="counterfactual", n_draws=10, ceiling=False, iwelbo_samples=2)
    assert ev.config["model_ate_latent_shift"] == "empirical"
    assert ev.summary["test"]["model_pearson"] > 0.5
    with pytest.raises(Exception, match="latent_shift"):
        compute_ate_evaluation(screen, model, latent_shift="mean")


def test_svae_has_latent_positions(sim_screen):
    """sVAE's positions are q(z | x)'s means: the empirical shift of a label is the mean of
    its cells' minus the controls'."""
    screen = sim_screen
    model = _shift_model(screen, SVAE)
    cells = _train_cells(screen, model)
    out = model.get_empirical_shifts([[cells["P000"]]], control_cells=cells["control"], n_draws=5)
    m = model.module
    x = torch.as_tensor(screen.counts.toarray(), dtype=torch.float32)
    with torch.no_grad():
        qz = m.inference(x)["qz_m"].double().numpy()
    np.testing.assert_allclose(out["point"][0], qz[cells["P000"]].mean(0) - qz[cells["control"]].mean(0), atol=1e-5)



# ------------------------------------------------------------ posterior estimator
class _KnownValues:
    """A stand-in model whose posterior-predictive value of every cell is given."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)
        self.asked: list[int] = []
        self.calls: list[np.ndarray] = []

    def sample_posterior_globals(self, n_draws, *, seed):
        return None  # no global latents

    def get_posterior_expression(self, indices, *, n_draws, seed, global_draws):
        assert global_draws is None
        self.asked += list(np.asarray(indices))
        self.calls.append(np.asarray(indices))
        return self.values[np.asarray(indices)]


def test_posterior_ate_is_the_contrast_of_the_cells_values_by_hand():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(30, 4))
    model = _KnownValues(values)
    controls, a, b = np.arange(0, 10), np.arange(10, 18), np.arange(18, 30)
    out = posterior_ate(model, ["A", "B"], cells=controls, label_cells={"A": a, "B": b}, interval=0.9)
    for lab, rows in (("A", a), ("B", b)):
        diff = values[rows].mean(0) - values[controls].mean(0)
        se = np.sqrt(values[rows].var(0, ddof=1) / len(rows) + values[controls].var(0, ddof=1) / len(controls))
        np.testing.assert_allclose(out.ate[lab].to_numpy(), diff, rtol=1e-12)
        np.testing.assert_allclose((out.hi - out.lo)[lab].to_numpy(), 2 * 1.6448536 * se, rtol=1e-6)
    assert sorted(model.asked) == list(range(30))  # each cell decoded once
    assert out.config["estimator"] == "posterior" and out.config["n_counterfactual_labels"] == 0
    # a cap on the cells per group: each group is represented by max_cells of its cells
    capped_model = _KnownValues(values)
    capped = posterior_ate(capped_model, ["A", "B"], cells=controls, label_cells={"A": a, "B": b}, max_cells=5)
    assert [len(c) for c in capped_model.calls] == [5, 5, 5] and capped.config["n_decoded_cells"] == 15
    c_rows, a_rows, b_rows = (next(c for c in capped_model.calls if set(c) <= set(g)) for g in (controls, a, b))
    np.testing.assert_allclose(capped.ate["B"], values[b_rows].mean(0) - values[c_rows].mean(0), rtol=1e-12)
    np.testing.assert_allclose(capped.ate["A"], values[a_rows].mean(0) - values[c_rows].mean(0), rtol=1e-12)
    assert not (np.array_equal(b_rows, b[:5]) and np.array_equal(a_rows, a[:5]))  # drawn at random
    again = posterior_ate(_KnownValues(values), ["A", "B"], cells=controls, label_cells={"A": a, "B": b}, max_cells=5)
    pd.testing.assert_frame_equal(again.ate, capped.ate)  # seeded
    # by level: each level's own contrast, pooled with the weights
    levels = np.array(["x", "y"] * 15)
    w = pd.Series({"x": 3.0, "y": 1.0})
    pooled = posterior_ate(model, ["A", "B"], cells=controls, label_cells={"A": a, "B": b},
                           cell_levels=levels[controls], weights=w,
                           label_cell_levels={"A": levels[a], "B": levels[b]})  # fmt: skip
    for lab, rows in (("A", a), ("B", b)):
        within = {lv: values[rows[levels[rows] == lv]].mean(0) - values[controls[levels[controls] == lv]].mean(0)
                  for lv in ("x", "y")}  # fmt: skip
        np.testing.assert_allclose(pooled.per_level["x"].ate[lab].to_numpy(), within["x"], rtol=1e-12)
        np.testing.assert_allclose(pooled.ate[lab].to_numpy(), (3 * within["x"] + within["y"]) / 4, rtol=1e-12)


def test_posterior_expression_is_the_decoded_posterior(sim_screen):
    """get_posterior_expression("rho") is the mean over draws of log2(1e4 ρ(z) + 1), z
    from the cell's posterior (SAMS-VAE: globals and z^b under the cell's perturbation)."""
    screen = sim_screen
    model = _shift_model(screen, SAMSVAE, guide="mean_field")
    cells = np.flatnonzero(screen.labels == "P001")[:12]
    got = model.get_posterior_expression(cells, n_draws=400, transform="rho", seed=3)
    m = model.module
    x = torch.as_tensor(screen.counts[cells].toarray(), dtype=torch.float32)
    d = torch.as_tensor(model.dosage_from_labels(list(screen.labels[cells])), dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        draws = torch.log2(1e4 * m.posterior_rho(x, d, n_draws=400) + 1).double().numpy()
    assert draws.shape == (400, *got.shape)
    mc = draws.std(0) / np.sqrt(400)
    assert np.all(np.abs(got - draws.mean(0)) < 5 * np.sqrt(2) * mc + 1e-9)
    # the posterior depends on the cell: two cells' values differ
    assert np.abs(got[0] - got[1]).max() > 1e-3
    # perturbseq values: counts drawn at each cell's depth; their mean is near the rho one at high depth
    ps = model.get_posterior_expression(cells, n_draws=50, seed=3)
    assert ps.shape == got.shape and np.isfinite(ps).all()


def test_posterior_ate_falls_back_to_the_counterfactual_without_cells(sim_screen, cpa):
    """A combination without training cells gets the counterfactual estimate (its parts'
    empirical shifts); the seen labels their cells' contrast; the default evaluation uses it."""
    screen = sim_screen
    model = cpa
    train = model.split_values() == "train"
    cells = {lab: np.flatnonzero(train & (screen.labels == lab)) for lab in np.unique(screen.labels[train])}
    combo = next(c for c in pd.unique(screen.labels) if "+" in c)
    cells.pop(combo, None)
    kw = {"cells": cells["control"], "label_cells": cells, "n_draws": 8, "seed": 2, "gene_names": screen.gene_names}
    post = posterior_ate(model, ["P000", combo], **kw)
    cf = counterfactual_ate(model, [combo], **kw)
    np.testing.assert_allclose(post.ate[combo].to_numpy(), cf.ate[combo].to_numpy(), rtol=1e-6, atol=1e-9)
    assert post.config["n_counterfactual_labels"] == 1
    truth = sams_true_ate(screen.adata, ["P000", "P001", "P002"], n_cells=4000)
    seen = posterior_ate(model, ["P000", "P001", "P002"], **kw)
    _, met = ate_metrics(truth, seen.ate.loc[truth.index], top_n=10)
    assert met["pearson"] > 0.8, met
    # the default combines that posterior estimate with the training-cell average
    ev = compute_ate_evaluation(screen, model, n_draws=5, ceiling=False, iwelbo_samples=2)
    assert ev.config["model_ate_estimator"] == "combined"
    post_ev = compute_ate_evaluation(screen, model, estimator="posterior", n_draws=5, ceiling=False, iwelbo_samples=2)
    w = ev.config["model_ate_combined"]["weight"]
    assert 0.0 <= w <= 1.0 and ev.config["model_ate_combined"]["fitted_on_labels"] > 0
    expected = w * ev.baselines["average"]["P000"] + (1 - w) * post_ev.model_ate.ate["P000"]
    np.testing.assert_allclose(ev.model_ate.ate["P000"], expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(Exception, match="estimator must be one of"):
        compute_ate_evaluation(screen, model, estimator="mean")


# ------------------------------------------------------------- combined estimator
def _frames(values: dict[str, np.ndarray], genes: int = 6) -> pd.DataFrame:
    return pd.DataFrame(values, index=[f"g{i}" for i in range(genes)])


def test_combined_weight_is_the_least_squares_weight_on_the_held_out_target():
    """A held-out target that is exactly 0.3 x average + 0.7 x model gives w = 0.3 and that
    combination; the interval is w z se + (1 - w) h; w is clipped to [0, 1]; no target, or
    a label with fewer than 2 training cells, keeps the model's estimate."""
    rng = np.random.default_rng(0)
    m = _frames({"A": rng.normal(size=6), "B": rng.normal(size=6), "A+B": rng.normal(size=6)})
    a = _frames({"A": rng.normal(size=6), "B": rng.normal(size=6), "A+B": rng.normal(size=6)})
    pred = ModelATE(ate=m, lo=m - 0.2, hi=m + 0.2, config={"interval": 0.9})
    se = a * 0 + 0.1
    target = 0.3 * a[["A", "B"]] + 0.7 * m[["A", "B"]]
    out = combine_with_average(pred, a, target, average_se=se, min_cells={"A": 10, "B": 10, "A+B": 1})
    assert out.config["combined"]["weight"] == pytest.approx(0.3)
    assert out.config["combined"]["fitted_on_labels"] == 2
    np.testing.assert_allclose(out.ate[["A", "B"]], target, atol=1e-12)
    pd.testing.assert_series_equal(out.ate["A+B"], m["A+B"])  # 1 training cell: not combined
    z = 1.6448536269514722
    np.testing.assert_allclose((out.hi - out.ate)["A"], 0.3 * z * 0.1 + 0.7 * 0.2, atol=1e-12)
    beyond = combine_with_average(pred, a, a + 2 * (a - m), min_cells={"A": 10, "B": 10, "A+B": 10})
    assert beyond.config["combined"]["weight"] == 1.0
    np.testing.assert_allclose(beyond.ate, a, atol=1e-12)
    assert combine_with_average(pred, a, m).config["combined"]["weight"] == 0.0
    alone = combine_with_average(pred, a, None)
    assert alone.config["combined"]["weight"] == 0.0 and "no held-out cells" in alone.config["combined"]["how"]
    pd.testing.assert_frame_equal(alone.ate, m)


def test_combined_weight_is_fitted_on_validation_cells_never_on_test_cells(sim_screen, cpa):
    """Changing the test cells' counts changes the scores but not the weight; changing the
    validation cells' counts changes the weight."""
    split = cpa.split_values()
    X = sim_screen.adata.X
    original = X.copy()

    def weight() -> float:
        return compute_ate_evaluation(sim_screen, cpa, n_draws=4, ceiling=False, iwelbo_samples=2).config[
            "model_ate_combined"]["weight"]  # fmt: skip

    rng = np.random.default_rng(3)
    base = weight()
    try:
        for s, changes in (("test", False), ("val", True)):
            rows = np.flatnonzero((split == s) & ~sim_screen.is_control)
            dense = np.asarray(original[rows].todense() if sp.issparse(original) else original[rows])
            noisy = rng.poisson(dense * rng.uniform(0.2, 3.0, size=dense.shape[1])).astype(dense.dtype)
            if sp.issparse(X):
                lil = original.tolil()
                lil[rows] = noisy
                sim_screen.adata.X = lil.tocsr()
            else:
                sim_screen.adata.X = original.copy()
                sim_screen.adata.X[rows] = noisy
            assert (weight() != pytest.approx(base)) is changes, s
    finally:
        sim_screen.adata.X = original
