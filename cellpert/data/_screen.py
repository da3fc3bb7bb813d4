"""Perturbation screens: labels, control detection, the dosage matrix D, validation."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpert._errors import CellpertInputError, CellpertWarning
from cellpert.data._io import read_h5ad
from cellpert.data._layout import (
    COMBINATION_SEP,
    CONTROL_SPELLINGS,
    as_list,
    recorded_screen_keys,
    split_label,
)
from cellpert.data._validate import CountSummary, summarise_counts

__all__ = [
    "PERTURBATION_KEY_CANDIDATES",
    "PerturbationScreen",
    "detect_control_labels",
    "load_screen",
    "parse_perturbation_labels",
]

logger = logging.getLogger(__name__)

#: obs columns tried, in order, when no ``perturbation_key`` is given or recorded.
PERTURBATION_KEY_CANDIDATES = ("perturbation", "condition", "perturbations", "target_gene", "gene")
#: Groups with fewer cells than this get a warning.
TINY_GROUP_CELLS = 10


def detect_control_labels(labels: Sequence[str] | pd.Index) -> list[str]:
    """Find the control label among the distinct perturbation labels.

    A label is a control candidate when the whole label, ignoring case, is one of
    :data:`CONTROL_SPELLINGS`, or when every part of a combination is (``"ctrl+ctrl"``).

    Returns
    -------
    The single control label, as a one-element list.

    Raises
    ------
    CellpertInputError
        When no label or several different labels look like controls.
    """
    distinct = pd.unique(pd.Series(list(labels), dtype=object).astype(str))
    candidates = [
        lab for lab in distinct if all(p.lower() in CONTROL_SPELLINGS for p in split_label(lab))
    ]
    if not candidates:
        examples = ", ".join(map(repr, distinct[:5]))
        raise CellpertInputError(
            f"no control cells found: no label is one of {', '.join(CONTROL_SPELLINGS)} "
            f"(labels include {examples}); pass --control with your control label."
        )
    if len(candidates) > 1:
        raise CellpertInputError(
            f"several labels look like controls: {', '.join(map(repr, candidates))}; pass "
            "--control with the one(s) that are controls (comma-separated)."
        )
    return candidates


@dataclass
class ParsedLabels:
    """Per-cell perturbation sets parsed from labels."""

    perturbation_names: list[str]
    dosage: sp.csr_matrix
    canonical_labels: np.ndarray


def parse_perturbation_labels(
    labels: Sequence[str],
    *,
    control: Sequence[str],
    doses: Sequence[str] | None = None,
) -> ParsedLabels:
    """Parse labels such as ``"A"``, ``"A+B"``, ``"A+ctrl"`` into a dosage matrix.

    Parts equal to a control label, or to any of :data:`CONTROL_SPELLINGS`, inside a
    combination mean "nothing". The same set of perturbations written in another order
    (``"B+A"``) is the same combination; its canonical label is the first spelling seen.

    Parameters
    ----------
    labels
        One label per cell.
    control
        Labels of control cells.
    doses
        Optional per-cell doses aligned with the parts of the label (``"1+0.5"``);
        default 1 for every part.

    Returns
    -------
    Perturbation names (columns of D, sorted), the CSR dosage matrix D (cells x
    perturbations, float32) and one canonical label per cell (control cells get the
    first control label).
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    control = [str(c) for c in control]
    nothing = {c.lower() for c in control} | set(CONTROL_SPELLINGS)
    uniq, inverse = np.unique(labels, return_inverse=True)
    dose_arr = None if doses is None else np.asarray(doses, dtype=object).astype(str)

    parts_of: list[list[str]] = []
    canonical_of_set: dict[frozenset, str] = {}
    canonical_unique: list[str] = []
    for lab in uniq:
        parts = [p for p in split_label(lab) if p and p.lower() not in nothing]
        if lab in control:
            parts = []
        parts_of.append(parts)
        key = frozenset(parts)
        if key not in canonical_of_set:
            canonical_of_set[key] = COMBINATION_SEP.join(parts) if parts else control[0]
        canonical_unique.append(canonical_of_set[key])

    names = sorted({p for parts in parts_of for p in parts})
    col = {n: j for j, n in enumerate(names)}
    rows, cols, vals = [], [], []
    if dose_arr is None:
        # one entry per part and label, expanded to that label's cells (vectorised)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(uniq)))])
        for u, parts in enumerate(parts_of):
            cells = order[bounds[u] : bounds[u + 1]]
            for p in parts:
                rows.append(cells)
                cols.append(np.full(len(cells), col[p]))
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        vals = np.ones(len(rows), dtype=np.float32)
    else:
        for i in range(len(labels)):
            raw_parts = split_label(labels[i])
            raw_doses = split_label(dose_arr[i])
            if len(raw_doses) != len(raw_parts):
                raw_doses = ["1"] * len(raw_parts)
            for p, d in zip(raw_parts, raw_doses, strict=True):
                if p in col and labels[i] not in control:
                    try:
                        dose = float(d)
                    except ValueError as err:
                        raise CellpertInputError(
                            f"dose {d!r} of cell row {i} is not a number; fix the dose column or omit it."
                        ) from err
                    if not np.isfinite(dose) or dose < 0:
                        raise CellpertInputError(
                            f"dose {d!r} of cell row {i} is negative or not finite; doses must be numbers >= 0."
                        )
                    rows.append(i)
                    cols.append(col[p])
                    vals.append(dose)
        vals = np.asarray(vals, dtype=np.float32)
    dosage = sp.csr_matrix((vals, (rows, cols)), shape=(len(labels), len(names)), dtype=np.float32)
    dosage.sum_duplicates()
    canonical = np.asarray(canonical_unique, dtype=object)[inverse]
    return ParsedLabels(perturbation_names=names, dosage=dosage, canonical_labels=canonical)


@dataclass
class PerturbationScreen:
    """A perturbation screen: counts, the dosage matrix and what the labels mean.

    Create it with :func:`load_screen`. The count matrix is never densified.
    """

    adata: ad.AnnData
    """The AnnData (possibly with all-zero genes dropped, see ``dropped_genes``)."""
    layer: str | None
    """Where the counts are: a layer name, or None for ``X``."""
    perturbation_key: str | None
    """obs column of the labels (None when D came from obsm)."""
    dosage_key: str | None
    """obsm key of the dosage matrix (None when D came from labels)."""
    control_labels: list[str]
    """Labels of control cells."""
    perturbation_names: list[str]
    """Names of the columns of D."""
    dosage: sp.csr_matrix
    """D: cells x perturbations (CSR, float32); control rows are all zero."""
    labels: np.ndarray
    """Canonical label per cell (``"A"``, ``"A+B"``, or the control label)."""
    count_summary: CountSummary
    """Library sizes, per-gene totals and sparsity from the validation pass."""
    dropped_genes: list[str] = field(default_factory=list)
    """Genes removed because they had zero counts in every cell."""
    notes: list[str] = field(default_factory=list)
    """What reading the labels found that the user should know (labels written in two
    spellings, a numeric label column); reported by :meth:`problems`."""

    # ------------------------------------------------------------------ counts
    @property
    def counts(self):
        """Cells x genes count matrix (sparse if stored sparse)."""
        return self.adata.X if self.layer is None else self.adata.layers[self.layer]

    @property
    def n_cells(self) -> int:
        return self.adata.n_obs

    @property
    def n_genes(self) -> int:
        return self.adata.n_vars

    @property
    def n_perturbations(self) -> int:
        return len(self.perturbation_names)

    @property
    def library_size(self) -> np.ndarray:
        """Observed library size ℓ_i = Σ_g x_ig."""
        return self.count_summary.library_size

    # ------------------------------------------------------------ perturbations
    @property
    def is_control(self) -> np.ndarray:
        """Cells whose row of D is all zero."""
        return np.diff(self.dosage.indptr) == 0

    @property
    def n_perturbations_per_cell(self) -> np.ndarray:
        return np.diff(self.dosage.indptr)

    @cached_property
    def cells_per_perturbation(self) -> pd.Series:
        """Number of cells that received each perturbation (alone or in a combination)."""
        counts = np.bincount(self.dosage.indices, minlength=self.n_perturbations)
        return pd.Series(counts, index=pd.Index(self.perturbation_names, name="perturbation"), name="n_cells")

    @cached_property
    def cells_per_label(self) -> pd.Series:
        """Number of cells of each canonical label (controls included)."""
        return pd.Series(self.labels).value_counts().rename("n_cells").rename_axis("label")

    @property
    def single_labels(self) -> list[str]:
        """Labels of cells with exactly one perturbation."""
        single = self.n_perturbations_per_cell == 1
        return sorted(pd.unique(self.labels[single]).tolist())

    @property
    def combination_labels(self) -> list[str]:
        """Labels of cells with two or more perturbations."""
        combo = self.n_perturbations_per_cell >= 2
        return sorted(pd.unique(self.labels[combo]).tolist())

    def label_parts(self, label: str) -> list[str]:
        """Perturbations making up a canonical label (empty for control)."""
        return [] if label in self.control_labels else split_label(label)

    @property
    def obs_names(self) -> pd.Index:
        return self.adata.obs_names

    @property
    def gene_names(self) -> pd.Index:
        return self.adata.var_names

    def problems(self) -> list[str]:
        """Readable warnings about the screen: tiny groups, cells with zero counts,
        all-zero genes, and the label notes of :attr:`notes`."""
        found = list(self.notes)
        tiny = self.cells_per_label[self.cells_per_label < TINY_GROUP_CELLS]
        if len(tiny):
            shown = ", ".join(f"{k} ({v})" for k, v in tiny.head(5).items())
            more = f" and {len(tiny) - 5} more" if len(tiny) > 5 else ""
            found.append(
                f"{len(tiny)} perturbation group(s) have fewer than {TINY_GROUP_CELLS} cells: "
                f"{shown}{more}; their effects will be noisy."
            )
        empty = self.count_summary.empty_cells
        if empty.any():
            names = ", ".join(map(repr, self.obs_names[empty][:3].astype(str)))
            found.append(
                f"{int(empty.sum())} of {self.n_cells} cells have zero total counts (e.g. {names}); they are "
                "kept, with their library size clamped to 1 in the models and an all-zero profile in the "
                "ATE space; if they are empty droplets, filter them (scanpy.pp.filter_cells(adata, "
                "min_counts=1)) and write a new file."
            )
        zero = self.count_summary.all_zero_genes
        if zero.any():
            names = self.gene_names[zero]
            found.append(
                f"{int(zero.sum())} of {self.n_genes} genes have zero counts in every cell "
                f"(e.g. {', '.join(names[:3])}); drop them with --drop-zero-genes."
            )
        if self.dropped_genes:
            found.append(f"dropped {len(self.dropped_genes)} all-zero genes.")
        return found


def _resolve_perturbation_key(adata: ad.AnnData, key: str | None) -> str:
    if key is not None:
        if key not in adata.obs.columns:
            raise CellpertInputError(
                f"obs has no column {key!r}; pass --perturbation-key with one of: "
                f"{', '.join(map(str, adata.obs.columns[:20]))}."
            )
        return key
    recorded, _ = recorded_screen_keys(adata)
    if recorded and recorded in adata.obs.columns:
        return recorded
    for cand in PERTURBATION_KEY_CANDIDATES:
        if cand in adata.obs.columns:
            logger.info("using obs[%r] as the perturbation labels", cand)
            return cand
    raise CellpertInputError(
        "no perturbation column found in obs (tried "
        f"{', '.join(PERTURBATION_KEY_CANDIDATES)}); pass --perturbation-key with one of: "
        f"{', '.join(map(str, adata.obs.columns[:20])) or '(obs is empty)'}."
    )


def _resolve_layer(adata: ad.AnnData, layer: str | None) -> None:
    if layer is not None and layer not in adata.layers:
        avail = ", ".join(adata.layers.keys()) or "none"
        raise CellpertInputError(
            f"layer {layer!r} not found (layers: {avail}); pass --layer with an existing layer "
            "or omit it to use X."
        )


def _dosage_from_obsm(adata: ad.AnnData, key: str) -> tuple[list[str], sp.csr_matrix]:
    if key not in adata.obsm:
        avail = ", ".join(adata.obsm.keys()) or "none"
        raise CellpertInputError(f"obsm has no {key!r} (obsm keys: {avail}); pass --dosage-key with one of them.")
    value = adata.obsm[key]
    if not isinstance(value, pd.DataFrame):
        raise CellpertInputError(
            f"obsm[{key!r}] must be a DataFrame whose columns name the perturbations; "
            "store it as pd.DataFrame(D, index=adata.obs_names, columns=names)."
        )
    names = [str(c) for c in value.columns]
    if len(set(names)) != len(names):
        raise CellpertInputError(f"obsm[{key!r}] has duplicate perturbation names; make its columns unique.")
    try:
        arr = value.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellpertInputError(
            f"obsm[{key!r}] holds values that are not numbers ({first}); doses must be numbers >= 0."
        ) from err
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        kinds = [
            (int(np.isnan(arr).sum()), "NaN"),
            (int(np.isinf(arr).sum()), "infinite"),
            (int((arr < 0).sum()), "negative"),
        ]
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise CellpertInputError(
            f"obsm[{key!r}] holds {', '.join(f'{n} {kind}' for n, kind in kinds if n)} dose(s) (e.g. "
            f"{arr[row, col]:g} for cell {str(adata.obs_names[row])!r} and {names[col]!r}); doses must be "
            "finite numbers >= 0 (0: not perturbed)."
        )
    return names, sp.csr_matrix(arr)


def _select_cells(adata: ad.AnnData, subset: str | None) -> ad.AnnData:
    """The cells of ``subset`` (a pandas query on obs), checked to be a usable matrix."""
    if subset:
        try:
            keep = adata.obs.eval(subset)
        except Exception as err:
            raise CellpertInputError(
                f"--subset {subset!r} is not a valid query on obs ({err}); write e.g. 'dataset == \"norman19\"'."
            ) from err
        keep = np.asarray(keep, dtype=bool)
        if not keep.any():
            raise CellpertInputError(f"--subset {subset!r} selects no cells; check the column and value.")
        adata = adata[keep].copy()
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CellpertInputError(f"the screen is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise CellpertInputError(
            f"{len(dup)} cell name(s) occur more than once (e.g. {', '.join(map(repr, dup[:3].astype(str)))}); "
            "runs record their split by cell name, so make the names unique, e.g. "
            "adata.obs_names_make_unique(), and write the screen to a new file."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise CellpertInputError(
            f"{len(dup)} gene name(s) are duplicated (e.g. {', '.join(map(str, dup[:3]))}); make them "
            "unique with adata.var_names_make_unique() or aggregate the duplicates."
        )
    return adata


def _count_summary(adata: ad.AnnData, layer: str | None) -> CountSummary:
    """Check that ``layer`` (or X) holds raw counts and summarise them (streamed)."""
    _resolve_layer(adata, layer)
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise CellpertInputError("X is empty; pass --layer with the layer that holds raw counts.")
    where = "X" if layer is None else f"layers[{layer!r}]"
    other_layers = [k for k in adata.layers.keys() if k != layer]
    hint = f" Pass --layer with the raw counts (layers: {', '.join(other_layers)})." if other_layers else (
        " Use the raw counts (e.g. adata.raw or the unnormalised matrix)." if layer is None else ""
    )
    return summarise_counts(matrix, where=where, fix_hint=hint)


def _perturbations_from_obsm(
    adata: ad.AnnData, dosage_key: str, control: str | Sequence[str] | None
) -> tuple[list[str], sp.csr_matrix, np.ndarray, list[str]]:
    """Perturbation names, D, a label per cell and the control labels from a dosage DataFrame."""
    _, recorded_control = recorded_screen_keys(adata)
    names, dosage = _dosage_from_obsm(adata, dosage_key)
    controls = [control] if isinstance(control, str) else list(control or recorded_control or ["control"])
    labels = np.asarray(
        [
            COMBINATION_SEP.join(names[j] for j in dosage.indices[dosage.indptr[i] : dosage.indptr[i + 1]])
            or controls[0]
            for i in range(dosage.shape[0])
        ],
        dtype=object,
    )
    empty = [n for n, c in zip(names, np.bincount(dosage.indices, minlength=len(names)), strict=True) if c == 0]
    if empty:
        raise CellpertInputError(
            f"perturbation(s) {', '.join(empty[:5])} in obsm[{dosage_key!r}] have zero cells; "
            "drop those columns."
        )
    return list(names), dosage, labels, controls


def _perturbations_from_labels(
    adata: ad.AnnData, key: str, control: str | Sequence[str] | None, *,
    dose_key: str | None, require_control: bool, warn: bool,
) -> tuple[list[str], sp.csr_matrix, np.ndarray, list[str], list[str]]:  # fmt: skip
    """Perturbation names, D, canonical labels, control labels and notes from ``obs[key]``.

    Controls: ``control`` when given (an error when none occurs), else the recorded ones
    when they occur, else detected (:func:`detect_control_labels`).
    """
    _, recorded_control = recorded_screen_keys(adata)
    column = adata.obs[key]
    if column.isna().any():
        raise CellpertInputError(
            f"obs[{key!r}] has {int(column.isna().sum())} missing labels; label those cells "
            "(e.g. as control) or drop them with --subset."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        unused = set(column.cat.categories) - set(column.unique())
        if unused and warn:
            logger.info("ignoring %d label categories with zero cells", len(unused))
    raw, notes = _label_text(column, key)
    _check_blank_labels(raw, key, adata.obs_names)
    if control is not None:
        controls = as_list(control) or []
        distinct = set(raw)
        missing = [c for c in controls if c not in distinct]
        if missing and len(missing) == len(controls):
            near = sorted({lab for lab in distinct for c in missing if lab.strip().casefold() == c.strip().casefold()})
            hint = f"; did you mean {', '.join(map(repr, near[:3]))}?" if near else "."
            raise CellpertInputError(
                f"control label(s) {', '.join(map(repr, missing))} match no cell in obs[{key!r}]; "
                f"check the spelling (labels are case-sensitive){hint}"
            )
    elif recorded_control and any(c in set(raw) for c in recorded_control):
        controls = recorded_control
    else:
        try:
            controls = detect_control_labels(raw)
        except CellpertInputError:
            if require_control:
                raise
            controls = []
    doses = None
    if dose_key is not None:
        if dose_key not in adata.obs.columns:
            raise CellpertInputError(f"obs has no dose column {dose_key!r}; give load_screen an existing obs column as dose_key.")
        doses = adata.obs[dose_key].astype(str).to_numpy()
    parsed = parse_perturbation_labels(raw, control=controls, doses=doses)
    notes += _spelling_notes(raw, key, parsed)
    return parsed.perturbation_names, parsed.dosage, parsed.canonical_labels, list(controls), notes


def _label_text(column: pd.Series, key: str) -> tuple[np.ndarray, list[str]]:
    """The labels as text, and a note when the column holds numbers.

    Numbers are read as text labels; whole floats lose their ``.0`` (``2.0`` -> ``"2"``),
    so that ``--control 0`` matches a float column too.
    """
    values = column
    if isinstance(column.dtype, pd.CategoricalDtype):
        values = column.astype(column.cat.categories.dtype)
    if not (pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)):
        return column.astype(str).to_numpy(), []
    arr = values.to_numpy()
    if pd.api.types.is_float_dtype(arr.dtype) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    raw = arr.astype(str).astype(object)
    shown = ", ".join(map(repr, pd.unique(raw)[:3]))
    return raw, [
        f"obs[{key!r}] holds numbers ({values.dtype}); they are read as text labels ({shown}, ...): "
        "check that this is the perturbation column (--perturbation-key)."
    ]


def _check_blank_labels(raw: np.ndarray, key: str, obs_names: pd.Index) -> None:
    """Raise for cells whose label is empty: "", spaces, or only separators ("+")."""
    distinct = pd.unique(raw)
    blank = [lab for lab in distinct if not any(split_label(lab))]
    if not blank:
        return
    cells = np.isin(raw, blank)
    first = str(obs_names[int(np.argmax(cells))])
    raise CellpertInputError(
        f"obs[{key!r}] has {int(cells.sum())} cell(s) with an empty label (e.g. cell {first!r}, label "
        f"{blank[0]!r}); give them a label (the control label if they are controls) or drop them with --subset."
    )


def _spelling_notes(raw: np.ndarray, key: str, parsed: ParsedLabels) -> list[str]:
    """Labels that differ only by surrounding spaces (read as one) or only by case (read as two)."""
    notes = []
    distinct = [str(lab) for lab in pd.unique(raw)]
    by_text: dict[str, list[str]] = {}
    for lab in distinct:
        by_text.setdefault(COMBINATION_SEP.join(split_label(lab)), []).append(lab)
    spaced = [sorted(group) for group in by_text.values() if len(group) > 1]
    if spaced:
        a, b = spaced[0][:2]
        notes.append(
            f"{len(spaced)} label(s) of obs[{key!r}] are written both with and without spaces around "
            f"names (e.g. {a!r} and {b!r}); they are read as the same label."
        )
    partly = [lab for lab in distinct if "" in split_label(lab) and any(split_label(lab))]
    if partly:
        notes.append(
            f"{len(partly)} label(s) of obs[{key!r}] have an empty part (e.g. {partly[0]!r}); empty parts "
            f"are ignored: check the separators ({COMBINATION_SEP!r})."
        )
    by_case: dict[str, list[str]] = {}
    for name in parsed.perturbation_names:
        by_case.setdefault(name.casefold(), []).append(name)
    cased = [sorted(group) for group in by_case.values() if len(group) > 1]
    if cased:
        a, b = cased[0][:2]
        notes.append(
            f"{len(cased)} perturbation name(s) differ from another only by case (e.g. {a!r} and {b!r}); "
            "labels are case-sensitive, so they are read as different perturbations: relabel them if "
            "they are the same."
        )
    return notes


def load_screen(
    data: ad.AnnData | str | os.PathLike,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    layer: str | None = None,
    dosage_key: str | None = None,
    dose_key: str | None = None,
    subset: str | None = None,
    drop_zero_genes: bool = False,
    require_control: bool = True,
    warn: bool = True,
    backed: bool = False,
) -> PerturbationScreen:
    """Read and validate a perturbation screen.

    Parameters
    ----------
    data
        An AnnData or the path of an ``.h5ad`` file.
    perturbation_key
        obs column with labels (``"A"``, ``"A+B"``, ``"A+ctrl"``). Default: the key
        recorded in ``uns['cellpert']['screen']``, else the first of
        :data:`PERTURBATION_KEY_CANDIDATES` present.
    control
        Control label(s). Default: the recorded one, else detected among
        :data:`CONTROL_SPELLINGS` (an error when ambiguous).
    layer
        Layer with raw counts; default ``X``.
    dosage_key
        obsm key of a dosage DataFrame (cells x perturbations) to use instead of labels.
    dose_key
        obs column with per-part doses such as ``"1+1"`` (default: dose 1).
    subset
        A pandas query on obs selecting the cells to use, e.g. ``'dataset == "norman19"'``.
    drop_zero_genes
        Remove genes with zero counts in every (selected) cell.
    require_control
        Raise when there are no control cells.
    warn
        Emit :class:`~cellpert.CellpertWarning` for tiny groups and all-zero genes.
    backed
        Read the counts from disk as they are needed (:func:`cellpert.data.read_h5ad`
        with ``backed=True``; a path only): per-cell metadata stays in memory, the count
        matrix does not, and every pass over the cells streams row chunks. Not combined
        with ``subset`` or ``drop_zero_genes`` (both would copy the matrix).

    Returns
    -------
    The :class:`PerturbationScreen`. A file is only read, and an AnnData given is never
    modified (``subset`` and ``drop_zero_genes`` work on copies).

    Raises
    ------
    CellpertInputError
        For input that cannot be used as given (see the checks below); the message is
        one line naming the problem and the fix.

    Notes
    -----
    Input checks. Those that look at every cell are one pass over the count matrix in
    row chunks (:data:`cellpert.data._validate.DEFAULT_CHUNK_ROWS`); the matrix is never
    densified.

    - Counts: NaN, infinite, negative or non-integer values are an error (raw counts
      are expected, not normalised data).
    - Cells with zero total counts: a warning with their number; they are kept, their
      library size is clamped to 1 by the models (log library 0) and their profile in
      the ATE space is all zero. Filter empty droplets yourself (e.g.
      ``scanpy.pp.filter_cells(adata, min_counts=1)``) into a new file.
    - Duplicate cell names: an error, since a run records its split by cell name; make
      them unique (``adata.obs_names_make_unique()``) and write a new file. Duplicate
      gene names: an error too.
    - Missing (NaN) labels, and empty ones (``""``, spaces only, ``"+"``): an error with
      the number of cells.
    - Labels that differ only by spaces around names (``"KLF1"``, ``"KLF1 "``): read as
      one label, with a warning. Perturbation names that differ only by case
      (``"KLF1"``, ``"Klf1"``): read as two perturbations, with a warning. A label with
      an empty part (``"A+"``): the empty part is ignored, with a warning.
    - A label column of numbers: read as text labels (whole floats without ``.0``, so
      ``control="0"`` matches ``0.0``), with a warning.
    - Doses (an obsm DataFrame or a dose column): NaN, infinite, negative or non-numeric
      doses are an error, and so is an obsm perturbation with zero cells.
    - No control cells (with ``require_control``) or no perturbed cells: an error. A
      single perturbation besides the controls (a two-condition screen such as control
      vs stimulated, the comparative model's usual input) is a valid screen, without a
      warning.
    - Label groups with fewer than :data:`TINY_GROUP_CELLS` cells, all-zero genes:
      warnings.

    Warnings are :class:`~cellpert.CellpertWarning` (only with ``warn``); every one is
    also listed by :meth:`PerturbationScreen.problems`.
    """
    if backed:
        if isinstance(data, ad.AnnData) and not data.isbacked:
            raise CellpertInputError("backed=True needs a file path (or an AnnData opened with backed='r').")
        if subset or drop_zero_genes:
            which = "--subset" if subset else "--drop-zero-genes"
            raise CellpertInputError(
                f"{which} cannot be combined with --backed (it would copy the count matrix into memory); "
                "write the selected cells or genes to their own file first."
            )
    adata = _select_cells(read_h5ad(data, backed=backed) if not isinstance(data, ad.AnnData) else data, subset)
    summary = _count_summary(adata, layer)
    notes: list[str] = []
    if dosage_key is not None:
        key = None
        names, dosage, labels, controls = _perturbations_from_obsm(adata, dosage_key, control)
    else:
        key = _resolve_perturbation_key(adata, perturbation_key)
        names, dosage, labels, controls, notes = _perturbations_from_labels(
            adata, key, control, dose_key=dose_key, require_control=require_control, warn=warn
        )

    screen = PerturbationScreen(
        adata=adata,
        layer=layer,
        perturbation_key=key,
        dosage_key=dosage_key,
        control_labels=list(controls),
        perturbation_names=list(names),
        dosage=dosage,
        labels=np.asarray(labels, dtype=object),
        count_summary=summary,
        notes=notes,
    )
    if require_control and not screen.is_control.any():
        fix = (
            f"control cells need an all-zero row in obsm[{dosage_key!r}]" if dosage_key is not None
            else "pass --control with the label of the control cells"
        )  # fmt: skip
        raise CellpertInputError(
            "no control cells: every cell has a perturbation, so effects relative to control "
            f"cannot be computed; {fix}."
        )
    if screen.n_perturbations == 0:
        raise CellpertInputError("no perturbed cells: every cell is a control; check --perturbation-key.")
    if drop_zero_genes and summary.all_zero_genes.any():
        keep = ~summary.all_zero_genes
        screen.dropped_genes = adata.var_names[~keep].tolist()
        screen.adata = adata[:, keep].copy()
        screen.count_summary = CountSummary(
            library_size=summary.library_size, gene_total=summary.gene_total[keep], nnz=summary.nnz
        )
    if warn:
        for problem in screen.problems():
            warnings.warn(problem, CellpertWarning, stacklevel=2)
    return screen


def screen_description(screen: PerturbationScreen) -> dict[str, Any]:
    """Numbers that summarise a screen (used by ``cellpert inspect``)."""
    lib = screen.library_size
    per_pert = screen.cells_per_perturbation
    per_label = screen.cells_per_label.drop(screen.control_labels, errors="ignore")
    return {
        "cells": screen.n_cells,
        "genes": screen.n_genes,
        "perturbations": screen.n_perturbations,
        "single_perturbation_labels": len(screen.single_labels),
        "combination_labels": len(screen.combination_labels),
        "control_cells": int(screen.is_control.sum()),
        "control_labels": screen.control_labels,
        "cells_per_label_min": int(per_label.min()) if len(per_label) else 0,
        "cells_per_label_median": float(per_label.median()) if len(per_label) else 0.0,
        "cells_per_label_max": int(per_label.max()) if len(per_label) else 0,
        "cells_per_perturbation_min": int(per_pert.min()),
        "cells_per_perturbation_median": float(per_pert.median()),
        "cells_per_perturbation_max": int(per_pert.max()),
        "library_size_quantiles": {
            q: float(np.quantile(lib, q)) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
        },
        "sparsity": screen.count_summary.sparsity,
        "all_zero_genes": int(screen.count_summary.all_zero_genes.sum()),
    }
