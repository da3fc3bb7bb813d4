"""Minibatches with background and target cells in proportion (docs/models.md, *Comparative VAE*).

scvi-tools' ``ContrastiveVI`` draws equal-sized background and target minibatches and
stops the epoch when the smaller set runs out, so cells of the larger set are silently
left out of every epoch. Here each epoch visits every training cell exactly once and
every minibatch holds the two sets in the proportion of the data (±1 cell).

From a file on disk (a backed AnnData) each set is visited in block-shuffled order
instead: contiguous blocks of rows in random order, shuffled within windows of several
minibatches, so that each minibatch reads a few runs of consecutive rows instead of
``batch_size`` scattered ones. scdataset (what the other families use,
:mod:`cellpert.models._datamodule`) draws its minibatches from one stream and cannot keep
the two sets in proportion in every minibatch, which the comparative losses need (the
background cells' penalty), so the block order is applied here, in the sampler.
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
    block_size
        Option: visit each set in blocks of this many consecutive positions (random block
        order), shuffled within windows of ``fetch_factor`` minibatches' share of the set;
        None: a full shuffle.
    fetch_factor
        Minibatches per shuffling window with ``block_size``.
    """

    def __init__(
        self, is_target: np.ndarray, batch_size: int, shuffle: bool = True, *, block_size: int | None = None,
        fetch_factor: int = 16,
    ) -> None:  # fmt: skip
        is_target = np.asarray(is_target, dtype=bool).ravel()
        self.background = np.flatnonzero(~is_target)
        self.target = np.flatnonzero(is_target)
        self.shuffle = shuffle
        self.block_size = None if block_size is None else max(int(block_size), 1)
        self.fetch_factor = max(int(fetch_factor), 1)
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
        if self.block_size is None:
            return positions[torch.randperm(len(positions)).numpy()]
        # blocks of consecutive positions in random order ...
        n_blocks = math.ceil(len(positions) / self.block_size)
        block_of = np.arange(len(positions)) // self.block_size
        rank = np.empty(n_blocks, dtype=np.int64)
        rank[torch.randperm(n_blocks).numpy()] = np.arange(n_blocks)
        order = positions[np.argsort(rank[block_of], kind="stable")]
        # ... then shuffled within windows of fetch_factor minibatches' share of the set
        window = max(1, math.ceil(len(positions) / self.n_batches) * self.fetch_factor)
        keys = np.arange(len(order)) // window + torch.rand(len(order), dtype=torch.float64).numpy()
        return order[np.argsort(keys, kind="stable")]

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
    block_size, fetch_factor
        Block-shuffled training order (see :class:`ProportionalBatchSampler`); None: a full
        shuffle.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        is_target: np.ndarray,
        batch_size: int,
        *,
        block_size: int | None = None,
        fetch_factor: int = 16,
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
        self.block_size, self.fetch_factor = block_size, int(fetch_factor)
        self.loader_kwargs = loader_kwargs

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        dataset = self.adata_manager.create_torch_dataset(indices=indices)
        sampler = ProportionalBatchSampler(
            self.is_target[indices], self.batch_size, shuffle=shuffle, block_size=self.block_size,
            fetch_factor=self.fetch_factor,
        )  # fmt: skip
        # the sampler yields whole minibatches: no automatic batching
        return DataLoader(dataset, sampler=sampler, batch_size=None, **self.loader_kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_idx, shuffle=False) if self.n_val else []
