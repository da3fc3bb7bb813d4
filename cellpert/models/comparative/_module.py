"""Torch module of the comparative VAE (Lopez et al., CLeaR 2024; docs/models.md, *Comparative VAE*).

Generative model, for a background cell (``g_i = 0``) and a target cell (``g_i = 1``)::

    z_i ~ N(0, I_dz)                        shared (background) latent, every cell
    t_i ~ N(0, I_dt)  if g_i = 1, else 0    salient latent, target cells only
    x_ig ~ NB(ℓ_i ρ_g(z_i, t_i), θ_g)       (or Poisson), ρ = softmax(f(z, t[, c]))

with one decoder f for both data sets whose hidden activations are leaky ReLUs (a
piecewise affine map, the paper's identifiability condition). The encoders
``q(z | x)`` and ``q(t | x)`` are Gaussian and see only the counts.

Covariates (option; docs/models.md, *Covariates*): the vector c_i of a cell's batch,
categorical and continuous covariates enters the first layer of the shared decoder,
``f(z_i, t_i, c_i)``, for background and target cells alike (so batch differences are
not pushed into z or t), and, with ``encode_covariates``, the first layer of both
encoders; θ may be per gene and batch. Without covariates nothing is added: such a
module has exactly the parameters it always had.

Per cell the negative ELBO is ``rec_i + w (KL_z,i + g_i KL_t,i)`` (w: KL warm-up weight).
The regularisers act on background cells' salient posteriors and are NOT scaled by w:

- Wasserstein penalty (contrastiveVI's) ``W_i = ‖μ_t(x_i)‖² + Σ_k σ²_t,k(x_i)``, the
  squared 2-Wasserstein distance between q(t | x_i) and a point mass at 0;
- optional MMD between the shared latents of background and target cells of the
  minibatch (Gaussian kernels), pushing z to mix the two conditions.

:meth:`ComparativeVAEModule.loss` returns the combined objective and, for the
multi-objective mode, the background and target negative ELBOs and the regulariser
separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from cellpert.models._components import (
    CovariateModuleMixin,
    GaussianHead,
    NBDecoder,
    ResidualMLP,
    chunked_predictive_mean,
    log_mean_counts,
    nb_log_prob_log_mean,
    nb_sample,
    poisson_log_prob_log_mean,
)
from cellpert.models._keys import IS_TARGET_KEY, LIBRARY_KEY

__all__ = ["IS_TARGET_KEY", "LIBRARY_KEY", "ComparativeVAEModule", "gaussian_kl", "mmd", "wasserstein_to_zero"]


Likelihood = Literal["nb", "poisson"]
#: Encoder inputs (standardised log1p counts) are clipped to ±INPUT_CLIP.
INPUT_CLIP = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale²) ‖ N(0, I)), summed over the last axis."""
    var = scale**2
    return 0.5 * (var + loc**2 - 1.0 - torch.log(var)).sum(-1)


def wasserstein_to_zero(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance of N(loc, diag scale²) to δ_0: ``‖loc‖² + Σ scale²``."""
    return (loc**2).sum(-1) + (scale**2).sum(-1)


def mmd(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)) -> torch.Tensor:
    """Biased squared MMD between samples ``a`` (n, d) and ``b`` (m, d), sum of Gaussian kernels.

    Kernel ``Σ_s exp(−‖u − v‖² / (2 s² d))``: the bandwidths are relative to the dimension
    d, so the same ``scales`` suit any latent size. Zero when either set is empty.
    """
    z = torch.cat([a, b])
    in_a = torch.cat([a.new_ones(a.shape[0]), a.new_zeros(b.shape[0])])
    return mmd_between_groups(z, in_a, 1.0 - in_a, scales)


def mmd_between_groups(
    z: torch.Tensor, in_a: torch.Tensor, in_b: torch.Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
) -> torch.Tensor:
    """:func:`mmd` between the rows of ``z`` (n, d) marked by the 0/1 weights ``in_a`` and
    ``in_b`` (n,), without indexing them out: ``wₐᵀKwₐ/nₐ² + w_bᵀKw_b/n_b² − 2wₐᵀKw_b/(nₐn_b)``.

    The same value as ``mmd(z[in_a], z[in_b])``, but no output size depends on the data,
    so a training step does not wait on the host (a boolean index would). Zero when either
    group is empty.
    """
    d = z.shape[-1]
    dist = torch.cdist(z, z).pow(2)
    k = sum(torch.exp(-dist / (2.0 * s * s * d)) for s in scales)
    wa, wb = in_a.to(k.dtype), in_b.to(k.dtype)
    na, nb = wa.sum(), wb.sum()
    value = wa @ k @ wa / na.clamp(min=1.0) ** 2 + wb @ k @ wb / nb.clamp(min=1.0) ** 2
    value = value - 2.0 * (wa @ k @ wb) / (na * nb).clamp(min=1.0)
    return value * ((na > 0) & (nb > 0)).to(k.dtype)


class ComparativeVAEModule(CovariateModuleMixin, BaseModuleClass):
    """Comparative VAE module: shared latent z, salient latent t (docs/models.md, *Comparative VAE*).

    Parameters
    ----------
    n_genes
        G.
    n_background_latent
        d_z.
    n_salient_latent
        d_t.
    n_hidden
        Width of the encoders and of the decoder.
    n_layers
        Hidden layers of the decoder (residual leaky-ReLU blocks: piecewise affine).
    n_layers_encoder
        Hidden layers of each encoder.
    likelihood
        ``"nb"`` (per-gene inverse dispersion) or ``"poisson"``.
    n_batch, n_cats_per_cov, n_continuous_cov
        Covariates: levels of the batch, of each categorical covariate, and the number of
        continuous ones (0 / empty: none). Their vector ``c_i``
        (:class:`~cellpert.models._components.CovariateInput`) enters the decoder's first
        layer, ``ρ = softmax(f(z, t, c))``.
    encode_covariates
        Also give ``c_i`` to the first layer of both encoders, ``q(z | x, c)`` and
        ``q(t | x, c)`` (off, as in scvi-tools).
    dispersion
        ``"gene"``: θ_g; ``"gene-batch"``: θ_bg, one per gene and batch (NB only; needs a
        batch).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_background_latent: int = 10,
        n_salient_latent: int = 2,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_layers_encoder: int = 2,
        likelihood: Likelihood = "nb",
        n_batch: int = 0,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
    ) -> None:
        super().__init__()
        self.n_genes = int(n_genes)
        self.n_background_latent = int(n_background_latent)
        self.n_salient_latent = int(n_salient_latent)
        self.likelihood = likelihood
        # --- covariates c_i (batch, categorical, continuous); width 0 without them
        n_cov = self._init_covariates(
            n_batch, n_cats_per_cov, n_continuous_cov, encode_covariates=encode_covariates, dispersion=dispersion, batch_dispersion_allowed=likelihood != "poisson",
        )
        # the covariate input is appended only when there is one, so a module without
        # covariates keeps its parameters (and their seeded initial values)
        cov_input = [n_cov] if n_cov else []
        enc_cov = cov_input if self.encode_covariates else []
        self.z_encoder = ResidualMLP([n_genes, *enc_cov], n_hidden, n_layers_encoder)
        self.z_head = GaussianHead(n_hidden, n_background_latent)
        self.t_encoder = ResidualMLP([n_genes, *enc_cov], n_hidden, n_layers_encoder)
        self.t_head = GaussianHead(n_hidden, n_salient_latent)
        # --- one decoder f(z, t[, c]) for background and target cells
        self.decoder = NBDecoder(
            [n_background_latent, n_salient_latent, *cov_input], n_genes, n_hidden, n_layers,
            n_batch_dispersion=n_batch if dispersion == "gene-batch" else 0,
        )  # fmt: skip
        if likelihood == "poisson":
            self.decoder.log_theta.requires_grad_(False)
        # encoder input statistics of log1p(x), computed on the training cells by the model
        self.register_buffer("gene_mean", torch.zeros(n_genes))
        self.register_buffer("gene_std", torch.ones(n_genes))

    # ------------------------------------------------------------ scvi API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "is_target": tensors[IS_TARGET_KEY].reshape(-1),
            "covariates": self.covariates(tensors),
        }

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, torch.Tensor]:
        return {
            "z": inference_outputs["z"],
            "t": inference_outputs["t"],
            "library_size": tensors[LIBRARY_KEY].reshape(-1),
            "covariates": self.covariates(tensors),
            "batch_index": self.covariates.batch_index(tensors),
        }


    def _decoder_inputs(
        self, z: torch.Tensor, t: torch.Tensor, covariates: torch.Tensor | None
    ) -> list[torch.Tensor | None]:
        """The decoder's inputs: ``z, t`` and, with covariates, ``c`` (broadcast by the
        first layer over any leading sample dimensions of z and t)."""
        if not self.covariates.n_output:
            return [z, t]
        if covariates is None:
            raise ValueError("this model was set up with covariates: pass each cell's covariates")
        return [z, t, covariates]

    def encode(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Posterior parameters of q(z | x[, c]) and q(t | x[, c]) (``c`` only with
        ``encode_covariates``)."""
        # standardised log1p(x), clipped as scanpy's scale(max_value=10): a gene seen in a
        # handful of cells would otherwise give inputs of 40+ and blow up the encoder
        h = ((torch.log1p(x) - self.gene_mean) / self.gene_std).clamp(-INPUT_CLIP, INPUT_CLIP)
        inputs = [h]
        if self.encode_covariates:
            if covariates is None:
                raise ValueError("this model encodes covariates: pass each cell's covariates")
            inputs.append(covariates)
        qz_loc, qz_scale = self.z_head(self.z_encoder(*inputs))
        qt_loc, qt_scale = self.t_head(self.t_encoder(*inputs))
        return {"qz_loc": qz_loc, "qz_scale": qz_scale, "qt_loc": qt_loc, "qt_scale": qt_scale}

    @auto_move_data
    def inference(
        self, x: torch.Tensor, is_target: torch.Tensor, n_samples: int = 1, covariates: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode and sample (reparameterised); background cells get ``t = 0``."""
        out = self.encode(x, covariates)
        shape = (n_samples,) if n_samples > 1 else ()
        # shared latent z_i ~ q(z | x_i), every cell
        z = out["qz_loc"] + out["qz_scale"] * torch.randn(shape + out["qz_loc"].shape, device=x.device)
        # salient latent t_i ~ q(t | x_i) for target cells; t_i = 0 for background cells
        t = out["qt_loc"] + out["qt_scale"] * torch.randn(shape + out["qt_loc"].shape, device=x.device)
        t = t * is_target.reshape(-1, 1).to(t.dtype)
        return {**out, "z": z, "t": t}

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        library_size: torch.Tensor,
        covariates: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Log mean counts ``log ℓ + log ρ(z, t[, c])`` (``batch_index`` is carried to the
        loss, which takes each cell's batch θ with ``dispersion="gene-batch"``)."""
        log_rho = self.decoder.log_rho(*self._decoder_inputs(z, t, covariates))
        return {"log_mu": log_mean_counts(library_size, log_rho)}

    def log_likelihood(
        self, x: torch.Tensor, log_mu: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | mean ``exp(log_mu)``) per cell (computed in log space); ``batch_index``
        picks each cell's θ with ``dispersion="gene-batch"``."""
        if self.likelihood == "poisson":
            return poisson_log_prob_log_mean(x, log_mu)
        return nb_log_prob_log_mean(x, log_mu, self.decoder.log_theta_of(batch_index))

    def nb_theta_of(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """θ of each cell: (G,), or (B, G) with ``dispersion="gene-batch"``."""
        return torch.exp(self.decoder.log_theta_of(batch_index))

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        kl_weight: float = 1.0,
        penalty_weight: float = 1.0,
        mmd_weight: float = 0.0,
    ) -> LossOutput:
        """Objectives of one minibatch.

        ``loss`` (standard and constrained modes) is the mean over the minibatch's cells of
        ``rec_i + w (KL_z,i + g_i KL_t,i)``, plus ``penalty_weight`` times the mean
        Wasserstein penalty over its background cells, plus ``mmd_weight`` times the MMD.
        Minibatches hold background and target cells in proportion to the data sets, so
        the mean over cells estimates the per-cell negative ELBO of the whole data.

        ``extra_metrics`` holds ``loss_background`` and ``loss_target`` (the mean per-cell
        negative ELBO over the minibatch's background, resp. target, cells: the two
        objectives of the multi-objective mode), ``regulariser`` (the weighted penalties),
        ``wasserstein`` (mean W over the background cells, the constrained quantity) and
        ``mmd``.
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        is_target = tensors[IS_TARGET_KEY].reshape(-1).to(inference_outputs["t"].dtype)
        is_background = 1.0 - is_target
        rec = -self.log_likelihood(x, generative_outputs["log_mu"], self.covariates.batch_index(tensors))
        kl_z = gaussian_kl(inference_outputs["qz_loc"], inference_outputs["qz_scale"])
        kl_t = gaussian_kl(inference_outputs["qt_loc"], inference_outputs["qt_scale"]) * is_target
        per_cell = rec + kl_weight * (kl_z + kl_t)
        n_bg, n_tg = is_background.sum(), is_target.sum()
        w = wasserstein_to_zero(inference_outputs["qt_loc"], inference_outputs["qt_scale"])
        wasserstein = (w * is_background).sum() / n_bg.clamp(min=1.0)
        discrepancy = (
            mmd_between_groups(inference_outputs["z"], is_background, is_target)
            if mmd_weight > 0
            else per_cell.new_zeros(())
        )
        regulariser = penalty_weight * wasserstein + mmd_weight * discrepancy
        loss = per_cell.mean() + regulariser
        loss_background = (per_cell * is_background).sum() / n_bg.clamp(min=1.0)
        loss_target = (per_cell * is_target).sum() / n_tg.clamp(min=1.0)
        return LossOutput(
            loss=loss,
            reconstruction_loss=rec,
            kl_local={"kl_z": kl_z, "kl_t": kl_t},
            extra_metrics={
                "loss_background": loss_background,
                "loss_target": loss_target,
                "regulariser": regulariser,
                "wasserstein": wasserstein,
                "mmd": discrepancy,
            },
        )

    # ----------------------------------------------------------- evaluation
    @torch.inference_mode()
    def log_weights(
        self,
        x: torch.Tensor,
        library_size: torch.Tensor,
        is_target: torch.Tensor,
        covariates: torch.Tensor | None,
        batch_index: torch.Tensor | None,
        n_samples: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Importance log-weights ``log p(x | z, t[, c]) + log p(z, t) − log q(z, t | x[, c])``.

        ``covariates`` and ``batch_index`` are the minibatch's (:meth:`side_inputs`; None
        for a module without them).

        Returns
        -------
        ``(log_w, log_px, kl)``: ``(S, B)`` log-weights and log-likelihoods, and the
        analytic ``(B,)`` KL of q from the prior (t counted for target cells only).
        """
        out = self.encode(x, covariates)
        g = is_target.reshape(-1).to(x.dtype)
        # z_s ~ q(z | x) and, for target cells, t_s ~ q(t | x)
        eps_z = torch.randn((n_samples,) + out["qz_loc"].shape, device=x.device)
        eps_t = torch.randn((n_samples,) + out["qt_loc"].shape, device=x.device)
        z = out["qz_loc"] + out["qz_scale"] * eps_z
        t = (out["qt_loc"] + out["qt_scale"] * eps_t) * g.reshape(-1, 1)
        log_rho = self.decoder.log_rho(*self._decoder_inputs(z, t, covariates))
        log_px = self.log_likelihood(x, log_mean_counts(library_size, log_rho), batch_index)
        # log p(z) − log q(z | x) per sample (the 2π terms cancel)
        log_ratio = (-0.5 * z**2 + 0.5 * eps_z**2 + torch.log(out["qz_scale"])).sum(-1)
        log_ratio = log_ratio + g * (-0.5 * t**2 + 0.5 * eps_t**2 + torch.log(out["qt_scale"])).sum(-1)
        kl = gaussian_kl(out["qz_loc"], out["qz_scale"]) + g * gaussian_kl(out["qt_loc"], out["qt_scale"])
        return log_px + log_ratio, log_px, kl

    @torch.inference_mode()
    def predictive_means(
        self,
        is_target: torch.Tensor,
        n_samples: int,
        library_size: torch.Tensor,
        *,
        transform: Literal["perturbseq", "counts", "rho"] = "perturbseq",
        chunk_size: int = 50,
    ) -> torch.Tensor:
        """Mean over prior predictive particles, per row (background or target).

        Each particle draws ``z ~ N(0, I)`` and, for target rows, ``t ~ N(0, I)``,
        independently per row, and, unless ``transform="rho"``, counts from the likelihood
        with mean ``ℓ ρ(z, t)``.

        Parameters
        ----------
        is_target
            (R,) 1 for a target row, 0 for a background row.
        n_samples
            Particles S.
        library_size
            (R,) or scalar ℓ.
        transform
            ``"perturbseq"`` (mean of ``log2(1e4 x / Σ_g x + 1)``), ``"counts"`` or ``"rho"``.
        chunk_size
            Particles per vectorised chunk.

        Returns
        -------
        (R, G) tensor.
        """
        if self.covariates.n_output:
            raise ValueError("the prior estimator does not take covariates")
        R = is_target.shape[0]
        g = is_target.reshape(-1, 1).to(torch.float32)

        def draw_rho(c: int) -> torch.Tensor:
            # shared latent z ~ N(0, I) per particle and row
            z = torch.randn(c, R, self.n_background_latent, device=is_target.device)
            # salient latent t ~ N(0, I) for target rows, 0 for background rows
            t = torch.randn(c, R, self.n_salient_latent, device=is_target.device) * g
            return self.decoder(z, t)

        def sample_counts(mu: torch.Tensor) -> torch.Tensor:
            return torch.poisson(mu) if self.likelihood == "poisson" else nb_sample(mu, self.decoder.theta)

        return chunked_predictive_mean(
            draw_rho,
            sample_counts,
            n_samples=n_samples, library_size=library_size, transform=transform, chunk_size=chunk_size,
        )  # fmt: skip
