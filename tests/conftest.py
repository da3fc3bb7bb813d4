"""Shared fixtures: the real screens in ../shared/data and small synthetic AnnData."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLPERT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """A file of ../shared/data; missing data fails under CI and skips elsewhere."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared beside the clone")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def norman_path() -> Path:
    return shared_file("norman2019_mcfaline2023_subset.h5ad")


@pytest.fixture(scope="session")
def cpa_fixture_path() -> Path:
    return shared_file("norman2019_cpa_format_fixture.h5ad")


@pytest.fixture(scope="session")
def kang_path() -> Path:
    return shared_file("kang2018_pbmc_ifnb_subset.h5ad")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_toy_adata(n_per_group: int = 20, n_genes: int = 12, seed: int = 0, dense: bool = False) -> ad.AnnData:
    """A tiny screen: control, A, B, A+B, with Poisson counts."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["control", "A", "B", "A+B"], n_per_group)
    counts = rng.poisson(3.0, size=(len(labels), n_genes)).astype(np.float32)
    X = counts if dense else sp.csr_matrix(counts)
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)


@pytest.fixture
def toy_adata() -> ad.AnnData:
    return make_toy_adata()
