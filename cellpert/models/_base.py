"""Pieces shared by the model families: split bookkeeping and seeding.

The model classes keep the train / val / test split in an obs column registered through
``setup_anndata(..., split_key=...)``; :class:`SplitMixin` reads it back and turns it
into the ``external_indexing`` that scvi-tools' data splitter takes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from anndata import AnnData

from cellpert._errors import CellpertInputError

__all__ = ["SplitMixin", "SplitName", "resolve_epochs", "seeded"]

logger = logging.getLogger(__name__)

SplitName = Literal["train", "val", "test", "unused"]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global (CPU) RNG inside the block and restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def resolve_epochs(
    n_train: int, batch_size: int, max_steps: int | None, max_epochs: int | None
) -> tuple[int, int]:
    """Epochs to ask Lightning for, and the total number of steps, from either limit.

    ``max_steps`` wins over ``max_epochs``; with neither, scvi-tools' heuristic for
    ``n_train`` cells is used. Raises when there are no training cells.
    """
    if n_train == 0:
        raise CellpertInputError("no training cells in the split; check the split column.")
    steps_per_epoch = math.ceil(n_train / batch_size)
    if max_steps is not None:
        return math.ceil(max_steps / steps_per_epoch), int(max_steps)
    if max_epochs is None:
        from scvi.model._utils import get_max_epochs_heuristic

        max_epochs = get_max_epochs_heuristic(n_train)
    return int(max_epochs), int(max_epochs) * steps_per_epoch


class SplitMixin:
    """Split bookkeeping for a :class:`~scvi.model.base.BaseModelClass` subclass.

    Expects ``split_key`` among the ``setup_anndata`` arguments (``None``: every cell
    is a training cell).
    """

    def split_values(self, adata: AnnData | None = None) -> np.ndarray:
        """The split of each cell (all ``"train"`` when set up with ``split_key=None``)."""
        adata = self._validate_anndata(adata)
        key = self.adata_manager.registry["setup_args"].get("split_key")
        if key is None or key not in adata.obs:
            if key is not None:
                logger.warning("obs has no split column %r; treating every cell as training", key)
            return np.full(adata.n_obs, "train", dtype=object)
        return adata.obs[key].astype(str).to_numpy()

    def split_indices(self, split: SplitName, adata: AnnData | None = None) -> np.ndarray:
        """Row indices of the cells of one split."""
        return np.flatnonzero(self.split_values(adata) == split)

    def _indices(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        split: SplitName | None,
    ) -> np.ndarray:
        """Explicit ``indices``, else the cells of ``split``, else every cell."""
        adata = self._validate_anndata(adata)
        if indices is not None:
            return np.asarray(indices, dtype=np.int64)
        if split is not None:
            return self.split_indices(split, adata)
        return np.arange(adata.n_obs)

    @staticmethod
    def external_indexing(
        n_obs: int, train_idx: np.ndarray, val_idx: np.ndarray
    ) -> list[np.ndarray]:
        """``[train, val, other]`` for ``datasplitter_kwargs={"external_indexing": ...}``."""
        used = np.concatenate([np.asarray(train_idx), np.asarray(val_idx)]).astype(np.int64)
        other = np.setdiff1d(np.arange(n_obs), used)
        return [np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64), other]
