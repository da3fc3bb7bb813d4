"""Covariates (batch, categorical, continuous) in sVAE, sVAE+, the comparative VAE and SAMS-VAE.

One tiny simulated screen with two batches (a latent batch effect, unevenly spread over
the perturbations), a three-level donor and a continuous score; each family is set up
with ``batch_key``, ``categorical_covariate_keys`` and ``continuous_covariate_keys``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scvi import REGISTRY_KEYS

from cellpert import CellpertInputError
from cellpert.data import load_screen
from cellpert.data.simulate import simulate_sams
from cellpert.models import SAMSVAE, prepare_anndata
from cellpert.models.comparative import ComparativeVAE
from cellpert.models.svae import SVAE, SVAEPlus, out_of_distribution, prepare_labels

COVARIATES = {"batch_key": "batch", "categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"]}
#: width of c_i: onehot(batch) 2 + onehot(donor) 3 + score 1
N_COV = 6
N_LATENT = 3
TRAIN = {"max_steps": 4, "batch_size": 64, "early_stopping": False, "enable_progress_bar": False}


@dataclass
class Family:
    """How one family is built, and where its decoder's first layer is."""

    cls: type
    kwargs: dict[str, Any]
    kinds: tuple[str, ...]
    counterfactual: bool
    decoder_widths: Any  # module -> input widths of the decoder's first layer
    encoder_widths: Any  # module -> input widths of the (first) encoder's first layer
    latent_inputs: list[int] = field(default_factory=list)  # decoder widths without covariates


def _fc_in(layer_stack) -> list[int]:
    return [layer_stack.fc_layers[0][0].in_features]


FAMILIES = {
    "svae": Family(
        SVAE, {"n_latent": N_LATENT, "n_hidden": 16, "n_layers": 1}, ("latent",), True,
        lambda m: _fc_in(m.decoder_body), lambda m: _fc_in(m.encoder.encoder), [N_LATENT],
    ),
    "svae+": Family(
        SVAEPlus, {"n_latent": N_LATENT, "n_hidden": 16, "n_layers": 1}, ("latent",), True,
        lambda m: _fc_in(m.decoder_body), lambda m: _fc_in(m.encoder.encoder), [N_LATENT],
    ),
    "comparative": Family(
        ComparativeVAE,
        {"n_background_latent": N_LATENT, "n_salient_latent": 2, "n_hidden": 16, "n_layers": 1, "n_layers_encoder": 1},
        ("background", "salient"), False,
        lambda m: m.decoder.body.first.n_inputs, lambda m: m.z_encoder.first.n_inputs, [N_LATENT, 2],
    ),
    "samsvae": Family(
        SAMSVAE, {"n_latent": N_LATENT, "n_hidden": 16}, ("basal",), True,
        lambda m: m.decoder.body.first.n_inputs, lambda m: m.encoder.first.n_inputs, [N_LATENT],
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)  # tiny models: more threads only contend on shared cores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def base_adata():
    """4 perturbations, 20 genes, 2 batches with a latent batch effect; a donor and a score."""
    adata = simulate_sams(
        seed=0, n_perturbations=4, n_latent=N_LATENT, n_cells_per_perturbation=(24, 6, 6),
        n_control_cells=(32, 8, 8), n_genes=20, n_batches=2, batch_effect=1.0, batch_imbalance=0.8,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d0", "d1", "d2"], size=adata.n_obs))
    adata.obs["score"] = rng.normal(size=adata.n_obs).astype(np.float32)
    screen = load_screen(adata, perturbation_key="perturbation", warn=False)
    prepare_anndata(screen)
    prepare_labels(screen)
    return screen.adata


def _setup(family: Family, adata, **covariates):
    adata = adata.copy()
    family.cls.setup_anndata(adata, **covariates)
    return adata


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, base_adata, tmp_path_factory):
    """(family, adata, model trained a few steps with covariates, its save directory)."""
    family = FAMILIES[request.param]
    adata = _setup(family, base_adata, **COVARIATES)
    model = family.cls(adata, seed=0, **family.kwargs)
    model.train(**TRAIN)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save(path, overwrite=True, save_anndata=False)
    return family, adata, model, path


def _control_train_cells(adata) -> np.ndarray:
    obs = adata.obs
    return np.flatnonzero((obs["perturbation"] == "control").to_numpy() & (obs["cellpert_split"] == "train").to_numpy())


# ------------------------------------------------------------------------ wiring
def test_covariate_width_and_vector_match_obs(trained):
    family, adata, model, _ = trained
    module = model.module
    assert module.covariates.n_output == N_COV
    assert model.covariate_sizes == {"n_batch": 2, "n_cats_per_cov": [3], "n_continuous_cov": 1}
    # the decoder's first layer takes c_i; the encoder does not by default
    assert sum(family.decoder_widths(module)) == sum(family.latent_inputs) + N_COV
    assert N_COV not in family.encoder_widths(module)[1:]
    # every cell's c_i is [onehot(batch), onehot(donor), score], from obs by hand
    codes_b = pd.Categorical(adata.obs["batch"].astype(str)).codes
    codes_d = pd.Categorical(adata.obs["donor"].astype(str)).codes
    expected = np.hstack([np.eye(2)[codes_b], np.eye(3)[codes_d], adata.obs[["score"]].to_numpy()])
    got = [module.covariates(t).cpu().numpy() for t in model._eval_batches(None, np.arange(adata.n_obs), 64)]
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-6)


def test_training_minibatches_carry_the_covariates(trained):
    """The comparative model's proportional datamodule, and the block-shuffled reader of
    the other families (scvi-tools' own splitter reads every registered field)."""
    family, _, model, _ = trained
    train_idx, val_idx = model.split_indices("train"), model.split_indices("val")
    if family.cls is ComparativeVAE:
        datamodule = model._datamodule(train_idx, val_idx, 32, loader="random")
    else:
        datamodule = model._datamodule(train_idx, val_idx, 32, loader="block", block_size=16, fetch_factor=2, seed=0)
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    for key in (REGISTRY_KEYS.BATCH_KEY, REGISTRY_KEYS.CAT_COVS_KEY, REGISTRY_KEYS.CONT_COVS_KEY):
        assert key in batch
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    assert model.module.covariates(batch).shape == (batch[REGISTRY_KEYS.X_KEY].shape[0], N_COV)


def test_evaluation_paths_run_and_use_the_covariates(trained):
    family, adata, model, _ = trained
    iwelbo = model.get_iwelbo(n_samples=4, return_mean=False)
    assert iwelbo.shape == (adata.n_obs,) and np.isfinite(iwelbo).all()
    assert np.isfinite(model.get_elbo(n_samples=4))
    for kind in family.kinds:
        latent = model.get_latent_representation(kind=kind)
        assert latent.shape[0] == adata.n_obs and np.isfinite(latent).all()
    # the decoder reads c_i: the same cells with the batch codes swapped score differently
    flipped = adata.copy()
    flipped.obs["batch"] = pd.Categorical(np.where(adata.obs["batch"] == "b0", "b1", "b0"), categories=["b0", "b1"])
    swapped = model.get_iwelbo(flipped, n_samples=4, return_mean=False)
    assert not np.allclose(swapped, iwelbo)
    # the prior estimator has no covariates to decode at: refused in one line
    with pytest.raises(CellpertInputError, match="covariates"):
        model.get_predictive_means(np.zeros((1, len(model.perturbation_names)), np.float32), n_samples=2)


def test_counterfactual_effects_keep_each_cells_covariates(trained):
    family, adata, model, _ = trained
    if not family.counterfactual:
        assert not hasattr(model, "get_counterfactual_effects")
        return
    rows = model.dosage_from_labels(model.perturbation_names[:2])
    out = model.get_counterfactual_effects(rows, indices=_control_train_cells(adata), n_draws=3, cells_per_draw=None)
    assert out["effects"].shape == (3, 2, adata.n_vars) and np.isfinite(out["effects"]).all()


def test_save_load_keeps_covariate_encodings(trained):
    family, adata, model, path = trained
    loaded = family.cls.load(path, adata=adata)
    assert loaded.covariate_levels == model.covariate_levels == {"batch": ["b0", "b1"], "donor": ["d0", "d1", "d2"]}
    assert loaded.module.covariates.n_output == N_COV
    a = model.get_iwelbo(n_samples=8, seed=3, return_mean=False)
    b = loaded.get_iwelbo(n_samples=8, seed=3, return_mean=False)
    np.testing.assert_array_equal(a, b)


def test_load_refuses_an_unseen_batch_level(trained):
    family, adata, _, path = trained
    other = adata.copy()
    other.obs["batch"] = other.obs["batch"].astype(str)
    other.obs.loc[other.obs_names[:3], "batch"] = "b7"
    with pytest.raises(CellpertInputError, match=r"obs\['batch'\].*b7"):
        family.cls.load(path, adata=other)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_setup_refuses_missing_covariate_values(base_adata, family_name):
    family = FAMILIES[family_name]
    bad_cat = base_adata.copy()
    bad_cat.obs["donor"] = bad_cat.obs["donor"].astype(object)
    bad_cat.obs.iloc[5, bad_cat.obs.columns.get_loc("donor")] = np.nan
    with pytest.raises(CellpertInputError, match=r"obs\['donor'\]"):
        family.cls.setup_anndata(bad_cat, **COVARIATES)
    bad_cont = base_adata.copy()
    bad_cont.obs.iloc[2, bad_cont.obs.columns.get_loc("score")] = np.nan
    with pytest.raises(CellpertInputError, match=r"obs\['score'\]"):
        family.cls.setup_anndata(bad_cont, **COVARIATES)


# ---------------------------------------------------- without covariates: unchanged
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_a_model_without_covariates_keeps_its_parameters(base_adata, family_name):
    """Without covariates nothing is added: the decoder's first layer takes the latents
    only, and the state_dict differs from a model with covariates only there."""
    family = FAMILIES[family_name]
    plain = family.cls(_setup(family, base_adata), seed=0, **family.kwargs)
    with_cov = family.cls(_setup(family, base_adata, **COVARIATES), seed=0, **family.kwargs)
    assert plain.module.covariates.n_output == 0
    assert sum(family.decoder_widths(plain.module)) == sum(family.latent_inputs)
    sp, sc = plain.module.state_dict(), with_cov.module.state_dict()
    changed = {k for k in sp if k in sc and sp[k].shape != sc[k].shape}
    if family.cls in (SVAE, SVAEPlus):
        # scvi-tools' FCLayers: its first Linear reads [z, c]
        assert set(sc) == set(sp) and changed == {"decoder_body.fc_layers.Layer 0.0.weight"}
    else:
        # MultiInputLinear: one more (bias-free) weight for c, every other one unchanged
        extra = f"decoder.body.first.layers.{len(family.latent_inputs)}.weight"
        assert set(sc) - set(sp) == {extra} and set(sp) <= set(sc) and not changed
        assert tuple(sc[extra].shape) == (16, N_COV)


def test_encoder_covariates_and_per_batch_dispersion(base_adata):
    """``encode_covariates`` widens the encoder's first layer; ``"gene-batch"`` gives θ per batch."""
    for name in ("svae", "comparative"):
        family = FAMILIES[name]
        adata = _setup(family, base_adata, **COVARIATES)
        model = family.cls(adata, seed=0, encode_covariates=True, dispersion="gene-batch", **family.kwargs)
        module = model.module
        log_theta = module.log_theta if name == "svae" else module.decoder.log_theta
        assert tuple(log_theta.shape) == (2, adata.n_vars)
        widths = family.encoder_widths(module)
        assert sum(widths) == adata.n_vars + N_COV
        model.train(**TRAIN)
        assert np.isfinite(model.get_iwelbo(n_samples=4))
        assert np.isfinite(model.get_latent_representation(kind=family.kinds[0])).all()
        batch = torch.tensor([0, 1, 1])
        assert module.nb_theta_of(batch).shape == (3, adata.n_vars)
        if family.counterfactual:
            rows = model.dosage_from_labels(model.perturbation_names[:1])
            out = model.get_counterfactual_effects(rows, indices=_control_train_cells(adata), n_draws=2)
            assert np.isfinite(out["effects"]).all()
        # a per-batch θ without a batch is refused at construction
        no_batch = _setup(family, base_adata, categorical_covariate_keys=["donor"])
        with pytest.raises(CellpertInputError, match="batch"):
            family.cls(no_batch, dispersion="gene-batch", **family.kwargs)


@pytest.mark.parametrize("trained", ["svae", "svae+"], indirect=True)
def test_svae_out_of_distribution_with_covariates(trained):
    """sVAE's three stages: every score and stage 3's fit go through the covariates."""
    family, adata, _, path = trained
    fresh = family.cls.load(path, adata=adata)
    table = out_of_distribution(
        fresh, heldout_labels=fresh.perturbation_names[:1], n_samples_iwelbo=4, n_samples_elbo=2,
        stage2_train_kwargs={"max_steps": 2, "batch_size": 64, "early_stopping": False, "enable_progress_bar": False},
    )  # fmt: skip
    assert list(table["stage"]) == [1, 2, 3] and np.isfinite(table[["elbo", "iwelbo"]].to_numpy()).all()
