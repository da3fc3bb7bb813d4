"""Identifiability metrics: MCC / matching, linear R², mask recovery, block leakage, ICA."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from scipy.linalg import hadamard

from cellpert import CellpertInputError
from cellpert.evaluate import (
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


@pytest.fixture
def latents() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 5))


def _rotation(k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q


# ------------------------------------------------------------------------------ MCC
def test_match_latents_recovers_permutation_and_signs(latents):
    perm_true = np.array([3, 0, 4, 1, 2])
    signs_true = np.array([1, -1, -1, 1, -1])
    # learned[:, perm_true[k]] = signs_true[k] * true[:, k]
    learned = np.empty_like(latents)
    learned[:, perm_true] = latents * signs_true
    perm, signs, corr = match_latents(latents, learned)
    np.testing.assert_array_equal(perm, perm_true)
    np.testing.assert_array_equal(signs, signs_true)
    assert corr.shape == (5, 5)
    np.testing.assert_allclose(corr[np.arange(5), perm], signs_true, atol=1e-12)
    np.testing.assert_allclose(align_latents(learned, perm, signs), latents, atol=1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_mcc_is_one_for_permuted_sign_flipped_copy(latents, method):
    learned = -latents[:, [2, 4, 0, 1, 3]] * np.array([1, -1, 1, -1, 1])
    result = mcc(latents, learned, method=method)
    assert isinstance(result, MCCResult)
    assert result == pytest.approx(1.0, abs=1e-12)
    assert result.method == method
    np.testing.assert_allclose(result.matched_corr, 1.0, atol=1e-12)
    np.testing.assert_allclose(align_latents(learned, result), latents, atol=1e-12)


def test_mcc_spearman_sees_monotone_maps_pearson_does_not(latents):
    learned = np.exp(2 * latents[:, ::-1])
    assert mcc(latents, learned, method="spearman") == pytest.approx(1.0, abs=1e-12)
    assert mcc(latents, learned, method="pearson") < 0.8


def test_mcc_clearly_below_one_for_rotation(latents):
    rotated = latents @ _rotation(5, seed=1)
    value = mcc(latents, rotated)
    assert value < 0.85
    # ... while the information is all there, linearly
    assert linear_r2(latents, rotated) == pytest.approx(1.0, abs=1e-10)


def test_mcc_known_value_with_noise():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20000, 2))
    learned = z + rng.normal(size=z.shape)  # corr = 1 / sqrt(2) per dim
    assert mcc(z, learned) == pytest.approx(1 / np.sqrt(2), abs=0.02)


def test_mcc_result_behaves_like_a_float(latents):
    result = mcc(latents, latents)
    assert float(result) == pytest.approx(1.0)
    assert json.loads(json.dumps(result)) == pytest.approx(1.0)
    assert json.loads(json.dumps(result.as_dict()))["perm"] == [0, 1, 2, 3, 4]
    back = pickle.loads(pickle.dumps(result))
    assert float(back) == float(result)
    np.testing.assert_array_equal(back.perm, result.perm)


def test_mcc_rectangular_more_learned_dims(latents):
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(latents.shape[0], 3))
    learned = np.column_stack(
        [
            noise[:, 0],
            latents[:, 1],
            noise[:, 1],
            latents[:, 0],
            latents[:, 4],
            noise[:, 2],
            latents[:, 2],
            latents[:, 3],
        ]
    )
    result = mcc(latents, learned)
    assert result == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(result.perm, [3, 1, 6, 7, 4])
    assert result.corr.shape == (5, 8)


def test_mcc_fewer_learned_dims_leaves_true_dims_unmatched(latents):
    perm, signs, _ = match_latents(latents, latents[:, [4, 1]])
    np.testing.assert_array_equal(perm, [-1, 1, -1, -1, 0])
    np.testing.assert_array_equal(signs, [0, 1, 0, 0, 1])
    assert mcc(latents, latents[:, [4, 1]]) == pytest.approx(1.0)


def test_constant_columns_give_no_nan(latents):
    learned = latents.copy()
    learned[:, 2] = 3.7  # collapsed dimension
    for method in ("pearson", "spearman"):
        result = mcc(latents, learned, method=method)
        assert np.isfinite(float(result))
        assert np.all(np.isfinite(result.corr))
        assert result == pytest.approx(4 / 5, abs=1e-12)
        assert result.matched_corr[2] == 0.0
    r2 = linear_r2(latents, learned)
    assert np.isfinite(r2)
    assert r2 == pytest.approx(4 / 5, abs=0.01)
    # a constant true dimension is left out of the R² average
    true = latents.copy()
    true[:, 0] = 1.0
    assert linear_r2(true, latents) == pytest.approx(1.0, abs=1e-10)
    # all-constant learned latents explain nothing
    assert linear_r2(latents, np.ones((latents.shape[0], 3))) == 0.0


def test_different_rows_and_bad_input_raise(latents):
    with pytest.raises(CellpertInputError, match="one row per cell"):
        mcc(latents, latents[:-1])
    with pytest.raises(CellpertInputError, match="one row per cell"):
        linear_r2(latents, latents[:-1])
    with pytest.raises(CellpertInputError, match="one row per cell"):
        block_leakage(latents[:, :2], latents[:-1, 2:], latents[:, :2], latents[:, 2:])
    bad = latents.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CellpertInputError, match="NaN"):
        mcc(latents, bad)
    with pytest.raises(CellpertInputError, match="method"):
        mcc(latents, latents, method="kendall")
    with pytest.raises(CellpertInputError, match="constant"):
        linear_r2(np.ones((10, 2)), latents[:10])


# ------------------------------------------------------------------------- linear R²
def test_linear_r2_is_one_for_invertible_linear_maps(latents):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5)) + 3 * np.eye(5)  # invertible (well conditioned)
    assert linear_r2(latents, latents @ a + 2.5) == pytest.approx(1.0, abs=1e-10)
    # extra, irrelevant learned dimensions do not hurt
    extra = np.column_stack([latents @ a, rng.normal(size=(latents.shape[0], 3))])
    assert linear_r2(latents, extra) == pytest.approx(1.0, abs=1e-10)


def test_linear_r2_low_for_unrelated_and_partial(latents):
    rng = np.random.default_rng(4)
    assert linear_r2(latents, rng.normal(size=latents.shape)) < 0.02
    # learned carries only 2 of the 5 true dims (mixed): R² = 2/5
    assert linear_r2(
        latents, latents[:, :2] @ np.array([[1.0, 2.0], [-1.0, 0.5]])
    ) == pytest.approx(0.4, abs=0.01)


# --------------------------------------------------------------------- mask recovery
def test_mask_recovery_with_and_without_matching():
    rng = np.random.default_rng(5)
    n_pert, k = 30, 6
    true_mask = rng.random((n_pert, k)) < 0.3
    true_mask[0] = True  # every dim has some targets
    perm_true = np.array([2, 5, 0, 1, 3, 4])
    learned_probs = np.zeros((n_pert, k))
    learned_probs[:, perm_true] = np.where(true_mask, 0.9, 0.1)

    z = rng.normal(size=(500, k))
    learned_latents = np.empty_like(z)
    learned_latents[:, perm_true] = -z
    perm, _, _ = match_latents(z, learned_latents)
    np.testing.assert_array_equal(perm, perm_true)

    res = mask_recovery(true_mask, learned_probs, matching=perm)
    assert res["precision"] == res["recall"] == res["f1"] == 1.0
    assert res["tp"] == int(true_mask.sum()) and res["fp"] == 0 and res["fn"] == 0
    assert mask_recovery(true_mask, learned_probs, matching=mcc(z, learned_latents))["f1"] == 1.0
    unmatched = mask_recovery(true_mask, learned_probs)
    assert unmatched["f1"] < 0.7


def test_mask_recovery_counts_by_hand():
    true_mask = np.array([[1, 0, 0], [0, 1, 1]])
    probs = np.array([[0.8, 0.6, 0.1], [0.2, 0.4, 0.51]])  # binarised: [[1,1,0],[0,0,1]]
    res = mask_recovery(true_mask, probs)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 1, 1)
    assert res["precision"] == pytest.approx(2 / 3)
    assert res["recall"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(2 / 3)
    # threshold is strict: exactly 0.5 is "absent"
    assert mask_recovery([[1.0]], [[0.5]])["tp"] == 0
    # more learned dims than true ones: the matching picks the columns
    wide = np.column_stack([np.zeros(2), probs])
    assert mask_recovery(true_mask, wide, matching=np.array([1, 2, 3]))["tp"] == 2


def test_mask_recovery_rejects_bad_input():
    with pytest.raises(CellpertInputError, match="probabilities"):
        mask_recovery(np.eye(3), np.eye(3) * 5 - 2)
    with pytest.raises(CellpertInputError, match="perturbations"):
        mask_recovery(np.eye(3), np.eye(4)[:, :3])
    with pytest.raises(CellpertInputError, match="matching"):
        mask_recovery(np.eye(3), np.eye(3), matching=np.array([0, 1]))
    with pytest.raises(CellpertInputError, match="fewer"):
        mask_recovery(np.eye(3), np.eye(3)[:, :2])


# --------------------------------------------------------------------- block leakage
def test_block_leakage_clean_and_leaky():
    rng = np.random.default_rng(6)
    n = 3000
    z = rng.normal(size=(n, 3))
    t = rng.normal(size=(n, 2))
    a = rng.normal(size=(3, 3)) + 2 * np.eye(3)
    b = np.array([[2.0, 1.0], [-1.0, 1.0]])
    z_hat = z @ a + 0.01 * rng.normal(size=(n, 3))
    t_hat = t @ b
    clean = block_leakage(z, t, z_hat, t_hat)
    assert set(clean) == {
        "r2_z_from_z_hat",
        "r2_t_from_t_hat",
        "r2_z_from_t_hat",
        "r2_t_from_z_hat",
    }
    assert clean["r2_z_from_z_hat"] > 0.99
    assert clean["r2_t_from_t_hat"] == pytest.approx(1.0, abs=1e-10)
    assert clean["r2_z_from_t_hat"] < 0.01
    assert clean["r2_t_from_z_hat"] < 0.01

    # t_hat also encodes z: the salient block leaks the shared one
    t_hat_leaky = np.column_stack([t @ b, z @ rng.normal(size=(3, 3))])
    leaky = block_leakage(z, t, z_hat, t_hat_leaky)
    assert leaky["r2_t_from_t_hat"] == pytest.approx(1.0, abs=1e-10)
    assert leaky["r2_z_from_t_hat"] > 0.99
    assert leaky["r2_t_from_z_hat"] < 0.01


# ------------------------------------------------------------------------------- ICA
@pytest.mark.parametrize("dist", ["uniform", "laplace"])
def test_ica_restores_mixed_non_gaussian_latents(dist):
    rng = np.random.default_rng(7)
    n, k = 4000, 4
    s = rng.uniform(-1, 1, size=(n, k)) if dist == "uniform" else rng.laplace(size=(n, k))
    # every observed dimension mixes every source (Hadamard), unequally scaled
    mixing = hadamard(k) @ np.diag([1.0, 2.0, 0.5, 3.0]) + 0.3 * rng.normal(size=(k, k))
    mixed = s @ mixing + 5.0
    before = mcc(s, mixed)
    rotated = ica_rotate(mixed, seed=0)
    after = mcc(s, rotated)
    assert before < 0.8
    assert after > 0.95
    assert rotated.shape == (n, k)
    np.testing.assert_allclose(rotated.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(rotated.std(axis=0, ddof=1), 1.0, atol=1e-10)
    # deterministic for a given seed
    np.testing.assert_array_equal(rotated, ica_rotate(mixed, seed=0))


def test_ica_drops_dead_directions_without_nan():
    rng = np.random.default_rng(8)
    s = rng.uniform(-1, 1, size=(2000, 3))
    mixed = s @ rng.normal(size=(3, 3))
    latent = np.column_stack([mixed, np.full(2000, 2.0), mixed[:, 0] - mixed[:, 1]])
    rotated = ica_rotate(latent)
    assert rotated.shape == (2000, 3)
    assert np.all(np.isfinite(rotated))
    assert mcc(s, rotated) > 0.95
    with pytest.raises(CellpertInputError, match="constant"):
        ica_rotate(np.ones((50, 3)))


# ------------------------------------------------------------- masks in the ICA basis
def _sparse_shift_latents(seed=0, n_pert=100, k=15, cells=40):
    """z = z^b + D (E ⊙ M) as in the SAMS simulator: mask density 2/15 (at least one target),
    magnitudes N(5, 0.5²) with random signs; singles, one double (additive) and controls."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((n_pert, k)) < 2 / 15).astype(float)
    mask[np.arange(n_pert), rng.integers(0, k, n_pert)] = 1
    effects = (
        mask * rng.choice([-1.0, 1.0], size=mask.shape) * rng.normal(5.0, 0.5, size=mask.shape)
    )
    dosage = np.repeat(
        np.vstack([np.zeros(n_pert), np.eye(n_pert), np.eye(n_pert)[0] + np.eye(n_pert)[1]]),
        cells,
        axis=0,
    )
    z = rng.normal(size=(len(dosage), k)) + dosage @ effects
    return z, dosage, mask, effects


def test_latent_shifts_recover_additive_effects_and_skip_unseen():
    z, dosage, _, effects = _sparse_shift_latents()
    shifts = latent_shifts(z, dosage)
    np.testing.assert_allclose(shifts, effects, atol=0.8)  # 40 cells: standard error ≈ 0.2
    unseen = np.c_[dosage, np.zeros(len(dosage))]  # a perturbation no cell received
    assert np.all(latent_shifts(z, unseen)[-1] == 0)
    with pytest.raises(CellpertInputError, match="rows"):
        latent_shifts(z, dosage[:-1])


def test_ica_masks_recover_sparse_targets_that_a_mixed_basis_hides():
    z, dosage, mask, _ = _sparse_shift_latents()
    mixing = np.random.default_rng(1).normal(size=(15, 15))
    mixed = z @ mixing  # what a model identifiable only up to a linear map may learn
    found = ica_masks(mixed, dosage, seed=0)
    matching = mcc(z, found["latent"])
    assert float(matching) > 0.9 > float(mcc(z, mixed))
    assert mask_recovery(mask, found["masks"], matching=matching)["f1"] > 0.95
    # the same support rule in the mixed basis: effects are dense there
    shifts = latent_shifts(mixed, dosage)
    dense = (np.abs(shifts) > 0.5 * np.abs(shifts).max(1, keepdims=True)).astype(float)
    assert mask_recovery(mask, dense, matching=mcc(z, mixed))["f1"] < 0.7
    with pytest.raises(CellpertInputError, match="threshold"):
        ica_masks(mixed, dosage, threshold=1.5)
