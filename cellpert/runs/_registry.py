"""The models ``cellpert train`` knows, and the prefix of their output keys."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from cellpert._errors import CellpertInputError

__all__ = ["MODELS", "ModelEntry", "get_entry", "model_key"]


@dataclass(frozen=True)
class ModelEntry:
    """A model the command line can train."""

    name: str
    """Name on the command line (``--model``)."""
    target: str
    """``module:Class`` of the scvi-tools model class."""
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments implied by the name."""

    def load_class(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


#: Models known to ``cellpert train``; later families register here.
MODELS: dict[str, ModelEntry] = {
    "samsvae": ModelEntry("samsvae", "cellpert.models.samsvae:SAMSVAE", "SAMS-VAE (docs/models.md, *SAMS-VAE*)"),
    "cpa-vae": ModelEntry("cpa-vae", "cellpert.models.samsvae:CPAVAE", "CPA-VAE baseline (docs/models.md, *Baselines: CPA-VAE and conditional VAE*)"),
    "conditional-vae": ModelEntry(
        "conditional-vae", "cellpert.models.samsvae:ConditionalVAE", "conditional VAE baseline (docs/models.md, *Baselines: CPA-VAE and conditional VAE*)"
    ),
    "comparative": ModelEntry(
        "comparative",
        "cellpert.models.comparative:ComparativeVAE",
        "comparative VAE, background vs target (docs/models.md, *Comparative VAE*)",
    ),
    "svae": ModelEntry("svae", "cellpert.models.svae:SVAE", "sVAE, expected-edge L1 sparsity (docs/models.md, *sVAE and sVAE+*)"),
    "svae-plus": ModelEntry("svae-plus", "cellpert.models.svae:SVAEPlus", "sVAE+, Beta(1, K_beta) sparsity (docs/models.md, *sVAE and sVAE+*)"),
}

def model_key(name: str) -> str:
    """Prefix of a model's output keys: ``obsm["X_<key>_latent"]`` (``cpa-vae`` -> ``cpa_vae``)."""
    return name.replace("-", "_")


def get_entry(name: str | None) -> ModelEntry:
    """The registry entry of a model name (a clear error for an unknown one)."""
    if name not in MODELS:
        raise CellpertInputError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name]
