"""Data ATE (streamed), the additive / mean baselines and the ATE metrics."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpert import CellpertInputError, CellpertWarning
from cellpert.data import load_screen
from cellpert.evaluate import (
    additive_baseline,
    ate_from_counts,
    ate_metrics,
    data_ate,
    mean_baseline,
    perturbseq_transform,
)

LABELS = ["ctrl"] * 6 + ["A"] * 5 + ["B"] * 4 + ["A+B"] * 3 + ["B+A"] * 2 + ["C"] * 3


def _counts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.2, 6.0, size=(len(LABELS), 7))).astype(np.float32)
    x[:, 6] = 0  # an all-zero gene
    x[7] = 0  # a cell of "A" with library size 0
    x[2] = 0  # a control cell with library size 0
    return x


def _screen(x, sparse: bool):
    adata = ad.AnnData(
        X=sp.csr_matrix(x) if sparse else x,
        obs=pd.DataFrame({"perturbation": LABELS}, index=[f"c{i}" for i in range(len(LABELS))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellpertWarning)
        return load_screen(adata, warn=False)


def _dense_reference(x: np.ndarray, space: str, rows=None) -> pd.DataFrame:
    """The ATE computed directly, cell by cell, on the dense matrix."""
    x = x.astype(np.float64)
    y = np.zeros_like(x)
    for i in range(x.shape[0]):
        lib = x[i].sum()
        if space == "mean":
            y[i] = x[i]
        elif lib > 0:
            y[i] = np.log2(1e4 * x[i] / lib + 1)
    canon = np.array(["A+B" if lab == "B+A" else lab for lab in LABELS])
    use = np.ones(len(canon), bool) if rows is None else np.isin(np.arange(len(canon)), rows)
    ctrl = y[use & (canon == "ctrl")].mean(axis=0)
    cols = {
        lab: y[use & (canon == lab)].mean(axis=0) - ctrl
        for lab in sorted(set(canon[use]) - {"ctrl"})
    }
    return pd.DataFrame(cols, index=[f"g{j}" for j in range(x.shape[1])])


# ------------------------------------------------------------------------ transform
def test_perturbseq_transform_by_hand():
    x = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    expected = np.array(
        [[np.log2(2501), np.log2(7501), 0.0], [0.0, 0.0, 0.0], [np.log2(5001), 0.0, np.log2(5001)]]
    )
    dense = perturbseq_transform(x)
    np.testing.assert_allclose(dense, expected, rtol=1e-12)
    sparse = perturbseq_transform(sp.csr_matrix(x))
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-12)
    assert np.isfinite(dense).all()


# ------------------------------------------------------------------------- data ATE
@pytest.mark.parametrize("space", ["perturbseq", "mean"])
@pytest.mark.parametrize("sparse", [True, False])
def test_data_ate_matches_dense_reference(space, sparse):
    x = _counts()
    screen = _screen(x, sparse)
    ate = data_ate(screen, space=space, chunk_rows=4)
    ref = _dense_reference(x, space)
    assert list(ate.columns) == ["A", "A+B", "B", "C"]
    pd.testing.assert_frame_equal(ate[ref.columns], ref, check_names=False, rtol=1e-10, atol=1e-12)
    assert np.isfinite(ate.to_numpy()).all()
    np.testing.assert_allclose(ate.loc["g6"], 0.0)  # all-zero gene
    assert ate.attrs["n_cells"] == {"A": 5, "A+B": 5, "B": 4, "C": 3}
    assert ate.attrs["n_control_cells"] == 6
    assert ate.attrs["space"] == space


def test_data_ate_sparse_dense_and_chunk_size_agree():
    x = _counts(1)
    reference = data_ate(_screen(x, sparse=False), chunk_rows=10_000)
    for sparse in (True, False):
        screen = _screen(x, sparse)
        for chunk in (1, 3, 7, 23, 1000):
            pd.testing.assert_frame_equal(data_ate(screen, chunk_rows=chunk), reference, rtol=1e-12)


def test_data_ate_restricted_to_cells():
    x = _counts(2)
    screen = _screen(x, sparse=True)
    rng = np.random.default_rng(0)
    mask = rng.random(len(LABELS)) < 0.6
    mask[[0, 1, 6, 11, 15, 18]] = True  # keep a cell of every group
    mask[np.flatnonzero(np.array(LABELS) == "C")] = False  # "C" entirely outside the selection
    ref = _dense_reference(x, "perturbseq", rows=np.flatnonzero(mask))
    by_mask = data_ate(screen, cells=mask, chunk_rows=5)
    by_index = data_ate(screen, cells=np.flatnonzero(mask)[::-1], chunk_rows=2)
    assert "C" not in by_mask.columns
    pd.testing.assert_frame_equal(
        by_mask[ref.columns], ref, check_names=False, rtol=1e-10, atol=1e-12
    )
    pd.testing.assert_frame_equal(by_index, by_mask, rtol=1e-12)
    assert by_mask.attrs["n_cells"]["A"] == int(mask[np.array(LABELS) == "A"].sum())


def test_data_ate_errors():
    screen = _screen(_counts(), sparse=True)
    no_control = np.array(LABELS) != "ctrl"
    with pytest.raises(CellpertInputError, match="no control cells"):
        data_ate(screen, cells=no_control)
    with pytest.raises(CellpertInputError, match="no perturbed cells"):
        data_ate(screen, cells=~no_control)
    with pytest.raises(CellpertInputError, match="length"):
        data_ate(screen, cells=np.ones(3, bool))
    with pytest.raises(CellpertInputError, match="space"):
        data_ate(screen, space="log")


def test_ate_from_counts_groups_control_spellings():
    x = np.array([[2.0, 0.0], [0.0, 2.0], [4.0, 4.0], [1.0, 3.0]])
    ate = ate_from_counts(x, ["ctrl", "NT", "A", "A"], control=["ctrl", "NT"], space="mean")
    # control mean [1, 1]; A mean [2.5, 3.5]
    np.testing.assert_allclose(ate["A"], [1.5, 2.5])
    assert list(ate.columns) == ["A"]
    assert ate.attrs["n_control_cells"] == 2


# ------------------------------------------------------------------------ baselines
@pytest.fixture
def train_ate() -> pd.DataFrame:
    return pd.DataFrame(
        {"A": [1.0, 2.0], "B": [3.0, -1.0], "C": [0.0, 5.0], "A+C": [2.0, 2.0], "A+D": [5.0, 5.0]},
        index=["g1", "g2"],
    )


def test_additive_baseline_by_hand(train_ate):
    pred = additive_baseline(
        train_ate,
        ["A+B", "A", "B+C", "A+C", "ctrl"],
        parts_of=lambda s: [] if s == "ctrl" else s.split("+"),
    )
    expected = pd.DataFrame(
        {
            "A+B": [4.0, 1.0],
            "A": [1.0, 2.0],
            "B+C": [3.0, 4.0],
            "A+C": [1.0, 7.0],
            "ctrl": [0.0, 0.0],
        },
        index=["g1", "g2"],
    )
    pd.testing.assert_frame_equal(pred, expected, check_names=False)


def test_additive_baseline_fallback_and_nan(train_ate):
    # D has no single in training: from A+D, D = [5, 5] - A = [4, 3]
    pred = additive_baseline(train_ate, ["B+D", "D"])
    np.testing.assert_allclose(pred["B+D"], [7.0, 2.0])
    np.testing.assert_allclose(pred["D"], [4.0, 3.0])
    # E appears nowhere: NaN and a warning
    with pytest.warns(CellpertWarning, match="E"):
        pred = additive_baseline(train_ate, ["A+E", "B"], parts_of={"A+E": ["A", "E"], "B": ["B"]})
    assert pred["A+E"].isna().all()
    np.testing.assert_allclose(pred["B"], [3.0, -1.0])


def test_mean_baseline_by_hand(train_ate):
    pred = mean_baseline(train_ate, ["X+Y", "A"])
    # g1: (1 + 3 + 0 + 2 + 5) / 5; g2: (2 - 1 + 5 + 2 + 5) / 5
    np.testing.assert_allclose(pred["X+Y"], [11 / 5, 13 / 5])
    np.testing.assert_allclose(pred["A"], [11 / 5, 13 / 5])


def test_baselines_on_a_screen():
    screen = _screen(_counts(3), sparse=True)
    train = data_ate(screen)
    pred = additive_baseline(train[["A", "B", "C"]], ["A+B"], parts_of=screen.label_parts)
    np.testing.assert_allclose(pred["A+B"], train["A"] + train["B"])


# -------------------------------------------------------------------------- metrics
def test_metrics_perfect_prediction():
    rng = np.random.default_rng(0)
    data = pd.DataFrame(rng.normal(size=(30, 4)), columns=list("ABCD"))
    data.loc[5] = 0.0  # an all-zero gene
    data.attrs["n_cells"] = {"A": 10, "B": 20, "C": 30, "D": 40}
    pred = data.copy()[["D", "C", "B", "A"]]  # column order must not matter
    per, summary = ate_metrics(data, pred, top_n=5)
    for key in ("pearson", "r2", "pearson_top", "r2_top"):
        assert summary[key] == pytest.approx(1.0)
        np.testing.assert_allclose(per[key], 1.0)
    assert per["n_cells"].tolist() == [10, 20, 30, 40]
    assert summary["n_perturbations"] == 4 and summary["n_genes"] == 30 and summary["top_n"] == 5


def test_metrics_by_hand_and_top_selection():
    genes = [f"g{j}" for j in range(5)]
    data = pd.DataFrame(
        {"A": [5.0, -4.0, 0.1, 0.2, 3.0], "B": [1.0, 0.0, -2.0, 0.5, 0.0]}, index=genes
    )
    pred = pd.DataFrame(
        {"A": [5.0, -4.0, 9.0, -9.0, 3.0], "B": [0.0, 0.0, -2.0, 1.5, 0.0]}, index=genes
    )
    per, summary = ate_metrics(data, pred, top_n=3)
    # A: top-3 |data| genes are g0, g1, g4, predicted exactly; the others are wrong
    assert per.loc["A", "pearson_top"] == pytest.approx(1.0)
    assert per.loc["A", "r2_top"] == pytest.approx(1.0)
    assert per.loc["A", "pearson"] < 0.5
    # B: top-3 |data| genes are g2 (2), g0 (1), g3 (0.5)
    d_b, p_b = np.array([-2.0, 1.0, 0.5]), np.array([-2.0, 0.0, 1.5])
    ss_res, ss_tot = 0 + 1 + 1, ((d_b - d_b.mean()) ** 2).sum()
    assert per.loc["B", "r2_top"] == pytest.approx(1 - ss_res / ss_tot)
    assert per.loc["B", "pearson_top"] == pytest.approx(np.corrcoef(d_b, p_b)[0, 1])
    # per-perturbation R² on all genes of B: residuals 1 and 1
    d_all = data["B"].to_numpy()
    assert per.loc["B", "r2"] == pytest.approx(1 - 2 / ((d_all - d_all.mean()) ** 2).sum())
    # overall figures flatten the selected entries across perturbations
    d_top = np.array([5.0, -4.0, 3.0, -2.0, 1.0, 0.5])
    p_top = np.array([5.0, -4.0, 3.0, -2.0, 0.0, 1.5])
    assert summary["pearson_top"] == pytest.approx(np.corrcoef(d_top, p_top)[0, 1])
    assert summary["r2_top"] == pytest.approx(1 - 2 / ((d_top - d_top.mean()) ** 2).sum())
    d_flat, p_flat = data.to_numpy().ravel(), pred.to_numpy().ravel()
    assert summary["pearson"] == pytest.approx(np.corrcoef(d_flat, p_flat)[0, 1])
    assert summary["r2"] == pytest.approx(
        1 - ((d_flat - p_flat) ** 2).sum() / ((d_flat - d_flat.mean()) ** 2).sum()
    )
    # top_n larger than the number of genes means all genes
    per_all, summary_all = ate_metrics(data, pred, top_n=100)
    assert summary_all["top_n"] == 5
    assert summary_all["pearson_top"] == pytest.approx(summary["pearson"])


def test_metrics_nan_safety():
    genes = [f"g{j}" for j in range(4)]
    data = pd.DataFrame(
        {"A": [1.0, -1.0, 0.5, 0.0], "B": [0.0, 0.0, 0.0, 0.0], "C": [2.0, 1.0, 0.0, 0.0]},
        index=genes,
    )
    pred = pd.DataFrame(
        {"A": [0.3, 0.3, 0.3, 0.3], "B": [0.0, 1.0, 0.0, 0.0], "C": [np.nan] * 4}, index=genes
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.warns(CellpertWarning, match="NaN"):
            per, summary = ate_metrics(data, pred, top_n=2)
    assert np.isnan(per.loc["A", "pearson"])  # constant prediction
    assert np.isnan(per.loc["B", "pearson"]) and np.isnan(per.loc["B", "r2"])  # constant data
    assert per.loc["C"].drop("n_cells").isna().all()  # NaN prediction
    for key in ("pearson", "r2", "pearson_top", "r2_top"):
        assert np.isfinite(summary[key])
    assert summary["n_perturbations"] == 2 and summary["n_excluded"] == 1
    d_flat = np.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    p_flat = np.array([0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 0.0])
    assert summary["pearson"] == pytest.approx(np.corrcoef(d_flat, p_flat)[0, 1])


def test_metrics_input_errors():
    data = pd.DataFrame({"A": [1.0, 2.0]}, index=["g1", "g2"])
    with pytest.raises(CellpertInputError, match="label"):
        ate_metrics(data, pd.DataFrame({"B": [1.0, 2.0]}, index=["g1", "g2"]))
    with pytest.raises(CellpertInputError, match="gene"):
        ate_metrics(data, pd.DataFrame({"A": [1.0, 2.0]}, index=["g1", "g3"]))
    with pytest.raises(CellpertInputError, match="top_n"):
        ate_metrics(data, data, top_n=0)
