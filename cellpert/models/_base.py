"""Pieces shared by the model families: split bookkeeping, seeding, evaluation helpers.

The model classes keep the train / val / test split in an obs column registered through
``setup_anndata(..., split_key=...)``; :class:`SplitMixin` reads it back and turns it
into the ``external_indexing`` that scvi-tools' data splitter takes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellpert._errors import CellpertInputError
from cellpert.data import as_list, is_control_spelling, split_label

__all__ = [
    "CounterfactualMixin",
    "CovariateMixin",
    "check_covariates",
    "DosageLabelsMixin",
    "LikelihoodMixin",
    "SplitMixin",
    "SplitName",
    "module_kwargs",
    "register_screen_fields",
    "resolve_epochs",
    "seeded",
]

logger = logging.getLogger(__name__)

#: Values (draws × cells × genes) of one batched posterior decode in get_posterior_expression
#: (16 MB of float32): large enough that small groups take all their draws in one call.
_POSTERIOR_BLOCK = 1 << 22

SplitName = Literal["train", "val", "test", "unused"]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global (CPU) RNG inside the block and restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def resolve_epochs(
    n_train: int, batch_size: int, max_steps: int | None, max_epochs: int | None
) -> tuple[int, int]:
    """Epochs to ask Lightning for, and the total number of steps, from either limit.

    ``max_steps`` wins over ``max_epochs``; with neither, scvi-tools' heuristic for
    ``n_train`` cells is used. Raises when there are no training cells.
    """
    if n_train == 0:
        raise CellpertInputError("no training cells in the split; check the split column.")
    steps_per_epoch = math.ceil(n_train / batch_size)
    if max_steps is not None:
        return math.ceil(max_steps / steps_per_epoch), int(max_steps)
    if max_epochs is None:
        from scvi.model._utils import get_max_epochs_heuristic

        max_epochs = get_max_epochs_heuristic(n_train)
    return int(max_epochs), int(max_epochs) * steps_per_epoch


def module_kwargs(init_locals: dict[str, Any]) -> dict[str, Any]:
    """A model constructor's own arguments, to forward to its module: ``locals()`` taken
    right after ``super().__init__(adata)``, without ``self``, ``adata`` and ``seed``."""
    return {k: v for k, v in init_locals.items() if k not in {"self", "adata", "seed", "__class__"}}


def check_covariates(
    adata: AnnData,
    *,
    batch_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> None:
    """One-line errors for covariate columns a model cannot use.

    Every column must exist in ``obs``; a categorical one (the batch included) must have
    no missing value; a continuous one must be numeric and finite.
    """
    for key in [batch_key, *(categorical_covariate_keys or [])]:
        if key is None:
            continue
        if key not in adata.obs:
            raise CellpertInputError(f"obs has no covariate column {key!r}; pass an existing obs column.")
        missing = int(pd.isna(adata.obs[key]).sum())
        if missing:
            raise CellpertInputError(
                f"obs[{key!r}] has {missing} cell(s) without a value; fill them (e.g. 'unknown') or drop those cells."
            )
    for key in continuous_covariate_keys or []:
        if key not in adata.obs:
            raise CellpertInputError(f"obs has no covariate column {key!r}; pass an existing obs column.")
        values = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise CellpertInputError(
                f"continuous covariate obs[{key!r}] has {bad} missing, non-numeric or infinite value(s); "
                "fill or drop those cells, or pass it as a categorical covariate."
            )
    keys = [k for k in [batch_key, *(categorical_covariate_keys or []), *(continuous_covariate_keys or [])] if k]
    if len(set(keys)) != len(keys):
        raise CellpertInputError(f"a covariate column is given twice ({', '.join(keys)}); give each once.")


def register_screen_fields(
    cls: type,
    adata: AnnData,
    *,
    layer: str | None,
    library_size_key: str,
    split_key: str | None,
    fields: Sequence[Any],
    setup_method_args: dict[str, Any],
    batch_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    **kwargs: Any,
) -> None:
    """What every family's ``setup_anndata`` does after its own checks.

    Checks the split column and the covariates (:func:`check_covariates`), writes
    ``adata.obs[library_size_key]`` (the observed library size ℓ_i, float32) when it is
    missing, and registers the counts (``layer``, raw counts), the family's own
    ``fields``, the library size and the covariates (scvi-tools' ``batch_key``,
    ``categorical_covariate_keys``, ``continuous_covariate_keys`` fields; each only when
    given, so a model without covariates has the registry it always had) with an
    :class:`~scvi.data.AnnDataManager`.
    """
    from scvi import REGISTRY_KEYS
    from scvi.data import AnnDataManager
    from scvi.data.fields import (
        CategoricalJointObsField,
        CategoricalObsField,
        LayerField,
        NumericalJointObsField,
        NumericalObsField,
    )

    from cellpert.models._keys import LIBRARY_KEY

    if split_key is not None and split_key not in adata.obs:
        raise CellpertInputError(
            f"obs has no split column {split_key!r}; make one with cellpert.data.make_split or "
            "pass split_key=None to train on every cell."
        )
    # one column or a comma-separated string (command line, config file) -> list
    categorical_covariate_keys = as_list(categorical_covariate_keys) or None
    continuous_covariate_keys = as_list(continuous_covariate_keys) or None
    if "source_registry" not in kwargs:  # a new setup (a saved model checks its levels in load)
        check_covariates(
            adata, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )  # fmt: skip
    if library_size_key not in adata.obs:
        counts = adata.X if layer is None else adata.layers[layer]
        adata.obs[library_size_key] = np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()
    anndata_fields = [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
        *fields,
        NumericalObsField(LIBRARY_KEY, library_size_key),
    ]
    if batch_key is not None:
        anndata_fields.append(CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key))
    if categorical_covariate_keys:
        anndata_fields.append(CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, list(categorical_covariate_keys)))
    if continuous_covariate_keys:
        anndata_fields.append(NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, list(continuous_covariate_keys)))
    adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
    adata_manager.register_fields(adata, **kwargs)
    cls.register_manager(adata_manager)


class CovariateMixin:
    """Covariates of a :class:`~scvi.model.base.BaseModelClass` subclass set up with
    :func:`register_screen_fields`: their sizes for the module, their levels, and a
    ``load`` that refuses, in one line, a screen whose levels the model never saw."""

    @property
    def covariate_sizes(self) -> dict[str, Any]:
        """``n_batch``, ``n_cats_per_cov`` and ``n_continuous_cov`` (0 / [] when absent)."""
        from scvi import REGISTRY_KEYS

        fields = self.adata_manager.data_registry
        out: dict[str, Any] = {"n_batch": 0, "n_cats_per_cov": [], "n_continuous_cov": 0}
        if REGISTRY_KEYS.BATCH_KEY in fields:
            out["n_batch"] = int(self.summary_stats.n_batch)
        if REGISTRY_KEYS.CAT_COVS_KEY in fields:
            state = self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY)
            out["n_cats_per_cov"] = [int(n) for n in state["n_cats_per_key"]]
        if REGISTRY_KEYS.CONT_COVS_KEY in fields:
            state = self.adata_manager.get_state_registry(REGISTRY_KEYS.CONT_COVS_KEY)
            out["n_continuous_cov"] = len(state["columns"])
        return out

    @property
    def covariate_levels(self) -> dict[str, list[str]]:
        """The levels of each categorical covariate (the batch included), by obs column."""
        return _registry_levels(self.adata_manager.registry)

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, *args: Any, **kwargs: Any):
        """scvi-tools' ``load``, after checking that ``adata``'s covariate levels are the model's."""
        if adata is not None:
            registry = cls.load_registry(dir_path)
            for key, levels in _registry_levels(registry).items():
                if key not in adata.obs:
                    raise CellpertInputError(
                        f"the model was trained with covariate obs[{key!r}], which this screen lacks; "
                        "use a screen with that column."
                    )
                check_covariates(adata, categorical_covariate_keys=[key])
                unseen = sorted(set(adata.obs[key].astype(str)) - set(levels))
                if unseen:
                    raise CellpertInputError(
                        f"obs[{key!r}] has level(s) {', '.join(unseen[:3])} the model was not trained on "
                        f"(its levels: {', '.join(levels[:6])}); keep only cells of those levels or train on them."
                    )
            for key in (registry.get("setup_args") or {}).get("continuous_covariate_keys") or []:
                check_covariates(adata, continuous_covariate_keys=[key])
        return super().load(dir_path, adata, *args, **kwargs)


def _registry_levels(registry: dict[str, Any]) -> dict[str, list[str]]:
    """obs column -> levels of the categorical covariates recorded in an scvi-tools registry."""
    from scvi import REGISTRY_KEYS

    fields = registry.get("field_registries", {})
    out: dict[str, list[str]] = {}
    batch = fields.get(REGISTRY_KEYS.BATCH_KEY, {}).get("state_registry", {})
    if batch and registry.get("setup_args", {}).get("batch_key"):
        out[str(batch["original_key"])] = [str(v) for v in batch["categorical_mapping"]]
    cats = fields.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    for key, levels in (cats.get("mappings") or {}).items():
        out[str(key)] = [str(v) for v in levels]
    return out


class SplitMixin:
    """Split bookkeeping for a :class:`~scvi.model.base.BaseModelClass` subclass.

    Expects ``split_key`` among the ``setup_anndata`` arguments (``None``: every cell
    is a training cell).
    """

    def split_values(self, adata: AnnData | None = None) -> np.ndarray:
        """The split of each cell (all ``"train"`` when set up with ``split_key=None``)."""
        adata = self._validate_anndata(adata)
        key = self.adata_manager.registry["setup_args"].get("split_key")
        if key is None or key not in adata.obs:
            if key is not None:
                logger.warning("obs has no split column %r; treating every cell as training", key)
            return np.full(adata.n_obs, "train", dtype=object)
        return adata.obs[key].astype(str).to_numpy()

    def split_indices(self, split: SplitName, adata: AnnData | None = None) -> np.ndarray:
        """Row indices of the cells of one split."""
        return np.flatnonzero(self.split_values(adata) == split)

    def _indices(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        split: SplitName | None,
    ) -> np.ndarray:
        """Explicit ``indices``, else the cells of ``split``, else every cell."""
        adata = self._validate_anndata(adata)
        if indices is not None:
            return np.asarray(indices, dtype=np.int64)
        if split is not None:
            idx = self.split_indices(split, adata)
            if idx.size == 0:
                # an empty split would give a NaN mean and only a numpy warning
                key = self.adata_manager.registry["setup_args"].get("split_key")
                raise CellpertInputError(
                    f"the {split!r} split has no cells (split column {key!r}); pass indices= or "
                    "another split, or give that split cells (e.g. n_heldout > 0 for held-out perturbations)."
                )
            return idx
        return np.arange(adata.n_obs)

    @staticmethod
    def external_indexing(
        n_obs: int, train_idx: np.ndarray, val_idx: np.ndarray
    ) -> list[np.ndarray]:
        """``[train, val, other]`` for ``datasplitter_kwargs={"external_indexing": ...}``."""
        used = np.concatenate([np.asarray(train_idx), np.asarray(val_idx)]).astype(np.int64)
        other = np.setdiff1d(np.arange(n_obs), used)
        return [np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64), other]

    def _eval_batches(self, adata: AnnData | None, indices: np.ndarray, batch_size: int | None):
        """Minibatches (tensors on the model's device) of the cells ``indices``, in order."""
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, shuffle=False)
        for tensors in loader:
            yield {k: v.to(self.device) for k, v in tensors.items()}

    def _eval_batch_size(self, n_samples: int, batch_size: int | None, extra_width: int = 0) -> int:
        """``batch_size``, else one keeping samples × cells × (genes + ``extra_width``) near
        2.5e7 floats (``extra_width``: other per-sample activations, e.g. an encoder's)."""
        if batch_size is not None:
            return batch_size
        width = self.summary_stats.n_vars + extra_width
        return int(max(16, min(1024, 2.5e7 // max(n_samples * width, 1))))


class DosageLabelsMixin:
    """Dosage rows from labels, for the ATE protocol (:mod:`cellpert.evaluate`).

    Expects a ``perturbation_names`` property (the columns of D).
    """

    def dosage_from_labels(self, labels: Sequence[str], *, control: Sequence[str] = ("control", "ctrl")) -> np.ndarray:
        """Dosage rows for labels such as ``"A"``, ``"A+B"`` or a control label (all zeros)."""
        col = {n: j for j, n in enumerate(self.perturbation_names)}
        rows = np.zeros((len(labels), len(col)), dtype=np.float32)
        for i, lab in enumerate(labels):
            if lab in control:
                continue
            for part in split_label(lab):
                if part in control or is_control_spelling(part):
                    continue
                if part not in col:
                    raise CellpertInputError(f"perturbation {part!r} of label {lab!r} is not a column of D.")
                rows[i, col[part]] += 1.0
        return rows

    @torch.inference_mode()
    def get_predictive_means(
        self,
        dosage: Any,
        *,
        n_samples: int = 2500,
        library_size: float | np.ndarray = 1e4,
        transform: Literal["perturbseq", "counts", "rho"] = "perturbseq",
        seed: int = 0,
        chunk_size: int | None = None,
    ) -> np.ndarray:
        """Posterior predictive mean expression for each perturbation vector (the prior estimator).

        For each of ``n_samples`` particles the model draws its global latents (SAMS-VAE,
        CPA-VAE: (E, M) ~ q, shared by the rows of the particle; sVAE: its point-estimate
        shifts), a basal state from the prior independently per row, and, unless
        ``transform="rho"``, counts ``x ~ NB(ℓ ρ(z), θ)``; it returns the mean over particles
        of ``transform(x)``. docs/models.md, *ATE space and data ATE*'s model ATE of t is ``out[row of t] -
        out[control row]`` with ``transform="perturbseq"`` (``log2(1e4 x / Σ x + 1)``) and
        ``library_size=1e4``. All rows are processed together, ``chunk_size`` particles at a
        time (hook: ``_predictive_means``).

        Parameters
        ----------
        dosage
            (R, T) perturbation vectors (columns in :attr:`perturbation_names` order; a zero
            row is control); see :meth:`dosage_from_labels`.
        n_samples
            Particles (paper: 2,500).
        library_size
            ℓ: scalar or one per row.
        transform
            ``"perturbseq"``, ``"counts"`` or ``"rho"`` (mean of the normalised NB mean,
            no count noise).
        seed
            Seeds every draw.
        chunk_size
            Particles per vectorised chunk (default: about 2e7 floats per chunk).

        Returns
        -------
        (R, G) float32 array.
        """
        self.module.eval()
        d = torch.as_tensor(self._dosage_rows(dosage), device=self.device)
        lib = torch.as_tensor(np.asarray(library_size, dtype=np.float32), device=self.device)
        chunk_size = self._predictive_chunk_size(d.shape[0], n_samples, chunk_size)
        with seeded(seed):
            out = self._predictive_means(d, n_samples, lib, transform, chunk_size)
        return out.cpu().numpy()

    def _predictive_chunk_size(self, n_rows: int, n_samples: int, chunk_size: int | None) -> int:
        """``chunk_size``, else the particles per chunk keeping particles × rows × genes near 2e7 floats."""
        if chunk_size is not None:
            return int(chunk_size)
        return int(max(1, min(n_samples, 2e7 // max(n_rows * self.summary_stats.n_vars, 1))))

    def _dosage_rows(self, dosage: Any) -> np.ndarray:
        """A dense (R, T) float32 array from an array, tensor, sparse matrix or DataFrame."""
        if isinstance(dosage, pd.DataFrame):
            dosage = dosage[self.perturbation_names].to_numpy()
        if sp.issparse(dosage):
            dosage = dosage.toarray()
        if torch.is_tensor(dosage):
            dosage = dosage.detach().cpu().numpy()
        rows = np.asarray(dosage, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self.perturbation_names):
            raise CellpertInputError(f"dosage must be (rows, {len(self.perturbation_names)}), got {tuple(rows.shape)}")
        return rows


class LikelihoodMixin:
    """Per-cell ELBO and importance-weighted ELBO for models with local latents only.

    Expects ``self.module.log_weights(*inputs, n_samples) -> (log_w (S, B), log_px (S, B),
    kl (B,))`` and ``self._log_weight_inputs(tensors)`` giving ``inputs`` for a minibatch.
    """

    def _per_cell(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        split: SplitName | None,
        n_samples: int,
        batch_size: int | None,
        seed: int,
        iw: bool,
    ) -> np.ndarray:
        self.module.eval()
        idx = self._indices(adata, indices, split)
        out = []
        with torch.inference_mode(), seeded(seed):
            for t in self._eval_batches(adata, idx, self._eval_batch_size(n_samples, batch_size)):
                logw, log_px, kl = self.module.log_weights(*self._log_weight_inputs(t), n_samples)
                value = torch.logsumexp(logw, 0) - math.log(n_samples) if iw else log_px.mean(0) - kl
                out.append(value.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        split: SplitName | None = None,
        n_samples: int = 100,
        batch_size: int | None = None,
        seed: int = 0,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """ELBO per cell, ``E_q[log p(x | ·)] − KL(q ‖ prior)``: ``n_samples`` draws, analytic KL
        (100 by default, as :meth:`get_iwelbo` and every family's ``get_elbo``).

        Returns
        -------
        The mean over the cells, or per-cell values (``return_mean=False``).
        """
        values = self._per_cell(adata, indices, split, n_samples, batch_size, seed, iw=False)
        return float(values.mean()) if return_mean else values

    def get_iwelbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        split: SplitName | None = None,
        n_samples: int = 100,
        batch_size: int | None = None,
        seed: int = 0,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-weighted ELBO per cell, ``log (1/S) Σ_s p(x, latents_s) / q(latents_s | x)``.

        Returns
        -------
        The mean over the cells, or per-cell values (``return_mean=False``).
        """
        values = self._per_cell(adata, indices, split, n_samples, batch_size, seed, iw=True)
        return float(values.mean()) if return_mean else values


class CounterfactualMixin:
    """Counterfactual effects on real control cells, for the ATE protocol of cellpert.

    Each control cell keeps its own library size and covariates (``module.side_inputs``:
    ``covariates`` passed to ``counterfactual_rho``, ``batch_index`` to ``nb_theta_of``),
    so the effect is averaged over the control cells' covariate levels.

    Hooks a model provides: ``_encode_basal(tensors, sample) -> (B, K)`` (the latent of
    control cells with no perturbation), ``_global_effect_draws(P) -> (P, T, K)`` latent
    shifts of the perturbations under P draws of the global latents (None when the model
    has none and decodes the dosage itself), ``module.counterfactual_rho(basal, rows,
    effect) -> (P, R, C, G)`` and ``module.nb_theta`` (G,); plus :class:`DosageLabelsMixin`.
    """

    @torch.inference_mode()
    def get_counterfactual_effects(
        self,
        dosage: Any,
        *,
        indices: Sequence[int],
        n_draws: int = 100,
        transform: Literal["perturbseq", "counts", "rho"] = "perturbseq",
        basal: Literal["sample", "mean"] = "sample",
        cells_per_draw: int | None = 256,
        seed: int = 0,
        max_elements: float = 2e7,
        shifts: np.ndarray | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Counterfactual effects of dosage rows on the control cells ``indices``.

        The cells are encoded once (a draw from q, or its mean with ``basal="mean"``);
        for each of ``n_draws`` draws of the global latents each cell is decoded moved by
        each row's latent shift and unmoved, at its own observed library size; counts
        are sampled and transformed (``transform``, see
        :func:`~cellpert.models._components.counterfactual_effect_sums`) and the per-cell
        differences averaged over the cells. Each draw uses one group of a random
        partition of the cells into groups of at most ``cells_per_draw`` (None: all cells
        for every draw), so that the cost is ``n_draws · cells_per_draw · R · G``.

        ``shifts`` (n_draws, R, K), e.g. the ``draws`` of :meth:`get_empirical_shifts`,
        replace the rows' latent shifts under the global latents: draw p moves every cell
        by ``shifts[p, r]`` (the conditional VAE: its basal state, decoded with ``D_r``).

        Returns
        -------
        ``effects``: (n_draws, R, G) float64, the cell-averaged effect of each row under
        each draw; ``mc_var``: same shape, the Monte Carlo variance of that average
        (variance of the per-cell differences / the draw's cells); ``n_cells``: C.
        """
        from cellpert.models._components import counterfactual_effect_sums

        if basal not in ("sample", "mean"):
            raise CellpertInputError(f"basal must be 'sample' or 'mean', not {basal!r}.")
        if transform not in ("perturbseq", "counts", "rho"):
            raise CellpertInputError(f"transform must be 'perturbseq', 'counts' or 'rho', not {transform!r}.")
        self.module.eval()
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise CellpertInputError("no control cells to build counterfactuals on; check the split.")
        rows = torch.as_tensor(self._dosage_rows(dosage), device=self.device)
        rows = torch.cat([torch.zeros_like(rows[:1]), rows], 0)  # row 0: control
        n_draws = int(n_draws)
        n_genes = self.summary_stats.n_vars
        theta = self.module.nb_theta
        shift = None
        if shifts is not None:
            shift = torch.as_tensor(np.asarray(shifts, dtype=np.float32), device=self.device)
            if tuple(shift.shape[:2]) != (n_draws, rows.shape[0] - 1):
                raise CellpertInputError(
                    f"shifts must be (n_draws={n_draws}, rows={rows.shape[0] - 1}, K), got {tuple(shift.shape)}."
                )
            shift = torch.cat([torch.zeros_like(shift[:, :1]), shift], 1)  # row 0: control, unmoved
        with seeded(seed):
            # the global draws first: the data loader below also draws from torch's RNG
            effect = self._global_effect_draws(n_draws) if shift is None else None
            states, libraries, covs, batches = [], [], [], []
            for t in self._eval_batches(None, idx, None):
                states.append(self._encode_basal(t, basal == "sample"))
                libraries.append(t["library_size"].reshape(-1))
                side = self._side_inputs(t)
                covs.append(side.get("covariates"))
                batches.append(side.get("batch_index"))
            zb, lib = torch.cat(states), torch.cat(libraries)
            # each cell keeps its own covariates (and its batch's θ) under every row
            cov = torch.cat(covs) if covs and covs[0] is not None else None
            batch = torch.cat(batches) if batches and batches[0] is not None else None
            n_cells = zb.shape[0]
            # each draw of the globals uses its own group of at most cells_per_draw cells
            # (a random partition of the cells, cycled), so that the cost is bounded
            order = torch.randperm(n_cells, device=zb.device)
            n_groups = max(1, -(-n_cells // int(cells_per_draw or n_cells)))
            groups = torch.tensor_split(order, n_groups)
            per_cell = rows.shape[0] * n_genes * 4  # rho, counts, y and the difference
            total = torch.zeros(n_draws, rows.shape[0] - 1, n_genes, dtype=torch.float64, device=self.device)
            total_sq = torch.zeros_like(total)
            used = torch.zeros(n_draws, dtype=torch.float64, device=self.device)
            for p in range(n_draws):
                cells = groups[p % n_groups]
                step = int(max(1, max_elements // per_cell))
                for c0 in range(0, len(cells), step):
                    c = cells[c0 : c0 + step]
                    extra = {} if cov is None else {"covariates": cov[c]}
                    if shift is not None:
                        extra["shift"] = shift[p : p + 1]
                    rho = self.module.counterfactual_rho(zb[c], rows, None if effect is None else effect[p : p + 1], **extra)
                    cell_theta = theta if batch is None else self.module.nb_theta_of(batch[c])
                    s, sq = counterfactual_effect_sums(rho, lib[c], cell_theta, transform=transform)
                    total[p] += s[0]
                    total_sq[p] += sq[0]
                used[p] = len(cells)
        used = used[:, None, None]
        mean = total / used
        var = (total_sq / used - mean**2).clamp(min=0.0) * used / (used - 1).clamp(min=1)
        return {"effects": mean.cpu().numpy(), "mc_var": (var / used).cpu().numpy(), "n_cells": n_cells}

    @torch.inference_mode()
    def get_empirical_shifts(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        *,
        control_cells: Sequence[int],
        dosage: Any = None,
        n_draws: int = 100,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Each row's latent shift measured on cells: where its cells lie against the controls.

        The shift of a group of cells is the mean of their posterior latent positions
        (``_latent_positions``: each cell encoded under its own perturbation, in the space
        the model's shifts act in) minus the mean position of ``control_cells``; a row's
        shift is the sum over its groups (one group: the label's own cells; a label
        without cells, e.g. a held-out combination, gets its parts' groups, the additive
        composition the latent models assume). A row with no group keeps the model's own
        shift under the draws of the global latents, ``D_r`` (``dosage``, (R, T)) times
        ``E ⊙ M`` (zero for the conditional VAE, or without ``dosage``).

        The ``n_draws`` draws are a Gaussian multiplier bootstrap of every group's mean
        (and of the controls' mean, shared by the rows of a draw): ``mean + Σ_i g_i (pos_i
        − mean) / n``, g ~ N(0, 1), which has the covariance of the mean, so an interval
        over the draws includes the uncertainty of which cells were observed.

        Why: the model's own shift (``D_r (E ⊙ M)``) can miss part of where a
        perturbation's cells lie (the encoder puts the rest into their basal states);
        moving the control cells by it then shrinks the effect (docs/models.md, *ATE
        space and data ATE*).

        Returns
        -------
        ``point`` (R, K) and ``draws`` (n_draws, R, K) float32 arrays and ``n_cells`` (R,),
        the cells each row's shift was measured on (0: a row without groups).
        """
        control_cells = np.asarray(control_cells, dtype=np.int64)
        if control_cells.size < 2:
            raise CellpertInputError("empirical shifts need at least 2 control cells; check the split.")
        self.module.eval()
        needed = np.unique(np.concatenate([control_cells, *[np.asarray(c, dtype=np.int64) for g in groups for c in g]]))
        with seeded(seed):
            pos = torch.cat([self._latent_positions(t) for t in self._eval_batches(None, needed, None)]).double()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))

        def bootstrap(cells: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            p = pos[torch.as_tensor(np.searchsorted(needed, cells), device=pos.device)]
            mean = p.mean(0)
            # multiplier bootstrap of the mean: g_i ~ N(0, 1) per cell and draw
            g = torch.randn(int(n_draws), p.shape[0], generator=gen, dtype=torch.float64).to(p.device)
            return mean, mean + g @ (p - mean) / p.shape[0]

        c_mean, c_draws = bootstrap(control_cells)
        # rows without cells: the model's own shift D_r (E ⊙ M) under each draw of the globals
        own = torch.zeros(len(groups), *c_draws.shape, dtype=torch.float64, device=c_draws.device)  # (R, P, K)
        if dosage is not None and any(not any(len(c) for c in g) for g in groups):
            with seeded(seed):
                effect = self._global_effect_draws(int(n_draws))  # (P, T, K), None for the conditional VAE
            if effect is not None:
                rows = torch.as_tensor(self._dosage_rows(dosage), dtype=torch.float64, device=effect.device)
                own = torch.einsum("rt,ptk->rpk", rows, effect.double()).to(c_draws.device)
        point, draws, n_cells = [], [], []
        for r, group in enumerate(groups):
            parts = [np.asarray(c, dtype=np.int64) for c in group if len(c)]
            if not parts:
                point.append(own[r].mean(0))
                draws.append(own[r])
                n_cells.append(0)
                continue
            means, boots = zip(*(bootstrap(c) for c in parts), strict=True)
            point.append(sum(m - c_mean for m in means))
            draws.append(sum(b - c_draws for b in boots))
            n_cells.append(int(sum(len(c) for c in parts)))
        return {
            "point": torch.stack(point).float().cpu().numpy(),
            "draws": torch.stack(draws, 1).float().cpu().numpy(),
            "n_cells": np.asarray(n_cells, dtype=np.int64),
        }

    @torch.inference_mode()
    def get_posterior_expression(
        self,
        indices: Sequence[int],
        *,
        n_draws: int = 100,
        transform: Literal["perturbseq", "rho"] = "perturbseq",
        seed: int = 0,
        global_draws: Any = None,
    ) -> np.ndarray:
        """Each cell's expression under its own posterior, averaged over ``n_draws`` draws.

        For each draw, the cell's latent is drawn from q (the model's hook
        ``_posterior_rho``, which decodes a block of draws in one call: the global latents
        and the cell's local latent, under its own perturbation and covariates), decoded,
        counts are drawn at the cell's own library size, ``x ~ NB(ℓ_i ρ_i, θ)``, and put
        in the perturbseq space
        (``transform="perturbseq"``), or ``log2(1e4 ρ + 1)`` (``"rho"``, no count
        noise). The mean over draws is the model's denoised version of the cell, in the
        space and at the depth of the data ATE (the posterior estimator of
        :func:`cellpert.evaluate.posterior_ate`; scvi-tools' differential expression
        contrasts groups of cells the same way, with ``get_normalized_expression``).

        ``global_draws`` (from :meth:`sample_posterior_globals`, at least ``n_draws``): the
        global latents' draws to use, so that several groups of cells share them (the
        contrast of two groups is then at the same draws of the globals, and they are
        drawn once); None: drawn here under ``seed``.

        Returns
        -------
        (len(indices), G) float64 array, in the order of ``indices``.
        """
        from cellpert.models._components._likelihood import nb_sample, perturbseq_transform

        if transform not in ("perturbseq", "rho"):
            raise CellpertInputError(f"transform must be 'perturbseq' or 'rho', not {transform!r}.")
        if int(n_draws) < 1:
            raise CellpertInputError(f"n_draws must be at least 1, not {n_draws}.")
        self.module.eval()
        idx = np.asarray(indices, dtype=np.int64)
        n_genes = self.summary_stats.n_vars
        out = []
        with seeded(seed):
            if global_draws is None:
                global_draws = self._posterior_globals(int(n_draws))
            for t in self._eval_batches(None, idx, None):
                lib = t["library_size"].reshape(-1, 1)
                batch = self._side_inputs(t).get("batch_index")
                theta = self.module.nb_theta if batch is None else self.module.nb_theta_of(batch)
                total = 0.0
                # draws decoded together, as many as keep a (draws, B, G) block near
                # _POSTERIOR_BLOCK values (one decode per draw, with the globals redrawn for
                # each group, took 3.3x as long: benchmarks/RESULTS_evaluate.md)
                step = max(1, min(int(n_draws), _POSTERIOR_BLOCK // max(1, lib.numel() * n_genes)))
                for start in range(0, int(n_draws), step):
                    k = min(step, int(n_draws) - start)
                    rho = self._posterior_rho(t, k, _draw_slice(global_draws, start, k))  # (k, B, G)
                    if transform == "rho":
                        y = torch.log2(1e4 * rho + 1.0)
                    else:
                        y = perturbseq_transform(nb_sample(lib * rho, theta))
                    total = total + y.double().sum(0)
                out.append((total / int(n_draws)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, n_genes))

    @torch.inference_mode()
    def sample_posterior_globals(self, n_draws: int, *, seed: int = 0) -> Any:
        """``n_draws`` draws of the global latents from q, for ``get_posterior_expression``'s
        ``global_draws`` (None for a model without global latents)."""
        self.module.eval()
        with seeded(seed):
            return self._posterior_globals(int(n_draws))

    def _posterior_globals(self, n_draws: int) -> Any:
        """Posterior-predictive hook: draws of the global latents (None: the model has none)."""
        return None

    def _side_inputs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """A minibatch's covariates and batch codes (empty for a module without them)."""
        side = getattr(self.module, "side_inputs", None)
        return side(tensors) if side is not None else {}


def _draw_slice(draws: Any, start: int, size: int) -> Any:
    """Draws ``start:start + size`` of a dict of (P, ...) tensors (None entries kept)."""
    if draws is None:
        return None
    return {k: None if v is None else v[start : start + size] for k, v in draws.items()}
