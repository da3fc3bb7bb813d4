"""The comparative VAE as an scvi-tools model (Lopez et al., CLeaR 2024; docs/models.md, *Comparative VAE*)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import NumericalObsField
from scvi.model.base import BaseModelClass

from cellpert._errors import CellpertInputError
from cellpert.data import DEFAULT_SPLIT_KEY, as_list, gene_log1p_stats, recorded_screen_keys
from cellpert.models._base import (
    CovariateMixin,
    DosageLabelsMixin,
    LikelihoodMixin,
    SplitMixin,
    SplitName,
    register_screen_fields,
    seeded,
)
from cellpert.models._prepare import DEFAULT_DOSAGE_KEY, DEFAULT_LIBRARY_SIZE_KEY, dosage_names_key
from cellpert.models._training import COMMON_TRAIN_DOC, PerturbationTrainingMixin
from cellpert.models.comparative._datasplitter import ComparativeDataSplitter
from cellpert.models.comparative._module import (
    IS_TARGET_KEY,
    LIBRARY_KEY,
    ComparativeVAEModule,
    Likelihood,
)
from cellpert.models.comparative._trainingplan import MODES, ComparativeTrainingPlan, Mode

__all__ = ["DEFAULT_IS_TARGET_KEY", "ComparativeVAE"]

logger = logging.getLogger(__name__)

#: obs column of the target indicator (1.0 target, 0.0 background) written by ``setup_anndata``.
DEFAULT_IS_TARGET_KEY = "cellpert_is_target"


def _target_indicator(
    adata: AnnData, background_key: str | None, background: Sequence[str] | str | None, dosage_key: str
) -> np.ndarray:
    """1 for target cells, 0 for background cells (see :meth:`ComparativeVAE.setup_anndata`)."""
    if isinstance(background, str):
        background = as_list(background)
    if background is not None and background_key is None:
        recorded, _ = recorded_screen_keys(adata)
        if not recorded:
            raise CellpertInputError(
                "background values given without background_key; name the obs column holding them "
                "(--background-key)."
            )
        background_key = str(recorded)
    if background_key is not None:
        if background_key not in adata.obs:
            raise CellpertInputError(f"obs has no column {background_key!r} (background_key); check the name.")
        values = adata.obs[background_key].astype(str)
        if background is None:
            _, recorded = recorded_screen_keys(adata)
            if not recorded:
                raise CellpertInputError(
                    f"no background values for obs[{background_key!r}]; pass background=<value(s)> "
                    "(--background), e.g. the control label."
                )
            background = recorded
        unknown = sorted(set(background) - set(values.unique()))
        if unknown:
            raise CellpertInputError(
                f"background value(s) {unknown[:5]} do not occur in obs[{background_key!r}] "
                f"(values: {', '.join(sorted(values.unique())[:8])})."
            )
        return (~values.isin(list(background))).to_numpy().astype(np.float32)
    if dosage_key not in adata.obsm:
        raise CellpertInputError(
            f"no way to tell background from target cells: obsm has no {dosage_key!r}; build it with "
            "cellpert.models.prepare_anndata(screen) (controls = background) or pass background_key and background."
        )
    dosage = adata.obsm[dosage_key]
    dosage = sp.csr_matrix(dosage.to_numpy() if isinstance(dosage, pd.DataFrame) else dosage)
    return (np.diff(dosage.indptr) > 0).astype(np.float32)


class ComparativeVAE(
    DosageLabelsMixin, LikelihoodMixin, SplitMixin, CovariateMixin, PerturbationTrainingMixin, BaseModelClass
):
    """Comparative VAE: background data decoded from z, target data from (z, t) (docs/models.md, *Comparative VAE*).

    Background cells (e.g. controls) have ``z ~ N(0, I)`` and ``x ~ p(x | f(z, 0))``;
    target cells (perturbed or stimulated) also a salient ``t ~ N(0, I)`` and
    ``x ~ p(x | f(z, t))``. One decoder f, a residual leaky-ReLU network (piecewise
    affine: the paper's identifiability condition), NB (or Poisson) counts with observed
    library size. Three fitting modes, chosen in :meth:`train`: ``standard``,
    ``multi-objective`` and ``constrained``. Covariates registered by
    :meth:`setup_anndata` (batch, categorical, continuous) enter the shared decoder,
    ``f(z, t, c)``, for both data sets (docs/models.md, *Covariates*).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_background_latent
        d_z, dimension of the shared (background) latent z.
    n_salient_latent
        d_t, dimension of the salient latent t.
    n_hidden
        Width of encoders and decoder (128).
    n_layers
        Decoder hidden layers (2).
    n_layers_encoder
        Hidden layers of each encoder (2).
    likelihood
        ``"nb"`` (default) or ``"poisson"``.
    encode_covariates
        Also give the covariates to both encoders, ``q(z | x, c)`` and ``q(t | x, c)``
        (default: decoder only, as in scvi-tools). Without covariates it does nothing.
    dispersion
        ``"gene"`` (θ_g) or ``"gene-batch"`` (θ_bg, one per gene and batch; needs the NB
        likelihood and a ``batch_key`` with at least two batches).
    seed
        Seeds the initial parameters and, by default, training.

    Examples
    --------
    >>> screen = cellpert.data.load_screen("kang.h5ad", perturbation_key="condition", control="control")
    >>> adata = cellpert.models.prepare_anndata(screen)
    >>> ComparativeVAE.setup_anndata(adata)  # controls are the background
    >>> model = ComparativeVAE(adata, n_background_latent=10, n_salient_latent=2)
    >>> model.train(max_epochs=200, mode="constrained", constraint_level=0.05)
    >>> adata.obsm["X_salient"] = model.get_latent_representation(kind="salient")
    """

    _module_cls = ComparativeVAEModule
    _training_plan_cls = ComparativeTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_background_latent: int = 10,
        n_salient_latent: int = 2,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_layers_encoder: int = 2,
        likelihood: Likelihood = "nb",
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        if likelihood not in ("nb", "poisson"):
            raise CellpertInputError(f"likelihood must be 'nb' or 'poisson', got {likelihood!r}.")
        if dispersion not in ("gene", "gene-batch"):
            raise CellpertInputError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}.")
        if dispersion == "gene-batch" and likelihood == "poisson":
            raise CellpertInputError("dispersion='gene-batch' needs likelihood='nb' (a Poisson has no dispersion).")
        for name, value in (("n_background_latent", n_background_latent), ("n_salient_latent", n_salient_latent)):
            if int(value) < 1:
                raise CellpertInputError(f"{name} must be >= 1, got {value}.")
        super().__init__(adata)
        self.seed = int(seed)
        n_genes = self.summary_stats.n_vars
        is_target = self._is_target()
        train_idx = self.split_indices("train")
        n_bg = int((is_target[train_idx] == 0).sum())
        n_tg = len(train_idx) - n_bg
        if len(train_idx) and (n_bg == 0 or n_tg == 0):
            raise CellpertInputError(
                f"the training split has {n_bg} background and {n_tg} target cells; a comparative model "
                "needs both (check --background / --control and the split)."
            )
        sizes = self.covariate_sizes
        if dispersion == "gene-batch" and sizes["n_batch"] <= 1:
            raise CellpertInputError(
                "dispersion='gene-batch' needs a batch: pass batch_key=<obs column> (two levels or more) "
                "to setup_anndata, or use dispersion='gene'."
            )
        counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        mean, std = gene_log1p_stats(counts, rows=train_idx)
        with seeded(self.seed):
            self.module = self._module_cls(
                n_genes,
                n_background_latent=n_background_latent,
                n_salient_latent=n_salient_latent,
                n_hidden=n_hidden,
                n_layers=n_layers,
                n_layers_encoder=n_layers_encoder,
                likelihood=likelihood,
                encode_covariates=encode_covariates,
                dispersion=dispersion,
                **sizes,
            )
        self.module.gene_mean.copy_(torch.as_tensor(mean))
        self.module.gene_std.copy_(torch.as_tensor(std))
        adata_now = self.adata
        names_key = dosage_names_key(DEFAULT_DOSAGE_KEY)
        if adata_now is not None and names_key in adata_now.uns:
            self.perturbation_names_ = [str(n) for n in np.atleast_1d(adata_now.uns[names_key])]
        else:
            self.perturbation_names_ = ["target"]
        self._model_summary_string = (
            f"ComparativeVAE: {n_genes} genes, d_z={n_background_latent}, d_t={n_salient_latent}, "
            f"{likelihood} likelihood, {len(train_idx)} training cells ({n_bg} background, {n_tg} target)"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        background_key: str | None = None,
        background: Sequence[str] | str | None = None,
        dosage_key: str = DEFAULT_DOSAGE_KEY,
        library_size_key: str = DEFAULT_LIBRARY_SIZE_KEY,
        is_target_key: str = DEFAULT_IS_TARGET_KEY,
        split_key: str | None = DEFAULT_SPLIT_KEY,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register counts, background / target membership, library size, split and covariates.

        Parameters
        ----------
        adata
            Cells × genes AnnData with raw counts.
        layer
            Layer with raw counts; ``None`` for ``X``.
        background_key
            obs column whose ``background`` values mark the background cells (e.g.
            ``"condition"``). ``None`` with ``background`` given: the screen's recorded
            perturbation column. ``None`` with neither: the control cells of the dosage
            matrix ``obsm[dosage_key]`` (an all-zero row) are the background.
        background
            Value(s) of ``obs[background_key]`` of the background cells (a list, or a
            comma-separated string). Default: the recorded control label(s).
        dosage_key
            obsm key of D (from :func:`~cellpert.models.prepare_anndata`), used when no
            ``background_key`` is given.
        library_size_key
            obs column with ℓ_i; computed from the counts and written there if missing.
        is_target_key
            obs column to write the membership into.
        split_key
            obs column with ``train`` / ``val`` / ``test`` / ``unused``; ``None``: every
            cell is a training cell.
        batch_key, categorical_covariate_keys, continuous_covariate_keys
            Covariates, as in scvi-tools: obs columns of the batch (e.g. the 10x lane),
            of other categorical covariates (donor, cell line) and of continuous ones
            (docs/models.md, *Covariates*). They enter the decoder shared by background
            and target cells, ``f(z, t, c)``; the constructor's ``encode_covariates=True``
            also gives them to both encoders and ``dispersion="gene-batch"`` gives each
            batch its own θ. A missing value (or a non-finite continuous one) is an
            error. With covariates the prior estimator of the model ATE
            (:meth:`get_predictive_means`) is refused: this family has no
            counterfactual estimator.

        Returns
        -------
        Nothing; registers the AnnData. Writes ``adata.obs[is_target_key]`` (float32, 1.0
        for target and 0.0 for background cells) and, if missing,
        ``adata.obs[library_size_key]``.
        """
        if isinstance(background, str):
            background = as_list(background)
        setup_method_args = cls._get_setup_method_args(**locals())
        indicator = _target_indicator(adata, background_key, background, dosage_key)
        if indicator.min() == indicator.max():
            which = "target" if indicator[0] else "background"
            raise CellpertInputError(
                f"every cell is a {which} cell; a comparative model needs background and target cells "
                "(check --background / --background-key or --control)."
            )
        adata.obs[is_target_key] = indicator
        register_screen_fields(
            cls, adata, layer=layer, library_size_key=library_size_key, split_key=split_key,
            fields=[NumericalObsField(IS_TARGET_KEY, is_target_key)], setup_method_args=setup_method_args,
            batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, **kwargs,
        )  # fmt: skip

    def _is_target(self, adata: AnnData | None = None) -> np.ndarray:
        adata = self._validate_anndata(adata)
        values = self.get_anndata_manager(adata, required=True).get_from_registry(IS_TARGET_KEY)
        return np.asarray(values).ravel().astype(np.float32)

    @property
    def perturbation_names(self) -> list[str]:
        """Names of the columns of D (for ATEs; every non-zero row is a target row)."""
        return list(self.perturbation_names_)

    # ------------------------------------------------------------------ train
    _train_defaults = {
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "early_stopping": False,
        "early_stopping_patience": None,
        "restore_best": False,
    }

    def _datamodule(
        self, train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int, *, loader: str, block_size: int = 64,
        fetch_factor: int = 16, **_: Any,
    ) -> Any:  # fmt: skip
        """Minibatches hold background and target cells in proportion (see the splitter).
        ``loader="block"``, or ``"auto"`` on a backed AnnData: each set in block-shuffled
        order (runs of consecutive rows); ``"random"`` (the in-memory default): a full shuffle."""
        blocks = self._block_order(loader, block_size, fetch_factor)
        return ComparativeDataSplitter(
            self.adata_manager, train_idx, val_idx, self._is_target() > 0.5, batch_size,
            block_size=int(block_size) if blocks else None, fetch_factor=int(fetch_factor),
        )  # fmt: skip

    def train(
        self,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        *,
        mode: Mode = "standard",
        penalty_weight: float = 1.0,
        mmd_weight: float = 0.0,
        constraint_level: float = 0.05,
        dual_lr: float = 0.1,
        n_epochs_kl_warmup: int | None = None,
        gradient_clip_val: float | None = None,
        plan_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        """Train with Adam; minibatches hold background and target cells in proportion.

        The common options and their defaults here: batch size 128 (nominal, see
        :class:`~cellpert.models.comparative._datasplitter.ProportionalBatchSampler`), lr
        1e-3, weight decay 0, no early stopping and no best-state restore (the paper
        trains a fixed number of epochs); with neither ``max_steps`` nor ``max_epochs``,
        scvi-tools' epoch heuristic.

        Parameters
        ----------
        mode
            ``"standard"``: fixed ``penalty_weight``; ``"multi-objective"``: the min-norm
            direction of the background and target objectives each step;
            ``"constrained"``: dual ascent on the penalty weight λ so that the background
            cells' mean Wasserstein penalty stays at ``constraint_level · d_t``. See
            :mod:`cellpert.models.comparative._trainingplan`.
        penalty_weight
            Weight of the Wasserstein penalty (standard, multi-objective), or the initial
            λ (constrained). Never scaled by the KL warm-up.
        mmd_weight
            Weight of the MMD between background and target cells' shared latents (0: off).
        constraint_level
            ε / d_t in the constrained mode: the fraction of the salient prior's energy
            (``E‖t‖² = d_t``) that background cells' salient posteriors may carry, e.g.
            0.05.
        dual_lr
            η, the dual-ascent step size per training step (constrained).
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (None: none).
        gradient_clip_val
            Clip the gradient norm (every mode; the multi-objective mode clips its manual
            step itself).

        The history (``model.history``) has, per epoch, ``penalty_weight`` (λ's
        trajectory), ``wasserstein_train`` and, in the multi-objective mode,
        ``mgda_alpha``; ``final_penalty_weight_`` is λ at the end.
"""
        if mode not in MODES:
            raise CellpertInputError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}.")
        if not penalty_weight >= 0 or not mmd_weight >= 0:
            raise CellpertInputError("penalty_weight and mmd_weight must be >= 0.")
        if mode == "constrained" and not 0 < constraint_level < 1:
            raise CellpertInputError(
                f"constraint_level is a fraction of the salient prior's energy, in (0, 1); got {constraint_level}."
            )
        plan = {
            "n_epochs_kl_warmup": n_epochs_kl_warmup or None,
            "n_steps_kl_warmup": None,
            "mode": mode,
            "penalty_weight": penalty_weight,
            "mmd_weight": mmd_weight,
            "constraint_level": constraint_level,
            "dual_lr": dual_lr,
            **(plan_kwargs or {}),
        }
        if mode == "multi-objective":
            plan["manual_clip_norm"] = gradient_clip_val
            gradient_clip_val = None  # Lightning cannot clip a manually optimised step
        out = super().train(max_steps, max_epochs, gradient_clip_val=gradient_clip_val, plan_kwargs=plan, **kwargs)
        self.training_mode_ = mode
        self.final_penalty_weight_ = self.trainer.lightning_module.multiplier
        return out

    train.__doc__ = (train.__doc__ or "") + COMMON_TRAIN_DOC

    # ------------------------------------------------------------- accessors
    def _log_weight_inputs(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """``(x, ℓ, is_target, covariates, batch_index)`` for
        :meth:`~cellpert.models.comparative.ComparativeVAEModule.log_weights` (the last two
        None without covariates)."""
        side = self.module.side_inputs(tensors)
        return (
            tensors[REGISTRY_KEYS.X_KEY], tensors[LIBRARY_KEY], tensors[IS_TARGET_KEY],
            side["covariates"], side["batch_index"],
        )  # fmt: skip

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        kind: Literal["background", "salient"] = "background",
        batch_size: int | None = None,
        split: SplitName | None = None,
    ) -> np.ndarray:
        """Posterior means of the shared latent z (``kind="background"``) or of the salient latent t.

        The salient means are the encoder's for every cell, background cells included
        (the model decodes those with t = 0; their salient means measure leakage).

        Returns
        -------
        (n_cells, d_z) or (n_cells, d_t) float32 array.
        """
        if kind not in ("background", "salient"):
            raise CellpertInputError(f"kind must be 'background' or 'salient', got {kind!r}.")
        self.module.eval()
        key = "qz_loc" if kind == "background" else "qt_loc"
        idx = self._indices(adata, indices, split)
        out = [
            self.module.encode(t[REGISTRY_KEYS.X_KEY], self.module.covariates(t))[key].cpu().numpy()
            for t in self._eval_batches(adata, idx, batch_size)
        ]
        width = self.module.n_background_latent if kind == "background" else self.module.n_salient_latent
        return np.concatenate(out, axis=0) if out else np.zeros((0, width), np.float32)

    def get_salient_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, *, batch_size: int | None = None
    ) -> np.ndarray:
        """Posterior means of t (:meth:`get_latent_representation` with ``kind="salient"``)."""
        return self.get_latent_representation(adata, indices, kind="salient", batch_size=batch_size)

    def is_target(self, adata: AnnData | None = None) -> np.ndarray:
        """Boolean membership per cell: True for target, False for background."""
        return self._is_target(adata) > 0.5

    def export_fields(self, adata: AnnData | None = None, batch_size: int | None = None) -> dict[str, dict[str, Any]]:
        """What ``cellpert export-latents`` writes.

        Returns
        -------
        ``{"obsm": {"background": z means, "salient": t means}, "uns": {"training": {...}}}``
        with the training mode, the final penalty weight and the set sizes.
        """
        is_target = self.is_target(adata)
        training = {
            "mode": getattr(self, "training_mode_", "untrained"),
            "final_penalty_weight": float(getattr(self, "final_penalty_weight_", float("nan"))),
            "n_background_cells": int((~is_target).sum()),
            "n_target_cells": int(is_target.sum()),
        }
        return {
            "obsm": {
                "background": self.get_latent_representation(adata, batch_size=batch_size),
                "salient": self.get_latent_representation(adata, kind="salient", batch_size=batch_size),
            },
            "uns": {"training": training},
        }

    def _predictive_means(self, dosage, n_samples, library, transform, chunk_size) -> torch.Tensor:
        """Prediction hook of :meth:`get_predictive_means` (the shared template).

        A zero row is a background row (``t = 0``); any other row a target row (``t ~
        N(0, I)``): the model has one salient space for every target cell, so all
        perturbations get the same predicted effect. ``z ~ N(0, I)`` for every row.
        Refused for a model with covariates (the prior has no covariates to decode at).
        """
        if self.module.covariates.n_output:
            raise CellpertInputError(
                "the comparative model's prior estimator does not take covariates, and the family has no "
                "counterfactual estimator; set the model up without covariates to compute model ATEs."
            )
        is_target = (dosage.abs().sum(1) > 0).to(torch.float32)
        return self.module.predictive_means(is_target, n_samples, library, transform=transform, chunk_size=chunk_size)
