"""The one safe writer: atomic replace, every field kept, original intact on failure."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellpert import CellpertInputError
from cellpert.data import read_h5ad, save_results, to_uns, write_h5ad_atomic

from conftest import file_digest, make_toy_adata


@pytest.fixture
def screen_file(tmp_path):
    adata = make_toy_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
    adata.uns["user_notes"] = {"lab": "x", "run": 3}
    adata.var["symbol"] = [f"S{j}" for j in range(adata.n_vars)]
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    return path


def test_results_added_and_every_field_kept(screen_file):
    adata = read_h5ad(screen_file)
    adata.uns["cellpert"] = {"config": to_uns({"a": None, "b": (1, 2), "c": ["x", "y"]})}
    adata.varm["ate_data"] = pd.DataFrame(np.ones((adata.n_vars, 2)), index=adata.var_names, columns=["A", "B"])
    save_results(adata, screen_file)
    back = ad.read_h5ad(screen_file)
    for key in ("counts",):
        assert (back.layers[key] != adata.layers[key]).nnz == 0
    np.testing.assert_allclose(back.obsm["X_pca"], adata.obsm["X_pca"])
    assert back.uns["user_notes"]["run"] == 3
    assert list(back.var["symbol"]) == list(adata.var["symbol"])
    assert back.uns["cellpert"]["config"]["a"] == "None"
    assert list(back.varm["ate_data"].columns) == ["A", "B"]
    assert not [p for p in os.listdir(screen_file.parent) if p.endswith(".tmp")]


def test_out_option_leaves_source_untouched(screen_file, tmp_path):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1
    out = tmp_path / "copy.h5ad"
    save_results(adata, screen_file, out=out)
    assert file_digest(screen_file) == before
    assert ad.read_h5ad(out).uns["new"] == 1


def test_failure_midway_leaves_original_intact(screen_file, monkeypatch):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["new"] = 1
    real_write = ad.AnnData.write_h5ad

    def write_then_crash(self, filename, *args, **kwargs):
        real_write(self, filename, *args, **kwargs)  # a complete temporary file...
        with open(filename, "r+b") as fh:  # ...half overwritten, then the process dies
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_results(adata, screen_file)
    assert file_digest(screen_file) == before
    assert sorted(os.listdir(screen_file.parent)) == ["screen.h5ad"]


def test_unwritable_value_fails_before_replacing(screen_file):
    before = file_digest(screen_file)
    adata = read_h5ad(screen_file)
    adata.uns["bad"] = object()  # h5ad cannot store it: the write fails inside anndata
    with pytest.raises(Exception):  # noqa: B017 - anndata's own error type
        write_h5ad_atomic(adata, screen_file)
    assert file_digest(screen_file) == before
    assert sorted(os.listdir(screen_file.parent)) == ["screen.h5ad"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CellpertInputError, match="no such directory"):
        write_h5ad_atomic(make_toy_adata(), tmp_path / "nope" / "x.h5ad")


def test_to_uns_round_trips_through_h5ad(tmp_path):
    adata = make_toy_adata()
    adata.uns["cfg"] = to_uns({"n": 3, "none": None, "names": ("a", "b"), "nested": {"x": [1.5, 2.0]}})
    path = write_h5ad_atomic(adata, tmp_path / "x.h5ad")
    cfg = ad.read_h5ad(path).uns["cfg"]
    assert cfg["none"] == "None" and list(cfg["names"]) == ["a", "b"]
    np.testing.assert_allclose(cfg["nested"]["x"], [1.5, 2.0])


def test_long_passes_over_the_cells_show_progress(monkeypatch, capsys):
    """A streamed pass over many cells shows a progress bar on stderr (issue 16: a long read
    must not look like a hang); small passes and CELLPERT_PROGRESS=0 show none."""
    import scipy.sparse as sp

    from cellpert.data import _validate

    matrix = sp.random(300, 5, density=0.2, format="csr", random_state=0)
    monkeypatch.setattr(_validate, "PROGRESS_MIN_ROWS", 100)
    monkeypatch.setenv("CELLPERT_PROGRESS", "1")
    assert sum(len(i) for i, _ in _validate.iter_row_chunks(matrix, chunk_rows=50)) == 300
    assert "reading cells" in capsys.readouterr().err
    monkeypatch.setenv("CELLPERT_PROGRESS", "0")
    list(_validate.iter_row_chunks(matrix, chunk_rows=50))
    assert capsys.readouterr().err == ""
