"""Shared fixtures: the real screens in ../shared/data, small synthetic AnnData, and the
trained models that several test files share (trained once per session).

Shared trained fixtures are read-only for the tests: a test that writes into a screen file
copies it first, and a test that changes a model deep-copies it. The run fixtures check
at teardown that their files were left as written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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


# ---------------------------------------------------------------- shared trained models
@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """One torch thread and no warnings while a shared fixture trains.

    The tiny models here only lose from more threads on shared cores, and one thread is
    what the thresholds of the tests using them were measured with. Session fixtures are
    set up before a test's autouse fixtures, so they set this themselves; the caller's
    thread count is restored.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(before)


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths``, to check that a shared run was left alone."""
    files = [p for path in paths for p in ([path] if Path(path).is_file() else sorted(Path(path).rglob("*"))) if p.is_file()]
    return {str(f): file_digest(f) for f in files}


class SharedRun(NamedTuple):
    """A run directory written once per session, and its screen file (never written to)."""

    path: Path  # the screen (.h5ad)
    run_dir: Path
    run: Any  # cellpert.runs.load_run(path, run_dir): the model as every command reloads it
    trained: Any  # what cellpert.runs.train_run returned (the in-memory model); None for CLI runs


ZERO_GENE = "all_zero_gene"
SAMS_RUN_OPTIONS = {
    "model": "samsvae",
    "guide": "mean_field",
    "n_latent": 3,
    "n_hidden": 32,
    "max_steps": 200,
    "lr": 2e-2,
    "batch_size": 128,
    "check_val_every_n_epoch": 20,
    "drop_zero_genes": True,
}


@pytest.fixture(scope="session")
def sams_run(tmp_path_factory) -> Iterator[SharedRun]:
    """A SAMS-VAE (mean field) trained by ``train_run`` for 200 steps on a simulated SAMS
    screen with known effects (6 perturbations, 3 combinations, K = 3, 40 genes).

    The screen has one extra all-zero gene (``ZERO_GENE``) that the run drops
    (``drop_zero_genes``). Used by test_evaluate.py (every model test) and
    test_samsvae.py (the IWELBO/ELBO protocol tests, which need any trained SAMS-VAE).
    """
    from cellpert.data.simulate import simulate_sams
    from cellpert.runs import load_run, train_run

    tmp = tmp_path_factory.mktemp("sams_run")
    adata = simulate_sams(
        seed=0,
        n_perturbations=6,
        n_latent=3,
        n_genes=40,
        n_combinations=3,
        n_cells_per_perturbation=(40, 10, 10),
        n_control_cells=(60, 15, 15),
    )
    full = ad.AnnData(
        X=sp.hstack([adata.X, sp.csr_matrix((adata.n_obs, 1), dtype=np.float32)], format="csr"),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=[*adata.var_names, ZERO_GENE]),
        obsm=dict(adata.obsm),
        uns=adata.uns,
    )
    path = tmp / "screen.h5ad"
    full.write_h5ad(path)
    run_dir = tmp / "run"
    with quiet_training():
        trained = train_run(path, out_dir=run_dir, progress_bar=False, **SAMS_RUN_OPTIONS)
        run = load_run(path, run_dir)
    digest = tree_digest(path, run_dir)
    yield SharedRun(path, run_dir, run, trained)
    assert tree_digest(path, run_dir) == digest, "a test wrote into the shared sams_run files; copy them first"


@pytest.fixture(scope="session")
def svae_run(tmp_path_factory) -> Iterator[SharedRun]:
    """``cellpert train -m svae`` (K = 15, 2 epochs) on a simulated sparse-shift screen
    (8 perturbations, 2 of them held out), written once.

    Used by test_workflow.py (``export-latents --ica``) and test_ate_estimators.py
    (``evaluate-ate`` on an sVAE run); both write into a copy of the screen.
    """
    from cellpert.data import write_h5ad_atomic
    from cellpert.data.simulate import simulate_sparse_shift
    from cellpert.runs import load_run
    from cellpert_cli.main import run as cli

    tmp = tmp_path_factory.mktemp("svae_run")
    path = tmp / "shift.h5ad"
    write_h5ad_atomic(
        simulate_sparse_shift(seed=0, n_perturbations=8, n_heldout=2, n_cells_per_perturbation=20, n_genes=30), path
    )
    run_dir = tmp / "run_svae"
    with quiet_training():
        code = cli(["train", str(path), "-m", "svae", "-o", str(run_dir), "--n-latent", "15", "--max-epochs", "2", "--quiet"])
        assert code == 0
        run = load_run(path, run_dir)
    digest = tree_digest(path, run_dir)
    yield SharedRun(path, run_dir, run, None)
    assert tree_digest(path, run_dir) == digest, "a test wrote into the shared svae_run files; copy them first"
