"""SAMS-VAE, CPA-VAE and the conditional VAE as scvi-tools models (docs/models.md, *SAMS-VAE*, *Baselines: CPA-VAE and conditional VAE*)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import ObsmField
from scvi.model.base import BaseModelClass

from cellpert._errors import CellpertInputError
from cellpert.data import DEFAULT_SPLIT_KEY, gene_log1p_stats
from cellpert.models._base import (
    CounterfactualMixin,
    CovariateMixin,
    DosageLabelsMixin,
    SplitMixin,
    SplitName,
    module_kwargs,
    register_screen_fields,
    seeded,
)
from cellpert.models._components._ica import ica_masks
from cellpert.models._keys import DOSAGE_KEY, LIBRARY_KEY
from cellpert.models._prepare import DEFAULT_DOSAGE_KEY, DEFAULT_LIBRARY_SIZE_KEY, dosage_names_key
from cellpert.models._training import COMMON_TRAIN_DOC, PerturbationTrainingMixin
from cellpert.models.samsvae._module import PerturbationVAEModule
from cellpert.models.samsvae._trainingplan import PerturbationTrainingPlan, TemperatureCallback

__all__ = ["CPAVAE", "SAMSVAE", "ConditionalVAE"]

logger = logging.getLogger(__name__)

#: How evaluation draws the global latents (E, M): one draw per importance sample, shared
#: by all cells (docs/models.md, *ATE space and data ATE*), or a single draw for every sample and cell.
GlobalDraws = Literal["per_sample", "single"]
#: Step cap of ``train()`` when neither ``max_steps`` nor ``max_epochs`` is given (early
#: stopping usually ends training sooner).
DEFAULT_MAX_STEPS = 30_000
#: Default Adam learning rate of the q(M) logits (the other parameters use ``lr``).
DEFAULT_MASK_LOGITS_LR = 3e-2



class _PerturbationVAE(
    CounterfactualMixin, DosageLabelsMixin, SplitMixin, CovariateMixin, PerturbationTrainingMixin, BaseModelClass
):
    """Shared model code of SAMS-VAE, CPA-VAE and the conditional VAE."""

    _module_cls = PerturbationVAEModule
    _training_plan_cls = PerturbationTrainingPlan
    _variant: str = "sams"
    #: lr 1e-3 and clipping at 100 (the paper: 3e-4, clipping on Norman only): on the shared
    #: subsets they reach a lower validation loss in fewer steps (benchmarks/RESULTS_ate.md,
    #: session 18)
    _train_defaults = {
        "batch_size": 512,
        "lr": 1e-3,
        "gradient_clip_val": 100.0,
        "weight_decay": 1e-6,
        "early_stopping": True,
        "early_stopping_patience": None,
        "restore_best": True,
    }
    _default_max_steps = DEFAULT_MAX_STEPS
    _monitor = "validation_loss"

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        dosage_key: str = DEFAULT_DOSAGE_KEY,
        library_size_key: str = DEFAULT_LIBRARY_SIZE_KEY,
        split_key: str | None = DEFAULT_SPLIT_KEY,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register counts, the dosage matrix D, the library size, the split and covariates.

        Parameters
        ----------
        adata
            Cells × genes AnnData (e.g. from :func:`cellpert.models.prepare_anndata`).
        layer
            Layer with raw counts; ``None`` for ``X``.
        dosage_key
            ``obsm`` key of D (cells × perturbations): a scipy sparse matrix (kept sparse;
            minibatches are densified, ``batch × T`` at a time) whose column names are in
            ``uns[dosage_key + "_names"]``, or a DataFrame whose columns name the
            perturbations.
        library_size_key
            obs column with the observed library size ℓ_i. If missing, it is computed
            from the counts and written there.
        split_key
            obs column with ``train`` / ``val`` / ``test`` / ``unused`` per cell; the model
            trains on ``train``, validates on ``val``, and computes the encoder's gene
            statistics and ``N_t`` on them. ``None``: every cell is a training cell.
        batch_key, categorical_covariate_keys, continuous_covariate_keys
            Covariates, as in scvi-tools: obs columns of the batch (e.g. the 10x lane),
            of other categorical covariates (donor, cell line) and of continuous ones.
            They enter the decoder (docs/models.md, *Covariates*); a missing value is an
            error.

        Returns
        -------
        Nothing; registers the AnnData with the model class. May write
        ``adata.obs[library_size_key]`` (float32).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if dosage_key not in adata.obsm:
            raise CellpertInputError(
                f"obsm has no {dosage_key!r}; build it with cellpert.models.prepare_anndata(screen) "
                "or pass dosage_key."
            )
        names_key = None
        if not isinstance(adata.obsm[dosage_key], pd.DataFrame):
            names_key = dosage_names_key(dosage_key)
            if names_key not in adata.uns:
                raise CellpertInputError(
                    f"uns has no {names_key!r} with the names of the columns of obsm[{dosage_key!r}]; "
                    "store them there or make obsm[dosage_key] a DataFrame."
                )
        register_screen_fields(
            cls, adata, layer=layer, library_size_key=library_size_key, split_key=split_key,
            fields=[ObsmField(DOSAGE_KEY, dosage_key, colnames_uns_key=names_key)], setup_method_args=setup_method_args,
            batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ init
    def _build(self, seed: int, **module_kwargs) -> None:
        """Split bookkeeping, training statistics, and the module (seeded)."""
        self.seed = seed
        n_genes = self.summary_stats.n_vars
        self.perturbation_names_ = [
            str(n) for n in self.adata_manager.get_state_registry(DOSAGE_KEY)["column_names"]
        ]
        n_pert = len(self.perturbation_names_)
        train_idx = self.split_indices("train")
        counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        mean, std = gene_log1p_stats(counts, rows=train_idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._module_cls(
                n_genes, n_pert, variant=self._variant, **self.covariate_sizes, **module_kwargs
            )
        self.module.gene_mean.copy_(torch.as_tensor(mean))
        self.module.gene_std.copy_(torch.as_tensor(std))
        self.module.n_cells_train.copy_(torch.as_tensor(self.cells_per_perturbation(train_idx)))
        self.module.n_cells_val.copy_(torch.as_tensor(self.cells_per_perturbation(self.split_indices("val"))))
        self._model_summary_string = (
            f"{type(self).__name__}: {n_genes} genes, {n_pert} perturbations, "
            f"n_latent={self.module.n_latent}, {len(train_idx)} training cells"
        )

    def _dosage(self, adata: AnnData | None = None) -> sp.csr_matrix:
        adata = self._validate_anndata(adata)
        value = self.get_anndata_manager(adata, required=True).get_from_registry(DOSAGE_KEY)
        if isinstance(value, pd.DataFrame):
            value = value.to_numpy()
        return sp.csr_matrix(value)

    def cells_per_perturbation(self, indices: np.ndarray, adata: AnnData | None = None) -> np.ndarray:
        """``N_t``: number of the given cells that received each perturbation."""
        dosage = self._dosage(adata)[np.asarray(indices, dtype=np.int64)]
        return np.bincount(dosage.indices[dosage.data != 0], minlength=dosage.shape[1]).astype(np.float32)

    @property
    def perturbation_names(self) -> list[str]:
        """Names of the columns of D."""
        return list(self.perturbation_names_)

    # ----------------------------------------------------------------- train
    def train(
        self,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        *,
        mask_temperature_final: float | None = None,
        mask_logits_lr: float | None = DEFAULT_MASK_LOGITS_LR,
        plan_kwargs: dict | None = None,
        **kwargs,
    ):
        """Train with Adam on the training split, validating on the validation split.

        The common options and their SAMS-VAE-family defaults: batch size 512 and weight
        decay 1e-6 (the paper's), lr 1e-3 and gradient clipping at norm 100 (the paper: lr
        3e-4, clipping on Norman; at 3e-4 the shared Norman and McFaline subsets stop at a 0.5
        and 2.4 nats worse validation loss after 1.9× and 1.8× the steps;
        ``lr=3e-4, gradient_clip_val=0`` is the paper's),
        early stopping on (the paper trains a fixed number of steps:
        ``early_stopping=False`` with ``max_steps``), step cap :data:`DEFAULT_MAX_STEPS`
        (the paper's Norman run: 30,000).

        Parameters
        ----------
        mask_temperature_final
            Option (not in the paper): anneal the relaxed-Bernoulli temperature
            geometrically from ``mask_temperature`` to this value over training.
        mask_logits_lr
            Adam learning rate of the q(M) logits (cellpert's default
            :data:`DEFAULT_MASK_LOGITS_LR`, 3e-2; None: ``lr``, the paper's). At lr = 3e-4
            Adam moves a logit by at most about 3e-4 per step, so the paper's masks need
            tens of thousands of steps to leave their initial value: on the Norman subset
            after 2,000 steps their mean q was still 0.44 and the held-out ATE r 0.35;
            with 3e-2 the masks settle (mean q 0.02) and r reaches 0.47.
"""
        plan = dict(plan_kwargs or {})
        if mask_logits_lr is not None:
            plan.setdefault("param_lrs", {"mask_logits": mask_logits_lr})
        callbacks = list(kwargs.pop("callbacks", []) or [])
        if mask_temperature_final is not None:
            callbacks.append(TemperatureCallback(self.module.mask_temperature, mask_temperature_final))
        return super().train(max_steps, max_epochs, plan_kwargs=plan, callbacks=callbacks, **kwargs)

    train.__doc__ = (train.__doc__ or "") + COMMON_TRAIN_DOC

    # ------------------------------------------------------------- helpers
    @staticmethod
    def _seeded(seed: int):
        """Seed torch's global RNG inside the block and restore its state afterwards."""
        return seeded(seed)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        kind: Literal["basal", "latent"] = "basal",
        batch_size: int | None = None,
        split: SplitName | None = None,
        n_samples: int = 10,
        seed: int = 0,
    ) -> np.ndarray:
        """Posterior means of the basal state z^b or the latent z = z^b + D(E ⊙ M).

        The encoder mean is averaged over ``n_samples`` draws of the globals from q (drawn
        once and shared by all cells); the latent adds the matching offset.

        Parameters
        ----------
        adata, indices, split
            Cells (default: all cells of the registered AnnData; ``split`` selects one split).
        kind
            ``"basal"`` (z^b) or ``"latent"`` (z). The same for the conditional VAE.
        batch_size
            Cells per minibatch.

        Returns
        -------
        (n_cells, n_latent) array.
        """
        self.module.eval()
        idx = self._indices(adata, indices, split)
        with self._seeded(seed):
            glob = self.module.sample_globals(n_samples)
            out = []
            for t in self._eval_batches(adata, idx, batch_size):
                inf = self.module.inference(
                    t[REGISTRY_KEYS.X_KEY], t[DOSAGE_KEY], n_particles=n_samples, global_samples=glob,
                    covariates=self.module.covariates(t),
                )  # fmt: skip
                loc = inf["qzb_loc"]
                if loc.dim() == 3:
                    loc = loc.mean(0)
                if kind == "latent" and inf["offset"] is not None:
                    loc = loc + inf["offset"].mean(0)
                out.append(loc.cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.module.n_latent), np.float32)

    def export_fields(self, adata: AnnData | None = None, batch_size: int | None = None) -> dict:
        """What ``cellpert export-latents`` writes (the export protocol of every model).

        Returns
        -------
        ``{"obsm": {"basal": z^b, "latent": z}, "uns": {"embeddings": ..., "mask_probabilities": ...}}``:
        posterior means per cell, and perturbation x latent DataFrames (the conditional VAE
        has neither embeddings nor masks; CPA-VAE has no masks).
        """
        fields: dict = {
            "obsm": {
                kind: self.get_latent_representation(adata, kind=kind, batch_size=batch_size)
                for kind in ("basal", "latent")
            },
            "uns": {},
        }
        if self.module.variant != "cvae":
            fields["uns"]["embeddings"] = self.get_perturbation_embeddings()
        if self.module.variant == "sams":
            fields["uns"]["mask_probabilities"] = self.get_mask_probabilities()
        return fields

    def _require_globals(self) -> None:
        if self.module.variant == "cvae":
            raise CellpertInputError(f"{type(self).__name__} has no perturbation embeddings or masks.")

    @torch.inference_mode()
    def get_perturbation_embeddings(
        self, *, masked: bool = False, n_samples: int = 200, seed: int = 0
    ) -> pd.DataFrame:
        """Posterior mean of the embeddings E_t (``masked=True``: of E_t ⊙ M_t).

        Exact for mean-field q(E); Monte Carlo over ``n_samples`` draws of (M, E) for the
        correlated guide.

        Returns
        -------
        DataFrame perturbations × latent dimensions, indexed by perturbation name.
        """
        self._require_globals()
        m = self.module
        if m.guide == "mean_field":
            value = m.embedding_loc
            if masked and m.variant == "sams":
                value = value * torch.sigmoid(m.mask_logits)
        else:
            with self._seeded(seed):
                glob = m.sample_globals(n_samples)
            if masked:
                value = glob["effect"].mean(0)
            else:
                # E_t = effect / M_t is undefined where M = 0: redraw E from q(E | M)
                loc, _ = m.embedding_guide(glob["mask"])
                value = loc.mean(0)
        return pd.DataFrame(
            value.detach().cpu().numpy(),
            index=pd.Index(self.perturbation_names, name="perturbation"),
            columns=[f"z{k}" for k in range(m.n_latent)],
        )

    @torch.inference_mode()
    def get_mask_probabilities(self) -> pd.DataFrame:
        """q(M_tk = 1) = σ(logit_tk) as a perturbations × latent dimensions DataFrame."""
        self._require_globals()
        if self.module.variant != "sams":
            raise CellpertInputError(f"{type(self).__name__} has no masks.")
        return pd.DataFrame(
            torch.sigmoid(self.module.mask_logits).cpu().numpy(),
            index=pd.Index(self.perturbation_names, name="perturbation"),
            columns=[f"z{k}" for k in range(self.module.n_latent)],
        )

    def get_ica_masks(
        self,
        adata: AnnData | None = None,
        *,
        threshold: float = 0.5,
        seed: int = 0,
        batch_size: int | None = None,
        latent: np.ndarray | None = None,
    ) -> dict[str, np.ndarray | pd.DataFrame]:
        """Option (not in the paper): perturbation → latent masks in the ICA basis of z.

        SAMS-VAE's priors other than the mask prior are invariant under rotations of the
        latent space, so the model learns z only up to a linear map and q(M) lives in a
        mixed basis where effects are dense (on the SAMS simulator the paper's q(M)
        switches most entries on). This un-mixes the posterior means of z with FastICA and
        reads the masks off each perturbation's latent shift there
        (:func:`cellpert.evaluate.ica_masks`, defined in :mod:`cellpert.models._components._ica`). The model itself is not changed.

        Parameters
        ----------
        adata
            Cells to use (default: the model's AnnData, every split).
        threshold
            A dimension counts as targeted when its shift exceeds this fraction of the
            perturbation's largest absolute shift.
        seed
            FastICA's seed.
        batch_size
            Minibatch size of the encoder pass.
        latent
            Posterior means of z of ``adata``'s cells, when already computed (skips the
            encoder pass).

        Returns
        -------
        ``latent`` (cells × r ICA latents), ``shifts`` and ``masks`` (perturbations × r
        DataFrames indexed by perturbation name; masks are 0/1).
        """
        self._require_globals()
        if latent is None:
            latent = self.get_latent_representation(adata, kind="latent", batch_size=batch_size)
        out = ica_masks(latent, self._dosage(adata), threshold=threshold, seed=seed)
        index = pd.Index(self.perturbation_names, name="perturbation")
        columns = [f"ica{k}" for k in range(out["latent"].shape[1])]
        return {
            "latent": out["latent"],
            "shifts": pd.DataFrame(out["shifts"], index=index, columns=columns),
            "masks": pd.DataFrame(out["masks"], index=index, columns=columns),
        }

    @torch.inference_mode()
    def get_iwelbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        split: SplitName | None = None,
        n_samples: int = 100,
        batch_size: int | None = None,
        seed: int = 0,
        global_draws: GlobalDraws = "per_sample",
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-weighted ELBO per cell (docs/models.md, *ATE space and data ATE*).

        Per cell, ``log (1/S) Σ_s p(x | z^b_s, E_s, M_s, ℓ_obs) p(z^b_s) / q(z^b_s | ·)``
        with ``S = n_samples``. Global variables are not scored against their priors.

        Parameters
        ----------
        global_draws
            ``"per_sample"`` (docs/models.md, *ATE space and data ATE*): each importance sample s draws its own
            (E_s, M_s) from q, shared by all cells, so the estimate also averages over
            q(E, M). ``"single"``: one draw of (E, M) for
            every sample and cell (the estimate then depends on that draw).

        Returns
        -------
        The mean over the cells, or per-cell values (``return_mean=False``).
        """
        values = self._local_log_weights(
            adata, indices, split, n_samples, batch_size, seed, iw=True, global_draws=global_draws
        )
        return float(values.mean()) if return_mean else values

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        split: SplitName | None = None,
        n_samples: int = 100,
        batch_size: int | None = None,
        seed: int = 0,
        include_global: bool = False,
        global_draws: GlobalDraws = "per_sample",
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """ELBO per cell under the same protocol as :meth:`get_iwelbo`.

        The local ELBO ``log p(x | z) + log p(z^b) - log q(z^b)`` averaged over
        ``n_samples`` draws (with ``global_draws="per_sample"``, each with its own draw of
        (E, M), shared by all cells). ``include_global=True`` adds the training
        objective's global terms of the same draws, each perturbation's spread over the
        scored cells that received it (``N_t`` counted on them).

        Returns
        -------
        The mean over the cells, or per-cell values (``return_mean=False``).
        """
        values = self._local_log_weights(
            adata, indices, split, n_samples, batch_size, seed,
            iw=False, include_global=include_global, global_draws=global_draws,
        )  # fmt: skip
        return float(values.mean()) if return_mean else values

    def _local_log_weights(
        self, adata, indices, split, n_samples, batch_size, seed, *,
        iw: bool, include_global: bool = False, global_draws: GlobalDraws = "per_sample",
    ) -> np.ndarray:  # fmt: skip
        if global_draws not in ("per_sample", "single"):
            raise ValueError(f"global_draws must be 'per_sample' or 'single', got {global_draws!r}")
        self.module.eval()
        idx = self._indices(adata, indices, split)
        # with one draw of (E, M) per sample, the encoder also runs once per sample
        per_sample_encoder = global_draws == "per_sample" and self.module.variant != "cvae"
        batch_size = self._eval_batch_size(
            n_samples, batch_size, extra_width=self.module.n_hidden if per_sample_encoder else 0
        )
        n_cells = torch.as_tensor(self.cells_per_perturbation(idx, adata), device=self.device)
        with self._seeded(seed):
            glob = self.module.sample_globals(n_samples if global_draws == "per_sample" else 1)
            out = []
            for t in self._eval_batches(adata, idx, batch_size):
                x, dosage, library = t[REGISTRY_KEYS.X_KEY], t[DOSAGE_KEY], t[LIBRARY_KEY]
                logw = self.module.iwelbo_terms(x, dosage, library, glob, n_samples, **self.module.side_inputs(t))  # (S, B)
                if iw:
                    value = torch.logsumexp(logw, 0) - math.log(n_samples)
                else:
                    value = logw.mean(0)
                    if include_global:
                        value = value + self.module.global_per_cell(dosage, glob["log_ratio"], n_cells).mean(0)
                out.append(value.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    # ------------------------------------------------------------ prediction
    def _encode_basal(self, tensors: dict[str, torch.Tensor], sample: bool) -> torch.Tensor:
        """Counterfactual hook: basal states of control cells, q(z^b | x̃, D = 0)."""
        return self.module.encode_basal(tensors[REGISTRY_KEYS.X_KEY], sample=sample, covariates=self.module.covariates(tensors))

    def _latent_positions(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Empirical-shift hook: E_q[z^b + D_i (E ⊙ M)] of cells under their own perturbation."""
        return self.module.latent_position(
            tensors[REGISTRY_KEYS.X_KEY], tensors[DOSAGE_KEY], covariates=self.module.covariates(tensors)
        )

    def _posterior_globals(self, n_draws: int) -> dict[str, torch.Tensor | None]:
        """Posterior-predictive hook: (E, M) ~ q, ``n_draws`` particles."""
        return self.module.sample_globals(n_draws)

    def _posterior_rho(
        self, tensors: dict[str, torch.Tensor], n_draws: int, global_draws: dict | None = None
    ) -> torch.Tensor:
        """Posterior-predictive hook: ρ of cells decoded at draws of their posterior, (n_draws, B, G)."""
        return self.module.posterior_rho(
            tensors[REGISTRY_KEYS.X_KEY], tensors[DOSAGE_KEY], covariates=self.module.covariates(tensors),
            n_draws=n_draws, global_samples=global_draws,
        )  # fmt: skip

    def _global_effect_draws(self, n_draws: int) -> torch.Tensor | None:
        """Counterfactual hook: (P, T, K) draws of E ⊙ M from q (None: the conditional VAE)."""
        return self.module.sample_globals(n_draws)["effect"]

    def _predictive_means(self, dosage, n_samples, library, transform, chunk_size) -> torch.Tensor:
        """Prediction hook: (E, M) ~ q per particle, z^b ~ N(0, I) per row (docs/models.md, *ATE space and data ATE*)."""
        if self.module.covariates.n_output:
            raise CellpertInputError(
                "the prior estimator does not take covariates; use the counterfactual estimator "
                "(estimator='counterfactual', the default), which keeps each control cell's covariates."
            )
        return self.module.predictive_means(dosage, n_samples, library, transform=transform, chunk_size=chunk_size)


_SHARED_DOC = """
    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        K (paper: 200 on Norman).
    n_hidden, n_layers
        Decoder (and encoder) width and decoder depth (paper: 400, 1).
    n_layers_encoder
        Encoder depth.
    n_particles
        Monte Carlo particles of the training ELBO (paper: 5).
    embedding_prior_scale
        s of the N(0, s² I) embedding prior.
    encode_covariates
        Also give the covariates to the encoder (default: decoder only, as scvi-tools;
        docs/models.md, *Covariates*).
    dispersion
        ``"gene"`` (θ_g) or ``"gene-batch"`` (θ_bg; needs ``batch_key``).
    seed
        Seeds the initial parameters (and, by default, training).
"""


class SAMSVAE(_PerturbationVAE):
    """Sparse Additive Mechanism Shift VAE (Bereket & Karaletsos, 2023).

    ``z_i = z^b_i + Σ_t D_it (E_t ⊙ M_t)`` with ``M_tk ~ Bernoulli(p)``; see docs/models.md, *SAMS-VAE*.
    """

    __doc__ += _SHARED_DOC + """    guide
        ``"correlated"`` (q(E_t | M_t) by a shared MLP) or ``"mean_field"``.
    guide_n_hidden, guide_n_layers
        Correlated guide MLP (Norman: 400 × 4).
    mask_prior_prob
        p (Norman: 0.01).
    mask_temperature
        Relaxed-Bernoulli temperature (paper: 1).
    mask_logits_init
        Initial q(M) logits (paper: 0); ``"prior"`` starts at ``logit(mask_prior_prob)``.
    encoder_input
        Encoder side input: ``"offset"`` (paper, the sampled ``D_i (E ⊙ M)``),
        ``"dosage"`` (option, ``D_i``) or ``"none"``; see the module.
    mask_gradient
        ``"straight_through"`` (paper) or ``"score"`` (option: unbiased leave-one-out
        score-function gradient for the mask logits; see the module).
    spike_slab_guide
        Option: ``q(E_tk | M_tk = 0) = p(E_tk)``, so that a mask that is on pays for its
        embedding (see the module). Same generative model, different guide.

    Examples
    --------
    >>> screen = cellpert.data.load_screen(path)
    >>> cellpert.data.make_split(screen, "random", seed=0)
    >>> adata = cellpert.models.prepare_anndata(screen)
    >>> SAMSVAE.setup_anndata(adata, layer=screen.layer)
    >>> model = SAMSVAE(adata, n_latent=200)
    >>> model.train(max_steps=2000)
    >>> model.get_iwelbo(split="test")
    """

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        guide: Literal["correlated", "mean_field"] = "correlated",
        n_latent: int = 200,
        n_hidden: int = 400,
        n_layers: int = 1,
        n_layers_encoder: int = 1,
        guide_n_hidden: int = 400,
        guide_n_layers: int = 4,
        mask_prior_prob: float = 0.01,
        embedding_prior_scale: float = 1.0,
        n_particles: int = 5,
        mask_temperature: float = 1.0,
        mask_logits_init: float | Literal["prior"] = 0.0,
        encoder_input: Literal["offset", "dosage", "none"] = "offset",
        mask_gradient: Literal["straight_through", "score"] = "straight_through",
        spike_slab_guide: bool = False,
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        super().__init__(adata)
        self._build(seed, **module_kwargs(locals()))
        self.init_params_ = self._get_init_params(locals())


class CPAVAE(_PerturbationVAE):
    """CPA-VAE: SAMS-VAE without masks, ``z = z^b + D E``, mean-field q(E) (docs/models.md, *Baselines: CPA-VAE and conditional VAE*)."""

    __doc__ += _SHARED_DOC
    _variant = "cpa"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_latent: int = 200,
        n_hidden: int = 400,
        n_layers: int = 1,
        n_layers_encoder: int = 1,
        embedding_prior_scale: float = 1.0,
        n_particles: int = 5,
        encoder_input: Literal["offset", "dosage", "none"] = "offset",
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        super().__init__(adata)
        self._build(seed, guide="mean_field", **module_kwargs(locals()))
        self.init_params_ = self._get_init_params(locals())


class ConditionalVAE(_PerturbationVAE):
    """Conditional VAE: ``z ~ N(0, I)``, decoder ``p(x | z, D)``, encoder ``q(z | x̃, D)`` (docs/models.md, *Baselines: CPA-VAE and conditional VAE*)."""

    __doc__ += _SHARED_DOC
    _variant = "cvae"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_latent: int = 200,
        n_hidden: int = 400,
        n_layers: int = 1,
        n_layers_encoder: int = 1,
        n_particles: int = 5,
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        super().__init__(adata)
        self._build(seed, **module_kwargs(locals()))
        self.init_params_ = self._get_init_params(locals())
