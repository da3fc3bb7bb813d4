"""The stored layout cellpert reads and writes: one home for each convention.

- :data:`UNS_KEY`: everything cellpert writes into ``uns`` lives under ``uns["cellpert"]``;
- :func:`record_screen_keys` / :func:`recorded_screen_keys`: where a screen's
  perturbation labels and controls are (``uns["cellpert"]["screen"]``);
- :data:`COMBINATION_SEP`, :func:`split_label`, :data:`CONTROL_SPELLINGS`,
  :func:`is_control_spelling`: how labels such as ``"A+B"`` and ``"ctrl"`` are read;
- :func:`as_list`: list-valued options given as ``"a,b"`` (command line, config files) or
  as a sequence (Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np

__all__ = [
    "COMBINATION_SEP",
    "CONTROL_SPELLINGS",
    "UNS_KEY",
    "as_list",
    "is_control_spelling",
    "record_screen_keys",
    "recorded_screen_keys",
    "split_label",
]

#: Everything cellpert writes into ``uns`` lives under this key.
UNS_KEY = "cellpert"
#: Label spellings recognised as control (case-insensitive, whole label or every part).
CONTROL_SPELLINGS = ("control", "ctrl", "non-targeting", "non_targeting", "nontargeting", "nt")
#: Separator of combinations in labels.
COMBINATION_SEP = "+"


def as_list(value: str | Sequence[Any] | None) -> list[str] | None:
    """A list-valued option: ``"a, b"`` -> ``["a", "b"]``; a sequence -> its items as str.

    None stays None (option not given); empty items are dropped.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in np.atleast_1d(np.asarray(value, dtype=object))]
    return [v.strip() for v in items if str(v).strip()]


def split_label(label: str) -> list[str]:
    """The parts of a label (``"A+B"`` -> ``["A", "B"]``), stripped; empty parts kept as ``""``."""
    return [p.strip() for p in str(label).split(COMBINATION_SEP)]


def is_control_spelling(part: str) -> bool:
    """Whether a label (or a part of one) is spelled like a control (:data:`CONTROL_SPELLINGS`)."""
    return str(part).strip().lower() in CONTROL_SPELLINGS


def record_screen_keys(
    adata: ad.AnnData, *, perturbation_key: str | None, control: str | Sequence[str] | None
) -> None:
    """Record in ``adata.uns['cellpert']['screen']`` where the perturbations are.

    Every command reads these when the user gives no ``--perturbation-key`` / ``--control``.

    Writes
    ------
    ``adata.uns['cellpert']['screen']``: ``{'perturbation_key': str, 'control': list[str]}``.
    """
    controls = [control] if isinstance(control, str) else list(control or [])
    screen = {"perturbation_key": perturbation_key or "", "control": np.asarray(controls, dtype=object)}
    adata.uns.setdefault(UNS_KEY, {})
    adata.uns[UNS_KEY]["screen"] = screen


def recorded_screen_keys(adata: ad.AnnData) -> tuple[str | None, list[str] | None]:
    """``(perturbation_key, control labels)`` recorded by :func:`record_screen_keys` (None when absent)."""
    section = adata.uns.get(UNS_KEY)
    rec = section.get("screen", {}) if isinstance(section, dict) else {}
    key = rec.get("perturbation_key") or None
    control = rec.get("control")
    if control is not None:
        control = [str(c) for c in np.atleast_1d(control)]
        control = control or None
    return key, control
