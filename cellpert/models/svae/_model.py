"""sVAE and sVAE+ as scvi-tools models (Lopez et al., CLeaR 2023; docs/models.md, *sVAE and sVAE+*)."""

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
from scvi.data.fields import CategoricalObsField
from scvi.model.base import BaseModelClass

from cellpert._errors import CellpertInputError
from cellpert.data import (
    DEFAULT_SPLIT_KEY,
    PerturbationScreen,
    detect_control_labels,
    recorded_screen_keys,
    split_label,
)
from cellpert.models._base import (
    CounterfactualMixin,
    CovariateMixin,
    DosageLabelsMixin,
    LikelihoodMixin,
    SplitMixin,
    SplitName,
    module_kwargs,
    register_screen_fields,
    seeded,
)
from cellpert.models._keys import LABEL_KEY, LIBRARY_KEY
from cellpert.models._prepare import DEFAULT_DOSAGE_KEY, DEFAULT_LIBRARY_SIZE_KEY, dosage_names_key
from cellpert.models._training import COMMON_TRAIN_DOC, PerturbationTrainingMixin
from cellpert.models.svae._module import Prior, SVAEModule
from cellpert.models.svae._trainingplan import SVAETrainingPlan

__all__ = ["DEFAULT_LABEL_KEY", "SVAE", "SVAEPlus", "labels_from_dosage", "prepare_labels"]

logger = logging.getLogger(__name__)

#: obs column of the one-label-per-cell perturbation labels written by :func:`prepare_labels`.
DEFAULT_LABEL_KEY = "cellpert_label"


def _controls_key(label_key: str) -> str:
    """Top-level ``uns`` key holding the control labels of ``obs[label_key]``."""
    return f"{label_key}_controls"


def prepare_labels(screen: PerturbationScreen, *, label_key: str = DEFAULT_LABEL_KEY) -> AnnData:
    """Write the screen's canonical labels (one per cell) for :meth:`SVAE.setup_anndata`.

    Combinations (``"A+B"``) are their own label, as sVAE treats them.

    Parameters
    ----------
    screen
        From :func:`~cellpert.data.load_screen`.
    label_key
        obs column to write.

    Returns
    -------
    ``screen.adata`` itself (modified in place), with

    - ``obs[label_key]``: the canonical label of each cell (categorical);
    - ``uns[label_key + "_controls"]``: the control labels (array of strings).
    """
    adata = screen.adata
    adata.obs[label_key] = pd.Categorical(np.asarray(screen.labels, dtype=str))
    adata.uns[_controls_key(label_key)] = np.asarray(list(screen.control_labels), dtype=str)
    return adata


def labels_from_dosage(
    adata: AnnData,
    *,
    dosage_key: str = DEFAULT_DOSAGE_KEY,
    control_label: str = "control",
) -> np.ndarray:
    """One label per cell from the dosage matrix of :func:`~cellpert.models.prepare_anndata`.

    A cell's label joins the names of its perturbations with ``+`` (in column order);
    control cells (an all-zero row) get ``control_label``.
    """
    dosage = sp.csr_matrix(adata.obsm[dosage_key])
    names = np.asarray(adata.uns[dosage_names_key(dosage_key)], dtype=str)
    labels = np.full(adata.n_obs, control_label, dtype=object)
    for i in range(adata.n_obs):
        cols = dosage.indices[dosage.indptr[i] : dosage.indptr[i + 1]]
        if len(cols):
            labels[i] = "+".join(names[np.sort(cols)])
    return labels


def _resolve_controls(
    adata: AnnData, label_key: str, control_labels: Sequence[str] | str | None
) -> list[str]:
    """Control labels: explicit, else recorded by :func:`prepare_labels` or the CLI, else detected."""
    if isinstance(control_labels, str):
        return [control_labels]
    if control_labels is not None:
        return [str(c) for c in control_labels]
    if _controls_key(label_key) in adata.uns:
        return [str(c) for c in np.atleast_1d(adata.uns[_controls_key(label_key)])]
    _, recorded = recorded_screen_keys(adata)
    if recorded:
        return recorded
    try:
        return detect_control_labels(adata.obs[label_key].astype(str))
    except CellpertInputError:
        logger.warning("no control label found in obs[%r]: every label gets a learned shift", label_key)
        return []


def _check_dispersion(dispersion: str) -> None:
    """A one-line error for an unknown ``dispersion`` (its batch is checked in ``_build``)."""
    if dispersion not in ("gene", "gene-batch"):
        raise CellpertInputError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}.")


class SVAE(
    CounterfactualMixin,
    DosageLabelsMixin,
    LikelihoodMixin,
    SplitMixin,
    CovariateMixin,
    PerturbationTrainingMixin,
    BaseModelClass,
):
    """sVAE: sparse mechanism shift VAE with an expected-edge L1 penalty (docs/models.md, *sVAE and sVAE+*).

    One label a per cell; ``z ~ N(m ⊙ μ_a, I)`` with hard Gumbel-sigmoid masks m from
    learned logits; label-agnostic encoder from ``log1p(x)``; NB decoder with observed
    library size that never sees the label. Loss ``mean_i[rec + β w KL] + λ · mean σ(log_alpha)``.
    ``sparsity_weight=0`` is the iVAE (masks stay on); ``prior="standard"`` the plain VAE.
    Covariates registered by :meth:`setup_anndata` (batch, categorical, continuous) enter
    the decoder, ``ρ = softmax(f(z, c))`` (docs/models.md, *Covariates*).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        K (simulation: 15).
    n_hidden, n_layers
        Hidden width and number of hidden layers of encoder and decoder (128, 2).
    dropout_rate
        Encoder dropout (0.1).
    use_batch_norm
        Batch norm in both networks (True).
    sparsity_weight
        λ ≥ 0 of the expected-edge L1 penalty.
    kl_beta
        β, weight of the KL term (1).
    mask_logits_init
        Initial log_alpha (5: edges start almost all on).
    mask_temperature
        Gumbel-sigmoid temperature (1).
    prior
        ``"shift"`` (sVAE) or ``"standard"`` (N(0, I) ignoring labels: the plain-VAE baseline).
    encode_covariates
        Also give the covariates to the encoder, ``q(z | x, c)`` (default: decoder only,
        as in scvi-tools). Without covariates it does nothing.
    dispersion
        ``"gene"`` (θ_g) or ``"gene-batch"`` (θ_bg, one per gene and batch; needs a
        ``batch_key`` with at least two batches).
    seed
        Seeds the initial parameters and, by default, training.

    Examples
    --------
    >>> screen = cellpert.data.load_screen(path)
    >>> adata = cellpert.models.prepare_anndata(screen)
    >>> prepare_labels(screen)
    >>> SVAE.setup_anndata(adata, layer=screen.layer, split_key="cellpert_split")
    >>> model = SVAE(adata, n_latent=15, sparsity_weight=1.0)
    >>> model.train(max_epochs=200)
    >>> model.get_mask_probabilities()
    """

    _module_cls = SVAEModule
    _training_plan_cls = SVAETrainingPlan
    _sparsity: Literal["l1", "beta"] = "l1"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        sparsity_weight: float = 10.0,
        kl_beta: float = 1.0,
        mask_logits_init: float = 5.0,
        mask_temperature: float = 1.0,
        prior: Prior = "shift",
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        if not sparsity_weight >= 0:
            raise CellpertInputError(f"sparsity_weight (λ) must be >= 0, got {sparsity_weight}.")
        _check_dispersion(dispersion)
        super().__init__(adata)
        self._build(seed, sparsity="l1", **module_kwargs(locals()))
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        label_key: str = DEFAULT_LABEL_KEY,
        control_labels: Sequence[str] | str | None = None,
        library_size_key: str = DEFAULT_LIBRARY_SIZE_KEY,
        split_key: str | None = DEFAULT_SPLIT_KEY,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register counts, one perturbation label per cell, the library size, the split and covariates.

        Parameters
        ----------
        adata
            Cells × genes AnnData (e.g. ``prepare_anndata(screen)`` then ``prepare_labels(screen)``).
        layer
            Layer with raw counts; ``None`` for ``X``.
        label_key
            obs column with one label per cell (combinations are their own label), e.g.
            written by :func:`prepare_labels`, or the screen's perturbation column. If the
            default column is missing but ``obsm['cellpert_dosage']`` (from
            :func:`~cellpert.models.prepare_anndata`) is there, the labels are built from
            it (:func:`labels_from_dosage`) and written to ``obs[label_key]``.
        control_labels
            Labels of control cells (μ = 0). Default: ``uns[label_key + "_controls"]``, else
            ``uns['cellpert']['screen']['control']``, else detected among the usual spellings
            (none found: every label gets a shift).
        library_size_key
            obs column with ℓ_i; computed from the counts and written there if missing.
        split_key
            obs column with ``train`` / ``val`` / ``test`` / ``unused``; ``None``: every cell
            is a training cell.
        batch_key, categorical_covariate_keys, continuous_covariate_keys
            Covariates, as in scvi-tools: obs columns of the batch (e.g. the 10x lane),
            of other categorical covariates (donor, cell line) and of continuous ones
            (docs/models.md, *Covariates*). They enter the decoder, ``f(z, c)``; the
            constructor's ``encode_covariates=True`` also gives them to the encoder and
            ``dispersion="gene-batch"`` gives each batch its own θ. A missing value (or a
            non-finite continuous one) is an error. With covariates the prior estimator
            of the model ATE is refused (use the counterfactual one, which keeps each
            control cell's covariates).

        Returns
        -------
        Nothing; registers the AnnData. May write ``adata.obs[library_size_key]`` (float32),
        and ``adata.obs[label_key]`` with ``adata.uns[label_key + "_controls"]`` (see
        ``label_key``).
        """
        if label_key not in adata.obs:
            if label_key != DEFAULT_LABEL_KEY or DEFAULT_DOSAGE_KEY not in adata.obsm:
                raise CellpertInputError(
                    f"obs has no label column {label_key!r}; write one with "
                    "cellpert.models.svae.prepare_labels(screen) or pass label_key=<perturbation column>."
                )
            _, recorded = recorded_screen_keys(adata)
            control = recorded[0] if recorded else "control"
            adata.obs[label_key] = pd.Categorical(labels_from_dosage(adata, control_label=control))
            adata.uns[_controls_key(label_key)] = np.asarray([control], dtype=str)
            logger.info("wrote obs[%r] from obsm[%r]", label_key, DEFAULT_DOSAGE_KEY)
        control_labels = _resolve_controls(adata, label_key, control_labels)
        setup_method_args = cls._get_setup_method_args(**locals())
        register_screen_fields(
            cls, adata, layer=layer, library_size_key=library_size_key, split_key=split_key,
            fields=[CategoricalObsField(LABEL_KEY, label_key)], setup_method_args=setup_method_args,
            batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------- init
    def _build(self, seed: int, **module_kwargs: Any) -> None:
        """Label bookkeeping and the module (seeded)."""
        self.seed = int(seed)
        n_genes = self.summary_stats.n_vars
        mapping = self.adata_manager.get_state_registry(LABEL_KEY)["categorical_mapping"]
        self.labels_ = [str(c) for c in mapping]
        controls = set(self.adata_manager.registry["setup_args"].get("control_labels") or [])
        self.control_labels_ = [lab for lab in self.labels_ if lab in controls]
        sizes = self.covariate_sizes
        if module_kwargs.get("dispersion") == "gene-batch" and sizes["n_batch"] <= 1:
            raise CellpertInputError(
                "dispersion='gene-batch' needs a batch: pass batch_key=<obs column> (two levels or more) "
                "to setup_anndata, or use dispersion='gene'."
            )
        with seeded(self.seed):
            self.module = self._module_cls(n_genes, len(self.labels_), **sizes, **module_kwargs)
        is_control = np.array([lab in controls for lab in self.labels_], dtype=np.float32)
        train_idx = self.split_indices("train")
        codes = self._label_codes()
        in_train = np.bincount(codes[train_idx], minlength=len(self.labels_)) > 0
        self.module.is_control.copy_(torch.as_tensor(is_control))
        self.module.penalised.copy_(torch.as_tensor(in_train.astype(np.float32)))
        self.module.n_obs_train.fill_(float(max(len(train_idx), 1)))
        self._model_summary_string = (
            f"{type(self).__name__}: {n_genes} genes, {len(self.labels_)} labels "
            f"({len(self.control_labels_)} control), n_latent={self.module.n_latent}, "
            f"{len(train_idx)} training cells"
        )

    def _label_codes(self, adata: AnnData | None = None) -> np.ndarray:
        adata = self._validate_anndata(adata)
        codes = self.get_anndata_manager(adata, required=True).get_from_registry(LABEL_KEY)
        return np.asarray(codes).ravel().astype(np.int64)

    @property
    def labels(self) -> list[str]:
        """The labels, in the order of the rows of μ and log_alpha."""
        return list(self.labels_)

    def label_indices(self, labels: Sequence[str], adata: AnnData | None = None) -> np.ndarray:
        """Row indices of the cells whose label is one of ``labels``."""
        unknown = sorted(set(labels) - set(self.labels_))
        if unknown:
            raise CellpertInputError(f"unknown label(s) {unknown[:5]}; the model knows {len(self.labels_)} labels.")
        wanted = np.isin(np.asarray(self.labels_), list(labels))
        return np.flatnonzero(wanted[self._label_codes(adata)])

    # ------------------------------------------------------------------ train
    _train_defaults = {
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "early_stopping": True,
        "early_stopping_patience": 45,
        "restore_best": True,
    }

    def train(
        self,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        *,
        perturbation_lr: float | None = None,
        n_epochs_kl_warmup: int | None = 50,
        plan_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        """Train with Adam on the training split; early stopping on the validation ELBO.

        The common options and their sVAE defaults: batch size 128, lr 1e-3, weight decay
        0, early stopping on with a patience of 45 epochs counted after the warm-up, best
        state restored; with neither ``max_steps`` nor ``max_epochs``, scvi-tools' epoch
        heuristic.

        Parameters
        ----------
        perturbation_lr
            Option (not in the paper): a separate Adam learning rate for the perturbation
            parameters μ and log_alpha. With lr 1e-3 Adam moves each of them by at most
            about 1e-3 per step, so switching an edge off from its initial logit 5, or
            growing a shift of size 5 from 0, takes at least ~5,000 steps; a larger
            ``perturbation_lr`` shortens compute-limited runs. None: ``lr``.
        n_epochs_kl_warmup
            Epochs of linear KL warm-up w: 0 → 1 (50). None or 0: no warm-up.
"""
        plan = {"n_epochs_kl_warmup": n_epochs_kl_warmup or None, "n_steps_kl_warmup": None, **(plan_kwargs or {})}
        if perturbation_lr is not None and self.module.prior == "shift":
            plan.setdefault("param_lrs", {"shift_mean": perturbation_lr, "log_alpha": perturbation_lr})
        out = super().train(max_steps, max_epochs, plan_kwargs=plan, **kwargs)
        if getattr(self, "best_validation_loss_", None) is not None:
            self.best_validation_elbo_ = -self.best_validation_loss_
        return out

    train.__doc__ = (train.__doc__ or "") + COMMON_TRAIN_DOC

    # -------------------------------------------------------------- helpers
    def _frame(self, values: torch.Tensor | np.ndarray) -> pd.DataFrame:
        if torch.is_tensor(values):
            values = values.detach().cpu().numpy()
        return pd.DataFrame(
            np.asarray(values, dtype=np.float32),
            index=pd.Index(self.labels_, name="label"),
            columns=[f"z{k}" for k in range(self.module.n_latent)],
        )

    def _require_shift(self) -> None:
        if self.module.prior != "shift":
            raise CellpertInputError(f"this {type(self).__name__} has prior='standard': no shifts or masks.")

    # ------------------------------------------------------------- accessors
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        kind: Literal["latent"] = "latent",
        batch_size: int | None = None,
        split: SplitName | None = None,
    ) -> np.ndarray:
        """Posterior means E_q[z | x] (encoder in eval mode; with ``encode_covariates``,
        E_q[z | x, c] at each cell's covariates).

        Parameters
        ----------
        adata, indices, split
            Cells (default: all cells of the registered AnnData; ``split`` selects one split).
        kind
            ``"latent"``, sVAE's only cell-level representation (the same argument as
            the other families', where it chooses among several).
        batch_size
            Cells per minibatch.

        Returns
        -------
        (n_cells, n_latent) float32 array.
        """
        if kind != "latent":
            raise CellpertInputError(f"kind must be 'latent' for {type(self).__name__}, not {kind!r}.")
        self.module.eval()
        idx = self._indices(adata, indices, split)
        out = [
            self.module.inference(t[REGISTRY_KEYS.X_KEY], covariates=self.module.covariates(t))["qz_m"].cpu().numpy()
            for t in self._eval_batches(adata, idx, batch_size)
        ]
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.module.n_latent), np.float32)

    @torch.inference_mode()
    def get_shift_means(self) -> pd.DataFrame:
        """μ: labels × latent dimensions (the control rows are 0)."""
        self._require_shift()
        m = self.module
        return self._frame(m.shift_mean * (1.0 - m.is_control).unsqueeze(-1))

    @torch.inference_mode()
    def get_mask_probabilities(self) -> pd.DataFrame:
        """σ(log_alpha): labels × latent dimensions (for control labels it is meaningless)."""
        self._require_shift()
        return self._frame(torch.sigmoid(self.module.log_alpha))

    @torch.inference_mode()
    def get_masks(self) -> pd.DataFrame:
        """The masks used at evaluation: ``1[log_alpha > 0]``, or the frozen masks."""
        self._require_shift()
        m = self.module
        value = m.frozen_mask if m._masks_are_frozen else (m.log_alpha > 0).float()
        return self._frame(value)

    def export_fields(self, adata: AnnData | None = None, batch_size: int | None = None) -> dict[str, dict[str, Any]]:
        """What ``cellpert export-latents`` writes.

        Returns
        -------
        ``{"obsm": {"latent": cells × K posterior means}, "uns": {"shift_means": μ,
        "mask_probabilities": σ(log_alpha), "masks": thresholded masks, "control_labels":
        list}}``, the DataFrames labels × K. A ``prior="standard"`` model has only ``obsm``.
        """
        out: dict[str, dict[str, Any]] = {
            "obsm": {"latent": self.get_latent_representation(adata, batch_size=batch_size)},
            "uns": {},
        }
        if self.module.prior == "shift":
            out["uns"] = {
                "shift_means": self.get_shift_means(),
                "mask_probabilities": self.get_mask_probabilities(),
                "masks": self.get_masks(),
                "control_labels": list(self.control_labels_),
            }
        return out

    # ------------------------------------------------------------ prediction
    @property
    def perturbation_names(self) -> list[str]:
        """The non-control labels: the columns of the dosage rows of the ATE protocol."""
        return [lab for lab in self.labels_ if lab not in set(self.control_labels_)]

    def dosage_from_labels(self, labels: Sequence[str], *, control: Sequence[str] = ("control", "ctrl")) -> np.ndarray:
        """One-hot rows over :attr:`perturbation_names` for labels.

        sVAE treats every label, a combination too, as its own perturbation: a label the
        model knows gets its own column. A combination ``"A+B"`` the model has not seen is
        predicted additively in the latent space, from the shifts of its parts (each a
        known label). Control labels give a zero row.
        """
        col = {n: j for j, n in enumerate(self.perturbation_names)}
        # a combination is the same label whatever the order of its parts ("A+B" = "B+A")
        by_parts = {frozenset(split_label(n)): j for n, j in col.items()}

        def known_column(lab: str) -> int | None:
            return col.get(str(lab), by_parts.get(frozenset(split_label(lab))))

        controls = set(control) | set(self.control_labels_)
        known = [lab for lab in labels if known_column(lab) is not None or str(lab) in controls]
        rows = super().dosage_from_labels([lab for lab in labels if lab not in known], control=control)
        out = np.zeros((len(labels), len(col)), dtype=np.float32)
        it = iter(rows)
        for i, lab in enumerate(labels):
            j = known_column(lab)
            if j is not None and str(lab) not in controls:
                out[i, j] = 1.0
            elif lab not in known:
                out[i] = next(it)
        return out

    def _shifts(self) -> torch.Tensor:
        """Latent shift ``m_a ⊙ μ_a`` of each perturbation (rows of :attr:`perturbation_names`)."""
        self._require_shift()
        rows = [self.labels_.index(lab) for lab in self.perturbation_names]
        m = self.module
        mask = m.frozen_mask if m._masks_are_frozen else (m.log_alpha > 0).to(m.shift_mean.dtype)
        return (mask * m.shift_mean)[rows]

    def _encode_basal(self, tensors: dict[str, torch.Tensor], sample: bool) -> torch.Tensor:
        """Counterfactual hook: the latents of control cells, from q(z | x[, c])."""
        inf = self.module.inference(tensors[REGISTRY_KEYS.X_KEY], covariates=self.module.covariates(tensors))
        return inf["z"] if sample else inf["qz_m"]

    def _latent_positions(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Empirical-shift hook: the posterior mean of z, q(z | x[, c]), of any cell."""
        return self.module.inference(tensors[REGISTRY_KEYS.X_KEY], covariates=self.module.covariates(tensors))["qz_m"]

    def _posterior_rho(self, tensors: dict[str, torch.Tensor], n_draws: int, global_draws: None = None) -> torch.Tensor:
        """Posterior-predictive hook: ρ of cells decoded at draws of q(z | x[, c]), (n_draws, B, G)
        (no global latents: ``global_draws`` is None)."""
        return self.module.posterior_rho(
            tensors[REGISTRY_KEYS.X_KEY], covariates=self.module.covariates(tensors), n_draws=n_draws
        )

    def _global_effect_draws(self, n_draws: int) -> torch.Tensor:
        """Counterfactual hook: the shifts, the same for every draw (μ and the masks are
        point estimates; masks thresholded at σ(log_alpha) = 0.5)."""
        return self._shifts().expand(int(n_draws), -1, -1)

    def _predictive_means(self, dosage, n_samples, library, transform, chunk_size) -> torch.Tensor:
        """Prediction hook (the paper protocol's model ATE for sVAE): ``z ~ N(D_r shift, I)``
        with the learned shifts of the rows' labels (thresholded masks), ``x ~ NB(ℓ ρ(z), θ)``."""
        from cellpert.models._components import chunked_predictive_mean, nb_sample

        if self.module.covariates.n_output:
            raise CellpertInputError(
                "the prior estimator does not take covariates; use the counterfactual estimator "
                "(estimator='counterfactual', the default), which keeps each control cell's covariates."
            )
        shift = dosage @ self._shifts()

        def draw_rho(c: int) -> torch.Tensor:
            # latent z ~ N(D_r shift, I), independently per particle and row
            return self.module.decode_rho(shift + torch.randn(c, *shift.shape, device=shift.device))

        return chunked_predictive_mean(
            draw_rho, lambda mu: nb_sample(mu, self.module.theta),
            n_samples=n_samples, library_size=library, transform=transform, chunk_size=chunk_size,
        )  # fmt: skip

    def _log_weight_inputs(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """``(x, ℓ, label, covariates, batch_index)`` for :meth:`SVAEModule.log_weights`
        (masks thresholded or frozen; the last two None without covariates)."""
        side = self.module.side_inputs(tensors)
        return (
            tensors[REGISTRY_KEYS.X_KEY], tensors[LIBRARY_KEY], tensors[LABEL_KEY],
            side["covariates"], side["batch_index"],
        )  # fmt: skip


class SVAEPlus(SVAE):
    """sVAE+: sVAE with a Beta(1, K_beta) prior on the mask probabilities (docs/models.md, *sVAE and sVAE+*).

    Loss ``n_obs · mean_i[rec + β w KL] + w · (−Σ_{a,k} log Beta(σ(log_alpha); 1, K_beta))``
    with n_obs the number of training cells (see :mod:`cellpert.models.svae._module` for
    how this interacts with minibatches).

    Parameters
    ----------
    adata, n_latent, n_hidden, n_layers, dropout_rate, use_batch_norm, kl_beta, mask_logits_init, mask_temperature, prior, seed
        As for :class:`SVAE`.
    encode_covariates, dispersion
        As for :class:`SVAE`: covariates enter the decoder, and with
        ``encode_covariates=True`` the encoder; ``"gene-batch"`` gives one θ per gene and batch.
    beta_k
        K_beta > 1 (swept {2, 5, 10}); 1 would be a flat prior, i.e. no sparsity at all.
    """

    _sparsity = "beta"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        beta_k: float = 5.0,
        kl_beta: float = 1.0,
        mask_logits_init: float = 5.0,
        mask_temperature: float = 1.0,
        prior: Prior = "shift",
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
        seed: int = 0,
    ) -> None:
        if not beta_k > 1:
            raise CellpertInputError(
                f"beta_k (K_beta) must be > 1, got {beta_k}: K_beta = 1 means no sparsity "
                "(Beta(1, 1) is flat); try 2, 5 or 10."
            )
        _check_dispersion(dispersion)
        BaseModelClass.__init__(self, adata)
        self._build(seed, sparsity="beta", **module_kwargs(locals()))
        self.init_params_ = self._get_init_params(locals())
