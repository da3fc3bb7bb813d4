"""Epoch-level metric logging shared by the training plans of every model family.

scvi-tools' :class:`~scvi.train.TrainingPlan` calls Lightning's ``self.log`` about ten
times per minibatch (the loss, four torchmetrics ELBO objects, every extra metric).
Each call costs Lightning a pass over its result collection (moving torchmetrics
objects to the device), which on a small network is most of a training step: 2.9 s of
6.4 s in three sVAE epochs on the sparse-shift benchmark. The history only ever records
epoch values, so :class:`EpochMetricsMixin` sums the minibatch values itself and logs
each metric once at the end of the epoch, under the same names and with the same values:

- ``train_loss`` / ``validation_loss``: mean of the minibatch losses weighted by the
  minibatch size (Lightning's epoch reduction);
- ``elbo_{mode}``, ``reconstruction_loss_{mode}``, ``kl_local_{mode}``, ``kl_global_{mode}``:
  scvi-tools' :class:`~scvi.train._metrics.ElboMetric` objects, updated per minibatch as
  before and logged once per epoch;
- ``{key}_{mode}`` for each scalar extra metric of the :class:`~scvi.module.base.LossOutput`,
  and any value passed to :meth:`EpochMetricsMixin.log_epoch_mean`: minibatch-size
  weighted means.

Under DDP the sums are all-reduced before the means are taken. The progress bar shows
the running mean of the epoch's training loss, refreshed every ``progress_every`` steps.

Checkpoints and resume: :mod:`cellpert.models._checkpoint` (the plan saves its partial
epoch sums and ``loss_kwargs`` in a checkpoint, :meth:`EpochMetricsMixin.on_save_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan

__all__ = [
    "CellpertTrainingPlan",
    "EpochMetricsMixin",
    "WarmupAwareEarlyStopping",
]

logger = logging.getLogger(__name__)


class EpochMetricsMixin:
    """Mixin for :class:`~scvi.train.TrainingPlan` subclasses: log metrics once per epoch.

    Put it first among the bases (``class Plan(EpochMetricsMixin, TrainingPlan)``).
    """

    #: Steps between two refreshes of the progress bar's loss.
    progress_every: int = 10

    # ------------------------------------------------------------- accumulation
    def _epoch_store(self, mode: str) -> dict[str, tuple[torch.Tensor | float, float]]:
        stores = self.__dict__.setdefault("_epoch_sums", {})
        return stores.setdefault(mode, {})

    def log_epoch_mean(
        self, name: str, value: torch.Tensor | float, weight: float, mode: str
    ) -> None:
        """Add ``value`` (weight ``weight``) to the epoch mean logged as ``name``."""
        store = self._epoch_store(mode)
        # float32 on the value's device: no host sync per step, and MPS has no float64
        value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        total, count = store.get(name, (0.0, 0.0))
        store[name] = (total + value * weight, count + weight)

    def _flush_epoch(self, mode: str, metrics: dict | None) -> None:
        store = self._epoch_store(mode)
        # what this epoch logs, for a checkpoint taken before Lightning hands it to the logger
        logged = self.__dict__.setdefault("_epoch_logged", {})[mode] = {}
        if store:
            names = list(store)
            device = self.device if hasattr(self, "device") else torch.device("cpu")
            sums = torch.stack(
                [
                    torch.stack(
                        [torch.as_tensor(v, dtype=torch.float32, device=device) for v in store[n]]
                    )
                    for n in names
                ]
            )
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            for n, (total, count) in zip(names, sums, strict=True):
                if float(count) > 0:
                    logged[n] = float(total / count)
                    self.log(
                        n,
                        logged[n],
                        on_step=False,
                        on_epoch=True,
                        prog_bar=n == "train_loss",
                    )
            store.clear()
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=self.use_sync_dist)
            if mode == "train":  # Lightning computes them the same way, from the cache
                logged.update({name: float(metric.compute()) for name, metric in metrics.items()})

    # ------------------------------------------------------------ scvi overrides
    def compute_and_log_metrics(self, loss_output: LossOutput, metrics: dict, mode: str) -> None:
        """Update the ELBO metrics and the extra metrics' sums (logged at the epoch's end)."""
        n_obs = loss_output.n_obs_minibatch
        with torch.inference_mode():
            metrics[f"elbo_{mode}"].update(
                reconstruction_loss=loss_output.reconstruction_loss_sum,
                kl_local=loss_output.kl_local_sum,
                kl_global=loss_output.kl_global_sum,
                n_obs_minibatch=n_obs,
            )
        for key in loss_output.extra_metrics_keys:
            value = loss_output.extra_metrics[key]
            if torch.is_tensor(value) and value.dim() != 0:
                continue  # scvi-tools logs only 0-d extra metrics
            self.log_epoch_mean(f"{key}_{mode}", value, n_obs, mode)

    def training_step(self, batch, batch_idx):
        """scvi-tools' training step with epoch-level logging."""
        if "kl_weight" in self.loss_kwargs:
            kl_weight = self.kl_weight
            self.loss_kwargs.update({"kl_weight": kl_weight})
            self.log_epoch_mean("kl_weight", kl_weight, 1.0, "train")
        _, _, scvi_loss = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.record_loss(scvi_loss, "train")
        return scvi_loss.loss

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step with epoch-level logging."""
        _, _, scvi_loss = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.record_loss(scvi_loss, "validation")

    def record_loss(self, scvi_loss: LossOutput, mode: str) -> None:
        """Add one minibatch's loss and metrics to the epoch's sums."""
        self.log_epoch_mean(
            f"{'train' if mode == 'train' else 'validation'}_loss",
            scvi_loss.loss,
            scvi_loss.n_obs_minibatch,
            mode,
        )
        self.compute_and_log_metrics(
            scvi_loss, self.train_metrics if mode == "train" else self.val_metrics, mode
        )
        if mode == "train" and self.progress_every and self.global_step % self.progress_every == 0:
            total, count = self._epoch_store("train")["train_loss"]
            self.log(  # a tensor: the progress bar reads it when it draws, not the step
                "loss",
                (total / count).detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                logger=False,
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._flush_epoch("train", self.train_metrics)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add what a mid-epoch resume needs and Lightning does not save: the epoch's
        partial sums, the ELBO metrics' states and the numeric ``loss_kwargs`` (the KL
        weight, the comparative model's multiplier λ)."""
        super().on_save_checkpoint(checkpoint)
        metrics = {}
        for mode in ("train", "validation"):
            collection = getattr(self, "train_metrics" if mode == "train" else "val_metrics", None) or {}
            for name, metric in collection.items():
                metrics[name] = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in metric.metric_state.items()}
        sums = {
            mode: {name: [torch.as_tensor(t).detach().cpu().clone(), float(c)] for name, (t, c) in store.items()}
            for mode, store in self.__dict__.get("_epoch_sums", {}).items()
        }
        loss_kwargs = {k: _number(v) for k, v in getattr(self, "loss_kwargs", {}).items() if _number(v) is not None}
        checkpoint["cellpert_plan"] = {"epoch_sums": sums, "metrics": metrics, "loss_kwargs": loss_kwargs}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` added."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("cellpert_plan")
        if not state:
            return
        self.loss_kwargs.update(state.get("loss_kwargs", {}))
        stores = self.__dict__.setdefault("_epoch_sums", {})
        for mode, store in state.get("epoch_sums", {}).items():
            stores[mode] = {name: (total, float(count)) for name, (total, count) in store.items()}
        for mode in ("train", "validation"):
            collection = getattr(self, "train_metrics" if mode == "train" else "val_metrics", None) or {}
            for name, metric in collection.items():
                for key, value in state.get("metrics", {}).get(name, {}).items():
                    setattr(metric, key, value.to(getattr(metric, key).device))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._flush_epoch("validation", self.val_metrics)


class CellpertTrainingPlan(EpochMetricsMixin, TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan` with epoch-level metrics and
    per-parameter learning rates, the base of every family's training plan.

    Parameters
    ----------
    module
        The module.
    param_lrs
        Option: ``{module attribute name: learning rate}`` for parameters that get their
        own Adam learning rate (e.g. SAMS-VAE's ``mask_logits``, sVAE's ``shift_mean``
        and ``log_alpha``); every other parameter uses ``lr``. Ignored unless the
        optimizer is Adam.
    **kwargs
        :class:`~scvi.train.TrainingPlan` arguments.
    """

    def __init__(self, module, *, param_lrs: dict[str, float] | None = None, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self.param_lrs = {k: float(v) for k, v in (param_lrs or {}).items() if v is not None}

    def _fused_optimizer(self) -> bool:
        """Whether Adam / AdamW may use torch's fused kernel (one pass per parameter).

        On this CPU, fused Adam steps the SAMS-VAE Norman model (1.46 M parameters) in
        1.5-2.3 ms against 6-19 ms for torch's default per-parameter loop
        (benchmarks/RESULTS_scale.md, session 16); the update is the same algorithm,
        rounded differently. It is used where torch has it (CPU and CUDA, floating
        parameters) and not under mixed precision (``bf16-mixed``, ``16-mixed``), whose
        Lightning plugin refuses gradient clipping with an optimizer that says it
        unscales its own gradients, as a fused one does.
        """
        try:
            precision = str(self.trainer.precision)
        except RuntimeError:  # not attached to a trainer
            precision = "32-true"
        if "mixed" in precision:  # Lightning reports "16-mixed" / "bf16-mixed"
            return False
        params = [p for p in self.module.parameters() if p.requires_grad]
        return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)

    def _optimizer_creator_fn(self, optimizer_cls):
        """scvi-tools' Adam / AdamW creator, fused where :meth:`_fused_optimizer` allows."""
        fused = {"fused": True} if self._fused_optimizer() else {}
        return lambda params: optimizer_cls(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, **fused)

    def configure_optimizers(self):
        """Adam, with the parameters named in ``param_lrs`` in their own groups."""
        special = {name: getattr(self.module, name, None) for name in self.param_lrs}
        special = {name: p for name, p in special.items() if isinstance(p, torch.nn.Parameter)}
        if not special or self.optimizer_name != "Adam":
            return super().configure_optimizers()
        chosen = {id(p) for p in special.values()}
        others = [p for p in self.module.parameters() if p.requires_grad and id(p) not in chosen]
        groups = [{"params": others}] + [{"params": [p], "lr": self.param_lrs[n]} for n, p in special.items()]
        return {"optimizer": self._optimizer_creator_fn(torch.optim.Adam)(groups)}


class WarmupAwareEarlyStopping(pl.Callback):
    """Early stopping and best-state restore on ``monitor``, after ``start_epoch``.

    Parameters
    ----------
    monitor
        Logged validation metric to minimise (``"elbo_validation"``: per-cell negative ELBO).
    start_epoch
        First epoch whose value counts (the end of the KL warm-up).
    patience
        Stop after this many validation checks without improvement (None: never stop).
    min_delta
        Improvement needed to reset the patience counter.
    restore_best
        Load the best state into the module when training ends.

    Attributes
    ----------
    best_score, best_epoch, best_step
        Best value seen after ``start_epoch``, its epoch and global step.
    stopped_epoch
        Epoch at which training was stopped early (None if it was not).
    """

    def __init__(
        self,
        monitor: str = "elbo_validation",
        *,
        start_epoch: int = 0,
        patience: int | None = 45,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.start_epoch = int(start_epoch)
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < self.start_epoch:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best_score - self.min_delta:
            self.best_score = value
            self.best_epoch = int(trainer.current_epoch)
            self.best_step = int(trainer.global_step)
            self._wait = 0
            if self.restore_best:
                self._state = copy.deepcopy(pl_module.module.state_dict())
            return
        self._wait += 1
        if self.patience is not None and self._wait >= self.patience:
            trainer.should_stop = True
            self.stopped_epoch = int(trainer.current_epoch)
            logger.info("early stopping at epoch %d (best %s at epoch %s)", self.stopped_epoch, self.monitor, self.best_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self._state is not None:
            pl_module.module.load_state_dict(self._state)
            logger.info("restored the state of epoch %s (%s = %.4f)", self.best_epoch, self.monitor, self.best_score)

    def state_dict(self) -> dict[str, Any]:
        """The counters and the best state, saved in Lightning's checkpoints."""
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "stopped_epoch": self.stopped_epoch,
            "wait": self._wait,
            "best_state": self._state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (when training resumes from a checkpoint)."""
        self.best_score = float(state_dict["best_score"])
        self.best_epoch = state_dict["best_epoch"]
        self.best_step = state_dict["best_step"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self._wait = int(state_dict["wait"])
        self._state = state_dict["best_state"]


def _number(value: Any) -> float | int | bool | None:
    """A plain number for a number or a 0-d tensor (None for anything else)."""
    if isinstance(value, bool | int | float):
        return value
    if torch.is_tensor(value) and value.dim() == 0:
        return value.item()
    return None
