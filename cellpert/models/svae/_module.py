"""Torch module of sVAE and sVAE+ (Lopez et al., CLeaR 2023; docs/models.md, *sVAE and sVAE+*).

Generative model, one perturbation label a_i per cell (combinations are their own label):

- mask      m_i ~ hard Gumbel-sigmoid(log_alpha[a_i]) ∈ {0, 1}^K (straight-through,
  temperature 1); log_alpha initialised to 5 (edges start almost all on);
- latent    z_i ~ N(m_i ⊙ μ_{a_i}, I_K), μ_control = 0 (the control's mask is irrelevant);
- counts    x_ig ~ NB(ℓ_i ρ_ig, θ_g), ρ_i = softmax(f(z_i[, c_i])), ℓ_i observed, θ gene-wise
  (option: θ_bg, one per gene and batch).

Covariates (option; docs/models.md, *Covariates*): the vector c_i of a cell's batch,
categorical and continuous covariates (:class:`~cellpert.models._components.CovariateInput`)
is appended to the decoder's input, ``f(z_i, c_i)``, and, with ``encode_covariates``, to
the encoder's, ``q(z_i | x_i, c_i)``; without covariates nothing is appended, so such a
module has exactly the parameters it always had.

Inference: q(z_i | x_i) = N(encoder(log1p(x_i))), label-agnostic on purpose; the label is
never given to the decoder either, so the perturbation can only act through the latent
shift. KL(q(z | x) ‖ p(z | a, m)) is analytic for the sampled mask.

Losses (per minibatch B of the training split, w the KL warm-up weight, β ``kl_beta``):

- sVAE  (``sparsity="l1"``):   ``mean_{i∈B}[rec_i + β w KL_i] + λ · mean_{a,k} σ(log_alpha_ak)``
- sVAE+ (``sparsity="beta"``): ``n_obs · mean_{i∈B}[rec_i + β w KL_i] + w · G``,
  ``G = −Σ_{a,k} log Beta(σ(log_alpha_ak); 1, K_beta) = −Σ[log K_beta + (K_beta − 1) log(1 − σ)]``

with ``n_obs`` the number of training cells. The sums and means over (a, k) run over the
non-control labels that have training cells (held-out labels are left untouched, so
their parameters stay at their initial values until the OOD protocol fits them).

Minibatches: sVAE+'s ``n_obs · mean_{i∈B}`` is an unbiased estimate of the sum over all
training cells, so one step's loss estimates the full-data objective ``Σ_i[…] + w G``
(the Beta prior counts once per data set: its pull relative to the data shrinks as
``1 / n_obs``). sVAE's L1 term is added in full to every per-cell *mean*, so λ is a
per-cell strength: the same λ has the same effect whatever the number of cells and the
batch size. Adam is invariant to the global scale, so sVAE+'s factor ``n_obs`` only
changes the balance between the data and the prior, not the step size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, kl_divergence

from cellpert.models._components import (
    CovariateModuleMixin,
    log_mean_counts,
    nb_log_prob_log_mean,
    sample_straight_through_bernoulli,
)
from cellpert.models._keys import LABEL_KEY, LIBRARY_KEY

__all__ = ["LABEL_KEY", "LIBRARY_KEY", "SVAEModule"]


Prior = Literal["shift", "standard"]
Sparsity = Literal["l1", "beta"]


def _refresh_frozen_flag(module: SVAEModule, incompatible_keys) -> None:
    """After ``load_state_dict``: the host copy of the loaded ``mask_frozen`` buffer."""
    module._masks_are_frozen = bool(module.mask_frozen)


class SVAEModule(CovariateModuleMixin, BaseModuleClass):
    """sVAE / sVAE+ / iVAE / plain-VAE module (scvi-tools torch path).

    Parameters
    ----------
    n_genes
        G.
    n_labels
        Number of labels (controls included).
    n_latent
        K (simulation: 15).
    n_hidden, n_layers
        Width and number of hidden layers of the encoder and of the decoder (128, 2).
    dropout_rate
        Encoder dropout (0.1). The decoder has no dropout (scvi-tools' decoder convention).
    use_batch_norm
        Batch norm in the hidden layers of both networks.
    prior
        ``"shift"``: p(z | a, m) = N(m ⊙ μ_a, I) (sVAE, sVAE+, iVAE); ``"standard"``:
        N(0, I) whatever the label (the plain-VAE baseline; no μ, no mask).
    sparsity
        ``"l1"`` (sVAE: expected-edge L1 of weight ``sparsity_weight``) or ``"beta"``
        (sVAE+: Beta(1, ``beta_k``) prior on σ(log_alpha)).
    sparsity_weight
        λ ≥ 0 of sVAE (0 gives the iVAE: masks stay on).
    beta_k
        K_beta > 1 of sVAE+.
    kl_beta
        β, the weight of the KL (on top of the warm-up weight).
    mask_logits_init
        Initial log_alpha (5: edges start almost all on).
    mask_temperature
        Gumbel-sigmoid temperature (1).
    n_batch, n_cats_per_cov, n_continuous_cov
        Covariates: levels of the batch, of each categorical covariate, and the number
        of continuous ones (0 / empty: none). Their vector ``c_i`` enters the decoder's
        first layer, ``ρ_i = softmax(f(z_i, c_i))``.
    encode_covariates
        Also give ``c_i`` to the encoder's first layer, ``q(z_i | x_i, c_i)`` (off, as in
        scvi-tools).
    dispersion
        ``"gene"``: θ_g; ``"gene-batch"``: θ_bg, one per gene and batch (needs a batch).
    """

    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        *,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        prior: Prior = "shift",
        sparsity: Sparsity = "l1",
        sparsity_weight: float = 10.0,
        beta_k: float = 5.0,
        kl_beta: float = 1.0,
        mask_logits_init: float = 5.0,
        mask_temperature: float = 1.0,
        n_batch: int = 0,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
    ) -> None:
        super().__init__()
        if prior not in ("shift", "standard"):
            raise ValueError(f"prior must be 'shift' or 'standard', got {prior!r}")
        if sparsity not in ("l1", "beta"):
            raise ValueError(f"sparsity must be 'l1' or 'beta', got {sparsity!r}")
        self.n_genes = n_genes
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.prior = prior
        self.sparsity = sparsity
        self.sparsity_weight = float(sparsity_weight)
        self.beta_k = float(beta_k)
        self.kl_beta = float(kl_beta)
        self.mask_logits_init = float(mask_logits_init)
        self.mask_temperature = float(mask_temperature)

        # label bookkeeping, filled by the model and saved with the module
        self.register_buffer("is_control", torch.zeros(n_labels))
        self.register_buffer("penalised", torch.ones(n_labels))
        self.register_buffer("n_obs_train", torch.ones(()))
        # masks frozen at their thresholded values (OOD protocol, stages 2-3)
        self.register_buffer("mask_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_mask", torch.ones(n_labels, n_latent))
        # a host copy of ``mask_frozen`` for the control flow of every step (reading the
        # buffer there would make the host wait for the device); refreshed on load
        self._masks_are_frozen = False
        self.register_load_state_dict_post_hook(_refresh_frozen_flag)
        # encoder, decoder (and dispersion) frozen (OOD protocol, stage 3)
        self.networks_frozen = False

        # --- covariates c_i (batch, categorical, continuous); width 0 without them
        n_cov = self._init_covariates(
            n_batch, n_cats_per_cov, n_continuous_cov, encode_covariates=encode_covariates, dispersion=dispersion,
        )

        # --- encoder q(z | x[, c]) from log1p(x), label-agnostic; the covariates, when
        # encoded, widen its first layer only (nothing is added without them)
        self.encoder = Encoder(
            n_genes + (n_cov if self.encode_covariates else 0),
            n_latent,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            var_eps=1e-4,
        )
        # --- decoder ρ = softmax(f(z[, c])); the label is never an input
        self.decoder_body = FCLayers(
            n_in=n_latent + n_cov,
            n_out=n_hidden,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=use_batch_norm,
        )
        self.decoder_out = nn.Linear(n_hidden, n_genes)
        # θ_g = exp(log_theta_g), gene-wise (or θ_bg per batch), initialised to 1
        shape = (n_batch, n_genes) if dispersion == "gene-batch" else (n_genes,)
        self.log_theta = nn.Parameter(torch.zeros(shape))

        # --- perturbation parameters: shift means μ (labels x K) and mask logits
        if prior == "shift":
            self.shift_mean = nn.Parameter(torch.zeros(n_labels, n_latent))
            self.log_alpha = nn.Parameter(torch.full((n_labels, n_latent), self.mask_logits_init))

    # ------------------------------------------------------------------ state
    def train(self, mode: bool = True) -> SVAEModule:
        """Train mode, keeping frozen networks (batch norm statistics) in eval mode."""
        super().train(mode)
        if self.networks_frozen:
            self.encoder.eval()
            self.decoder_body.eval()
        return self

    def freeze_masks(self) -> None:
        """Freeze every label's mask at its thresholded value ``1[log_alpha > 0]``."""
        if self.prior == "shift":
            self.frozen_mask.copy_((self.log_alpha.detach() > 0).to(self.frozen_mask.dtype))
        self.mask_frozen.fill_(True)
        self._masks_are_frozen = True

    @property
    def theta(self) -> torch.Tensor:
        """θ: (G,), or (n_batch, G) with ``dispersion="gene-batch"``."""
        return torch.exp(self.log_theta)

    def log_theta_of(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """``log θ`` of each cell's batch (B, G), or the per-gene (G,) without a per-batch θ."""
        if self.log_theta.dim() == 1:
            return self.log_theta
        if batch_index is None:
            raise ValueError("a per-batch dispersion needs the cells' batch codes")
        return self.log_theta[batch_index.reshape(-1).long()]

    # ------------------------------------------------------------- scvi hooks
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "covariates": self.covariates(tensors)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {
            "z": inference_outputs["z"],
            "library": tensors[LIBRARY_KEY],
            "label": tensors[LABEL_KEY],
            "covariates": self.covariates(tensors),
            "batch_index": self.covariates.batch_index(tensors),
        }



    def _with_covariates(self, h: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        """``[h, c]`` along the features, ``c`` (B, C) broadcast over h's leading sample
        dimensions (h: (..., B, ·)); h itself for a module without covariates."""
        if not self.covariates.n_output:
            return h
        self._check_covariates(covariates)
        c = covariates.to(h.dtype).expand(*h.shape[:-1], covariates.shape[-1])
        return torch.cat([h, c], dim=-1)

    @auto_move_data
    def inference(
        self, x: torch.Tensor, n_samples: int | None = None, covariates: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """q(z | x[, c]) from log1p(x) and a reparameterised sample of z.

        Parameters
        ----------
        x
            Counts (B, G).
        n_samples
            Draws of z; None gives one draw without a sample dimension.
        covariates
            (B, C) covariate vectors (:meth:`side_inputs`); used only with
            ``encode_covariates``.
        """
        h = torch.log1p(x)
        if self.encode_covariates:
            h = self._with_covariates(h, covariates)
        qz_m, qz_v, _ = self.encoder(h)
        qz_m, qz_v = qz_m.float(), qz_v.float()  # float32 under mixed precision
        qz_s = torch.sqrt(qz_v)
        shape = qz_m.shape if n_samples is None else (n_samples, *qz_m.shape)
        # latent z_i ~ q(z_i | x_i) = N(qz_m, qz_v), reparameterised
        z = qz_m + qz_s * torch.randn(shape, dtype=qz_m.dtype, device=qz_m.device)
        return {"z": z, "qz_m": qz_m, "qz_s": qz_s}

    def sample_mask(self, label: torch.Tensor) -> torch.Tensor:
        """The mask m_i of each cell (B, K) for integer labels (B,).

        Training: hard Gumbel-sigmoid (straight-through) from ``log_alpha[a_i]``; evaluation:
        the thresholded mask ``1[log_alpha[a_i] > 0]``; frozen: the stored frozen mask.
        """
        if self._masks_are_frozen:
            return self.frozen_mask[label]
        logits = self.log_alpha[label]
        if self.training:
            # mask m_ik ~ hard Gumbel-sigmoid(log_alpha[a_i, k]), relaxed gradient
            return sample_straight_through_bernoulli(logits, temperature=self.mask_temperature)
        return (logits > 0).to(logits.dtype)

    def prior_mean(self, label: torch.Tensor) -> torch.Tensor:
        """Mean ``m_i ⊙ μ_{a_i}`` of p(z_i | a_i, m_i) (zero for controls and the plain VAE)."""
        label = label.reshape(-1).long()
        if self.prior == "standard":
            return torch.zeros(label.shape[0], self.n_latent, device=label.device)
        mask = self.sample_mask(label)
        not_control = (1.0 - self.is_control[label]).unsqueeze(-1)
        return mask * self.shift_mean[label] * not_control

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        label: torch.Tensor,
        covariates: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prior mean of z and the log NB mean ``log ℓ_i + log softmax(f(z_i[, c_i]))`` with
        log θ (per gene, or of each cell's batch)."""
        # latent prior z_i ~ N(m_i ⊙ μ_{a_i}, I) (N(0, I) for controls / the plain VAE)
        pz_m = self.prior_mean(label)
        h = self.decoder_body(self._with_covariates(z, covariates))
        log_rho = torch.log_softmax(self.decoder_out(h).float(), dim=-1)
        log_theta = self.log_theta_of(batch_index)
        return {"log_mu": log_mean_counts(library, log_rho), "log_theta": log_theta, "pz_m": pz_m}

    @property
    def nb_theta(self) -> torch.Tensor:
        """NB inverse dispersion θ: (G,), or (n_batch, G) with ``dispersion="gene-batch"``."""
        return self.theta

    def nb_theta_of(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """θ of each cell: (G,), or (B, G) with ``dispersion="gene-batch"``."""
        return torch.exp(self.log_theta_of(batch_index))

    def decode_rho(self, z: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """ρ = softmax(f(z[, c])) for latents of any leading shape (..., K) -> (..., G).

        ``covariates`` (B, C) go with the last leading dimension of ``z`` (its cells).
        """
        zc = self._with_covariates(z, covariates)
        flat = zc.reshape(-1, zc.shape[-1])
        rho = torch.softmax(self.decoder_out(self.decoder_body(flat)).float(), dim=-1)
        return rho.reshape(*z.shape[:-1], rho.shape[-1])

    @torch.inference_mode()
    def posterior_rho(
        self, x: torch.Tensor, *, covariates: torch.Tensor | None = None, n_draws: int = 1
    ) -> torch.Tensor:
        """ρ of each cell decoded at ``n_draws`` draws of its posterior, z_i ~ q(z_i | x_i[, c_i]):
        (n_draws, B, G)."""
        return self.decode_rho(self.inference(x, n_samples=int(n_draws), covariates=covariates)["z"], covariates)

    def counterfactual_rho(
        self,
        basal: torch.Tensor,
        rows: torch.Tensor,
        effect: torch.Tensor,
        covariates: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ρ of cells' latents ``z_c + D_r shift`` (``effect``: (P, T, K) shifts): (P, R, C, G).

        ``shift`` (P, R, K), when given, replaces ``D_r shift`` (the empirical shifts of
        :meth:`~cellpert.models._base.CounterfactualMixin.get_empirical_shifts`).
        ``covariates`` (C, ·): the cells' own, kept under every row (the effect of a
        perturbation at the cell's covariates).
        """
        if shift is None:
            shift = torch.matmul(rows, effect)  # (P, R, K)
        return self.decode_rho(basal[None, None] + shift[:, :, None, :], covariates)

    # ------------------------------------------------------------------- loss
    def sparsity_penalty(self) -> torch.Tensor:
        """sVAE: ``λ · mean σ(log_alpha)``; sVAE+: ``−Σ log Beta(σ(log_alpha); 1, K_beta)``.

        Over the non-control labels with training cells. Zero for the plain VAE and
        once the masks are frozen.
        """
        if self.prior == "standard" or self._masks_are_frozen:
            return torch.zeros((), device=self.n_obs_train.device)
        # the penalised labels as 0/1 row weights, not a boolean index (whose output size
        # would have to be read on the host); no such label gives 0
        keep = (self.penalised * (1.0 - self.is_control))[:, None]
        if self.sparsity == "l1":
            n_entries = (keep.sum() * self.log_alpha.shape[1]).clamp_min(1.0)
            return self.sparsity_weight * (torch.sigmoid(self.log_alpha) * keep).sum() / n_entries
        # log(1 - σ(l)) = logsigmoid(-l), stable for large l
        log_beta = math.log(self.beta_k) + (self.beta_k - 1.0) * F.logsigmoid(-self.log_alpha)
        return -(log_beta * keep).sum()

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        kl_weight: float | torch.Tensor = 1.0,
        n_obs: int | None = None,
    ) -> LossOutput:
        """The sVAE / sVAE+ loss of docs/models.md, *sVAE and sVAE+* (see the module docstring).

        Parameters
        ----------
        kl_weight
            Warm-up weight w (filled in by the training plan).
        n_obs
            Number of training cells (sVAE+ scaling; default: the stored count).

        Returns
        -------
        :class:`~scvi.module.base.LossOutput` with the per-cell reconstruction loss and the
        unweighted KL (so ``elbo_validation`` is the per-cell negative ELBO), and the
        sparsity term in ``extra_metrics``.
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        # counts x_ig ~ NB(ℓ_i ρ_ig, θ_g)
        rec = -nb_log_prob_log_mean(x, generative_outputs["log_mu"], generative_outputs["log_theta"])
        qz = Normal(inference_outputs["qz_m"], inference_outputs["qz_s"])
        pz = Normal(generative_outputs["pz_m"], torch.ones_like(generative_outputs["pz_m"]))
        kl = kl_divergence(qz, pz).sum(-1)
        penalty = self.sparsity_penalty()
        per_cell = (rec + self.kl_beta * kl_weight * kl).mean()
        if self.sparsity == "beta":
            n = self.n_obs_train if n_obs is None else float(n_obs)
            loss = n * per_cell + kl_weight * penalty
        else:
            loss = per_cell + penalty
        extra = {"sparsity_penalty": penalty.detach()}
        if self.prior == "shift":
            extra["mask_on_fraction"] = (self.log_alpha > 0).float().mean().detach()
        return LossOutput(
            loss=loss,
            reconstruction_loss=rec,
            kl_local=kl,
            kl_global=torch.zeros((), device=x.device),
            extra_metrics=extra,
        )

    # -------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def log_weights(
        self,
        x: torch.Tensor,
        library: torch.Tensor,
        label: torch.Tensor,
        covariates: torch.Tensor | None,
        batch_index: torch.Tensor | None,
        n_samples: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample terms for the ELBO and the IWELBO (eval mode: thresholded masks).

        ``covariates`` and ``batch_index`` are the minibatch's (:meth:`side_inputs`; None
        for a module without them).

        Returns
        -------
        ``log p(x | z_s) + log p(z_s | a, m) − log q(z_s | x)`` (S, B), ``log p(x | z_s)``
        (S, B) and the analytic KL (B,).
        """
        inf = self.inference(x, n_samples=n_samples, covariates=covariates)
        gen = self.generative(inf["z"], library, label, covariates, batch_index)
        log_px = nb_log_prob_log_mean(x, gen["log_mu"], gen["log_theta"])
        qz = Normal(inf["qz_m"], inf["qz_s"])
        pz = Normal(gen["pz_m"], torch.ones_like(gen["pz_m"]))
        log_pz = pz.log_prob(inf["z"]).sum(-1)
        log_qz = qz.log_prob(inf["z"]).sum(-1)
        kl = kl_divergence(qz, pz).sum(-1)
        return log_px + log_pz - log_qz, log_px, kl
