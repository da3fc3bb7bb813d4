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
"""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput

__all__ = ["EpochMetricsMixin"]


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
                    self.log(
                        n,
                        float(total / count),
                        on_step=False,
                        on_epoch=True,
                        prog_bar=n == "train_loss",
                    )
            store.clear()
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=self.use_sync_dist)

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
            self.log(
                "loss",
                float(total / count),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                logger=False,
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._flush_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._flush_epoch("validation", self.val_metrics)
