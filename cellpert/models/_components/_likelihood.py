"""Negative-binomial count likelihood with observed library size (docs/models.md, *SAMS-VAE*)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from pyro.distributions import GammaPoisson
from torch import nn

from cellpert.models._components._nn import ResidualMLP

__all__ = [
    "NBDecoder",
    "chunked_predictive_mean",
    "counterfactual_effect_sums",
    "log_mean_counts",
    "nb_log_prob_log_mean",
    "nb_sample",
    "perturbseq_transform",
    "poisson_log_prob_log_mean",
]


def nb_log_prob_log_mean(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Log-probability of counts under NB(mean ``exp(log_mu)``, inverse dispersion θ), summed over genes.

    ``lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ log(θ/(θ+μ)) + x log(μ/(θ+μ))``, which is
    Pyro's ``GammaPoisson(θ, θ/μ)``, computed from ``log μ`` with both logarithms through
    ``logaddexp(log θ, log μ)``: a gene whose softmax weight is 0 in float32 gives finite
    values and gradients (``GammaPoisson(θ, θ/μ)`` gives NaN gradients).

    The terms that do not depend on μ are computed at the shape of ``x``, so when
    ``log_mu`` carries extra leading sample dimensions (particles ``(P, B, G)`` against
    counts ``(B, G)``) the ``lgamma`` calls are not repeated for every sample.

    Parameters
    ----------
    x
        Counts ``(..., B, G)``.
    log_mu
        Log means, broadcastable with ``x`` (e.g. ``(P, B, G)``).
    log_theta
        ``log θ`` per gene ``(G,)``.

    Returns
    -------
    Log-probabilities of shape ``broadcast(x, log_mu).shape[:-1]``.
    """
    log_mu, log_theta = log_mu.float(), log_theta.float()  # float32 under mixed precision too
    theta = torch.exp(log_theta)
    # with s = softplus(log μ − log θ) = log(1 + μ/θ): θ log(θ/(θ+μ)) + x log(μ/(θ+μ))
    # = −(θ + x) s + x (log μ − log θ), one softplus and no difference of large terms, so a
    # gene whose θ has grown large (near-Poisson genes after long training reach θ ~ 1e8)
    # keeps float32 accuracy; θ log θ − (θ + x) log(θ + μ) summed over genes lost whole nats
    s = nn.functional.softplus(log_mu - log_theta)
    mean_part = x * (log_mu - log_theta) - (theta + x) * s
    # lgamma(x + θ) − lgamma(θ) cancels the same way for large θ: float64 (once per cell, not per particle).
    # Σ_g lgamma(θ_g) is taken at θ's own shape ((G,): once, not once per cell), then broadcast:
    # the same sum, a third fewer float64 lgamma calls and half the digamma calls in backward
    theta64, x64 = theta.double(), x.double()
    count_part = (torch.lgamma(x64 + theta64) - torch.lgamma(x64 + 1.0)).sum(-1) - torch.lgamma(theta64).sum(-1)
    return mean_part.sum(-1) + count_part.to(mean_part.dtype)


def log_mean_counts(library_size: torch.Tensor, log_rho: torch.Tensor) -> torch.Tensor:
    """``log μ = log ℓ + log ρ`` with the observed library size ℓ ``(B, 1)`` or ``(B,)``.

    An empty cell (ℓ = 0) is given ℓ = 1 so that its log-likelihood stays finite.
    """
    return torch.log(library_size.reshape(-1, 1).clamp(min=1.0)) + log_rho


def poisson_log_prob_log_mean(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """Log-probability of counts under Poisson(exp(``log_mu``)), summed over genes."""
    return (x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0)).sum(-1)


#: Draws at or above this many values are split into ``_SAMPLE_CHUNKS`` parts on the CPU.
PARALLEL_SAMPLE_MIN = 1 << 17
_SAMPLE_CHUNKS = 8


def nb_sample(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Draw NB(mean ``mu``, inverse dispersion ``theta``) counts: ``x ~ Poisson(g)``,
    ``g ~ Gamma(θ, θ/μ)`` (Pyro's ``GammaPoisson(θ, θ/μ)``), from torch's global RNG.

    On the CPU, a large draw (``PARALLEL_SAMPLE_MIN`` values or more) is split into a fixed
    number of parts, each drawn with its own generator (seeded from the global RNG) on
    ``torch.get_num_threads()`` threads. torch's (and NumPy's) gamma and Poisson samplers
    run on one core whatever the thread setting, and they are most of an ATE's time; no
    library we could find draws them in parallel. The parts are fixed, so the counts do not
    depend on the number of threads, only on the seed.
    """
    rate = theta / mu
    concentration = theta.expand_as(mu)
    if mu.device.type != "cpu" or mu.numel() < PARALLEL_SAMPLE_MIN or mu.dim() == 0:
        return GammaPoisson(concentration, rate, validate_args=False).sample()
    flat_conc = concentration.contiguous().reshape(-1)
    flat_rate = rate.expand_as(mu).contiguous().reshape(-1)
    seeds = torch.randint(0, 2**62, (_SAMPLE_CHUNKS,)).tolist()  # from the global RNG: seeded runs repeat
    bounds = torch.linspace(0, flat_conc.numel(), _SAMPLE_CHUNKS + 1).long().tolist()
    tiny = torch.finfo(flat_conc.dtype).tiny
    # grad and inference modes are per thread: the workers run in the caller's
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def draw(part: int) -> torch.Tensor:
        lo, hi = bounds[part], bounds[part + 1]
        gen = torch.Generator().manual_seed(seeds[part])
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            # g ~ Gamma(θ, θ/μ) = StandardGamma(θ) / rate, kept positive as torch's Gamma does
            # (torch._standard_gamma is what torch.distributions.Gamma.sample calls; it takes a generator)
            gamma = (torch._standard_gamma(flat_conc[lo:hi], generator=gen) / flat_rate[lo:hi]).clamp_(min=tiny)
            # x ~ Poisson(g)
            return torch.poisson(gamma, generator=gen)

    workers = max(1, min(_SAMPLE_CHUNKS, torch.get_num_threads()))
    if workers == 1:
        parts = [draw(part) for part in range(_SAMPLE_CHUNKS)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(draw, range(_SAMPLE_CHUNKS)))
    out = torch.cat(parts)
    return out.reshape(mu.shape)


class NBDecoder(nn.Module):
    """``x_ig ~ NB(ℓ_i ρ_ig, θ_g)`` with ``ρ_i = softmax(W h(inputs) + b)``.

    Parameters
    ----------
    n_inputs
        Feature sizes of the decoder inputs (``[K]``, or ``[K, T]`` for the conditional VAE).
    n_genes
        G.
    n_hidden, n_layers
        Body of the residual MLP (paper: 400, 1).
    n_batch_dispersion
        Option: one θ per gene and batch (``log_theta`` is (n_batch, G)) when > 1;
        otherwise one θ per gene.
    """

    def __init__(
        self, n_inputs: Sequence[int], n_genes: int, n_hidden: int, n_layers: int, n_batch_dispersion: int = 0
    ) -> None:
        super().__init__()
        self.body = ResidualMLP(n_inputs, n_hidden, n_layers)
        self.out = nn.Linear(n_hidden, n_genes)
        # θ_g = exp(log_theta_g) (or θ_bg per batch), initialised to 1
        shape = (n_batch_dispersion, n_genes) if n_batch_dispersion > 1 else (n_genes,)
        self.log_theta = nn.Parameter(torch.zeros(shape))

    @property
    def theta(self) -> torch.Tensor:
        """θ: (G,), or (n_batch, G) with a per-batch dispersion."""
        return torch.exp(self.log_theta)

    def log_theta_of(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """``log θ`` of each cell's batch, (B, G), or the per-gene (G,) without batches."""
        if self.log_theta.dim() == 1:
            return self.log_theta
        if batch_index is None:
            raise ValueError("a per-batch dispersion needs the cells' batch codes")
        return self.log_theta[batch_index]

    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """Normalised expression ρ (softmax over genes, in float32)."""
        return torch.softmax(self.out(self.body(*inputs)).float(), dim=-1)

    def log_rho(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """``log ρ`` (log-softmax over genes), for :func:`nb_log_prob_log_mean`."""
        # the logits leave the (possibly half-precision) layers as float32: a softmax over
        # thousands of genes and the NB terms need its range and precision
        return torch.log_softmax(self.out(self.body(*inputs)).float(), dim=-1)


def perturbseq_transform(x: torch.Tensor) -> torch.Tensor:
    """docs/models.md, *ATE space and data ATE*'s ATE space, ``log2(1e4 x / Σ_g x + 1)`` per row (empty rows stay 0)."""
    return torch.log2(1e4 * x / x.sum(-1, keepdim=True).clamp(min=1.0) + 1.0)


def chunked_predictive_mean(
    draw_rho: Callable[[int], torch.Tensor],
    sample_counts: Callable[[torch.Tensor], torch.Tensor],
    *,
    n_samples: int,
    library_size: torch.Tensor,
    transform: str = "perturbseq",
    chunk_size: int = 50,
) -> torch.Tensor:
    """Mean over ``n_samples`` predictive particles, drawn ``chunk_size`` at a time.

    Parameters
    ----------
    draw_rho
        ``draw_rho(c)`` -> (c, R, G) normalised expression of ``c`` fresh particles.
    sample_counts
        Counts from a mean ``ℓ ρ`` (e.g. :func:`nb_sample` with the model's θ).
    n_samples
        Particles (at least one).
    library_size
        (R,) or scalar ℓ.
    transform
        ``"perturbseq"``: mean of :func:`perturbseq_transform` of the counts; ``"counts"``:
        mean of the counts; ``"rho"``: mean of ρ (no count noise).
    chunk_size
        Particles per vectorised chunk.

    Returns
    -------
    (R, G) float32 tensor (accumulated in float64).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    total = None  # (R, G), shaped by the first chunk
    library = library_size.reshape(-1, 1) if library_size.dim() else library_size
    done = 0
    while done < n_samples:
        c = min(chunk_size, n_samples - done)
        values = draw_rho(c)
        if transform != "rho":
            values = sample_counts(library * values)
            if transform == "perturbseq":
                values = perturbseq_transform(values)
        chunk_sum = values.sum(0, dtype=torch.float64)
        total = chunk_sum if total is None else total.add_(chunk_sum)
        done += c
    return (total / n_samples).to(torch.float32)


def counterfactual_effect_sums(
    rho: torch.Tensor, library: torch.Tensor, theta: torch.Tensor, *, transform: str = "perturbseq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over cells of per-cell counterfactual effects and of their squares.

    Parameters
    ----------
    rho
        (P, R + 1, C, G) normalised expression of C cells under R + 1 rows, row 0 being
        control.
    library
        (C,) the cells' library sizes.
    theta
        (G,) NB inverse dispersion.
    transform
        ``"perturbseq"``: counts ``x ~ NB(ℓ_c ρ, θ)`` then ``log2(1e4 x / Σ x + 1)``;
        ``"counts"``: the counts; ``"rho"``: ``log2(1e4 ρ + 1)`` (no count noise).

    Returns
    -------
    Two (P, R, G) float64 tensors: Σ_c (y_rc − y_0c) and Σ_c (y_rc − y_0c)².
    """
    if transform == "rho":
        y = torch.log2(1e4 * rho + 1.0)
    else:
        x = nb_sample(library.reshape(1, 1, -1, 1) * rho, theta)
        y = perturbseq_transform(x) if transform == "perturbseq" else x
    diff = (y[:, 1:] - y[:, :1]).double()
    return diff.sum(2), (diff**2).sum(2)
