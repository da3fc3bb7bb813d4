"""Reading screens: label parsing, the dosage matrix, control detection, validation errors."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpert import CellpertInputError, CellpertWarning
from cellpert.data import (
    detect_control_labels,
    gene_log1p_stats,
    load_screen,
    parse_perturbation_labels,
    record_screen_keys,
    summarise_counts,
)

from conftest import file_digest, make_toy_adata

NORMAN = 'dataset == "norman19"'


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellpertWarning)
        return load_screen(*args, **kwargs)


# --------------------------------------------------------------------------- real files
def test_norman_subset_parses_singles_doubles_and_dosage(norman_path):
    screen = quiet_load(norman_path, perturbation_key="condition", subset=NORMAN)
    assert screen.n_cells == 3375
    assert screen.control_labels == ["control"]
    assert len(screen.single_labels) == 18
    assert len(screen.combination_labels) == 15
    assert screen.n_perturbations == 31
    assert screen.is_control.sum() == 100
    d = screen.dosage
    assert sp.issparse(d) and d.shape == (3375, 31)
    # each double has two ones, each single one, controls none
    per_cell = np.asarray(d.sum(axis=1)).ravel()
    labels = screen.labels
    assert set(per_cell[np.char.count(labels.astype(str), "+") == 1]) == {2.0}
    assert set(per_cell[screen.is_control]) == {0.0}
    # the row of a "SET+KLF1" cell has ones exactly in the SET and KLF1 columns
    i = int(np.flatnonzero(labels == "SET+KLF1")[0])
    cols = [screen.perturbation_names[j] for j in d[i].indices]
    assert sorted(cols) == ["KLF1", "SET"]
    # KLF1 alone (100 cells) and in KLF1+MAP2K6, KLF1+TGFBR2, SET+KLF1 (100 each)
    assert screen.cells_per_perturbation["KLF1"] == 400
    assert screen.cells_per_label["KLF1"] == 100


def test_norman_all_zero_genes_warned_and_droppable(norman_path):
    with pytest.warns(CellpertWarning, match="250 of 500 genes have zero counts"):
        load_screen(norman_path, subset=NORMAN)
    screen = quiet_load(norman_path, subset=NORMAN, drop_zero_genes=True)
    assert screen.n_genes == 250 and len(screen.dropped_genes) == 250
    assert (screen.count_summary.gene_total > 0).all()
    mean, std = gene_log1p_stats(quiet_load(norman_path, subset=NORMAN).counts)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()


def test_cpa_format_ctrl_parts_mean_nothing(cpa_fixture_path):
    screen = quiet_load(cpa_fixture_path, perturbation_key="condition", layer="counts")
    assert screen.control_labels == ["ctrl"]
    assert screen.is_control.sum() == 6
    obs = screen.adata.obs
    # "MEIS1+ctrl" is the single MEIS1; "ctrl+ETS2" the single ETS2
    meis = np.flatnonzero(obs["condition"].to_numpy() == "MEIS1+ctrl")
    assert screen.labels[meis[0]] == "MEIS1"
    assert screen.dosage[meis[0]].nnz == 1
    assert screen.labels[np.flatnonzero(obs["condition"].to_numpy() == "ctrl+ETS2")[0]] == "ETS2"
    assert len(screen.combination_labels) == 10
    assert "ctrl" not in screen.perturbation_names


def test_cpa_format_counts_layer_is_required(cpa_fixture_path):
    before = file_digest(cpa_fixture_path)
    with pytest.raises(CellpertInputError, match="non-integer"):
        load_screen(cpa_fixture_path, perturbation_key="condition")
    assert file_digest(cpa_fixture_path) == before


# --------------------------------------------------------------------------- parsing
def test_parse_labels_orders_and_doses():
    parsed = parse_perturbation_labels(
        ["ctrl", "A", "B+A", "A+B", "A+ctrl", "C"], control=["ctrl"], doses=["1", "2", "1+3", "1+1", "5+1", "1"]
    )
    assert parsed.perturbation_names == ["A", "B", "C"]
    d = parsed.dosage.toarray()
    np.testing.assert_array_equal(
        d, [[0, 0, 0], [2, 0, 0], [3, 1, 0], [1, 1, 0], [5, 0, 0], [0, 0, 1]]
    )
    # "B+A" and "A+B" are the same combination, named by the first spelling seen (sorted order)
    assert parsed.canonical_labels[2] == parsed.canonical_labels[3]
    assert parsed.canonical_labels[4] == "A"
    assert parsed.canonical_labels[0] == "ctrl"


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["control", "A", "B"], ["control"]),
        (["A", "non-targeting"], ["non-targeting"]),
        (["NT", "A"], ["NT"]),
        (["ctrl", "A+ctrl"], ["ctrl"]),
    ],
)
def test_control_detection(labels, expected):
    assert detect_control_labels(labels) == expected


def test_control_detection_ambiguous_lists_candidates():
    with pytest.raises(CellpertInputError, match="'control'.*'ctrl'|'ctrl'.*'control'"):
        detect_control_labels(["control", "ctrl", "A"])


def test_dosage_matrix_from_obsm(toy_adata):
    d = pd.DataFrame(0.0, index=toy_adata.obs_names, columns=["X1", "X2"])
    d.iloc[20:40, 0] = 1.0
    d.iloc[40:60, 1] = 0.5
    d.iloc[60:, :] = 1.0
    toy_adata.obsm["doses"] = d
    screen = quiet_load(toy_adata, dosage_key="doses")
    assert screen.perturbation_names == ["X1", "X2"]
    assert screen.is_control.sum() == 20
    assert screen.labels[70] == "X1+X2"
    assert screen.dosage[50].toarray().tolist() == [[0.0, 0.5]]


def test_recorded_keys_are_used_by_default(toy_adata):
    toy_adata.obs["grp"] = toy_adata.obs["perturbation"].astype(str).replace({"control": "base"})
    del toy_adata.obs["perturbation"]
    record_screen_keys(toy_adata, perturbation_key="grp", control="base")
    screen = quiet_load(toy_adata)
    assert screen.perturbation_key == "grp" and screen.control_labels == ["base"]


def test_summary_is_chunk_independent(toy_adata):
    a = summarise_counts(toy_adata.X, chunk_rows=7)
    b = summarise_counts(toy_adata.X.toarray(), chunk_rows=1000)
    np.testing.assert_allclose(a.library_size, b.library_size)
    np.testing.assert_allclose(a.gene_total, b.gene_total)
    assert a.nnz == b.nnz


def test_gene_log1p_stats_match_dense(toy_adata):
    dense = np.log1p(toy_adata.X.toarray().astype(np.float64))
    rows = np.arange(0, 80, 3)
    mean, std = gene_log1p_stats(toy_adata.X, rows=rows, chunk_rows=5)
    np.testing.assert_allclose(mean, dense[rows].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, dense[rows].std(0), rtol=1e-4)


def test_tiny_groups_warn_not_error():
    adata = make_toy_adata(n_per_group=3)
    with pytest.warns(CellpertWarning, match="fewer than 10 cells"):
        screen = load_screen(adata)
    assert screen.n_perturbations == 2


# ------------------------------------------------------------------ validation errors
def _write(tmp_path, adata, name="bad.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _corrupt(kind: str) -> tuple[ad.AnnData, dict, str]:
    """An AnnData with one problem, the load_screen kwargs, and the expected message."""
    adata = make_toy_adata()
    X = adata.X.toarray()
    kwargs: dict = {}
    if kind == "negative":
        X[3, 2] = -1
        expected = "negative values"
    elif kind == "non-integer":
        X = np.log1p(X)
        expected = "non-integer values.*log-normalised"
    elif kind == "nan":
        X[5, 1] = np.nan
        expected = "NaN"
    elif kind == "inf":
        X[5, 1] = np.inf
        expected = "infinite"
    elif kind == "duplicate-genes":
        adata.var_names = ["g0"] * 2 + [f"g{j}" for j in range(2, adata.n_vars)]
        expected = "duplicated.*var_names_make_unique"
    elif kind == "missing-key":
        kwargs = {"perturbation_key": "nope"}
        expected = "no column 'nope'"
    elif kind == "missing-layer":
        kwargs = {"layer": "counts"}
        expected = "layer 'counts' not found"
    elif kind == "no-control":
        adata = adata[adata.obs["perturbation"] != "control"].copy()
        X = adata.X.toarray()
        expected = "no control cells"
    elif kind == "zero-cell-perturbation":
        d = pd.DataFrame(0.0, index=adata.obs_names, columns=["X1", "EMPTY"])
        d.iloc[20:, 0] = 1.0
        adata.obsm["doses"] = d
        kwargs = {"dosage_key": "doses"}
        expected = "EMPTY.*zero cells"
    elif kind == "unknown-control":
        kwargs = {"control": "Control"}
        expected = "match no cell"
    else:  # pragma: no cover
        raise AssertionError(kind)
    adata.X = sp.csr_matrix(X)
    return adata, kwargs, expected


@pytest.mark.parametrize(
    "kind",
    [
        "negative",
        "non-integer",
        "nan",
        "inf",
        "duplicate-genes",
        "missing-key",
        "missing-layer",
        "no-control",
        "zero-cell-perturbation",
        "unknown-control",
    ],
)
def test_validation_errors_leave_file_untouched(tmp_path, kind):
    adata, kwargs, expected = _corrupt(kind)
    path = _write(tmp_path, adata)
    before = file_digest(path)
    with pytest.raises(CellpertInputError, match=expected) as info:
        load_screen(path, **kwargs)
    assert "\n" not in str(info.value)
    assert file_digest(path) == before


def test_missing_file_and_not_hdf5(tmp_path):
    with pytest.raises(CellpertInputError, match="no such file"):
        load_screen(tmp_path / "absent.h5ad")
    text = tmp_path / "table.h5ad"
    text.write_text("gene,cell\n1,2\n")
    before = file_digest(text)
    with pytest.raises(CellpertInputError, match="not an HDF5"):
        load_screen(text)
    assert file_digest(text) == before


def test_dense_matrix_over_budget_is_refused(tmp_path, monkeypatch):
    path = _write(tmp_path, make_toy_adata(dense=True))
    before = file_digest(path)
    monkeypatch.setenv("CELLPERT_MAX_DENSE_GB", "1e-6")  # about 1 kB
    with pytest.raises(CellpertInputError, match="dense 80 x 12.*sparse CSR.*CELLPERT_MAX_DENSE_GB"):
        load_screen(path)
    assert file_digest(path) == before
    monkeypatch.setenv("CELLPERT_MAX_DENSE_GB", "1")
    assert quiet_load(path).n_cells == 80
