"""Screens read from disk (backed): the block-shuffled loader, training, and writing back."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellpert import CellpertInputError
from cellpert.data import load_screen, read_split, write_h5ad_atomic
from cellpert.data.simulate import simulate_sams
from cellpert.models import SAMSVAE, SVAE, prepare_anndata
from cellpert.models._datamodule import BlockShuffledDataModule, _batch, _Cells
from cellpert.runs import evaluate_ate, export_latents, train_run

from conftest import file_digest


@pytest.fixture(scope="module")
def csr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("backed") / "screen.h5ad"
    adata = simulate_sams(seed=0, n_perturbations=6, n_latent=3, n_genes=30, n_cells_per_perturbation=(30, 8, 8))
    adata.X = sp.csr_matrix(adata.X)
    adata.obs["user_field"] = "kept"
    write_h5ad_atomic(adata, path)
    return path


def _prepared(path, backed: bool):
    screen = load_screen(path, warn=False, backed=backed)
    read_split(screen, "cellpert_split")
    return screen, prepare_anndata(screen)


def test_backed_screen_keeps_counts_on_disk_and_refuses_copies(csr_file):
    screen, adata = _prepared(csr_file, backed=True)
    assert adata.isbacked and not isinstance(adata.X, np.ndarray | sp.spmatrix)
    with pytest.raises(CellpertInputError, match="--subset cannot be combined with --backed"):
        load_screen(csr_file, backed=True, subset="perturbation == 'P000'")
    with pytest.raises(CellpertInputError, match="--drop-zero-genes cannot be combined"):
        load_screen(csr_file, backed=True, drop_zero_genes=True)
    with pytest.raises(CellpertInputError, match="needs a file path"):
        load_screen(ad.read_h5ad(csr_file), backed=True)


@pytest.mark.parametrize("cls", [SAMSVAE, SVAE])
def test_block_loader_gives_the_tensors_of_scvi_tools_loader(csr_file, cls):
    _, adata = _prepared(csr_file, backed=True)
    cls.setup_anndata(adata)
    model = cls(adata, n_latent=3)
    rows = np.array([0, 7, 8, 100, 251])
    ref = next(iter(model._make_data_loader(adata=adata, indices=rows, batch_size=len(rows), shuffle=False)))
    got = _batch(_Cells(model.adata_manager, rows).fetch(np.arange(len(rows))), np.arange(len(rows)))
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key


def test_block_loader_visits_every_training_cell_once_per_epoch(csr_file):
    _, adata = _prepared(csr_file, backed=True)
    SAMSVAE.setup_anndata(adata)
    model = SAMSVAE(adata, n_latent=3)
    train = model.split_indices("train")
    dm = BlockShuffledDataModule(model.adata_manager, train, model.split_indices("val"), 16, block_size=4, fetch_factor=2)
    library = np.asarray(adata.obs["cellpert_library_size"], dtype=np.float32)
    for _ in range(2):  # two epochs, two block orders
        seen = np.concatenate([b["library_size"].numpy().ravel() for b in dm.train_dataloader()])
        np.testing.assert_array_equal(np.sort(seen), np.sort(library[train]))


def test_backed_training_matches_the_same_loader_in_memory(csr_file):
    results = []
    for backed in (False, True):
        _, adata = _prepared(csr_file, backed=backed)
        SAMSVAE.setup_anndata(adata)
        model = SAMSVAE(adata, n_latent=3, n_hidden=16, guide_n_hidden=8, seed=1)
        model.train(max_steps=30, batch_size=32, lr=3e-3, early_stopping=False, loader="block")
        results.append(model.get_iwelbo(split="test", n_samples=5, seed=0))
    # the same cells in the same order: disk and memory give the same model
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_train_evaluate_export_backed_write_back_without_losing_anything(csr_file, tmp_path):
    original = file_digest(csr_file)
    path = tmp_path / "screen.h5ad"
    path.write_bytes(csr_file.read_bytes())
    run = train_run(path, out_dir=tmp_path / "run", model="samsvae", n_latent=3, n_hidden=16, guide_n_hidden=8,
                    max_steps=40, early_stopping=False, backed=True, progress_bar=False)  # fmt: skip
    assert run.screen.adata.isbacked and run.config["backed"] is True
    before = ad.read_h5ad(csr_file)
    evaluate_ate(path, model_dir=tmp_path / "run", n_draws=4, iwelbo_samples=5)
    export_latents(path, model_dir=tmp_path / "run")
    after = ad.read_h5ad(path)
    assert (after.X != before.X).nnz == 0  # the counts were copied, never rewritten
    assert after.obs["user_field"].eq("kept").all()
    assert {"X_true_latent", "X_samsvae_basal", "X_samsvae_latent"} <= set(after.obsm)
    assert "ate_samsvae" in after.varm and "ground_truth" in after.uns["cellpert"]
    np.testing.assert_array_equal(after.obsm["X_samsvae_latent"], run.model.get_latent_representation(kind="latent"))
    assert not list(tmp_path.glob(".*.tmp"))
    assert file_digest(csr_file) == original  # reading backed never writes the file it reads


def test_simulating_in_blocks_writes_the_same_screen_as_in_memory(tmp_path):
    kwargs = {"seed": 3, "n_perturbations": 5, "n_latent": 3, "n_genes": 40, "n_combinations": 2}
    path = simulate_sams(**kwargs, out=tmp_path / "blocks.h5ad")
    assert path == tmp_path / "blocks.h5ad" and not list(tmp_path.glob(".*.tmp"))
    on_disk, in_memory = ad.read_h5ad(path), simulate_sams(**kwargs)
    assert sp.issparse(on_disk.X) and (on_disk.X != in_memory.X).nnz == 0
    assert on_disk.obs.equals(in_memory.obs)
    np.testing.assert_array_equal(on_disk.obsm["X_true_latent"], in_memory.obsm["X_true_latent"])
    np.testing.assert_array_equal(
        on_disk.uns["cellpert"]["ground_truth"]["mask"], in_memory.uns["cellpert"]["ground_truth"]["mask"]
    )


def test_comparative_model_reads_a_backed_file_in_block_order_like_memory(csr_file):
    """The comparative model from disk: block-shuffled proportional minibatches by default
    (loader "auto"), and the same model as in memory with the same order."""
    from cellpert.models.comparative import ComparativeVAE

    results = []
    for backed in (False, True):
        _, adata = _prepared(csr_file, backed=backed)
        ComparativeVAE.setup_anndata(adata)
        model = ComparativeVAE(adata, n_background_latent=2, n_salient_latent=2, n_hidden=16, seed=1)
        dm = model._datamodule(model.split_indices("train"), model.split_indices("val"), 32, loader="auto")
        assert dm.block_size == (64 if backed else None)
        model.train(max_steps=20, batch_size=32, loader="block")
        results.append(float(model.history["elbo_train"].to_numpy().ravel()[-1]))
    assert np.isfinite(results).all()
    assert results[0] == pytest.approx(results[1], rel=1e-6)
