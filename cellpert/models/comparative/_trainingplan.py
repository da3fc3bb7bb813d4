"""Training modes of the comparative VAE (docs/models.md, *Comparative VAE*).

- ``standard``: minimise the combined loss, ``−ELBO`` per cell plus a fixed weight times the
  background cells' mean Wasserstein penalty (scvi-tools' automatic optimisation).
- ``multi-objective``: per step, the gradients ``g_b`` and ``g_t`` of the background and
  target objectives (each set's mean per-cell negative ELBO); the update follows the
  two-task min-norm (MGDA) direction ``α* g_b + (1 − α*) g_t`` with
  ``α* = clip(((g_t − g_b) · g_t) / ‖g_b − g_t‖², 0, 1)`` (:func:`min_norm_coefficient`),
  plus the gradient of the weighted regularisers, which is not part of either objective:
  inside ``g_b`` a large penalty weight would dominate the min-norm direction and leave
  the background ELBO unoptimised (α* → 0; measured in benchmarks/RESULTS_comparative.md).
  Implemented with Lightning's manual optimisation; the optimiser (Adam) steps on that
  direction.
- ``constrained``: minimise ``−ELBO`` subject to ``W ≤ ε`` through the Lagrangian
  ``−ELBO + λ (W − ε)``; gradient descent on the parameters and dual ascent on the
  multiplier, ``λ ← max(0, λ + η (Ŵ − ε))`` after every step (:func:`dual_ascent_step`),
  with ``Ŵ`` the minibatch's mean penalty over its background cells. ε is given as a
  fraction of the salient prior's energy (``E‖t‖² = d_t`` under N(0, I)): ``ε = level · d_t``.

The multiplier λ (``penalty_weight``), the penalty ``W`` and, in the multi-objective mode,
``α*`` are logged every epoch, so their trajectories are in the model's history.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from cellpert.models._trainingplan import CellpertTrainingPlan

__all__ = ["MODES", "ComparativeTrainingPlan", "Mode", "dual_ascent_step", "min_norm_coefficient"]

logger = logging.getLogger(__name__)

Mode = Literal["standard", "multi-objective", "constrained"]
MODES: tuple[str, ...] = ("standard", "multi-objective", "constrained")


def min_norm_coefficient(grad_background: torch.Tensor, grad_target: torch.Tensor) -> torch.Tensor:
    """α* minimising ``‖α g_b + (1 − α) g_t‖²`` over α ∈ [0, 1] (two-task MGDA).

    ``α* = clip(((g_t − g_b) · g_t) / ‖g_b − g_t‖², 0, 1)``; equal gradients give ½.
    Computed on the gradients' device and returned as a 0-d tensor there, so a training
    step does not wait on the host (no ``.item()``).

    Parameters
    ----------
    grad_background, grad_target
        Flattened gradients g_b and g_t of the same parameters.
    """
    diff = grad_background - grad_target
    denom = torch.dot(diff, diff)
    alpha = torch.dot(-diff, grad_target) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    usable = (denom > 0) & torch.isfinite(denom) & torch.isfinite(alpha)
    return torch.where(usable, alpha.clamp(0.0, 1.0), torch.full_like(alpha, 0.5))


def dual_ascent_step(multiplier, value, level: float, lr: float):
    """One projected dual-ascent step ``max(0, λ + η (value − level))``.

    Plain numbers give a float; a tensor ``multiplier`` or ``value`` gives a 0-d tensor on
    its device (the training step's path: no host sync).
    """
    if torch.is_tensor(multiplier) or torch.is_tensor(value):
        return (torch.as_tensor(multiplier) + lr * (torch.as_tensor(value) - level)).clamp_min(0.0)
    return max(0.0, float(multiplier) + float(lr) * (float(value) - float(level)))


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the DDP ranks (``value`` itself in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value / torch.distributed.get_world_size()


class ComparativeTrainingPlan(CellpertTrainingPlan):
    """:class:`~scvi.train.TrainingPlan` with the three fitting modes of the comparative VAE.

    Parameters
    ----------
    module
        :class:`~cellpert.models.comparative._module.ComparativeVAEModule`.
    mode
        ``"standard"``, ``"multi-objective"`` or ``"constrained"``.
    penalty_weight
        Weight of the Wasserstein penalty (standard and multi-objective modes), or the
        initial multiplier λ₀ (constrained mode).
    mmd_weight
        Weight of the MMD penalty (every mode).
    constraint_level
        ε / d_t (constrained mode): the fraction of the salient prior's energy allowed in
        background cells' salient posteriors.
    dual_lr
        η, the dual-ascent step size (constrained mode).
    manual_clip_norm
        Gradient-norm clipping of the manual (multi-objective) step (None: none);
        Lightning clips only automatically optimised steps.
    **kwargs
        :class:`~cellpert.models._trainingplan.CellpertTrainingPlan` arguments (optimizer,
        lr, KL warm-up, ...).
    """

    def __init__(
        self,
        module,
        *,
        mode: Mode = "standard",
        penalty_weight: float = 1.0,
        mmd_weight: float = 0.0,
        constraint_level: float = 0.05,
        dual_lr: float = 0.1,
        manual_clip_norm: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(module, penalty_weight=float(penalty_weight), mmd_weight=float(mmd_weight), **kwargs)
        self.mode = mode
        self.constraint = float(constraint_level) * module.n_salient_latent
        self.dual_lr = float(dual_lr)
        self.automatic_optimization = mode != "multi-objective"
        self.alpha_: torch.Tensor | None = None
        #: gradient-norm clipping of the manual (multi-objective) step (None: none); Lightning
        #: clips only automatically optimised steps.
        self.manual_clip_norm: float | None = manual_clip_norm

    @property
    def multiplier(self) -> float:
        """The current weight (λ in the constrained mode) of the Wasserstein penalty (a host
        read: for reports, not for the training step)."""
        return float(self.loss_kwargs["penalty_weight"])

    def _log_scalar(self, name: str, value: torch.Tensor | float) -> None:
        self.log_epoch_mean(name, value, 1.0, "train")

    def training_step(self, batch, batch_idx):
        """One step of the chosen mode (no host sync: λ and α* stay on the device)."""
        self._log_scalar("penalty_weight", self.loss_kwargs["penalty_weight"])
        if self.mode == "multi-objective":
            return self._multi_objective_step(batch)
        loss = super().training_step(batch, batch_idx)
        if self.mode == "constrained":
            # every rank takes the same dual step: the mean penalty over the ranks' batches
            self.loss_kwargs["penalty_weight"] = dual_ascent_step(
                self.loss_kwargs["penalty_weight"], _mean_over_ranks(self._last_wasserstein), self.constraint, self.dual_lr
            )
        return loss

    def forward(self, *args, **kwargs):
        inference_outputs, generative_outputs, loss = super().forward(*args, **kwargs)
        self._last_wasserstein = loss.extra_metrics["wasserstein"].detach()
        return inference_outputs, generative_outputs, loss

    def _multi_objective_step(self, batch):
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs.update({"kl_weight": self.kl_weight})
        optimizer = self.optimizers()
        _, _, scvi_loss = self.forward(batch, loss_kwargs=self.loss_kwargs)
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = []
        for name in ("loss_background", "loss_target", "regulariser"):
            value = scvi_loss.extra_metrics[name]
            if not value.requires_grad:  # no regulariser (weights 0)
                grads.append(torch.zeros_like(grads[0]))
                continue
            g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params, strict=True)])
            grads.append(_mean_over_ranks(flat))
        alpha = min_norm_coefficient(grads[0], grads[1])
        direction = alpha * grads[0] + (1.0 - alpha) * grads[1] + grads[2]
        optimizer.zero_grad()
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = direction[offset : offset + n].view_as(p).clone()
            offset += n
        if self.manual_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.manual_clip_norm)
        optimizer.step()
        self.alpha_ = alpha
        self._log_scalar("mgda_alpha", alpha)
        self.record_loss(scvi_loss, "train")
        return None
