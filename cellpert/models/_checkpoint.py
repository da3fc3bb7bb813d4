"""Checkpoints and resume of every model family's training: what makes a resumed run equal an
uninterrupted one.

Lightning's checkpoint (``trainer.fit(ckpt_path=...)``) holds the parameters, Adam's
moments, the loops' progress and each callback's ``state_dict``. Not in it, and added here:

- the random state (torch, numpy, Python) and the position in the epoch's shuffled order:
  :class:`ResumableLoader` wraps the training loader and is *stateful* in Lightning's
  sense, so a mid-epoch checkpoint continues with the same minibatches and the same draws;
- the epoch's partial metric sums and the training plan's ``loss_kwargs`` (e.g. the
  comparative model's multiplier λ): :meth:`EpochMetricsMixin.on_save_checkpoint`;
- early stopping's counters and best state: :meth:`WarmupAwareEarlyStopping.state_dict`;
- the history logged so far (scvi-tools' in-memory logger): :class:`RunCheckpoint`.

:class:`RunCheckpoint` (a Lightning :class:`~lightning.pytorch.callbacks.Checkpoint`)
writes ``last.ckpt`` every N steps and, on SIGINT or SIGTERM, at the next point where a
checkpoint resumes exactly (the end of a step that is not an epoch's last, or the end of
an epoch after its validation), then raises :class:`TrainingInterrupted`. Checkpoints
load with ``torch.load(weights_only=True)`` (tensors and plain values only).

What a resume does not reproduce: under DDP (several processes) the loader is not
wrapped and the random state is per process, so a resume is not exact; on a GPU,
nondeterministic kernels differ between any two runs anyway; a resume with other
package versions than the run started with is logged (``run.json`` records them).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cellpert.data._io import atomic_path

__all__ = [
    "CHECKPOINT_NAME",
    "ResumableLoader",
    "RunCheckpoint",
    "SameDirectoryCheckpointIO",
    "TrainingInterrupted",
    "make_resumable",
    "read_checkpoint",
    "rng_states",
    "set_rng_states",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ random state
def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), numpy and Python, as tensors and
    plain values (so that checkpoints load with ``torch.load(weights_only=True)``)."""
    # numpy's legacy global state: the one Lightning's seed_everything seeds
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    version, state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(state), "gauss": py_gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states recorded by :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(n["pos"]), int(n["has_gauss"]), float(n["gauss"])))  # noqa: NPY002
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------- resumable loader
class ResumableLoader:
    """A training loader whose position Lightning saves in its checkpoints.

    Lightning restores a loader that has ``state_dict`` / ``load_state_dict`` before it
    iterates it again. The state is the random state when this epoch's iterator was made
    (which fixed the epoch's shuffled order), the number of minibatches handed out since,
    and the random state now. A mid-epoch resume remakes the epoch's iterator from the
    first, skips the minibatches already trained on (positions only, without reading
    them, for scvi-tools' and the comparative loader; the block loader reads them) and
    continues from the second; an end-of-epoch resume only restores the random state.
    The shuffles of every loader here come from the global torch RNG (scvi-tools',
    comparative) or from a seed and scdataset's epoch counter (block loader), which is
    saved too. Every other attribute is the wrapped loader's.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._batches = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._epoch_counter: int | None = None
        self._pending: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _counter(self) -> int | None:
        """scdataset's epoch counter (it seeds the epoch's block order), if any."""
        value = getattr(getattr(self.loader, "dataset", None), "_epoch", None)
        return value if isinstance(value, int) else None

    def _set_counter(self, value: int | None) -> None:
        if value is not None and self._counter() is not None:
            self.loader.dataset._epoch = int(value)

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        skip = 0
        if pending is not None and 0 < pending["batches"] < len(self):
            # mid-epoch: the epoch's order from its first random state, then the rest
            set_rng_states(pending["epoch_rng"])
            self._set_counter(pending["epoch_counter"])
            skip = int(pending["batches"])
        elif pending is not None:
            set_rng_states(pending["rng"])
            self._set_counter(pending["counter"])
        self._epoch_rng, self._epoch_counter = rng_states(), self._counter()
        iterator = iter(self.loader)
        if skip:
            _skip_batches(iterator, skip)
            set_rng_states(pending["rng"])
        self._batches = skip
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch and random states (saved in Lightning's checkpoint)."""
        return {
            "batches": self._batches,
            "epoch_rng": self._epoch_rng if self._epoch_rng is not None else rng_states(),
            "epoch_counter": self._epoch_counter,
            "rng": rng_states(),
            "counter": self._counter(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next iteration."""
        self._pending = dict(state_dict)


def _skip_batches(iterator: Any, n: int) -> None:
    """Advance a data loader's iterator by ``n`` minibatches; a single-process loader over a
    map-style dataset skips the positions only (no reading)."""
    from torch.utils.data.dataloader import _SingleProcessDataLoaderIter

    sampler_iter = getattr(iterator, "_sampler_iter", None)
    if isinstance(iterator, _SingleProcessDataLoaderIter) and sampler_iter is not None and not iterator._dataset_kind:
        for _ in range(n):
            next(sampler_iter)
        iterator._num_yielded += n
        return
    for _ in range(n):
        next(iterator)


def make_resumable(datamodule: Any) -> None:
    """Make ``datamodule.train_dataloader()`` return a :class:`ResumableLoader` (on one
    process; under DDP the loader is left as it is and a resume is not exact)."""
    original = datamodule.train_dataloader

    def train_dataloader() -> Any:
        loader = original()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            return loader
        return ResumableLoader(loader)

    datamodule.train_dataloader = train_dataloader


# ------------------------------------------------------------------ checkpoints
#: File name of the checkpoint in a run's ``checkpoints/`` directory.
CHECKPOINT_NAME = "last.ckpt"

_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM (a scheduler), after saving a checkpoint.

    Attributes
    ----------
    signum
        The signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    step
        Optimisation steps done when training stopped.
    checkpoint
        The checkpoint to resume from (None if none could be saved).
    resume_hint
        How to continue (set by :func:`cellpert.runs.train_run`: ``cellpert train --resume DIR``).
    exit_code
        ``128 + signum``, the shell's convention (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(
        self, signum: int, *, step: int, checkpoint: Path | None, resume_hint: str | None = None,
        immediate: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(signum, step, checkpoint)
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        self.resume_hint = resume_hint
        self.immediate = immediate

    @property
    def signal_name(self) -> str:
        return _SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        how = " (second Ctrl-C: stopped at once)" if self.immediate else ""
        if self.checkpoint is None:
            saved = "no checkpoint was saved, a resume starts from the beginning"
        else:
            step = _checkpoint_step(self.checkpoint)
            saved = f"checkpoint {self.checkpoint}" + (f" (step {step})" if step is not None and step != self.step else "")
        hint = f"; continue with: {self.resume_hint}" if self.resume_hint else ""
        return f"interrupted by {self.signal_name} at step {self.step}{how}: {saved}{hint}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, memory-mapped (cheap), as Lightning will load it
    (``weights_only=True``). Raises what :func:`torch.load` raises on a bad file."""
    return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(read_checkpoint(path)["global_step"])
    except Exception:  # only for a message: any unreadable file gives None
        return None


class SameDirectoryCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on any filesystem: through cellpert's one safe
    writer (:func:`cellpert.data._io.atomic_path`: beside the target, flushed, renamed;
    Lightning's own writer goes through the system temporary directory, a copy when that
    is another filesystem)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RunCheckpoint(Checkpoint):
    """``DIR/last.ckpt`` every ``every_n_steps`` steps, and on SIGINT / SIGTERM.

    Checkpoints are taken only where a resume from them repeats nothing and skips
    nothing, the *safe points*:

    - the end of a step that is not the last of its epoch (the loader's position is in
      the checkpoint: :class:`ResumableLoader`);
    - the end of an epoch that ran its validation, after early stopping and the training
      plan's epoch-end hook, with the epoch's training metrics added to the saved history
      (Lightning hands them to the logger only after every epoch-end hook).

    Not safe, measured: after an epoch's last step (Lightning skips that epoch's
    validation on resume), at the end of an epoch without validation (Lightning trains
    one more step in that epoch on resume) and at the start of an epoch (Lightning counts
    one more epoch). Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
    saves at such points too and loses the history row, hence this callback. With one
    step per epoch and no validation at all there is no safe point: such a run is saved
    at epoch ends, and a resume from there trains one step more than the uninterrupted
    run.

    A periodic checkpoint is taken at the first safe point after every ``every_n_steps``
    steps. While training runs the callback handles SIGINT and SIGTERM: the first one
    asks training to stop at the next safe point, where it saves the checkpoint and
    raises :class:`TrainingInterrupted`; a second SIGINT stops at once
    (``KeyboardInterrupt``). Under DDP the processes agree on stopping at each step. When
    training ends before a safe point (its last step or epoch) the signal only lets it
    finish. The previous handlers come back when training ends. The checkpoint also
    holds the history logged so far.

    Parameters
    ----------
    dirpath
        Directory of ``last.ckpt``.
    every_n_steps
        Steps between periodic checkpoints (0: only on a signal).
    handle_signals
        Handle SIGINT and SIGTERM as above (main thread only).
    """

    def __init__(self, dirpath: str | os.PathLike, *, every_n_steps: int = 1000, handle_signals: bool = True) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = max(int(every_n_steps), 0)
        self.handle_signals = handle_signals
        self.signal: int | None = None
        self.interrupted: TrainingInterrupted | None = None
        self._previous: dict[int, Any] = {}
        self._saved_step: int | None = None
        self._start_step = 0
        self._validated_epoch: int | None = None
        self._at_epoch_end = False

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.dirpath / CHECKPOINT_NAME

    # ------------------------------------------------------------ signals
    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "%s received: saving a checkpoint and stopping at the end of this step (or of this epoch's "
            "validation); Ctrl-C again stops at once", _SIGNAL_NAMES.get(signum, signum),
        )  # fmt: skip

    def _install(self) -> None:
        if not self.handle_signals or self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN:  # e.g. SIGINT of a background job: left ignored
                self._previous[signum] = previous
                signal.signal(signum, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _should_stop(self, trainer: pl.Trainer) -> bool:
        decision = self.signal is not None
        if trainer.world_size > 1:  # any process signalled: all stop at the same step
            decision = trainer.strategy.reduce_boolean_decision(decision, all=False)
            if decision and self.signal is None:
                self.signal = signal.SIGTERM
        return decision

    # ------------------------------------------------------------ saving
    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self._saved_step or not self.path.is_file():
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = int(trainer.global_step)

    def _due(self, trainer: pl.Trainer) -> bool:
        last = self._saved_step if self._saved_step is not None else self._start_step
        return bool(self.every_n_steps) and trainer.global_step - last >= self.every_n_steps

    def _at_safe_point(self, trainer: pl.Trainer) -> None:
        """Save if a signal asked to stop (then stop) or a periodic checkpoint is due."""
        if self._should_stop(trainer):
            self._save(trainer)
            self.interrupted = TrainingInterrupted(self.signal, step=trainer.global_step, checkpoint=self.path)
            raise self.interrupted
        if self._due(trainer):
            self._save(trainer)

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "received_sigterm", False):  # SIGTERM before our handler (setup)
            self.signal = signal.SIGTERM
        self._start_step = int(trainer.global_step)
        self._install()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = int(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # not safe: its validation and epoch-end hooks follow (see the class docstring)
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return  # the last step: training ends now anyway
        self._at_safe_point(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _ends_after_this_epoch(trainer):
            return  # the run writes its result: no checkpoint needed
        validated = self._validated_epoch == trainer.current_epoch
        if not validated and not _no_safe_point(trainer):
            return
        self._at_epoch_end = True
        try:
            self._at_safe_point(trainer)
        finally:
            self._at_epoch_end = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Add the history logged so far (scvi-tools' logger keeps it in memory)."""
        history = getattr(trainer.logger, "history", None)
        if not isinstance(history, dict):
            return
        saved = {
            name: {"index_name": df.index.name, "index": [_plain_value(i) for i in df.index],
                   "values": [_plain_value(v) for v in df.iloc[:, 0]]}
            for name, df in history.items() if isinstance(df, pd.DataFrame) and df.shape[1] == 1
        }  # fmt: skip
        if self._at_epoch_end:  # this epoch's training metrics, not yet in the logger
            epoch = int(trainer.current_epoch)
            for name, value in (getattr(pl_module, "__dict__", {}).get("_epoch_logged", {}).get("train") or {}).items():
                rows = saved.setdefault(name, {"index_name": "epoch", "index": [], "values": []})
                if epoch not in rows["index"]:
                    rows["index"].append(epoch)
                    rows["values"].append(value)
        checkpoint["cellpert_history"] = saved

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Put the saved history back into the logger (frames as scvi-tools' logger builds them)."""
        self._saved_step = int(checkpoint.get("global_step", -1))
        saved = checkpoint.get("cellpert_history")
        experiment = getattr(trainer.logger, "experiment", None)
        data = getattr(experiment, "data", None)
        if not saved or not isinstance(data, dict):
            return
        for name, rows in saved.items():
            index = pd.Index(rows["index"], name=rows["index_name"])
            # object dtype, as scvi-tools' logger builds its frames row by row
            data[name] = pd.DataFrame({name: pd.Series(rows["values"], index=index, dtype=object)})


def _no_safe_point(trainer: pl.Trainer) -> bool:
    """One step per epoch and no validation: no point where a resume is exact."""
    n_val = trainer.num_val_batches
    n_val = sum(n_val) if isinstance(n_val, list) else n_val
    return trainer.num_training_batches <= 1 and (not n_val or trainer.check_val_every_n_epoch is None)


def _ends_after_this_epoch(trainer: pl.Trainer) -> bool:
    """Whether training ends at the end of the current epoch without being asked."""
    if trainer.should_stop:
        return True
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs


def _plain_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic | torch.Tensor) else value
