"""Covariates (issue 15): simulator batches, ATEs within levels, SAMS-VAE with covariates, CLI."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellpert._errors import CellpertInputError
from cellpert.data import covariate_spread, load_screen, read_split
from cellpert.data.simulate import sams_true_ate, simulate_sams
from cellpert.evaluate import (
    ate_from_counts,
    compute_ate_evaluation,
    counterfactual_ate,
    data_ate,
    level_weights,
    noise_ceiling,
    pool_frames,
    pooled_ate,
    write_ate_report,
    write_ate_results,
)
from cellpert.models import SAMSVAE, prepare_anndata
from cellpert_cli.main import run

SIM = dict(seed=0, n_perturbations=4, n_latent=3, n_cells_per_perturbation=(30, 8, 8), n_control_cells=(60, 15, 15), n_genes=25)


def _batched(**kw):
    return simulate_sams(**{**SIM, "n_batches": 2, "batch_effect": 1.0, "batch_imbalance": 0.8, **kw})


# ------------------------------------------------------------------- simulator
def test_simulator_without_batch_effect_is_the_screen_without_batches():
    plain = simulate_sams(**SIM)
    batched = _batched(batch_effect=0.0)
    assert (plain.X != batched.X).nnz == 0  # the batch stream leaves the other draws alone
    assert "batch" not in plain.obs and set(batched.obs["batch"].astype(str)) == {"b0", "b1"}


def test_simulator_spreads_perturbations_unevenly_and_controls_evenly():
    adata = _batched(batch_imbalance=1.0, n_cells_per_perturbation=(60, 10, 10), n_control_cells=(300, 50, 50))
    table = pd.crosstab(adata.obs["perturbation"], adata.obs["batch"])
    # imbalance 1: every cell of perturbation g in batch (g - 1) mod 2
    assert table.loc["P000", "b1"] == 0 and table.loc["P001", "b0"] == 0
    control_share = table.loc["control", "b0"] / table.loc["control"].sum()
    assert 0.4 < control_share < 0.6


@pytest.mark.parametrize("space", ["latent", "gene"])
def test_true_ate_depends_on_the_batch_and_pools_uniformly(space):
    adata = _batched(batch_effect=2.0, batch_space=space)
    per = [sams_true_ate(adata, ["P000"], n_cells=4000, seed=1, batch=b) for b in (0, 1)]
    pooled = sams_true_ate(adata, ["P000"], n_cells=8000, seed=1)
    assert np.abs(per[0] - per[1]).to_numpy().max() > 0.1  # the effect differs between batches
    # Monte Carlo error of each estimate is ~0.02 per gene: compare on average over genes
    assert np.abs(pooled.to_numpy() - (per[0] + per[1]).to_numpy() / 2).mean() < 0.04
    with pytest.raises(CellpertInputError, match="not a simulated batch"):
        sams_true_ate(adata, ["P000"], batch=5)


# --------------------------------------------------------------- ATE by level
def _toy_screen() -> tuple:
    """Two levels; in level a the effect of P is +1 count-space shift on gene 0, in b none."""
    rng = np.random.default_rng(0)
    n = 40
    x = rng.poisson(5.0, size=(4 * n, 3)).astype(np.float32)
    labels = np.repeat(["control", "P", "control", "P"], n)
    level = np.repeat(["a", "a", "b", "b"], n)
    x[n : 2 * n, 0] += 20  # P in level a
    obs = pd.DataFrame({"perturbation": labels, "line": level}, index=[f"c{i}" for i in range(4 * n)])
    screen = load_screen(ad.AnnData(X=x, obs=obs), perturbation_key="perturbation", control=["control"], warn=False)
    return screen, screen.adata.obs["line"].astype(str).to_numpy()


def test_pooled_ate_is_the_weighted_mean_of_the_within_level_ates():
    screen, levels = _toy_screen()
    weights = level_weights(levels, screen.is_control, "uniform")
    pooled = pooled_ate(lambda m: data_ate(screen, cells=m, standard_error=True), levels=levels, weights=weights,
                        cells=np.ones(screen.n_cells, bool), is_control=screen.is_control)  # fmt: skip
    by_hand = {lvl: data_ate(screen, cells=levels == lvl) for lvl in ("a", "b")}
    np.testing.assert_allclose(pooled.to_numpy(), (by_hand["a"] + by_hand["b"]).to_numpy() / 2)
    assert set(pooled.attrs["per_level"]) == {"a", "b"} and pooled.attrs["n_cells"]["P"] == 80
    se = {lvl: data_ate(screen, cells=levels == lvl, standard_error=True).attrs["standard_error"] for lvl in "ab"}
    np.testing.assert_allclose(pooled.attrs["standard_error"].to_numpy(),
                               np.sqrt((se["a"] ** 2 + se["b"] ** 2).to_numpy()) / 2)  # fmt: skip


def test_level_weights_and_pool_frames():
    levels = np.array(["a", "a", "a", "b", "c"])
    control = np.array([True, True, False, True, False])
    assert level_weights(levels, control, "control").to_dict() == {"a": 2.0, "b": 1.0, "c": 0.0}
    assert level_weights(levels, control, "uniform").to_dict() == {"a": 1.0, "b": 1.0, "c": 0.0}
    frames = {"a": pd.DataFrame({"P": [1.0], "Q": [4.0]}), "b": pd.DataFrame({"P": [4.0]})}
    out = pool_frames(frames, pd.Series({"a": 2.0, "b": 1.0}))
    assert out.loc[0, "P"] == pytest.approx(2.0) and out.loc[0, "Q"] == pytest.approx(4.0)  # Q only in a
    with pytest.raises(CellpertInputError, match="pool must be"):
        level_weights(levels, control, "median")


# ---------------------------------------------------------- SAMS with covariates
@pytest.fixture(scope="module")
def batched_model():
    adata = _batched()
    adata.obs["depth"] = np.log(np.asarray(adata.X.sum(1)).ravel())
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d1", "d2")
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    data = prepare_anndata(screen)
    SAMSVAE.setup_anndata(data, batch_key="batch", categorical_covariate_keys="donor", continuous_covariate_keys=["depth"])
    model = SAMSVAE(data, n_latent=3, n_hidden=16, guide_n_hidden=16, guide_n_layers=1, dispersion="gene-batch")
    model.train(max_steps=20, enable_progress_bar=False, batch_size=64)
    return screen, model


def test_covariates_enter_the_decoder_only_by_default(batched_model):
    _, model = batched_model
    m = model.module
    assert model.covariate_sizes == {"n_batch": 2, "n_cats_per_cov": [2], "n_continuous_cov": 1}
    assert m.covariates.n_output == 2 + 2 + 1
    assert [layer.in_features for layer in m.decoder.body.first.layers] == [3, 5]
    assert [layer.in_features for layer in m.encoder.first.layers] == [25, 3]
    assert tuple(m.decoder.log_theta.shape) == (2, 25)  # per-batch dispersion
    assert model.covariate_levels == {"batch": ["b0", "b1"], "donor": ["d1", "d2"]}


def test_a_model_without_covariates_keeps_its_parameters():
    adata = simulate_sams(**SIM)
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    data = prepare_anndata(screen)
    SAMSVAE.setup_anndata(data)
    model = SAMSVAE(data, n_latent=3, n_hidden=16, guide_n_hidden=16, guide_n_layers=1, seed=3)
    shapes = {k: tuple(v.shape) for k, v in model.module.state_dict().items()}
    assert not any("covariate" in k for k in shapes) and shapes["decoder.log_theta"] == (25,)
    assert [layer.in_features for layer in model.module.decoder.body.first.layers] == [3]
    assert model.covariate_sizes == {"n_batch": 0, "n_cats_per_cov": [], "n_continuous_cov": 0}


def test_the_counterfactual_effect_keeps_each_cells_covariates(batched_model):
    screen, model = batched_model
    controls = np.flatnonzero(screen.is_control)
    dosage = model.dosage_from_labels(["P000"])
    out = model.get_counterfactual_effects(dosage, indices=controls, n_draws=2, transform="rho", cells_per_draw=None)
    # by hand for draw 0: decode the control cells' basal means... (sample) with their own covariates
    with torch.inference_mode(), model._seeded(0):
        effect = model.module.sample_globals(2)["effect"]
        states, covs = [], []
        for t in model._eval_batches(None, controls, None):
            states.append(model._encode_basal(t, True))
            covs.append(model.module.covariates(t))
        zb, cov = torch.cat(states), torch.cat(covs)
        rho = model.module.counterfactual_rho(zb, torch.cat([torch.zeros_like(torch.as_tensor(dosage)), torch.as_tensor(dosage)]),
                                              effect[:1], covariates=cov)  # fmt: skip
        y = torch.log2(1e4 * rho + 1.0)
        expected = (y[0, 1] - y[0, 0]).double().mean(0).numpy()
    np.testing.assert_allclose(out["effects"][0, 0], expected, rtol=1e-5, atol=1e-6)


def test_counterfactual_by_level_pools_the_per_level_draws(batched_model):
    screen, model = batched_model
    controls = np.flatnonzero(screen.is_control)
    levels = screen.adata.obs["batch"].astype(str).to_numpy()
    weights = pd.Series({"b0": 3.0, "b1": 1.0})
    pooled = counterfactual_ate(model, ["P000", "P001"], cells=controls, n_draws=4, seed=2,
                                cell_levels=levels[controls], weights=weights)  # fmt: skip
    assert set(pooled.per_level) == {"b0", "b1"}
    by_hand = (3 * pooled.per_level["b0"].ate + pooled.per_level["b1"].ate) / 4
    np.testing.assert_allclose(pooled.ate.to_numpy(), by_hand.to_numpy(), rtol=1e-6, atol=1e-9)


def test_evaluation_by_level_writes_per_level_results(batched_model, tmp_path):
    screen, model = batched_model
    ev = compute_ate_evaluation(screen, model, n_draws=3, iwelbo_samples=3, level_key="batch", ceiling=False)
    assert list(ev.per_level.index) == ["b0", "b1"]
    assert {"model_pearson", "average_pearson", "weight"} <= set(ev.per_level.columns)
    assert "within each level of obs['batch']" in ev.config["target"]
    report = write_ate_report(ev, tmp_path / "r.html")
    assert "Per level of batch" in report.read_text()
    written = write_ate_results(screen.adata.copy(), ev)
    assert "varm/ate_model_level_b0" in written and "varm/ate_data_level_b1" in written
    with pytest.raises(CellpertInputError, match="counterfactual estimator"):
        compute_ate_evaluation(screen, model, estimator="prior", level_key="batch", ceiling=False)


def test_save_load_keeps_the_covariate_encodings_and_refuses_unseen_levels(batched_model, tmp_path):
    screen, model = batched_model
    model.save(str(tmp_path / "m"), overwrite=True)
    data = model.adata
    loaded = SAMSVAE.load(str(tmp_path / "m"), adata=data)
    assert loaded.covariate_levels == model.covariate_levels
    assert loaded.get_iwelbo(split="test", n_samples=4, seed=1) == pytest.approx(model.get_iwelbo(split="test", n_samples=4, seed=1))
    other = data.copy()
    other.obs["batch"] = other.obs["batch"].astype(str).replace({"b1": "b7"})
    with pytest.raises(CellpertInputError, match=r"obs\['batch'\] has level\(s\) b7"):
        SAMSVAE.load(str(tmp_path / "m"), adata=other)
    gone = data.copy()
    del gone.obs["donor"]
    with pytest.raises(CellpertInputError, match="lacks"):
        SAMSVAE.load(str(tmp_path / "m"), adata=gone)


def test_bad_covariate_columns_are_one_line_errors():
    adata = _batched()
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    data = prepare_anndata(screen)
    data.obs["depth"] = 1.0
    data.obs.iloc[3, data.obs.columns.get_loc("depth")] = np.nan
    data.obs["donor"] = pd.Series(["d1"] * data.n_obs, index=data.obs_names, dtype=object)
    data.obs.iloc[0, data.obs.columns.get_loc("donor")] = None
    with pytest.raises(CellpertInputError, match=r"obs\['donor'\] has 1 cell"):
        SAMSVAE.setup_anndata(data, categorical_covariate_keys=["donor"])
    with pytest.raises(CellpertInputError, match=r"continuous covariate obs\['depth'\] has 1"):
        SAMSVAE.setup_anndata(data, continuous_covariate_keys=["depth"])
    with pytest.raises(CellpertInputError, match="no covariate column 'lane'"):
        SAMSVAE.setup_anndata(data, batch_key="lane")
    with pytest.raises(CellpertInputError, match="given twice"):
        SAMSVAE.setup_anndata(data, batch_key="batch", categorical_covariate_keys=["batch"])


# ------------------------------------------------------------------------ CLI
def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_train_evaluate_inspect_with_a_batch(tmp_path, capsys):
    path = tmp_path / "s.h5ad"
    _batched().write_h5ad(path)
    assert run(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "covariate         obs['batch']: 2 levels" in out and "over 80% of their cells in one level" in out
    assert run(["train", str(path), "-m", "samsvae", "-o", str(tmp_path / "run"), "--n-latent", "3",
                "--max-steps", "10", "--batch-key", "batch", "--quiet"]) == 0  # fmt: skip
    assert run(["evaluate-ate", str(path), "-m", str(tmp_path / "run"), "--n-draws", "3", "--iwelbo-samples", "3",
                "--no-ceiling"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "within each level of obs['batch']" in out and "\nb0 " in out
    written = ad.read_h5ad(path)
    assert "ate_samsvae_level_b0" in written.varm and "per_level" in written.uns["cellpert"]["ate_metrics"]["samsvae"]
    # a screen with a batch the model never saw: one line, the file untouched
    written.obs["batch"] = written.obs["batch"].astype(str).replace({"b1": "b9"})
    other = tmp_path / "other.h5ad"
    written.write_h5ad(other)
    before = _sha(other)
    assert run(["evaluate-ate", str(other), "-m", str(tmp_path / "run"), "--n-draws", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: obs['batch'] has level(s) b9") and "Traceback" not in "\n".join(err)
    assert _sha(other) == before


def test_train_suggests_the_covariate_a_run_leaves_out(tmp_path, capsys):
    """A cell line / batch column with control cells in several levels, and no covariate
    given: `cellpert train` says once how to model it (on the McFaline subset the line
    covariate is what puts SAMS-VAE ahead of the training-cell average); given, or with
    nothing to compare within, it says nothing."""
    from cellpert.runs._train import covariate_hints

    screen = load_screen(_batched(), warn=False)
    (hint,) = covariate_hints(screen, {})
    assert hint.startswith("obs['batch'] has 2 levels with control cells") and "--covariate-keys batch" in hint
    assert covariate_hints(screen, {"batch_key": "batch"}) == []
    assert covariate_hints(screen, {"categorical_covariate_keys": ["batch"]}) == []
    assert covariate_hints(screen, {"background_key": "batch"}) == []  # the comparative model's data sets
    assert covariate_hints(load_screen(simulate_sams(**SIM), warn=False), {}) == []  # no such column
    one = _batched()
    one.obs["batch"] = one.obs["batch"].astype(str)
    one.obs.loc[(one.obs["perturbation"] == "control").to_numpy(), "batch"] = "b0"  # controls in one level only
    assert covariate_hints(load_screen(one, warn=False), {}) == []

    path = tmp_path / "s.h5ad"
    _batched().write_h5ad(path)
    args = ["train", str(path), "-m", "samsvae", "-o", str(tmp_path / "run"), "--n-latent", "3", "--max-steps", "2",
            "--quiet", "--overwrite"]  # fmt: skip
    assert run(args) == 0
    assert capsys.readouterr().err.count("train with --covariate-keys batch") == 1
    assert run([*args, "--batch-key", "batch"]) == 0
    assert "--covariate-keys" not in capsys.readouterr().err


def test_covariate_spread_flags_labels_in_one_level():
    adata = _batched(batch_imbalance=1.0)
    spread = covariate_spread(load_screen(adata, warn=False), "batch")
    assert spread["labels_in_one_level"] == ["P000", "P001", "P002", "P003"]
    assert spread["levels_without_control"] == [] and spread["max_share_median"] == 1.0


@pytest.mark.slow
def test_by_level_ates_recover_the_true_effect_with_or_without_the_covariate():
    """Batches that shift the cells, with 80% of each perturbation's cells in one batch,
    evaluated by batch. Before the estimators worked within levels, the batch covariate
    paid (benchmarks/RESULTS_covariates.md, 3 seeds: r 0.966 vs 0.923 with one shift over
    both batches). Now the posterior contrast and the counterfactual's shifts are taken
    within each batch, and both models recover the true effect as well as the within-batch
    training-cell average (measured at seed 0: 0.990 / 0.989 without the covariate,
    0.988 / 0.987 with it, average 0.988)."""
    adata = simulate_sams(seed=0, n_perturbations=12, n_latent=6, n_cells_per_perturbation=(100, 20, 20),
                          n_control_cells=(200, 40, 40), n_batches=2, batch_effect=1.5, batch_imbalance=0.8)  # fmt: skip
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    labels = list(data_ate(screen).columns)
    truth = sams_true_ate(screen.adata, labels, n_cells=10000, seed=0)
    truth.index = screen.gene_names

    def r(frame):
        return np.corrcoef(truth.to_numpy().ravel(), frame[labels].to_numpy().ravel())[0, 1]

    for setup in ({}, {"batch_key": "batch"}):
        data = prepare_anndata(screen)
        SAMSVAE.setup_anndata(data, **setup)
        model = SAMSVAE(data, n_latent=6, seed=0)
        model.train(max_steps=2000, lr=3e-3, batch_size=256, enable_progress_bar=False)
        for estimator in ("posterior", "counterfactual"):
            ev = compute_ate_evaluation(screen, model, n_draws=30, level_key="batch", pool="uniform", ceiling=False,
                                        iwelbo_samples=5, estimator=estimator)  # fmt: skip
            average = r(ev.baselines["average"])
            assert r(ev.model_ate.ate) > 0.98 and r(ev.model_ate.ate) > average - 0.005, (setup, estimator)


def _train_cells_by_label(screen, model):
    train = model.split_values() == "train"
    return {lab: np.flatnonzero(train & (screen.labels == lab)) for lab in np.unique(screen.labels[train])}


def test_empirical_shift_by_level_is_measured_within_each_level(batched_model):
    """With levels, each level's ATE is the estimator run on that level alone: its control
    cells, and each label's shift measured on the label's cells of that level."""
    screen, model = batched_model
    levels = screen.adata.obs["batch"].astype(str).to_numpy()
    cells = _train_cells_by_label(screen, model)
    controls = cells["control"]
    labels = ["P000", "P001", "P002+P003"]  # the combination has no cells: its parts' shifts
    weights = pd.Series({"b0": 1.0, "b1": 1.0})
    kw = {"n_draws": 6, "seed": 4, "transform": "rho"}
    pooled = counterfactual_ate(model, labels, cells=controls, cell_levels=levels[controls], weights=weights,
                                label_cells=cells, label_cell_levels={k: levels[v] for k, v in cells.items()}, **kw)  # fmt: skip
    assert pooled.config["shift_within_levels"]
    for lvl in ("b0", "b1"):
        own = {k: v[levels[v] == lvl] for k, v in cells.items()}
        alone = counterfactual_ate(model, labels, cells=own["control"], label_cells=own, **kw)
        np.testing.assert_allclose(pooled.per_level[lvl].ate.to_numpy(), alone.ate.to_numpy(), rtol=1e-5, atol=1e-6)
    # one shift over all levels (the former behaviour) is a different estimate here
    single = counterfactual_ate(model, labels, cells=controls, cell_levels=levels[controls], weights=weights,
                                label_cells=cells, **kw)  # fmt: skip
    assert not single.config["shift_within_levels"]
    assert np.abs(single.ate.to_numpy() - pooled.ate.to_numpy()).max() > 1e-3


def test_empirical_shift_falls_back_to_all_levels_where_a_label_has_no_cells(batched_model):
    """A label with fewer than 2 cells in a level keeps its shift over all levels there."""
    screen, model = batched_model
    levels = screen.adata.obs["batch"].astype(str).to_numpy()
    cells = _train_cells_by_label(screen, model)
    p0 = cells["P000"]
    cells["P000"] = p0[levels[p0] == "b0"]  # P000 only in b0
    controls = cells["control"]
    weights = pd.Series({"b0": 1.0, "b1": 1.0})
    kw = {"n_draws": 5, "seed": 1, "transform": "rho", "cell_levels": levels[controls], "weights": weights}
    within = counterfactual_ate(model, ["P000"], cells=controls, label_cells=cells,
                                label_cell_levels={k: levels[v] for k, v in cells.items()}, **kw)  # fmt: skip
    single = counterfactual_ate(model, ["P000"], cells=controls, label_cells=cells, **kw)
    # in b1 both use the shift over all levels; in b0 the within-level shift
    np.testing.assert_allclose(within.per_level["b1"].ate.to_numpy(), single.per_level["b1"].ate.to_numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(within.per_level["b0"].ate.to_numpy() - single.per_level["b0"].ate.to_numpy()).max() > 1e-3


def test_within_level_shift_removes_the_composition_of_the_levels():
    """Batches that shift the cells, 90% of each perturbation's cells in one batch, a model
    without the batch covariate: measured within batches, the shifts leave out where the
    batch put the cells, and the pooled ATE agrees with the true effect better."""
    adata = simulate_sams(seed=2, n_perturbations=6, n_latent=3, n_cells_per_perturbation=(60, 10, 10),
                          n_control_cells=(120, 20, 20), n_genes=30, n_batches=2, batch_effect=2.0,
                          batch_imbalance=0.9)  # fmt: skip
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    data = prepare_anndata(screen)
    SAMSVAE.setup_anndata(data)
    model = SAMSVAE(data, n_latent=3, n_hidden=32, guide_n_hidden=16, guide_n_layers=1, seed=0)
    model.train(max_steps=600, lr=1e-2, batch_size=256, enable_progress_bar=False, early_stopping=False)
    labels = [f"P00{i}" for i in range(6)]
    truth = sams_true_ate(screen.adata, labels, n_cells=4000, seed=0)
    truth.index = screen.gene_names
    levels = screen.adata.obs["batch"].astype(str).to_numpy()
    cells = _train_cells_by_label(screen, model)
    controls = cells["control"]
    kw = {"cells": controls, "n_draws": 10, "seed": 0, "label_cells": cells, "cell_levels": levels[controls],
          "weights": level_weights(levels, screen.is_control, "uniform"), "gene_names": screen.gene_names}  # fmt: skip
    within = counterfactual_ate(model, labels, label_cell_levels={k: levels[v] for k, v in cells.items()}, **kw)
    single = counterfactual_ate(model, labels, **kw)

    def r(pred):
        return np.corrcoef(truth[labels].to_numpy().ravel(), pred.ate.loc[truth.index, labels].to_numpy().ravel())[0, 1]

    # measured: 0.961 vs 0.798
    assert r(within) > r(single) + 0.05, (r(within), r(single))


def test_noise_ceiling_of_a_target_within_levels():
    """No perturbation effect, two levels that differ, labels spread over them unlike the
    controls: the naive target is reproducible (composition), the within-level one is noise."""
    rng = np.random.default_rng(0)
    n = 1200
    labels = rng.choice(["control", "A", "B"], size=n)
    share_a = np.where(labels == "A", 0.9, np.where(labels == "B", 0.1, 0.5))
    levels = np.where(rng.random(n) < share_a, "a", "b")
    mean = np.full((n, 200), 5.0)
    mean[levels == "b", :100] *= 4.0
    counts = sp.csr_matrix(rng.poisson(mean).astype(np.float32))
    is_control = labels == "control"
    weights = level_weights(levels, is_control, "control")
    cells = np.ones(n, dtype=bool)
    kw = {"control": "control", "cells": cells, "n_repeats": 3, "seed": 0}
    naive = noise_ceiling(counts, labels, **kw)

    def within(mask):
        return pooled_ate(lambda m: ate_from_counts(counts, labels, control="control", cells=m),
                          levels=levels, weights=weights, cells=mask, is_control=is_control)  # fmt: skip

    by_level = noise_ceiling(counts, labels, ate=within, **kw)
    assert naive["pearson"] > 0.9, naive
    assert by_level["reliability"] < 0.3 and by_level["pearson"] < naive["pearson"] - 0.3, by_level
