"""The one ``train()`` of every model family (a template with small hooks).

Every family trains the same way: Adam (eps 1e-8) through scvi-tools'
:class:`~scvi.model.base.UnsupervisedTrainingMixin` on the cells of the recorded split,
seeded, with early stopping and best-state restoration on the validation loss
(:class:`~cellpert.models._trainingplan.WarmupAwareEarlyStopping`), an optional cap on the
wall time, and a summary of what happened in ``model.training_summary_`` (steps, epochs,
wall time, steps/s, best step). What differs is declared, not re-implemented:

- ``_train_defaults``: the family's defaults (batch size, learning rate, weight decay,
  early stopping and its patience), from its paper;
- ``_default_max_steps``: the step cap when neither ``max_steps`` nor ``max_epochs`` is
  given (None: scvi-tools' epoch heuristic);
- ``_monitor``: the logged validation metric early stopping watches;
- :meth:`PerturbationTrainingMixin._datamodule`: the data splitter (default: scvi-tools'
  with the split's cells as ``external_indexing``);
- a family's own ``train(...)`` takes its own options (e.g. SAMS-VAE's
  ``mask_logits_lr``) and passes them on as ``plan_kwargs`` and ``callbacks``.

With ``checkpoint_dir``, training writes ``checkpoint_dir/last.ckpt`` (Lightning's
checkpoint plus what :mod:`cellpert.models._checkpoint` adds to it) and turns SIGINT and
SIGTERM into a checkpoint and :class:`~cellpert.models._checkpoint.TrainingInterrupted`;
``ckpt_path`` continues from such a checkpoint through Lightning's ``trainer.fit(ckpt_path=...)``.
On one CPU process a resumed run gives the same parameters as an uninterrupted one (same
seed, options and data); see ``tests/test_resume.py`` for what is compared.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities.exceptions import SIGTERMException
from scvi.model.base import UnsupervisedTrainingMixin
from scvi.train import Trainer, TrainRunner

from cellpert._errors import CellpertInputError
from cellpert.models._base import resolve_epochs
from cellpert.models._checkpoint import (
    RunCheckpoint,
    SameDirectoryCheckpointIO,
    TrainingInterrupted,
    make_resumable,
    read_checkpoint,
)
from cellpert.models._datamodule import DEFAULT_BLOCK_SIZE, DEFAULT_FETCH_FACTOR
from cellpert.models._trainingplan import WarmupAwareEarlyStopping

__all__ = [
    "COMMON_TRAIN_DOC",
    "DEFAULT_CHECKPOINT_EVERY",
    "Loader",
    "PerturbationTrainingMixin",
    "TrainingInterrupted",
    "check_checkpoint",
]

#: Steps between two periodic checkpoints (each at the first point after them where a
#: resume is exact).
DEFAULT_CHECKPOINT_EVERY = 1000
#: Lightning precisions ``train`` accepts. In the mixed ones the linear layers run in half
#: precision under autocast; every network's outputs (Normal parameters, decoder logits)
#: are cast to float32, so the softmax over genes, the NB / Poisson log-likelihoods, the
#: Normal densities, KL terms and the global variables' terms stay in float32, as do the
#: parameters and Adam's state.
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")

#: Minibatch reader: ``"random"`` (scvi-tools' loader: rows at random positions),
#: ``"block"`` (block-shuffled reads, for counts on disk) or ``"auto"`` (block when the
#: AnnData is backed).
Loader = Literal["auto", "random", "block"]

#: Docstring of the options every family's ``train`` takes (appended to each family's).
COMMON_TRAIN_DOC = """
        Common options (every family; defaults in brackets are the family's)
        -------------------------------------------------------------------
        max_steps
            Cap on the optimisation steps (takes precedence over ``max_epochs``).
        max_epochs
            Cap on the epochs when ``max_steps`` is None. With neither, the family's step
            cap (SAMS-VAE family: 30,000) or scvi-tools' epoch heuristic.
        batch_size, lr, weight_decay
            Minibatch size, Adam learning rate and weight decay [family defaults]. Adam's
            ``eps`` is 1e-8, not scvi-tools' 0.01 (which swamps small gradients).
        gradient_clip_val
            Clip the gradient norm at this value [family default: SAMS-VAE family 100,
            the others none]; 0: no clipping.
        check_val_every_n_epoch
            Validation frequency.
        early_stopping
            Stop once the validation loss has not improved for ``early_stopping_patience``
            validation checks, counted after any KL warm-up [family default]. Needs
            validation cells.
        early_stopping_patience
            Checks without improvement before stopping (None: enough checks to span 1,000
            steps, and at least 10).
        restore_best
            Restore the state with the best validation loss at the end (needs validation
            cells) [family default].
        max_time
            Cap on the training wall time, in seconds (None: no cap); a resumed run counts
            the time of its earlier sessions (Lightning's Timer is in the checkpoint).
        seed
            Seeds data order and every draw (default: the model's ``seed``); same seed,
            same result on CPU.
        accelerator, devices
            Lightning devices.
        strategy
            Lightning strategy (None: Lightning's choice). ``"ddp"`` trains on several
            devices (or CPU processes, with the gloo backend): each process sees its own
            shard of the training cells with equal batch counts; the loss's global terms
            stay scaled by the counts of the whole training split (they are module
            buffers set before training), and the validation metrics are all-reduced,
            so early stopping and best-state restore take the same decision on every rank.
        precision
            Lightning precision (None: float32). ``"bf16-mixed"`` (CPU or a recent GPU)
            or ``"16-mixed"`` (CUDA, with loss scaling) run the linear layers in half
            precision; what stays in float32 is listed at :data:`PRECISIONS`.
        loader
            ``"auto"`` (default: block-shuffled when the counts are on disk, a backed
            AnnData; scvi-tools' fully shuffled loader otherwise), ``"random"`` or
            ``"block"`` (:mod:`cellpert.models._datamodule`).
        block_size, fetch_factor
            Block loader: consecutive cells per shuffled block (64) and minibatches read
            at once (16).
        train_indices, val_indices
            Override the cells of the split (e.g. sVAE's out-of-distribution protocol).
        checkpoint_dir
            Write ``checkpoint_dir/last.ckpt`` every ``checkpoint_every`` steps and when
            SIGINT (Ctrl-C) or SIGTERM arrives, at the next point where a resume is exact
            (:class:`~cellpert.models._checkpoint.RunCheckpoint`: the end of a step
            that is not the last of its epoch, or the end of a validated epoch); the
            signal stops training there with
            :class:`~cellpert.models._checkpoint.TrainingInterrupted`. None (default):
            no checkpoints, signals as Lightning handles them.
            :func:`cellpert.runs.train_run` sets it to ``DIR/checkpoints``.
        checkpoint_every
            Steps between periodic checkpoints (:data:`DEFAULT_CHECKPOINT_EVERY`; 0: only
            on a signal).
        ckpt_path
            Continue from this checkpoint (same model, options and data): parameters,
            optimiser, step and epoch, random state, position in the epoch, early
            stopping's best state and the history so far. Checkpoints go on into
            ``checkpoint_dir`` (default: the checkpoint's directory).
        plan_kwargs
            Extra training-plan arguments.
        **trainer_kwargs
            Extra :class:`~scvi.train.Trainer` arguments (e.g. ``enable_progress_bar``).

        Returns
        -------
        What scvi-tools' :class:`~scvi.train.TrainRunner` returns. Sets
        ``training_summary_`` (steps, epochs, wall time, steps/s, step cap, whether it
        stopped early, patience, best step and best validation loss).
"""


class _Trainer(Trainer):
    """scvi-tools' Trainer whose ``fit`` keeps an exception for the template to raise.

    scvi-tools' :class:`~scvi.train.TrainRunner` catches every exception of ``fit``,
    prints ``Exception raised during training. <class 'NameError'>`` (the class NameError,
    not the exception) and raises it again; Lightning's answer to SIGTERM is an exception
    with an empty message, hence the line users saw. Here ``fit`` returns and leaves the
    exception in ``fit_error_``. With a :class:`RunCheckpoint` among the callbacks the
    training loader is made resumable first.
    """

    fit_error_: BaseException | None = None

    def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        # scvi-tools' Trainer turns Lightning's checkpointing off, and turned on it adds
        # its own SaveCheckpoint (best validation loss as scvi-tools model directories,
        # loaded at the end): a RunCheckpoint joins the callbacks after the Trainer is built
        ours = [c for c in callbacks or [] if isinstance(c, RunCheckpoint)]
        super().__init__(*args, callbacks=[c for c in callbacks or [] if not isinstance(c, RunCheckpoint)], **kwargs)
        # last, as Lightning orders checkpoint callbacks (after early stopping and the plan's hooks)
        self.callbacks = [*self.callbacks, *ours]

    def fit(self, model: Any, train_dataloaders: Any = None, *args: Any, **kwargs: Any) -> None:
        if any(isinstance(c, RunCheckpoint) for c in self.callbacks):
            source = kwargs.get("datamodule", train_dataloaders)
            if isinstance(source, pl.LightningDataModule):
                make_resumable(source)
        self.fit_error_ = None
        try:
            super().fit(model, train_dataloaders, *args, **kwargs)
        except BaseException as err:  # raised again by PerturbationTrainingMixin.train
            self.fit_error_ = err


class _TrainRunner(TrainRunner):
    _trainer_cls = _Trainer


def check_checkpoint(path: str | os.PathLike, module: Any) -> dict[str, Any]:
    """The contents of checkpoint ``path``, checked to be readable and to hold ``module``'s
    parameters (names and shapes); a one-line :class:`~cellpert.CellpertInputError` if not."""
    path = Path(path)
    if not path.is_file():
        raise CellpertInputError(f"checkpoint {path} not found; give the last.ckpt that training wrote.")
    try:
        checkpoint = read_checkpoint(path)
        state = checkpoint["state_dict"]
        step = int(checkpoint["global_step"])
    except Exception as err:  # torch's errors on a truncated or foreign file vary
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CellpertInputError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {first}); it is truncated or not a "
            "cellpert checkpoint: delete it to train from the start."
        ) from err
    expected = {f"module.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if k.startswith("module.")}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise CellpertInputError(
            f"checkpoint {path} holds another model ({len(differ)} parameters differ, e.g. {differ[0]}); "
            "resume with the options it was trained with, or delete it to train from the start."
        )
    checkpoint["global_step"] = step
    return checkpoint


class PerturbationTrainingMixin(UnsupervisedTrainingMixin):
    """Template ``train()`` (see the module docstring); put it before ``BaseModelClass``."""

    _train_runner_cls = _TrainRunner

    #: The family's defaults of the common options.
    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "early_stopping": True,
        "early_stopping_patience": None,
        "restore_best": True,
    }
    #: Step cap when neither max_steps nor max_epochs is given (None: scvi-tools' heuristic).
    _default_max_steps: ClassVar[int | None] = None
    #: Logged validation metric of early stopping and best-state restore.
    _monitor: ClassVar[str] = "elbo_validation"

    def _block_order(self, loader: Loader, block_size: int, fetch_factor: int) -> bool:
        """Whether minibatches are read in block-shuffled order: ``loader="block"``, or
        ``"auto"`` on a backed AnnData (options checked)."""
        if loader not in ("auto", "random", "block"):
            raise CellpertInputError(f"loader must be 'auto', 'random' or 'block', not {loader!r}.")
        if int(block_size) < 1 or int(fetch_factor) < 1:
            raise CellpertInputError(
                f"block_size and fetch_factor must be positive integers, not {block_size} and {fetch_factor}."
            )
        return loader == "block" or (loader == "auto" and bool(getattr(self.adata, "isbacked", False)))

    def _datamodule(
        self, train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int, *, loader: Loader,
        block_size: int, fetch_factor: int, seed: int,
    ) -> Any:  # fmt: skip
        """Hook: a Lightning data module for these cells (None: scvi-tools' data splitter).

        ``loader="block"``, or ``"auto"`` on a backed AnnData: the block-shuffled reader
        of :mod:`cellpert.models._datamodule`.
        """
        if self._block_order(loader, block_size, fetch_factor):
            from cellpert.models._datamodule import BlockShuffledDataModule

            return BlockShuffledDataModule(
                self.adata_manager, train_idx, val_idx, batch_size, block_size=block_size,
                fetch_factor=fetch_factor, seed=seed,
            )  # fmt: skip
        return None

    def train(
        self,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        gradient_clip_val: float | None = None,
        check_val_every_n_epoch: int = 1,
        early_stopping: bool | None = None,
        early_stopping_patience: int | None = None,
        restore_best: bool | None = None,
        max_time: float | None = None,
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        strategy: str | None = None,
        precision: str | None = None,
        loader: Loader = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        fetch_factor: int = DEFAULT_FETCH_FACTOR,
        train_indices: Sequence[int] | None = None,
        val_indices: Sequence[int] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        ckpt_path: str | os.PathLike | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ):
        """Train with Adam on the training split, validating on the validation split.
        """
        d = self._train_defaults
        batch_size = int(d["batch_size"] if batch_size is None else batch_size)
        lr = float(d["lr"] if lr is None else lr)
        weight_decay = float(d["weight_decay"] if weight_decay is None else weight_decay)
        early_stopping = bool(d["early_stopping"] if early_stopping is None else early_stopping)
        if early_stopping_patience is None:
            early_stopping_patience = d.get("early_stopping_patience")
        restore_best = bool(d.get("restore_best", True) if restore_best is None else restore_best)
        seed = self.seed if seed is None else int(seed)
        train_idx = self.split_indices("train") if train_indices is None else np.asarray(train_indices, dtype=np.int64)
        val_idx = self.split_indices("val") if val_indices is None else np.asarray(val_indices, dtype=np.int64)
        if max_steps is None and max_epochs is None:
            max_steps = self._default_max_steps
        max_epochs, total_steps = resolve_epochs(len(train_idx), batch_size, max_steps, max_epochs)
        steps_per_epoch = math.ceil(len(train_idx) / batch_size)

        plan = {"optimizer": "Adam", "lr": lr, "weight_decay": weight_decay, "eps": 1e-8, **(plan_kwargs or {})}
        callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
        self._stopper = None
        if len(val_idx) and (restore_best or early_stopping):
            if early_stopping_patience is None:
                early_stopping_patience = max(10, math.ceil(1000 / (steps_per_epoch * check_val_every_n_epoch)))
            self._stopper = WarmupAwareEarlyStopping(
                self._monitor,
                start_epoch=int(plan.get("n_epochs_kl_warmup") or 0),
                patience=int(early_stopping_patience) if early_stopping else None,
                restore_best=restore_best,
            )
            callbacks.append(self._stopper)
        start_step = 0
        if ckpt_path is not None:
            start_step = check_checkpoint(ckpt_path, self.module)["global_step"]
            trainer_kwargs["ckpt_path"] = str(ckpt_path)
            if checkpoint_dir is None:  # the checkpoint's loader and history state need a RunCheckpoint
                checkpoint_dir = Path(ckpt_path).parent
        checkpointer = None
        if checkpoint_dir is not None:
            every = DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None else int(checkpoint_every)
            if every < 0:
                raise CellpertInputError(f"checkpoint_every must be a number of steps >= 0, not {checkpoint_every}.")
            checkpointer = RunCheckpoint(checkpoint_dir, every_n_steps=every)
            callbacks.append(checkpointer)
            trainer_kwargs.setdefault("plugins", [SameDirectoryCheckpointIO()])
        if gradient_clip_val is None:
            gradient_clip_val = d.get("gradient_clip_val")
        if gradient_clip_val:  # 0: no clipping
            trainer_kwargs["gradient_clip_val"] = float(gradient_clip_val)
        if max_time is not None:
            if not max_time > 0:
                raise CellpertInputError(f"max_time must be a positive number of seconds, not {max_time}.")
            trainer_kwargs["max_time"] = datetime.timedelta(seconds=float(max_time))
        trainer_kwargs.setdefault("enable_progress_bar", False)
        trainer_kwargs.setdefault("enable_model_summary", False)
        if strategy is not None:
            trainer_kwargs["strategy"] = strategy
        if precision is not None:
            if str(precision) not in PRECISIONS:
                raise CellpertInputError(
                    f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}."
                )
            trainer_kwargs["precision"] = str(precision)
        datamodule = self._datamodule(
            train_idx, val_idx, batch_size, loader=loader, block_size=block_size, fetch_factor=fetch_factor, seed=seed
        )
        data = (
            {"datamodule": datamodule}
            if datamodule is not None
            else {"datasplitter_kwargs": {"external_indexing": self.external_indexing(self.adata.n_obs, train_idx, val_idx)}}
        )
        pl.seed_everything(seed, workers=True, verbose=False)
        was_trained = bool(getattr(self, "is_trained_", False))
        start = time.perf_counter()
        out = UnsupervisedTrainingMixin.train(
            self,
            # with a step cap, Lightning stops at max_steps; the epochs are left open because
            # under DDP each rank sees 1/world of the cells per epoch
            max_epochs=-1 if max_steps is not None else max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            plan_kwargs=plan,
            max_steps=-1 if max_steps is None else int(max_steps),
            check_val_every_n_epoch=check_val_every_n_epoch if len(val_idx) else None,
            callbacks=callbacks,
            **data,
            **trainer_kwargs,
        )
        wall = time.perf_counter() - start
        trainer = getattr(self, "trainer", None)
        error = getattr(trainer, "fit_error_", None)
        if error is not None:
            self.is_trained_ = was_trained
            raise _interruption(error, trainer, checkpointer)
        steps = int(trainer.global_step) if trainer is not None else total_steps
        self.training_summary_ = {
            "steps": steps,
            "epochs": int(trainer.current_epoch) if trainer is not None else max_epochs,
            "wall_time_s": round(wall, 3),
            "steps_per_s": round((steps - start_step) / wall, 3) if wall > 0 else None,
            "max_steps": max_steps,
            "stopped_early": bool(self._stopper is not None and self._stopper.stopped_epoch is not None),
            "patience": early_stopping_patience if early_stopping else None,
        }
        if ckpt_path is not None:
            self.training_summary_["resumed_from_step"] = start_step
        if self._stopper is not None and self._stopper.best_step is not None:
            self.best_step_ = self._stopper.best_step
            self.best_epoch_ = self._stopper.best_epoch
            self.best_validation_loss_ = float(self._stopper.best_score)
            self.training_summary_.update(best_step=self.best_step_, best_validation_loss=self.best_validation_loss_)
        self.module.eval()
        return out


def _interruption(error: BaseException, trainer: Any, checkpointer: RunCheckpoint | None) -> BaseException:
    """What ``train`` raises for an exception of ``fit``: a :class:`TrainingInterrupted`
    for a signal, the exception itself otherwise."""
    if isinstance(error, TrainingInterrupted):
        return error
    step = int(getattr(trainer, "global_step", 0) or 0)
    saved = checkpointer.path if checkpointer is not None and checkpointer.path.is_file() else None
    # Lightning answers KeyboardInterrupt with sys.exit(1) (its "graceful shutdown")
    if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
        if checkpointer is None or checkpointer.signal is None:
            return error.__context__
        return TrainingInterrupted(signal.SIGINT, step=step, checkpoint=saved, immediate=True)
    if isinstance(error, KeyboardInterrupt) and checkpointer is not None and checkpointer.signal is not None:
        return TrainingInterrupted(signal.SIGINT, step=step, checkpoint=saved, immediate=True)
    if isinstance(error, SIGTERMException):  # Lightning's own SIGTERM handling (no checkpoint_dir)
        return TrainingInterrupted(signal.SIGTERM, step=step, checkpoint=saved)
    return error
