"""Neural-network pieces shared by the model families (docs/models.md, *SAMS-VAE*)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MultiInputLinear", "ResidualMLP", "GaussianHead"]


class MultiInputLinear(nn.Module):
    """A linear layer on the concatenation of several inputs, without concatenating.

    ``y = W [x_1, ..., x_n] + b`` computed as ``Σ_j W_j x_j + b``: inputs may have
    different leading (broadcastable) shapes, so a per-cell input of shape ``(B, G)``
    and a per-particle input of shape ``(P, B, K)`` are combined without copying the
    per-cell input ``P`` times (the product ``W_1 x_1`` is computed once).

    Parameters
    ----------
    n_inputs
        Feature size of each input (0 entries are skipped).
    n_output
        Output features.
    """

    def __init__(self, n_inputs: Sequence[int], n_output: int) -> None:
        super().__init__()
        self.n_inputs = [int(n) for n in n_inputs]
        self.layers = nn.ModuleList(
            [nn.Linear(n, n_output, bias=(j == 0)) for j, n in enumerate(self.n_inputs)]
        )
        # same initialisation as one nn.Linear on the concatenated input
        fan_in = max(sum(self.n_inputs), 1)
        bound = 1.0 / fan_in**0.5
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.uniform_(-bound, bound)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound)

    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        out = None
        for layer, x in zip(self.layers, inputs, strict=True):
            if x is None:
                continue
            y = layer(x)
            out = y if out is None else out + y
        return out


class ResidualMLP(nn.Module):
    """Residual LeakyReLU MLP without batch norm or dropout (the SAMS-VAE body).

    ``h = LeakyReLU(Linear(x))`` followed by ``n_layers - 1`` blocks
    ``h = h + LeakyReLU(Linear(h))``.

    Parameters
    ----------
    n_inputs
        Feature sizes of the inputs (concatenated, see :class:`MultiInputLinear`).
    n_hidden
        Width H.
    n_layers
        Number of hidden layers L (>= 1).
    """

    def __init__(self, n_inputs: Sequence[int] | int, n_hidden: int, n_layers: int = 1) -> None:
        super().__init__()
        if isinstance(n_inputs, int):
            n_inputs = [n_inputs]
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.first = MultiInputLinear(n_inputs, n_hidden)
        self.blocks = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(n_layers - 1)])
        self.act = nn.LeakyReLU()
        self.n_output = n_hidden

    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        return self.body(self.first(*inputs))

    def body(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """The network after its first linear layer, from that layer's output."""
        h = self.act(pre_activation)
        for block in self.blocks:
            h = h + self.act(block(h))
        return h


class GaussianHead(nn.Module):
    """Normal parameters from a hidden layer: ``loc``, ``scale = sqrt(exp(v) + var_eps)``.

    Parameters
    ----------
    n_hidden
        Input features.
    n_output
        Dimension of the Normal.
    var_eps
        Added to the variance (docs/models.md, *SAMS-VAE*: 1e-4).
    """

    def __init__(self, n_hidden: int, n_output: int, var_eps: float = 1e-4) -> None:
        super().__init__()
        self.loc = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Linear(n_hidden, n_output)
        self.var_eps = var_eps

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 out of the (possibly half-precision) layer: the Normal's densities and KL
        # terms downstream stay in float32 under mixed precision
        loc, log_var = self.loc(h).float(), self.log_var(h).float()
        return loc, torch.sqrt(torch.exp(log_var) + self.var_eps)
