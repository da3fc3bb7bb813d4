"""Block-shuffled minibatches from a count matrix on disk (backed AnnData).

scvi-tools' default loader reads each minibatch's rows at random positions; from a
backed h5ad that is one small random read per cell. This data module reads the counts
the way a disk likes: the training cells are cut into blocks of ``block_size``
consecutive cells, the blocks are shuffled, ``fetch_factor`` minibatches' worth of
blocks are read at once (rows sorted, so the reads are nearly sequential) and shuffled
in memory into minibatches. Sampling and fetching are scdataset's
(:class:`scdataset.scDataset` with :class:`scdataset.BlockShuffling`, a maintained
loader made for this); what is ours is only the glue to scvi-tools' tensors: the
minibatch is the dict of registry keys a cellpert training plan expects (``X`` dense
float32, every other registered field float32 with its registered shape), read from
the in-memory per-cell fields (dosage, library size, labels) and the backed counts.

Peak memory is bounded by ``batch_size * fetch_factor`` rows of counts, not by the
number of cells. Validation cells are read in order (no shuffling needed). Under DDP
scdataset deals the reads to the ranks in turn; each epoch's order is cut to a multiple
of (cells per read x ranks) so that every rank gets as many minibatches (DDP needs it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from torch.utils.data import DataLoader

from cellpert._errors import CellpertInputError

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_FETCH_FACTOR", "BlockShuffledDataModule"]

#: Consecutive cells per block (the unit of shuffling across the file).
DEFAULT_BLOCK_SIZE = 64
#: Minibatches read from disk at once (and shuffled together in memory).
DEFAULT_FETCH_FACTOR = 16


class _Cells:
    """The cells ``indices`` of a registered AnnData: counts from ``X`` (backed or not),
    every other registry field from memory."""

    def __init__(self, adata_manager: Any, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.counts = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self.fields: dict[str, np.ndarray | sp.csr_matrix] = {}
        for key in adata_manager.data_registry:
            if key == REGISTRY_KEYS.X_KEY:
                continue
            value = adata_manager.get_from_registry(key)
            if isinstance(value, pd.DataFrame | pd.Series):
                value = value.to_numpy()
            if sp.issparse(value):
                self.fields[key] = sp.csr_matrix(value, dtype=np.float32)  # densified per minibatch
                continue
            value = np.asarray(value, dtype=np.float32)
            self.fields[key] = value.reshape(-1, 1) if value.ndim == 1 else value

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at these (sorted) positions: one read of the counts, the rest from memory."""
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        x = self.counts[rows]
        x = x.toarray() if sp.issparse(x) or hasattr(x, "toarray") else np.asarray(x)
        out = {REGISTRY_KEYS.X_KEY: x.astype(np.float32, copy=False)}
        for key, value in self.fields.items():
            part = value[rows]
            out[key] = part.toarray() if sp.issparse(part) else part
        return out


def _even_shards(block_size: int, unit: int):
    """scdataset's BlockShuffling with each epoch's cell order cut to a multiple of ``unit``
    (cells per read x DDP ranks), so that every rank gets the same number of full reads and
    so of minibatches, which DDP needs. The cells cut are the end of that epoch's block
    order: different cells every epoch."""
    from scdataset import BlockShuffling

    class EvenShards(BlockShuffling):
        def get_len(self, data_collection) -> int:
            n = super().get_len(data_collection)
            return n - n % unit

        def get_indices(self, data_collection, *args, **kwargs):
            indices = super().get_indices(data_collection, *args, **kwargs)
            return indices[: len(indices) - len(indices) % unit]

    return EvenShards(block_size=block_size)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fetch(cells: _Cells, positions: np.ndarray) -> dict[str, np.ndarray]:
    return cells.fetch(positions)


def _batch(fetched: dict[str, np.ndarray], order: np.ndarray) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value[order])) for key, value in fetched.items()}


class BlockShuffledDataModule(pl.LightningDataModule):
    """Training and validation minibatches of a registered (backed) AnnData.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    train_idx, val_idx
        Rows of the training and validation cells (sorted, as the split gives them).
    batch_size
        Cells per minibatch.
    block_size
        Consecutive cells per shuffled block (:data:`DEFAULT_BLOCK_SIZE`); 1 is a full
        shuffle.
    fetch_factor
        Minibatches read at once (:data:`DEFAULT_FETCH_FACTOR`).
    seed
        Seed of the block order (epoch e uses ``seed + 1000 e``, scdataset's rule).
    """

    def __init__(
        self,
        adata_manager: Any,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        fetch_factor: int = DEFAULT_FETCH_FACTOR,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.adata_manager = adata_manager
        self.train_idx = np.sort(np.asarray(train_idx, dtype=np.int64))
        self.val_idx = np.sort(np.asarray(val_idx, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.fetch_factor = int(fetch_factor)
        self.seed = int(seed)
        # scvi-tools' training runner reads these
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        from scdataset import BlockShuffling, scDataset
        from scdataset.strategy import Streaming

        fetch_factor = self.fetch_factor
        strategy = BlockShuffling(block_size=self.block_size) if shuffle else Streaming()
        world = _world_size()
        if shuffle and world > 1:  # DDP: every rank the same number of full minibatches
            while fetch_factor > 1 and len(indices) < self.batch_size * fetch_factor * world:
                fetch_factor //= 2
            unit = self.batch_size * fetch_factor * world
            if len(indices) < unit:
                raise CellpertInputError(
                    f"{len(indices)} training cells cannot fill one minibatch of {self.batch_size} on each of "
                    f"{world} processes; lower --batch-size or --devices."
                )
            strategy = _even_shards(self.block_size, unit)
        batch_size = self.batch_size
        if not shuffle and world > 1:  # validation under DDP: at least one minibatch per rank
            fetch_factor = 1
            batch_size = max(1, min(batch_size, -(-len(indices) // world)))
        dataset = scDataset(
            _Cells(self.adata_manager, indices),
            strategy,
            batch_size=batch_size,
            fetch_factor=fetch_factor,
            fetch_callback=_fetch,
            batch_callback=_batch,
            seed=self.seed,
        )
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_idx, shuffle=False) if len(self.val_idx) else []
