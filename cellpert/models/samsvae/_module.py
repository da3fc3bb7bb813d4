"""Torch module of SAMS-VAE, CPA-VAE and the conditional VAE (docs/models.md, *SAMS-VAE*, *Baselines: CPA-VAE and conditional VAE*).

One module class covers the three models of the SAMS-VAE paper; ``variant`` picks the
generative model:

- ``"sams"``: ``z_i = z^b_i + Σ_t D_it (E_t ⊙ M_t)`` with sparse masks M;
- ``"cpa"``: ``z_i = z^b_i + Σ_t D_it E_t`` (no masks, mean-field q(E));
- ``"cvae"``: ``z_i ~ N(0, I)``, decoder input ``[z_i, D_i]``, encoder ``q(z | x̃, D)``.

The loss is the Monte Carlo ELBO of docs/models.md, *SAMS-VAE* with ``n_particles`` particles: global
samples (E, M) are drawn once per particle and shared by every cell of the minibatch;
each perturbation's global log-density ratio is spread over the cells that received it
with weight ``1 / N_t`` (``N_t`` counted on the split being scored); controls carry no
global term; no analytic KL is used anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from cellpert.models._components import (
    CovariateModuleMixin,
    GaussianHead,
    NBDecoder,
    ResidualMLP,
    bernoulli_log_prob,
    chunked_predictive_mean,
    log_mean_counts,
    nb_log_prob_log_mean,
    nb_sample,
    sample_straight_through_bernoulli,
)
from cellpert.models._keys import DOSAGE_KEY, LIBRARY_KEY

__all__ = ["DOSAGE_KEY", "LIBRARY_KEY", "PerturbationVAEModule"]


Variant = Literal["sams", "cpa", "cvae"]
Guide = Literal["correlated", "mean_field"]

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(x: torch.Tensor, loc: torch.Tensor | float, scale: torch.Tensor | float) -> torch.Tensor:
    """Elementwise log N(x; loc, scale²) (as torch's ``Normal.log_prob``, without validation)."""
    if isinstance(scale, float):
        return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - _HALF_LOG_2PI
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - _HALF_LOG_2PI


class _CorrelatedEmbeddingGuide(nn.Module):
    """q(E_t | M_t) = N(MLP([m_t, onehot(t)])), one MLP shared by all perturbations.

    The one-hot input of the first layer is a (T, H) table (the same linear map without
    materialising the one-hot vectors).
    """

    def __init__(self, n_perturbations: int, n_latent: int, n_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.mlp = ResidualMLP([n_latent], n_hidden, n_layers)
        bound = 1.0 / math.sqrt(n_latent + n_perturbations)
        self.onehot_weight = nn.Parameter(torch.empty(n_perturbations, n_hidden).uniform_(-bound, bound))
        self.head = GaussianHead(n_hidden, n_latent)

    def forward(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask``: (..., T, K) -> loc, scale of shape (..., T, K)."""
        return self.head(self.mlp.body(self.mlp.first(mask) + self.onehot_weight))


class PerturbationVAEModule(CovariateModuleMixin, BaseModuleClass):
    """SAMS-VAE / CPA-VAE / conditional VAE module (scvi-tools torch path).

    Parameters
    ----------
    n_genes
        G.
    n_perturbations
        T (columns of D).
    variant
        ``"sams"``, ``"cpa"`` or ``"cvae"`` (see module docstring).
    n_latent
        K.
    n_hidden, n_layers
        Width and depth of the decoder body (paper: 400, 1).
    n_layers_encoder
        Depth of the basal encoder body (width ``n_hidden``).
    guide
        SAMS-VAE q(E): ``"correlated"`` (q(E_t | M_t) by an MLP) or ``"mean_field"``.
    guide_n_hidden, guide_n_layers
        Correlated guide MLP (Norman: 400 × 4; Replogle: 200 × 2).
    mask_prior_prob
        p of the Bernoulli(p) mask prior.
    embedding_prior_scale
        s of the N(0, s² I) embedding prior.
    n_particles
        Monte Carlo particles P of the training ELBO.
    mask_temperature
        Temperature of the relaxed Bernoulli (paper: 1). Can be changed during training
        (see ``mask_temperature_final`` of the model's ``train``).
    mask_logits_init
        Initial q(M) logits (paper: 0, i.e. q = 1/2). ``"prior"`` starts them at
        ``logit(mask_prior_prob)``.
    encoder_input
        What the basal encoder sees besides x̃: ``"offset"`` (paper), the sampled
        ``D_i (E ⊙ M)``; ``"dosage"`` (option), the perturbation vector ``D_i`` itself, so
        that the identity of the perturbation reaches the encoder whatever the masks (with
        the offset, switching masks on is also a way of telling the encoder which
        perturbation a cell got); ``"none"``, x̃ only (the reference's
        ``mean_field_encoder``).
    mask_gradient
        Gradient estimator of the q(M) logits. ``"straight_through"`` (paper): hard
        samples with relaxed-Bernoulli gradients. ``"score"`` (option): hard samples
        without relaxed gradients, and an unbiased score-function (REINFORCE) gradient
        with a leave-one-out baseline over the particles: per particle p and
        perturbation t, the reward is the sum of the ELBO of the minibatch cells that
        received t (needs ``n_particles >= 2``). The loss value is unchanged.
    spike_slab_guide
        Option: the variational family ``q(E_tk | M_tk = 0) = p(E_tk)`` (spike and slab):
        the embedding term of the ELBO becomes ``Σ_k M_tk (log p(E_tk) - log q(E_tk))``,
        so switching a mask on costs the information that its embedding carries (the
        paper's guide pays it whatever the mask, and its straight-through gradient
        cannot see that a mask turned off would let q(E) return to the prior). The
        generative model is unchanged.
    n_batch, n_cats_per_cov, n_continuous_cov
        Covariates (docs/models.md, *Covariates*): levels of the batch, of each
        categorical covariate, and the number of continuous ones. Their vector ``c_i``
        (:class:`~cellpert.models._components.CovariateInput`) enters the first decoder
        layer, ``p(x | z, c)``.
    encode_covariates
        Also give ``c_i`` to the encoder, ``q(z^b | x̃, ·, c)`` (scvi-tools' default and
        cellpert's: off).
    dispersion
        ``"gene"``: θ_g; ``"gene-batch"``: θ_bg, one per gene and batch.
    """

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        *,
        variant: Variant = "sams",
        n_latent: int = 200,
        n_hidden: int = 400,
        n_layers: int = 1,
        n_layers_encoder: int = 1,
        guide: Guide = "correlated",
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
        n_batch: int = 0,
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        encode_covariates: bool = False,
        dispersion: Literal["gene", "gene-batch"] = "gene",
    ) -> None:
        super().__init__()
        self.spike_slab_guide = spike_slab_guide and variant == "sams"
        if mask_gradient not in ("straight_through", "score"):
            raise ValueError(f"mask_gradient must be 'straight_through' or 'score', got {mask_gradient!r}")
        if mask_gradient == "score" and n_particles < 2:
            raise ValueError("mask_gradient='score' needs n_particles >= 2 (leave-one-out baseline)")
        self.mask_gradient = mask_gradient
        if variant not in ("sams", "cpa", "cvae"):
            raise ValueError(f"variant must be 'sams', 'cpa' or 'cvae', got {variant!r}")
        if guide not in ("correlated", "mean_field"):
            raise ValueError(f"guide must be 'correlated' or 'mean_field', got {guide!r}")
        if not 0.0 < mask_prior_prob < 1.0:
            raise ValueError(f"mask_prior_prob must be in (0, 1), got {mask_prior_prob}")
        self.n_genes = n_genes
        self.n_perturbations = n_perturbations
        self.variant = variant
        self.n_latent = n_latent
        self.n_hidden = n_hidden
        self.guide = guide if variant == "sams" else "mean_field"
        self.mask_prior_prob = mask_prior_prob
        self.embedding_prior_scale = embedding_prior_scale
        self.n_particles = n_particles
        self.mask_temperature = mask_temperature
        if encoder_input not in ("offset", "dosage", "none"):
            raise ValueError(f"encoder_input must be 'offset', 'dosage' or 'none', got {encoder_input!r}")
        self.encoder_input = "dosage" if variant == "cvae" else encoder_input

        # training-split statistics, filled by the model and saved with the module
        self.register_buffer("gene_mean", torch.zeros(n_genes))
        self.register_buffer("gene_std", torch.ones(n_genes))
        self.register_buffer("n_cells_train", torch.ones(n_perturbations))
        self.register_buffer("n_cells_val", torch.ones(n_perturbations))

        # --- covariates c_i (batch, categorical, continuous); width 0 without them
        n_cov = self._init_covariates(
            n_batch, n_cats_per_cov, n_continuous_cov, encode_covariates=encode_covariates, dispersion=dispersion,
        )
        # the covariate input is appended only when there is one, so a model without
        # covariates keeps its parameters (and their seeded initial values)
        cov_input = [n_cov] if n_cov else []

        # --- encoder q(z^b | x̃, offset[, c]) or, for the CVAE, q(z | x̃, D[, c])
        extra = {"offset": n_latent, "dosage": n_perturbations, "none": 0}[self.encoder_input]
        enc_inputs = [n_genes, extra, *(cov_input if self.encode_covariates else [])]
        self.encoder = ResidualMLP(enc_inputs, n_hidden, n_layers_encoder)
        self.encoder_head = GaussianHead(n_hidden, n_latent)

        # --- decoder p(x | z[, c]) (CVAE: p(x | z, D[, c]))
        dec_inputs = [n_latent, n_perturbations] if variant == "cvae" else [n_latent]
        self.decoder = NBDecoder(
            [*dec_inputs, *cov_input], n_genes, n_hidden, n_layers,
            n_batch_dispersion=n_batch if dispersion == "gene-batch" else 0,
        )  # fmt: skip

        # --- global variational parameters
        if variant != "cvae":
            if self.guide == "mean_field":
                self.embedding_loc = nn.Parameter(torch.zeros(n_perturbations, n_latent))
                self.embedding_scale_raw = nn.Parameter(torch.full((n_perturbations, n_latent), _SOFTPLUS_ONE))
            else:
                self.embedding_guide = _CorrelatedEmbeddingGuide(
                    n_perturbations, n_latent, guide_n_hidden, guide_n_layers
                )
        if variant == "sams":
            init = (
                math.log(mask_prior_prob / (1 - mask_prior_prob))
                if mask_logits_init == "prior"
                else float(mask_logits_init)
            )
            self.mask_logits = nn.Parameter(torch.full((n_perturbations, n_latent), init))

    # ------------------------------------------------------------------ globals
    def sample_globals(self, n_particles: int) -> dict[str, torch.Tensor | None]:
        """Draw the global latents from q and score them.

        Returns
        -------
        ``effect`` (P, T, K): ``E ⊙ M`` (``E`` for CPA-VAE); ``mask`` (P, T, K) or None;
        ``embedding`` (P, T, K): E; ``log_ratio`` (P, T):
        ``Σ_k log p(E_tk) - log q(E_tk) + log p(M_tk) - log q(M_tk)``.
        None entries for the CVAE.
        """
        if self.variant == "cvae":
            return {"effect": None, "mask": None, "embedding": None, "log_ratio": None}
        P = n_particles
        prior_scale = float(self.embedding_prior_scale)
        log_ratio = 0.0
        mask = None
        if self.variant == "sams":
            # mask M_tk ~ q(M_tk) = Bernoulli(σ(logit_tk)), hard sample, relaxed gradient
            mask = sample_straight_through_bernoulli(
                self.mask_logits, (P,), temperature=self.mask_temperature
            )
            if self.mask_gradient == "score":
                mask = mask.detach()  # hard sample only; logits learn by the score function
            prior_logit = torch.full_like(self.mask_logits, math.log(self.mask_prior_prob / (1 - self.mask_prior_prob)))
            # log p(M_tk) - log q(M_tk): exact Bernoulli log-probabilities of the hard sample
            log_ratio = (bernoulli_log_prob(mask, prior_logit) - bernoulli_log_prob(mask, self.mask_logits)).sum(-1)
        if self.guide == "correlated":
            # embedding E_t ~ q(E_t | M_t) = N(MLP([m_t, onehot(t)]))
            loc, scale = self.embedding_guide(mask)
        else:
            # embedding E_tk ~ q(E_tk) = N(loc_tk, scale_tk) (mean field)
            loc = self.embedding_loc.expand(P, -1, -1)
            scale = F.softplus(self.embedding_scale_raw).expand(P, -1, -1)
        embedding = loc + scale * torch.randn_like(loc)
        # log p(E_tk) - log q(E_tk), prior N(0, s²)
        e_ratio = _normal_log_prob(embedding, 0.0, prior_scale) - _normal_log_prob(embedding, loc, scale)
        if self.spike_slab_guide:
            # q(E_tk | M_tk = 0) = p(E_tk): the ratio is 1 where the mask is off
            e_ratio = mask * e_ratio
        log_ratio = log_ratio + e_ratio.sum(-1)
        effect = embedding * mask if mask is not None else embedding
        return {"effect": effect, "mask": mask, "embedding": embedding, "log_ratio": log_ratio}

    def mask_score_surrogate(self, elbo: torch.Tensor, dosage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero-valued term whose gradient is the leave-one-out score-function estimate.

        ``elbo``: (P, B) per-particle ELBO of the minibatch cells; ``mask``: (P, T, K) hard.
        The gradient w.r.t. the logits is ``(1/(P B)) Σ_{p,t} (f_pt - b_pt) ∇ log q(m_pt)``
        with ``f_pt`` the summed ELBO of the cells that received t and ``b_pt`` the mean of
        ``f`` over the other particles.
        """
        P = elbo.shape[0]
        received = (dosage != 0).to(elbo.dtype)
        reward = elbo.detach() @ received  # (P, T)
        baseline = (reward.sum(0, keepdim=True) - reward) / (P - 1)
        log_q = bernoulli_log_prob(mask, self.mask_logits).sum(-1)  # (P, T)
        surrogate = ((reward - baseline) * log_q).sum() / (P * elbo.shape[1])
        return surrogate - surrogate.detach()

    # ------------------------------------------------------------- scvi hooks
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "dosage": tensors[DOSAGE_KEY], "covariates": self.covariates(tensors)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {
            "z": inference_outputs["z"],
            "library": tensors[LIBRARY_KEY],
            "dosage": tensors[DOSAGE_KEY],
            "covariates": self.covariates(tensors),
            "batch_index": self.covariates.batch_index(tensors),
        }


    def _encoder_covariates(self, covariates: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The encoder's covariate input: ``[c]`` when it takes one, else ``[]``."""
        return [covariates] if self.encode_covariates else []


    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input: ``(log(x + 1) - mean) / std`` with training-split statistics."""
        return (torch.log1p(x) - self.gene_mean) / self.gene_std

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        dosage: torch.Tensor,
        n_particles: int | None = None,
        global_samples: dict[str, torch.Tensor | None] | None = None,
        n_local_samples: int | None = None,
        covariates: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Sample globals (shared by the minibatch) and the local latent of each cell.

        Parameters
        ----------
        n_particles
            P (default ``self.n_particles``); ignored when ``global_samples`` is given.
        global_samples
            Output of :meth:`sample_globals` to reuse (e.g. one draw for all test cells).
        n_local_samples
            Local samples per global particle (IWELBO: P = 1 global draw, S local draws).
        covariates
            (B, C) covariate vectors (:meth:`side_inputs`); used by the encoder only with
            ``encode_covariates``.
        """
        if global_samples is None:
            global_samples = self.sample_globals(n_particles or self.n_particles)
        x_std = self.standardise(x)
        effect = global_samples["effect"]
        if self.variant == "cvae":
            loc, scale = self.encoder_head(self.encoder(x_std, dosage, *self._encoder_covariates(covariates)))  # (B, K)
            n_draws = n_local_samples or n_particles or self.n_particles
            offset = None
        else:
            # offset_i = Σ_t D_it (E_t ⊙ M_t): (P, B, K)
            offset = torch.matmul(dosage, effect).float()  # float32 under mixed precision
            if self.encoder_input == "offset":
                # the first layer's offset product W (D_i (E ⊙ M)) = D_i ((E ⊙ M) W^T): a
                # (P, T, H) product instead of a (P, B, H) one over the minibatch
                first = self.encoder.first
                pre = first.layers[0](x_std) + torch.matmul(dosage, first.layers[1](effect))
                if self.encode_covariates:
                    pre = pre + first.layers[2](covariates)
                h = self.encoder.body(pre)
            else:
                side = dosage if self.encoder_input == "dosage" else None
                h = self.encoder(x_std, side, *self._encoder_covariates(covariates))
            loc, scale = self.encoder_head(h)  # (P, B, K), or (B, K) without the offset input
            n_draws = effect.shape[0]
            if n_local_samples is not None:
                if n_draws != 1:
                    raise ValueError("n_local_samples needs a single global particle")
                n_draws = n_local_samples
        shape = (n_draws, *loc.shape[-2:])
        # basal state z^b_i ~ q(z^b_i | x̃_i, offset_i) (CVAE: z_i ~ q(z_i | x̃_i, D_i))
        zb = loc + scale * torch.randn(shape, dtype=loc.dtype, device=loc.device)
        z = zb if offset is None else zb + offset
        return {
            "zb": zb,
            "z": z,
            "qzb_loc": loc,
            "qzb_scale": scale,
            "offset": offset,
            "mask": global_samples["mask"],
            "log_ratio": global_samples["log_ratio"],
        }

    def _decoder_inputs(
        self, z: torch.Tensor, dosage: torch.Tensor | None, covariates: torch.Tensor | None
    ) -> list[torch.Tensor | None]:
        """The decoder's inputs: ``z`` (CVAE: ``z, D``) and, with covariates, ``c``."""
        self._check_covariates(covariates)
        inputs: list[torch.Tensor | None] = [z, dosage] if self.variant == "cvae" else [z]
        return [*inputs, covariates] if self.covariates.n_output else inputs

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        dosage: torch.Tensor,
        covariates: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decoder: log NB mean ``log μ_i = log ℓ_i + log softmax(W h(z_i[, c_i]) + b)`` and log θ
        (per gene, or of each cell's batch)."""
        log_rho = self.decoder.log_rho(*self._decoder_inputs(z, dosage, covariates))
        return {"log_mu": log_mean_counts(library, log_rho), "log_theta": self.decoder.log_theta_of(batch_index)}

    def cell_terms(
        self,
        x: torch.Tensor,
        inference_outputs: dict[str, torch.Tensor | None],
        generative_outputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Per-sample, per-cell local terms: ``log p(x|z)``, ``log p(z^b)``, ``log q(z^b)``."""
        zb = inference_outputs["zb"]
        # counts x_ig ~ NB(ℓ_i ρ_ig, θ_g)
        log_px = nb_log_prob_log_mean(x, generative_outputs["log_mu"], generative_outputs["log_theta"])
        # basal prior z^b_i ~ N(0, I)
        log_pz = _normal_log_prob(zb, 0.0, 1.0).sum(-1)
        log_qz = _normal_log_prob(zb, inference_outputs["qzb_loc"], inference_outputs["qzb_scale"]).sum(-1)
        return {"log_px": log_px, "log_pz": log_pz, "log_qz": log_qz}

    def global_per_cell(
        self, dosage: torch.Tensor, log_ratio: torch.Tensor | None, n_cells: torch.Tensor
    ) -> torch.Tensor | float:
        """``Σ_t 1[D_it ≠ 0] / N_t · log_ratio_t`` per particle and cell: (P, B)."""
        if log_ratio is None:
            return 0.0
        received = (dosage != 0).to(log_ratio.dtype)  # (B, T)
        weighted = log_ratio / n_cells.clamp(min=1.0)  # (P, T)
        return weighted @ received.T

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor | None],
        generative_outputs: dict[str, torch.Tensor],
        split: Literal["train", "val"] = "train",
        n_cells: torch.Tensor | None = None,
    ) -> LossOutput:
        """Negative Monte Carlo ELBO per cell, averaged over particles and cells.

        Parameters
        ----------
        split
            Which split's ``N_t`` scales the global terms (``"train"`` or ``"val"``).
        n_cells
            Explicit ``N_t`` (T,), overriding ``split``.
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        dosage = tensors[DOSAGE_KEY]
        terms = self.cell_terms(x, inference_outputs, generative_outputs)
        if n_cells is None:
            n_cells = self.n_cells_train if split == "train" else self.n_cells_val
        glob = self.global_per_cell(dosage, inference_outputs["log_ratio"], n_cells)
        local = terms["log_pz"] - terms["log_qz"]
        elbo = terms["log_px"] + local + glob  # (P, B)
        loss = -elbo.mean()
        if self.variant == "sams" and self.mask_gradient == "score" and self.training:
            loss = loss - self.mask_score_surrogate(elbo, dosage, inference_outputs["mask"])
        glob_cell = glob.mean(0) if torch.is_tensor(glob) else torch.zeros_like(elbo[0])
        extra = {"elbo_per_cell": elbo.mean().detach()}
        if self.variant == "sams":
            extra["mask_on_fraction"] = (self.mask_logits > 0).float().mean().detach()
        return LossOutput(
            loss=loss,
            reconstruction_loss=-terms["log_px"].mean(0),
            kl_local=-local.mean(0),
            kl_global=-glob_cell.sum(),
            extra_metrics=extra,
        )

    # -------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def iwelbo_terms(
        self,
        x: torch.Tensor,
        dosage: torch.Tensor,
        library: torch.Tensor,
        global_samples: dict[str, torch.Tensor | None],
        n_samples: int,
        covariates: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample local log-weights ``log p(x|z) + log p(z^b) - log q(z^b)``: (S, B).

        ``global_samples`` holds either ``S = n_samples`` particles (importance sample s
        uses the s-th draw of (E, M) and one draw of z^b) or a single particle shared by
        the ``S`` draws of z^b. Either way the global draws are shared by all cells.
        """
        n_global = 1 if global_samples["effect"] is None else global_samples["effect"].shape[0]
        if n_global not in (1, n_samples):
            raise ValueError(f"global_samples must hold 1 or n_samples={n_samples} particles, got {n_global}")
        local = n_samples if n_global == 1 else None
        inf = self.inference(x, dosage, global_samples=global_samples, n_local_samples=local, covariates=covariates)
        zb, z = inf["zb"], inf["z"]
        loc, scale = inf["qzb_loc"], inf["qzb_scale"]
        gen = self.generative(z, library, dosage, covariates, batch_index)
        log_px = nb_log_prob_log_mean(x, gen["log_mu"], gen["log_theta"])
        log_pz = _normal_log_prob(zb, 0.0, 1.0).sum(-1)
        log_qz = _normal_log_prob(zb, loc, scale).sum(-1)
        return log_px + log_pz - log_qz

    @torch.inference_mode()
    def predictive_means(
        self,
        dosage: torch.Tensor,
        n_samples: int,
        library_size: torch.Tensor,
        *,
        transform: Literal["perturbseq", "counts", "rho"] = "perturbseq",
        chunk_size: int = 50,
    ) -> torch.Tensor:
        """Mean over posterior predictive particles, per dosage row.

        Each particle draws (E, M) from q (shared by the rows of the particle), an
        independent ``z^b ~ N(0, I)`` per row, and, unless ``transform="rho"``, counts
        ``x ~ NB(ℓ ρ, θ)``.

        Parameters
        ----------
        dosage
            (R, T) perturbation vectors (a zero row is control).
        n_samples
            Particles S.
        library_size
            (R,) or scalar ℓ.
        transform
            ``"perturbseq"``: mean of ``log2(1e4 x / Σ_g x + 1)``; ``"counts"``: mean of
            ``x``; ``"rho"``: mean of ρ (no count noise).
        chunk_size
            Particles per vectorised chunk.

        Returns
        -------
        (R, G) tensor.
        """
        if self.covariates.n_output:
            raise ValueError("the prior estimator does not take covariates; use the counterfactual estimator")
        R = dosage.shape[0]

        def draw_rho(c: int) -> torch.Tensor:
            glob = self.sample_globals(c)
            # basal state z^b ~ N(0, I), independently for every particle and row
            zb = torch.randn(c, R, self.n_latent, device=dosage.device)
            z = zb if glob["effect"] is None else zb + torch.matmul(dosage, glob["effect"])
            return self.decoder(z, dosage) if self.variant == "cvae" else self.decoder(z)

        return chunked_predictive_mean(
            draw_rho,
            lambda mu: nb_sample(mu, self.decoder.theta),
            n_samples=n_samples, library_size=library_size, transform=transform, chunk_size=chunk_size,
        )  # fmt: skip

    @property
    def nb_theta(self) -> torch.Tensor:
        """NB inverse dispersion θ: (G,), or (n_batch, G) with ``dispersion="gene-batch"``."""
        return self.decoder.theta

    def nb_theta_of(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """θ of each cell: (G,), or (B, G) with ``dispersion="gene-batch"``."""
        return torch.exp(self.decoder.log_theta_of(batch_index))

    @torch.inference_mode()
    def encode_basal(
        self, x: torch.Tensor, *, sample: bool = True, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Basal states of control cells: z^b ~ q(z^b | x̃, D = 0) (or its mean): (B, K).

        With ``D = 0`` the offset input is zero, so the encoder does not depend on the
        global latents. For the conditional VAE this is ``q(z | x̃, D = 0)``.
        """
        dosage = torch.zeros(x.shape[0], self.n_perturbations, device=x.device, dtype=x.dtype)
        x_std = self.standardise(x)
        enc_cov = self._encoder_covariates(covariates)
        if self.variant == "cvae" or self.encoder_input != "offset":
            h = self.encoder(x_std, dosage if self.encoder_input == "dosage" else None, *enc_cov)
        else:
            h = self.encoder(x_std, torch.zeros(x.shape[0], self.n_latent, device=x.device, dtype=x.dtype), *enc_cov)
        loc, scale = self.encoder_head(h)
        # basal state z^b_i ~ q(z^b_i | x̃_i, D_i = 0)
        return loc + scale * torch.randn_like(loc) if sample else loc

    def counterfactual_rho(
        self,
        basal: torch.Tensor,
        rows: torch.Tensor,
        effect: torch.Tensor | None,
        covariates: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ρ of control cells moved by dosage rows: (P, R, C, G) (P = 1 without globals).

        ``z = z^b_c + D_r (E_p ⊙ M_p)`` for each global draw p (``effect``: (P, T, K));
        the conditional VAE decodes ``[z^b_c, D_r]``. ``shift`` (P, R, K), when given,
        replaces the rows' latent shifts (the empirical shifts of
        :meth:`~cellpert.models._base.CounterfactualMixin.get_empirical_shifts`; the
        conditional VAE then decodes ``[z^b_c + shift, D_r]``). ``covariates`` (C, ·): the
        cells' own, kept under every row (the effect of a perturbation at the cell's
        covariates).
        """
        if shift is not None:
            z = basal[None, None] + shift[:, :, None, :]  # (P, R, C, K)
            side = rows[:, None, :].expand(-1, basal.shape[0], -1) if self.variant == "cvae" else None
            return self.decoder(*self._decoder_inputs(z, side, covariates))
        if effect is None:
            side = rows[:, None, :].expand(-1, basal.shape[0], -1)
            return self.decoder(*self._decoder_inputs(basal.expand(rows.shape[0], -1, -1), side, covariates))[None]
        shift = torch.matmul(rows, effect)  # (P, R, K)
        return self.decoder(*self._decoder_inputs(basal[None, None] + shift[:, :, None, :], None, covariates))

    @torch.inference_mode()
    def posterior_rho(
        self,
        x: torch.Tensor,
        dosage: torch.Tensor,
        *,
        covariates: torch.Tensor | None = None,
        n_draws: int = 1,
        global_samples: dict[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """ρ of each cell decoded at ``n_draws`` draws of its posterior: (n_draws, B, G).

        Per draw: the global latents (E, M) ~ q (one draw shared by the cells), then
        z_i = z^b_i + D_i (E ⊙ M) with z^b_i ~ q(z^b_i | x̃_i, D_i) (the conditional VAE:
        z_i ~ q(z_i | x̃_i, D_i), decoded with D_i), each cell with its own covariates.
        The draws are made in one batched call (one :meth:`sample_globals` of
        ``n_draws`` particles, or ``global_samples``: that many draws made before), not
        one call per draw.
        """
        n_draws = int(n_draws)
        if global_samples is None:
            global_samples = self.sample_globals(n_draws)
        inf = self.inference(
            x, dosage, global_samples=global_samples, covariates=covariates,
            n_local_samples=n_draws if self.variant == "cvae" else None,
        )  # fmt: skip
        return self.decoder(*self._decoder_inputs(inf["z"], dosage if self.variant == "cvae" else None, covariates))

    @torch.inference_mode()
    def latent_position(
        self, x: torch.Tensor, dosage: torch.Tensor, *, covariates: torch.Tensor | None = None, n_draws: int = 20
    ) -> torch.Tensor:
        """Each cell's posterior mean position in the space the shifts act in: (B, K).

        ``E_q[z^b_i + D_i (E ⊙ M)]`` over ``n_draws`` draws of the global latents, with
        z^b_i encoded under the cell's own perturbation (the conditional VAE:
        ``E_q[z_i | x̃_i, D_i]``, its basal state).
        """
        inf = self.inference(x, dosage, global_samples=self.sample_globals(n_draws), covariates=covariates)
        pos = inf["qzb_loc"] if inf["offset"] is None else inf["qzb_loc"] + inf["offset"]
        return pos.mean(0) if pos.dim() == 3 else pos
