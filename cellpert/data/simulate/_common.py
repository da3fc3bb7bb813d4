"""Pieces shared by the simulators (docs/models.md, *Simulators*).

- random leaky-ReLU MLP decoders with the orthogonal, variance-scaled initialisation of
  the sVAE reference, and the standardisation of their outputs;
- count sampling (negative binomial or Poisson) one block of rows at a time, so that no
  dense cells x genes matrix larger than a block is ever built;
- the layout of the AnnData every simulator returns (names, labels, split, ground truth).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellpert._errors import CellpertInputError
from cellpert.data._io import to_uns
from cellpert.data._layout import UNS_KEY, record_screen_keys
from cellpert.data._splits import DEFAULT_SPLIT_KEY, SPLIT_NAMES

__all__ = [
    "CONTROL_LABEL",
    "GROUND_TRUTH_KEY",
    "PERTURBATION_KEY",
    "RandomMLP",
    "build_adata",
    "check_choice",
    "check_int",
    "check_positive",
    "check_probability",
    "check_sizes",
    "child_rngs",
    "draw_library_size",
    "perturbation_names",
    "random_mlp",
    "row_chunks",
    "sample_counts",
    "string_array",
]

logger = logging.getLogger(__name__)

#: obs column of the perturbation labels written by every simulator.
PERTURBATION_KEY = "perturbation"
#: Label of control cells.
CONTROL_LABEL = "control"
#: Key of the ground truth in ``adata.uns['cellpert']``.
GROUND_TRUTH_KEY = "ground_truth"
#: Largest number of rows in one block of count sampling.
MAX_CHUNK_ROWS = 10_000
#: Largest number of entries (rows x genes) of one dense block (2**22 float64 = 32 MiB).
CHUNK_ELEMENTS = 2**22
#: Negative slope of the leaky ReLUs of every simulator decoder.
LEAKY_SLOPE = 0.2


# ----------------------------------------------------------------------------- validation
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """Check that ``value`` is an integer in ``[minimum, maximum]``; return it as ``int``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    raise CellpertInputError(
        f"{name} ({_flag(name)}) must be an integer {bounds}, got {value!r}; pass a value {bounds}."
    )


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite number > 0 (>= 0 with ``allow_zero``); return a ``float``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = np.isfinite(number) and (number >= 0 if allow_zero else number > 0)
    if not ok or isinstance(value, bool):
        bound = ">= 0" if allow_zero else "> 0"
        raise CellpertInputError(
            f"{name} ({_flag(name)}) must be a number {bound}, got {value!r}; pass a value {bound}."
        )
    return number


def check_probability(name: str, value: Any) -> float:
    """Check that ``value`` is a probability strictly between 0 and 1."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 < number < 1.0:
        raise CellpertInputError(
            f"{name} ({_flag(name)}) must be a probability strictly between 0 and 1, got "
            f"{value!r}; pass e.g. 0.13."
        )
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise CellpertInputError(
            f"{name} ({_flag(name)}) must be one of {', '.join(choices)}, got {value!r}."
        )
    return str(value)


def check_sizes(name: str, value: Any, *, n: int, minimum: int = 0) -> tuple[int, ...]:
    """Check a tuple of ``n`` integers >= ``minimum`` with a positive sum."""
    try:
        items = tuple(value)
    except TypeError:
        items = (value,)
    if len(items) != n:
        raise CellpertInputError(
            f"{name} ({_flag(name)}) must have {n} integers, got {value!r}; e.g. "
            f"{_flag(name)} {' '.join(['10'] * n)}."
        )
    sizes = tuple(check_int(name, v, minimum=minimum) for v in items)
    if sum(sizes) < 1:
        raise CellpertInputError(f"{name} ({_flag(name)}) must not be all zero; give at least one cell.")
    return sizes


# ------------------------------------------------------------------------------ randomness
def child_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators derived from ``seed``.

    Each part of a simulator (effects, decoder, cells, counts, split) draws from its own
    stream, so that e.g. the true effects of a seed do not change with the number of
    cells or genes.
    """
    seed = check_int("seed", seed, minimum=0)
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


def draw_library_size(
    rng: np.random.Generator, n_cells: int, *, median: float, log_sd: float
) -> np.ndarray:
    """Library sizes ℓ_i ~ LogNormal(log median, log_sd²) (float64, length ``n_cells``)."""
    # library size of each cell: log ℓ_i ~ N(log median, log_sd²)
    return median * np.exp(log_sd * rng.standard_normal(n_cells))


# -------------------------------------------------------------------------------- decoders
def orthogonal_weight(rng: np.random.Generator, fan_in: int, fan_out: int, *, gain: float) -> np.ndarray:
    """Gaussian weight matrix, orthogonalised, scaled by ``gain · √(2/(fan_in+fan_out))``.

    The Gaussian matrix is made (semi-)orthogonal by a QR decomposition with the signs of
    R's diagonal absorbed into Q (a Haar-distributed orthogonal matrix), as in the sVAE
    reference. Shape ``(fan_in, fan_out)``: layers compute ``h @ W``.
    """
    # weight matrix entries ~ N(0, 1) before orthogonalisation
    a = rng.standard_normal((max(fan_in, fan_out), min(fan_in, fan_out)))
    q, r = np.linalg.qr(a)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    w = q if fan_in >= fan_out else q.T
    return w * gain * np.sqrt(2.0 / (fan_in + fan_out))


@dataclass(frozen=True)
class RandomMLP:
    """A random leaky-ReLU MLP without biases, followed by a fixed standardisation.

    ``logits(x) = (W_L · a(... a(W_1 x)) - center) / scale`` with ``a`` the leaky ReLU.
    Everything needed to recompute the logits from the true latents is stored by
    :meth:`to_uns`.
    """

    weights: tuple[np.ndarray, ...]
    """Weight matrices, shapes ``(fan_in, fan_out)``."""
    negative_slope: float = LEAKY_SLOPE
    """Slope of the leaky ReLU for negative inputs."""
    center: np.ndarray = field(default_factory=lambda: np.zeros(1))
    """Subtracted from the raw outputs (one value, or one per output)."""
    scale: np.ndarray = field(default_factory=lambda: np.ones(1))
    """The centred outputs are divided by this (one value, or one per output)."""

    @property
    def n_out(self) -> int:
        return self.weights[-1].shape[1]

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw MLP outputs (before standardisation), float64."""
        h = np.asarray(x, dtype=np.float64)
        for i, w in enumerate(self.weights):
            h = h @ w
            if i < len(self.weights) - 1:
                h = np.where(h > 0, h, self.negative_slope * h)
        return h

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Standardised outputs (the logits of the count model), float64."""
        return (self.raw(x) - self.center) / self.scale

    def standardised(
        self, x: np.ndarray, *, per_output: bool, center: bool
    ) -> RandomMLP:
        """A copy whose outputs on ``x`` have standard deviation 1.

        Parameters
        ----------
        x
            Inputs (cells x inputs) over which the statistics are computed (in row blocks).
        per_output
            One mean / standard deviation per output (gene) instead of one global value.
        center
            Subtract the mean (otherwise only divide by the standard deviation).
        """
        mean, std = _streamed_moments(self.raw, x, n_out=self.n_out, per_output=per_output)
        std = np.where(std > 1e-12, std, 1.0)
        return replace(
            self,
            center=np.atleast_1d(mean if center else np.zeros_like(mean)),
            scale=np.atleast_1d(std),
        )

    def to_uns(self) -> dict[str, Any]:
        """The decoder as a dict of arrays: ``W0`` … ``W{L-1}``, ``negative_slope``, ``center``, ``scale``."""
        out: dict[str, Any] = {f"W{i}": w for i, w in enumerate(self.weights)}
        out.update(negative_slope=float(self.negative_slope), center=self.center, scale=self.scale)
        return out


def random_mlp(
    rng: np.random.Generator, sizes: Sequence[int], *, negative_slope: float = LEAKY_SLOPE
) -> RandomMLP:
    """A random MLP with layer widths ``sizes`` (input, hidden…, output).

    Every weight matrix comes from :func:`orthogonal_weight` with the leaky-ReLU gain
    ``√(2/(1+slope²))``. There are no biases, so the network is positively homogeneous
    and the overall weight scale only matters through the later standardisation.
    """
    gain = np.sqrt(2.0 / (1.0 + negative_slope**2))
    weights = tuple(
        orthogonal_weight(rng, int(a), int(b), gain=gain) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )
    return RandomMLP(weights=weights, negative_slope=negative_slope)


def row_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Row blocks with at most :data:`CHUNK_ELEMENTS` entries and :data:`MAX_CHUNK_ROWS` rows."""
    step = int(np.clip(CHUNK_ELEMENTS // max(n_cols, 1), 1, MAX_CHUNK_ROWS))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _streamed_moments(fn, x: np.ndarray, *, n_out: int, per_output: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``fn(x)`` merged over row blocks (Chan et al.)."""
    axis = 0 if per_output else None
    count, mean, m2 = 0, np.zeros(n_out if per_output else 1), np.zeros(n_out if per_output else 1)
    for sl in row_chunks(x.shape[0], n_out):
        out = fn(x[sl])
        n_b = out.shape[0] if per_output else out.size
        if n_b == 0:
            continue
        mean_b = np.atleast_1d(out.mean(axis=axis))
        m2_b = np.atleast_1d(((out - mean_b) ** 2).sum(axis=axis))
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta**2 * count * n_b / total
        count = total
    if count == 0:
        raise CellpertInputError("no cells to simulate; give at least one cell.")
    return mean, np.sqrt(m2 / count)


# ---------------------------------------------------------------------------------- counts
def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _draw(
    rng: np.random.Generator, mean: np.ndarray, likelihood: Literal["nb", "poisson"], theta: float | None
) -> np.ndarray:
    if likelihood == "nb":
        # NB(mean, θ) as a Gamma-Poisson mixture: rate_ig ~ Gamma(θ, mean_ig / θ)
        mean = rng.gamma(shape=theta, scale=mean / theta)
    # count x_ig ~ Poisson(rate_ig)
    return rng.poisson(mean)


def sample_counts(
    rng: np.random.Generator,
    latent: np.ndarray,
    decoder: RandomMLP,
    *,
    normalise: Literal["genes", "cells"] = "genes",
    library_size: np.ndarray | None = None,
    likelihood: Literal["nb", "poisson"] = "nb",
    theta: float | None = None,
    total_per_gene: float = 1e6,
    sink: Callable[[sp.csr_matrix], None] | None = None,
) -> tuple[sp.csr_matrix | None, np.ndarray]:
    """Draw the count matrix from the decoder logits, one block of rows at a time.

    Parameters
    ----------
    rng
        Generator of the count noise.
    latent
        Decoder inputs, cells x inputs.
    decoder
        Maps a block of latents to logits (cells x genes).
    normalise
        ``"genes"``: mean ``ℓ_i · softmax_g(logits_i)`` (needs ``library_size``).
        ``"cells"`` (sVAE legacy): mean ``total_per_gene · exp(l_ig) / Σ_j exp(l_jg)``, so
        that each gene has ``total_per_gene`` expected counts over the data set.
    library_size
        ℓ_i per cell for ``normalise="genes"``.
    likelihood
        ``"nb"`` (inverse dispersion ``theta``) or ``"poisson"``.
    sink
        Called with each block of rows (CSR, in order) instead of keeping them, e.g. to
        append them to a file; the counts returned are then None.

    Returns
    -------
    The counts (CSR, float32, integer values; None with ``sink``) and the expected
    library size ``Σ_g mean_ig`` of each cell.
    """
    n_cells, n_genes = latent.shape[0], decoder.n_out
    chunks = row_chunks(n_cells, n_genes)
    if normalise == "cells":
        gene_total = np.zeros(n_genes)
        for sl in chunks:
            gene_total += np.exp(decoder(latent[sl])).sum(axis=0)
    elif library_size is None:
        raise ValueError("normalise='genes' needs library_size")
    blocks = []
    expected = np.zeros(n_cells)
    for sl in chunks:
        logits = decoder(latent[sl])
        if normalise == "genes":
            mean = library_size[sl, None] * _softmax(logits)
        else:
            mean = total_per_gene * np.exp(logits) / gene_total
        expected[sl] = mean.sum(axis=1)
        block = sp.csr_matrix(_draw(rng, mean, likelihood, theta).astype(np.float32))
        if sink is not None:
            sink(block)
        else:
            blocks.append(block)
    if sink is not None:
        return None, expected
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.float32), expected
    return sp.vstack(blocks, format="csr", dtype=np.float32), expected


# --------------------------------------------------------------------------------- AnnData
def perturbation_names(n: int) -> list[str]:
    """``P000``, ``P001``, … zero-padded so that sorted order is index order."""
    width = max(3, len(str(max(n - 1, 0))))
    return [f"P{t:0{width}d}" for t in range(n)]


def _names(prefix: str, n: int, width: int) -> pd.Index:
    width = max(width, len(str(max(n - 1, 0))))
    return pd.Index([f"{prefix}{i:0{width}d}" for i in range(n)])


def gene_names(n_genes: int) -> pd.Index:
    """The simulators' gene names, ``gene0000``…"""
    return _names("gene", n_genes, 4)


def build_adata(
    *,
    counts: sp.csr_matrix,
    group_labels: Sequence[str],
    group_of_cell: np.ndarray,
    split: np.ndarray,
    obsm: Mapping[str, np.ndarray],
    obs: Mapping[str, np.ndarray] | None = None,
    ground_truth: Mapping[str, Any],
) -> ad.AnnData:
    """Assemble a simulated screen with the conventions every simulator follows.

    Parameters
    ----------
    counts
        Cells x genes CSR counts.
    group_labels
        Label of each group of cells (``"control"`` first); written as the categories
        of ``obs['perturbation']``.
    group_of_cell
        Index into ``group_labels`` of each cell.
    split
        ``"train"``, ``"val"``, ``"test"`` or ``"unused"`` per cell.
    obsm
        Latents, written as float32.
    obs
        Other per-cell columns.
    ground_truth
        Written (through :func:`~cellpert.data.to_uns`) to
        ``uns['cellpert']['ground_truth']``.

    Returns
    -------
    AnnData with ``X`` (CSR float32 counts), ``obs_names`` ``cell000000``…, ``var_names``
    ``gene0000``…, ``obs['perturbation']`` and ``obs['cellpert_split']`` (categorical),
    the ``obsm`` latents, ``uns['cellpert']['screen']`` (from
    :func:`~cellpert.data.record_screen_keys`) and ``uns['cellpert']['ground_truth']``.
    """
    n_cells, n_genes = counts.shape
    frame = pd.DataFrame(index=_names("cell", n_cells, 6))
    frame[PERTURBATION_KEY] = pd.Categorical.from_codes(
        np.asarray(group_of_cell, dtype=np.int64), categories=list(group_labels)
    )
    frame[DEFAULT_SPLIT_KEY] = pd.Categorical(np.asarray(split, dtype=object), categories=list(SPLIT_NAMES))
    for key, values in (obs or {}).items():
        frame[key] = np.asarray(values)
    adata = ad.AnnData(X=counts, obs=frame, var=pd.DataFrame(index=gene_names(n_genes)))
    for key, value in obsm.items():
        adata.obsm[key] = np.ascontiguousarray(value, dtype=np.float32)
    record_screen_keys(adata, perturbation_key=PERTURBATION_KEY, control=CONTROL_LABEL)
    adata.uns[UNS_KEY][GROUND_TRUTH_KEY] = to_uns(dict(ground_truth))
    logger.debug(
        "simulated %s: %d cells x %d genes, %d labels",
        ground_truth.get("simulator"), n_cells, n_genes, len(group_labels),
    )
    return adata


def write_in_blocks(
    path: Path, *, n_genes: int, draw: Mapping[str, Any], **screen: Any
) -> Path:
    """Write a simulated screen to ``path`` with the counts drawn and appended in row blocks.

    The screen without counts (obs, var, obsm, uns: what :func:`build_adata` makes from
    ``screen``, its arguments other than ``counts``, with an empty CSR ``X``) is written
    to a temporary file beside ``path``; then :func:`sample_counts` (arguments ``draw``) appends each block of rows to its ``X``;
    the file is flushed and renamed to ``path``. Memory: one block of counts.
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    from cellpert.data._io import atomic_path

    n_cells = len(screen["group_of_cell"])
    skeleton = build_adata(counts=sp.csr_matrix((n_cells, n_genes), dtype=np.float32), **screen)
    with atomic_path(path) as tmp:
        skeleton.write_h5ad(tmp)
        del skeleton
        with h5py.File(tmp, "r+") as f:
            del f["X"]
            state = {"rows": 0}

            def append(block: sp.csr_matrix) -> None:
                if state["rows"] == 0:
                    write_elem(f, "X", block)
                else:
                    sparse_dataset(f["X"]).append(block)
                state["rows"] += block.shape[0]

            sample_counts(**draw, sink=append)
            if state["rows"] != n_cells:  # pragma: no cover - sample_counts covers every row
                raise RuntimeError(f"wrote {state['rows']} of {n_cells} rows")
    return path


def string_array(values: Sequence[str]) -> np.ndarray:
    """Strings as an array h5ad stores (also when empty)."""
    values = list(values)
    return np.asarray(values, dtype=object) if values else np.asarray([], dtype=str)
