"""Cell covariates (batch, donor, cell line, continuous ones) as one model input
(docs/models.md, *Covariates*).

scvi-tools registers a batch (``REGISTRY_KEYS.BATCH_KEY``, one integer code per cell),
categorical covariates (``CAT_COVS_KEY``, one code per column) and continuous ones
(``CONT_COVS_KEY``). :class:`CovariateInput` turns them into the vector ``c_i``: the
one-hot code of the batch, of each categorical covariate, and the continuous values, side
by side. A column with a single level carries no information and is left out, as in
scvi-tools' ``FCLayers``. The models add ``c_i`` to the first layer of their decoder
(and, optionally, of their encoder) through :class:`~cellpert.models._components.MultiInputLinear`,
so a model without covariates has exactly the parameters it had before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from torch import nn

__all__ = ["CovariateInput", "CovariateModuleMixin"]


class CovariateInput(nn.Module):
    """``c_i = [onehot(batch_i), onehot(cat_i1), ..., cont_i]`` from a minibatch's tensors.

    Parameters
    ----------
    n_batch
        Levels of the batch (0 or 1: no batch).
    n_cats_per_cov
        Levels of each categorical covariate.
    n_continuous_cov
        Number of continuous covariates.
    """

    def __init__(self, n_batch: int = 0, n_cats_per_cov: Sequence[int] = (), n_continuous_cov: int = 0) -> None:
        super().__init__()
        self.n_batch = int(n_batch)
        self.n_cats_per_cov = [int(n) for n in (n_cats_per_cov or [])]
        self.n_continuous_cov = int(n_continuous_cov)
        widths = [self.n_batch if self.n_batch > 1 else 0]
        widths += [n if n > 1 else 0 for n in self.n_cats_per_cov]
        self._widths = widths
        self.n_output = sum(widths) + self.n_continuous_cov

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, n_output) float tensor, or None when the model has no covariates."""
        if self.n_output == 0:
            return None
        parts: list[torch.Tensor] = []
        if self._widths[0]:
            parts.append(F.one_hot(tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long(), self.n_batch))
        if any(self._widths[1:]):
            codes = tensors[REGISTRY_KEYS.CAT_COVS_KEY].long()
            for j, width in enumerate(self._widths[1:]):
                if width:
                    parts.append(F.one_hot(codes[:, j], width))
        if self.n_continuous_cov:
            parts.append(tensors[REGISTRY_KEYS.CONT_COVS_KEY].reshape(-1, self.n_continuous_cov))
        return torch.cat([p.float() for p in parts], dim=-1)

    def batch_index(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(B,) batch codes (None without a batch), e.g. for a per-batch dispersion."""
        if self.n_batch <= 1:
            return None
        return tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()

    def extra_repr(self) -> str:
        return f"n_batch={self.n_batch}, n_cats_per_cov={self.n_cats_per_cov}, n_continuous_cov={self.n_continuous_cov}"


class CovariateModuleMixin:
    """Covariate plumbing of a model family's torch module: ``self.covariates`` (a
    :class:`CovariateInput`), ``encode_covariates``, ``dispersion`` and the minibatch
    inputs of the evaluation methods."""

    def _init_covariates(
        self,
        n_batch: int,
        n_cats_per_cov: Sequence[int],
        n_continuous_cov: int,
        *,
        encode_covariates: bool,
        dispersion: str,
        batch_dispersion_allowed: bool = True,
    ) -> int:
        """Build ``self.covariates``; returns the covariate width C (0 without covariates).

        ``dispersion="gene-batch"`` needs a batch with two levels or more (and a likelihood
        with a dispersion: ``batch_dispersion_allowed``).
        """
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        if dispersion == "gene-batch" and (n_batch <= 1 or not batch_dispersion_allowed):
            raise ValueError(
                "dispersion='gene-batch' needs a batch_key with at least two batches"
                + ("" if batch_dispersion_allowed else " and the negative-binomial likelihood")
            )
        self.covariates = CovariateInput(n_batch, n_cats_per_cov, n_continuous_cov)
        n_cov = self.covariates.n_output
        self.encode_covariates = bool(encode_covariates) and n_cov > 0
        self.dispersion = dispersion
        return n_cov

    def side_inputs(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """``covariates`` (B, C) and ``batch_index`` (B,) of a minibatch (None when absent),
        the keyword arguments of the evaluation methods."""
        return {"covariates": self.covariates(tensors), "batch_index": self.covariates.batch_index(tensors)}

    def _check_covariates(self, covariates: torch.Tensor | None) -> None:
        if self.covariates.n_output and covariates is None:
            raise ValueError("this model was set up with covariates: pass each cell's covariates")
