"""The simulators (MODELS.md §8) and the ``cellpert simulate`` commands."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from cellpert import CellpertInputError
from cellpert.data import load_screen, read_h5ad
from cellpert.data._splits import SPLIT_NAMES
from cellpert.data.simulate import (
    SIMULATORS,
    _common,
    simulate_comparative,
    simulate_sams,
    simulate_sparse_shift,
)
from cellpert.data.simulate._sams import _sample_pairs
from cellpert_cli._simulate import simulate_app

#: Small sizes for each simulator (fast, but enough cells for loose statistical checks).
SMALL = {
    "sparse-shift": dict(n_perturbations=12, n_latent=5, n_cells_per_perturbation=20, n_control_cells=20, n_genes=30, n_heldout=3),
    "sams": dict(n_perturbations=12, n_latent=5, n_cells_per_perturbation=(12, 4, 4), n_control_cells=(12, 4, 4), n_combinations=4, n_genes=30),
    "comparative": dict(n_background=100, n_target=100, n_genes=30),
}


def truth(adata: ad.AnnData) -> dict:
    return adata.uns["cellpert"]["ground_truth"]


def assert_same_tree(a, b, path="uns") -> None:
    """Recursive equality of nested dicts of arrays / scalars."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, np.ndarray) and a.dtype.kind in "OUS":
        assert [str(v) for v in np.ravel(a)] == [str(v) for v in np.ravel(b)], path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, np.asarray(b)), path
        assert a.dtype == np.asarray(b).dtype, path
    else:
        assert a == b, path


def logits_from_truth(adata: ad.AnnData, latent: np.ndarray) -> np.ndarray:
    """Recompute the decoder logits from the weights recorded in the ground truth."""
    dec = truth(adata)["decoder"]
    n_layers = sum(1 for k in dec if k.startswith("W"))
    h = np.asarray(latent, dtype=np.float64)
    for i in range(n_layers):
        h = h @ dec[f"W{i}"]
        if i < n_layers - 1:
            h = np.where(h > 0, h, dec["negative_slope"] * h)
    return (h - dec["center"]) / dec["scale"]


def softmax_means(adata: ad.AnnData, latent: np.ndarray) -> np.ndarray:
    logits = logits_from_truth(adata, latent)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return adata.obs["true_library_size"].to_numpy(np.float64)[:, None] * p


def pearson_dispersion(x: sp.csr_matrix, mu: np.ndarray) -> float:
    """Mean of (x - μ)² / μ: 1 for Poisson, 1 + mean(μ)/θ for NB(μ, θ)."""
    return float(np.mean((x.toarray() - mu) ** 2 / mu))


def group_mean(adata: ad.AnnData, key: str, label: str) -> np.ndarray:
    return adata.obsm[key][(adata.obs["perturbation"] == label).to_numpy()].mean(axis=0)


def assert_counts(adata: ad.AnnData) -> None:
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    data = adata.X.data
    assert (data > 0).all() and np.array_equal(data, np.round(data))


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", list(SIMULATORS))
def test_same_seed_same_arrays_other_seed_other_arrays(name):
    fn = SIMULATORS[name]
    a, b, c = fn(seed=3, **SMALL[name]), fn(seed=3, **SMALL[name]), fn(seed=4, **SMALL[name])
    for attr in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(a.X, attr), getattr(b.X, attr))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert set(a.obsm) == set(b.obsm)
    for key in a.obsm:
        assert np.array_equal(a.obsm[key], b.obsm[key])
    assert_same_tree(dict(a.uns), dict(b.uns))
    assert truth(a)["simulator"] == name and truth(a)["seed"] == 3
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0
    assert not np.array_equal(a.obsm["X_true_latent"], c.obsm["X_true_latent"])
    assert not np.array_equal(truth(a)["decoder"]["W0"], truth(c)["decoder"]["W0"])


# ------------------------------------------------------------------------- sparse shift
def test_sparse_shift_ground_truth_matches_latents_and_split():
    adata = simulate_sparse_shift(
        seed=1, n_perturbations=30, n_latent=6, n_cells_per_perturbation=150, n_control_cells=150,
        n_genes=20, n_heldout=8,
    )  # fmt: skip
    gt = truth(adata)
    effects, mask = gt["effects"], gt["mask"]
    names = list(gt["perturbation_names"])
    assert names == [f"P{t:03d}" for t in range(30)]
    assert effects.shape == (30, 6) and mask.dtype == np.int8
    assert np.array_equal(mask, (effects != 0).astype(np.int8))
    distinct = mask.sum(axis=1)
    assert distinct.min() >= 1 and distinct.max() <= 3
    assert (distinct <= gt["n_target_draws"]).all()
    nonzero = effects[effects != 0]
    assert (np.abs(nonzero) > 2.5).all() and (np.abs(nonzero) < 7.5).all()
    assert (nonzero > 0).any() and (nonzero < 0).any()
    # z ~ N(μ_a, I): group means within 6 standard errors of μ
    for t, name in enumerate(names):
        np.testing.assert_allclose(group_mean(adata, "X_true_latent", name), effects[t], atol=0.5)
    np.testing.assert_allclose(group_mean(adata, "X_true_latent", "control"), 0.0, atol=0.5)
    mu = np.vstack([np.zeros((1, 6)), effects])[adata.obs["perturbation"].cat.codes.to_numpy()]
    assert abs(np.std(adata.obsm["X_true_latent"] - mu) - 1.0) < 0.05
    # split: the last 8 perturbations are test, the others and controls train / val 80 / 20
    split = adata.obs["cellpert_split"]
    assert list(split.cat.categories) == list(SPLIT_NAMES)
    heldout = adata.obs["perturbation"].isin(names[-8:]).to_numpy()
    assert list(gt["heldout"]) == names[-8:]
    assert (split[heldout] == "test").all()
    assert set(split[~heldout]) == {"train", "val"}
    assert abs((split[~heldout] == "val").mean() - 0.2) < 0.01
    assert_counts(adata)


def test_sparse_shift_targets_are_drawn_with_replacement():
    adata = simulate_sparse_shift(
        seed=0, n_perturbations=3000, n_latent=15, n_cells_per_perturbation=1, n_control_cells=1,
        n_genes=3, n_heldout=0,
    )  # fmt: skip
    gt = truth(adata)
    draws, distinct = gt["n_target_draws"], gt["mask"].sum(axis=1)
    assert set(np.unique(draws)) == {1, 2, 3}
    assert (distinct[draws == 3] < 3).any()  # repeated draws collapse
    expected = np.mean([15 * (1 - (14 / 15) ** k) for k in (1, 2, 3)])  # 1.913
    assert abs(distinct.mean() - expected) < 0.06
    assert abs(distinct.mean() - 2.0) > 0.05


def test_sparse_shift_legacy_mode_normalises_over_cells():
    adata = simulate_sparse_shift(
        seed=2, mode="legacy", n_perturbations=10, n_latent=4, n_cells_per_perturbation=60,
        n_control_cells=60, n_genes=25, n_heldout=2,
    )  # fmt: skip
    assert_counts(adata)
    gene_totals = np.asarray(adata.X.sum(axis=0)).ravel()
    # each gene totals Poisson(1e6) counts: standard deviation 1000
    assert np.abs(gene_totals - 1e6).max() < 6000
    logits = logits_from_truth(adata, adata.obsm["X_true_latent"])
    mu = 1e6 * np.exp(logits) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(mu.sum(axis=1), adata.obs["true_library_size"], rtol=1e-4)
    assert abs(pearson_dispersion(adata.X, mu) - 1.0) < 0.05


def test_sparse_shift_nb_counts_follow_the_recorded_decoder():
    adata = simulate_sparse_shift(
        seed=5, n_perturbations=20, n_latent=5, n_cells_per_perturbation=100, n_control_cells=100,
        n_genes=40, library_size=5000, nb_theta=4.0, n_heldout=4,
    )  # fmt: skip
    assert_counts(adata)
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    assert abs(np.median(library) / 5000 - 1) < 0.06
    assert abs(np.median(adata.obs["true_library_size"]) / 5000 - 1) < 0.03
    assert abs(np.std(np.log(adata.obs["true_library_size"])) - 0.3) < 0.03
    mu = softmax_means(adata, adata.obsm["X_true_latent"])
    gene_totals = np.asarray(adata.X.sum(axis=0)).ravel()
    big = mu.sum(axis=0) > 5000
    assert big.sum() > 10
    np.testing.assert_allclose(gene_totals[big], mu.sum(axis=0)[big], rtol=0.08)
    # NB(μ, θ = 4): E[(x-μ)²/μ] = 1 + μ/θ
    expected = 1 + mu.mean() / 4.0
    assert abs(pearson_dispersion(adata.X, mu) / expected - 1) < 0.1
    # logits are divided by their global standard deviation (not centred)
    assert abs(np.std(logits_from_truth(adata, adata.obsm["X_true_latent"])) - 1) < 1e-9
    assert truth(adata)["decoder"]["center"].tolist() == [0.0]


# ---------------------------------------------------------------------------------- SAMS
def test_sams_latents_are_basal_plus_shift_and_combinations_add():
    adata = simulate_sams(
        seed=7, n_perturbations=25, n_latent=8, mask_prob=0.2, n_cells_per_perturbation=(40, 6, 4),
        n_control_cells=(30, 5, 5), n_combinations=10, n_genes=30,
    )  # fmt: skip
    gt = truth(adata)
    names, shift = list(gt["perturbation_names"]), gt["shift"]
    assert gt["mask"].dtype == np.int8 and (gt["mask"].sum(axis=1) >= 1).all()
    np.testing.assert_array_equal(shift, gt["mask"] * gt["effects"])
    nonzero = gt["effects"][gt["effects"] != 0]
    assert (np.abs(nonzero) > 2.5).all() and (nonzero > 0).any() and (nonzero < 0).any()
    # combinations: distinct pairs a < b, labels "Pa+Pb"
    parts, combos = gt["combination_parts"], list(gt["combinations"])
    assert parts.shape == (10, 2) and (parts[:, 0] < parts[:, 1]).all()
    assert len({tuple(p) for p in parts}) == 10
    assert combos == [f"{names[a]}+{names[b]}" for a, b in parts]
    # z = z^b + D (m ⊙ e), exactly, per cell
    row_shift = dict(zip(names, shift, strict=True)) | {"control": np.zeros(8)}
    row_shift |= {c: shift[a] + shift[b] for c, (a, b) in zip(combos, parts, strict=True)}
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    np.testing.assert_allclose(
        adata.obsm["X_true_latent"] - adata.obsm["X_true_basal"],
        np.stack([row_shift[lab] for lab in labels]), atol=1e-5,
    )  # fmt: skip
    # z^b ~ N(0, I): mean of z over a label ≈ its (summed) shift
    for label in ["control", names[0], names[-1], *combos[:3]]:
        np.testing.assert_allclose(group_mean(adata, "X_true_latent", label), row_shift[label], atol=0.7)
    assert abs(adata.obsm["X_true_basal"].std() - 1) < 0.05
    # split per label: exactly (train, val, test)
    table = pd.crosstab(adata.obs["perturbation"], adata.obs["cellpert_split"])
    assert (table.loc[names + combos, ["train", "val", "test"]].to_numpy() == [40, 6, 4]).all()
    assert table.loc["control", ["train", "val", "test"]].tolist() == [30, 5, 5]
    # counts: NB around the recorded decoder's means; logits standardised per gene
    assert_counts(adata)
    logits = logits_from_truth(adata, adata.obsm["X_true_latent"])
    np.testing.assert_allclose(logits.mean(axis=0), 0, atol=1e-8)
    np.testing.assert_allclose(logits.std(axis=0), 1, atol=1e-8)
    mu = softmax_means(adata, adata.obsm["X_true_latent"])
    expected = 1 + mu.mean() / 10.0
    assert abs(pearson_dispersion(adata.X, mu) / expected - 1) < 0.1


def test_sams_mask_density_matches_mask_prob():
    p, k = 2 / 15, 15
    adata = simulate_sams(
        seed=0, n_perturbations=500, n_latent=k, mask_prob=p, n_cells_per_perturbation=(1, 0, 0),
        n_control_cells=(1, 0, 0), n_genes=3,
    )  # fmt: skip
    mask = truth(adata)["mask"]
    # Bernoulli(p), plus one forced dimension in the rows that came out empty
    expected = p + (1 - p) ** k / k
    assert abs(mask.mean() - expected) < 0.015
    assert (mask.sum(axis=1) >= 1).all() and (mask.sum(axis=1) == 1).any()


def test_sample_pairs_decodes_every_pair_once():
    pairs = _sample_pairs(np.random.default_rng(0), 9, 36)
    assert sorted(map(tuple, pairs.tolist())) == [(a, b) for a in range(9) for b in range(a + 1, 9)]
    big = _sample_pairs(np.random.default_rng(1), 20_000, 200)
    assert (big[:, 0] < big[:, 1]).all() and big.max() < 20_000 and len({tuple(p) for p in big}) == 200


# --------------------------------------------------------------------------- comparative
@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_comparative_background_has_no_salient_latent(likelihood):
    adata = simulate_comparative(
        seed=11, n_background=400, n_target=300, n_background_latent=3, n_salient_latent=2,
        n_genes=25, likelihood=likelihood, nb_theta=5.0,
    )  # fmt: skip
    background = (adata.obs["perturbation"] == "control").to_numpy()
    assert background.sum() == 400 and (adata.obs["perturbation"][~background] == "target").all()
    z, t = adata.obsm["X_true_background"], adata.obsm["X_true_salient"]
    assert z.shape == (700, 3) and t.shape == (700, 2)
    assert (t[background] == 0).all() and (t[~background] != 0).all()
    assert abs(t[~background].std() - 1) < 0.1 and abs(z.std() - 1) < 0.1
    np.testing.assert_array_equal(adata.obsm["X_true_latent"], np.hstack([z, t]))
    counts = adata.obs["cellpert_split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"], counts["unused"]) == (560, 70, 70, 0)
    assert_counts(adata)
    mu = softmax_means(adata, adata.obsm["X_true_latent"])
    expected = 1.0 if likelihood == "poisson" else 1 + mu.mean() / 5.0
    assert abs(pearson_dispersion(adata.X, mu) / expected - 1) < 0.1


# ------------------------------------------------------------------------- file layout
@pytest.mark.parametrize("name", list(SIMULATORS))
def test_round_trip_through_h5ad_and_load_screen(name, tmp_path):
    adata = SIMULATORS[name](seed=0, **SMALL[name])
    assert adata.obs_names[0] == "cell000000" and adata.var_names[0] == "gene0000"
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    back = read_h5ad(path)
    assert_same_tree(dict(adata.uns), dict(back.uns))
    screen = load_screen(back)
    gt_names = [str(n) for n in truth(back)["perturbation_names"]]
    assert screen.perturbation_names == sorted(gt_names) == gt_names
    assert screen.control_labels == ["control"]
    assert screen.perturbation_key == "perturbation"
    n_control = int((adata.obs["perturbation"] == "control").sum())
    assert int(screen.is_control.sum()) == n_control
    assert len(screen.combination_labels) == len(truth(back).get("combinations", []))
    assert list(back.obs["cellpert_split"].cat.categories) == list(SPLIT_NAMES)
    for key in adata.obsm:
        np.testing.assert_array_equal(adata.obsm[key], back.obsm[key])


def test_sams_without_combinations_round_trips(tmp_path):
    adata = simulate_sams(seed=0, n_perturbations=5, n_cells_per_perturbation=(10, 1, 1), n_genes=10)
    adata.write_h5ad(tmp_path / "s.h5ad")
    screen = load_screen(ad.read_h5ad(tmp_path / "s.h5ad"))
    assert screen.combination_labels == [] and screen.n_perturbations == 5


def test_counts_are_sampled_in_row_blocks(monkeypatch):
    kwargs = dict(seed=0, mode="legacy", n_perturbations=10, n_latent=4, n_cells_per_perturbation=50, n_control_cells=50, n_genes=40, n_heldout=2)
    whole = simulate_sparse_shift(**kwargs)
    shapes = []
    draw = _common._draw

    def spy(rng, mean, likelihood, theta):
        shapes.append(mean.shape)
        return draw(rng, mean, likelihood, theta)

    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 25 * 40)
    monkeypatch.setattr(_common, "_draw", spy)
    chunked = simulate_sparse_shift(**kwargs)
    assert len(shapes) == 22 and max(s[0] for s in shapes) == 25
    np.testing.assert_array_equal(whole.obsm["X_true_latent"], chunked.obsm["X_true_latent"])
    # streamed standardisation and per-gene totals equal the one-block ones
    np.testing.assert_allclose(truth(chunked)["decoder"]["scale"], truth(whole)["decoder"]["scale"], rtol=1e-12)
    np.testing.assert_allclose(chunked.obs["true_library_size"], whole.obs["true_library_size"], rtol=1e-5)
    assert np.abs(np.asarray(chunked.X.sum(axis=0)).ravel() - 1e6).max() < 6000
    assert chunked.X.format == "csr" and chunked.X.shape == (550, 40)


def test_names_are_zero_padded_so_sorting_keeps_order():
    assert _common.perturbation_names(3) == ["P000", "P001", "P002"]
    names = _common.perturbation_names(1001)
    assert names[0] == "P0000" and sorted(names) == names


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("fn", "kwargs", "flag"),
    [
        (simulate_sparse_shift, {"n_latent": 0}, "--n-latent"),
        (simulate_sparse_shift, {"n_heldout": 101}, "--n-heldout"),
        (simulate_sparse_shift, {"mode": "zinb"}, "--mode"),
        (simulate_sparse_shift, {"nb_theta": 0.0}, "--nb-theta"),
        (simulate_sparse_shift, {"seed": -1}, "--seed"),
        (simulate_sams, {"mask_prob": 1.0}, "--mask-prob"),
        (simulate_sams, {"mask_prob": 0.0}, "--mask-prob"),
        (simulate_sams, {"n_perturbations": 3, "n_combinations": 4}, "--n-combinations"),
        (simulate_sams, {"n_cells_per_perturbation": (5, 1)}, "--n-cells-per-perturbation"),
        (simulate_sams, {"n_control_cells": (0, 0, 0)}, "--n-control-cells"),
        (simulate_comparative, {"likelihood": "zinb"}, "--likelihood"),
        (simulate_comparative, {"n_salient_latent": 0}, "--n-salient-latent"),
        (simulate_comparative, {"library_size": -5}, "--library-size"),
    ],
)
def test_bad_arguments_raise_one_line_errors(fn, kwargs, flag):
    with pytest.raises(CellpertInputError) as err:
        fn(**kwargs)
    assert flag in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------- CLI
CLI_ARGS = {
    "sparse-shift": ["--n-perturbations", "6", "--n-latent", "3", "--n-cells-per-perturbation", "12", "--n-control-cells", "12", "--n-genes", "17", "--n-heldout", "2", "--mode", "legacy"],
    "sams": ["--n-perturbations", "6", "--n-latent", "4", "--mask-prob", "0.3", "--n-cells-per-perturbation", "10", "2", "1", "--n-control-cells", "10", "3", "2", "--n-combinations", "3", "--n-genes", "17", "--decoder-hidden", "8", "--decoder-hidden", "9"],
    "comparative": ["--n-background", "40", "--n-target", "30", "--n-background-latent", "3", "--n-salient-latent", "2", "--n-genes", "17", "--likelihood", "poisson", "--decoder-hidden", "7"],
}


@pytest.mark.parametrize("name", list(SIMULATORS))
def test_cli_writes_the_simulated_screen(name, tmp_path):
    out = tmp_path / "sim.h5ad"
    result = CliRunner().invoke(simulate_app, [name, "-o", str(out), "--seed", "5", *CLI_ARGS[name]])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "cells" in lines[0] and "17 genes" in lines[0] and str(out) in lines[0]
    adata = read_h5ad(out)
    gt = truth(adata)
    assert gt["simulator"] == name and gt["seed"] == 5 and adata.n_vars == 17
    load_screen(adata)
    if name == "sparse-shift":
        assert adata.n_obs == 6 * 12 + 12 and gt["params"]["mode"] == "legacy"
        assert (adata.obs["cellpert_split"] == "test").sum() == 24
        same = simulate_sparse_shift(seed=5, n_perturbations=6, n_latent=3, n_cells_per_perturbation=12, n_control_cells=12, n_genes=17, n_heldout=2, mode="legacy")
        np.testing.assert_array_equal(adata.X.toarray(), same.X.toarray())
    elif name == "sams":
        assert adata.n_obs == (6 + 3) * 13 + 15 and len(gt["combinations"]) == 3
        assert gt["decoder"]["W0"].shape == (4, 8) and gt["decoder"]["W1"].shape == (8, 9)
        assert "3 combinations" in lines[0]
    else:
        assert adata.n_obs == 70 and gt["params"]["likelihood"] == "poisson"
        assert adata.obsm["X_true_salient"].shape == (70, 2) and gt["decoder"]["W0"].shape == (5, 7)


@pytest.mark.parametrize("name", list(SIMULATORS))
def test_cli_help_has_an_example(name):
    result = CliRunner().invoke(simulate_app, [name, "--help"])
    assert result.exit_code == 0
    assert f"cellpert simulate {name} -o" in result.output and "--seed 0" in result.output


def test_cli_bad_option_fails_with_a_readable_error(tmp_path):
    out = tmp_path / "bad.h5ad"
    result = CliRunner().invoke(simulate_app, ["sams", "-o", str(out), "--mask-prob", "1.5"])
    assert result.exit_code != 0 and not out.exists()
    assert isinstance(result.exception, CellpertInputError)
    assert "--mask-prob" in str(result.exception) and "\n" not in str(result.exception)
    result = CliRunner().invoke(simulate_app, ["sparse-shift", "-o", str(out), "--n-latent", "0"])
    assert isinstance(result.exception, CellpertInputError) and "--n-latent" in str(result.exception)
    result = CliRunner().invoke(simulate_app, ["sparse-shift", "-o", str(out), "--mode", "zinb"])
    assert result.exit_code == 2 and "--mode" in result.output
    result = CliRunner().invoke(simulate_app, ["comparative"])
    assert result.exit_code == 2 and "--out" in result.output
