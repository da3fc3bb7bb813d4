"""Minibatches with background and target cells in proportion (docs/models.md, *Comparative VAE*).

scvi-tools' ``ContrastiveVI`` draws equal-sized background and target minibatches and
stops the epoch when the smaller set runs out, so cells of the larger set are silently
left out of every epoch. Here each epoch visits every training cell exactly once and
every minibatch holds the two sets in the proportion of the data (±1 cell).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader, Sampler

__all__ = ["ComparativeDataSplitter", "ProportionalBatchSampler"]


class ProportionalBatchSampler(Sampler):
    """Batches of positions with background and target cells in proportion.

    The epoch has ``n_batches = ceil(n / batch_size)`` minibatches, reduced to the size of
    the smaller set when that set has fewer cells than batches (so that every minibatch
    holds both sets; the minibatches are then larger than ``batch_size``). Each set is
    shuffled (``shuffle=True``; torch's global RNG, so Lightning's seed applies) and cut
    into ``n_batches`` near-equal chunks; minibatch j joins chunk j of each set. No cell is
    dropped. With only one set present, plain consecutive batches.

    Parameters
    ----------
    is_target
        (n,) booleans, one per position of the dataset.
    batch_size
        Nominal minibatch size.
    shuffle
        Reshuffle every epoch.
    """

    def __init__(self, is_target: np.ndarray, batch_size: int, shuffle: bool = True) -> None:
        is_target = np.asarray(is_target, dtype=bool).ravel()
        self.background = np.flatnonzero(~is_target)
        self.target = np.flatnonzero(is_target)
        self.shuffle = shuffle
        n = len(is_target)
        n_batches = max(1, math.ceil(n / max(int(batch_size), 1)))
        smaller = min(len(self.background), len(self.target))
        if smaller > 0:
            n_batches = min(n_batches, smaller)
        self.n_batches = n_batches if n else 0

    def __len__(self) -> int:
        return self.n_batches

    def _order(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle or len(positions) == 0:
            return positions
        return positions[torch.randperm(len(positions)).numpy()]

    def __iter__(self) -> Iterator[list[int]]:
        background = np.array_split(self._order(self.background), self.n_batches)
        target = np.array_split(self._order(self.target), self.n_batches)
        for b, t in zip(background, target, strict=True):
            yield np.sort(np.concatenate([b, t])).tolist()


class ComparativeDataSplitter(pl.LightningDataModule):
    """Training and validation loaders of :class:`ProportionalBatchSampler` minibatches.

    Parameters
    ----------
    adata_manager
        The model's registered AnnData manager.
    train_idx, val_idx
        Row indices of the training and validation cells.
    is_target
        (n_obs,) booleans for every row of the AnnData.
    batch_size
        Nominal minibatch size.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        is_target: np.ndarray,
        batch_size: int,
        **loader_kwargs,
    ) -> None:
        super().__init__()
        self.adata_manager = adata_manager
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.val_idx = np.asarray(val_idx, dtype=np.int64)
        self.test_idx = np.zeros(0, dtype=np.int64)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self.is_target = np.asarray(is_target, dtype=bool)
        self.batch_size = int(batch_size)
        self.loader_kwargs = loader_kwargs

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        dataset = self.adata_manager.create_torch_dataset(indices=indices)
        sampler = ProportionalBatchSampler(self.is_target[indices], self.batch_size, shuffle=shuffle)
        # the sampler yields whole minibatches: no automatic batching
        return DataLoader(dataset, sampler=sampler, batch_size=None, **self.loader_kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_idx, shuffle=False) if self.n_val else []
