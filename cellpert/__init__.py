"""cellpert: models of single-cell perturbation screens.

The library is organised as in scvi-tools and scanpy:

- :mod:`cellpert.data`: reading and validating screens, the dosage matrix, splits,
  simulators and the one safe writer for results.
- :mod:`cellpert.models`: the model families, each as scvi-tools model / module /
  training plan.
- :mod:`cellpert.evaluate`: average treatment effects, metrics, identifiability.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cellpert._errors import CellpertError, CellpertInputError, CellpertWarning

try:
    __version__ = version("cellpert")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["CellpertError", "CellpertInputError", "CellpertWarning", "__version__"]
