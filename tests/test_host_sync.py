"""No host reads in a training step (issue 14, GPU): ``.item()``, ``float(tensor)``,
``bool(tensor)`` or ``.tolist()`` on a device tensor makes the host wait for the device on
every step. Our training steps must not do any (checked on CPU by catching the reads that
our own code makes while Lightning runs a step; torch.optim's and Lightning's are theirs:
Adam's step counter lives on the host, for example)."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch.strategies.strategy import Strategy

from cellpert.data import load_screen
from cellpert.data.simulate import simulate_comparative, simulate_sams
from cellpert.models import CPAVAE, SAMSVAE, SVAE, ConditionalVAE, SVAEPlus, prepare_anndata
from cellpert.models.comparative import ComparativeVAE

SAMS_LIKE = {"samsvae": SAMSVAE, "cpavae": CPAVAE, "conditional-vae": ConditionalVAE, "svae": SVAE, "svae-plus": SVAEPlus}


def _model(name: str):
    if name.startswith("comparative"):
        adata = simulate_comparative(seed=0, n_background=200, n_target=200, n_background_latent=3,
                                     n_salient_latent=2, n_genes=40)  # fmt: skip
        cls, kwargs = ComparativeVAE, {"n_background_latent": 3, "n_salient_latent": 2, "n_hidden": 16}
    else:
        adata = simulate_sams(seed=0, n_perturbations=4, n_latent=3, n_genes=40, n_cells_per_perturbation=(40, 5, 5),
                              n_control_cells=(40, 5, 5))  # fmt: skip
        cls, kwargs = SAMS_LIKE[name], {"n_latent": 3, "n_hidden": 16}
    prepared = prepare_anndata(load_screen(adata, warn=False))
    cls.setup_anndata(prepared)
    return cls(prepared, seed=0, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """The host reads our code makes inside training steps (name and where)."""
    inside = {"step": False}
    reads: list[tuple[str, str]] = []
    step = Strategy.training_step

    def watched_step(self, *args, **kwargs):
        inside["step"] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            inside["step"] = False

    def guard(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if inside["step"] and "/cellpert/" in caller.co_filename:
                reads.append((name, f"{caller.co_filename}:{caller.co_name}"))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        guard(name)
    # a boolean index: its output size is read on the host
    getitem = torch.Tensor.__getitem__

    def index(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        caller = sys._getframe(1).f_code
        if inside["step"] and "/cellpert/" in caller.co_filename and any(
            torch.is_tensor(k) and k.dtype == torch.bool for k in keys
        ):
            reads.append(("boolean index", f"{caller.co_filename}:{caller.co_name}"))
        return getitem(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", index)
    monkeypatch.setattr(Strategy, "training_step", watched_step)
    return reads


@pytest.mark.parametrize(
    ("name", "mode"),
    [(name, None) for name in SAMS_LIKE]
    + [("comparative", mode) for mode in ("standard", "multi-objective", "constrained", "mmd")],
)
def test_training_steps_never_read_a_tensor_on_the_host(host_reads, name, mode):
    model = _model(name)
    options = {"mode": mode} if mode else {"early_stopping": False}
    if mode == "mmd":
        options = {"mode": "standard", "mmd_weight": 1.0}
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False, **options)
    assert host_reads == []
    assert len(model.history["elbo_train"]) == 2  # the steps did run


def test_the_guard_catches_a_host_read(host_reads, monkeypatch):
    """The check can fail: a training step that reads its loss on the host is caught."""
    from cellpert.models._trainingplan import CellpertTrainingPlan

    step = CellpertTrainingPlan.training_step

    def reading_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        float(loss.detach())
        return loss

    monkeypatch.setattr(CellpertTrainingPlan, "training_step", reading_step)
    # the guard looks for our files: run the reading step as if it were ours
    reading_step.__code__ = reading_step.__code__.replace(co_filename="/x/cellpert/models/_trainingplan.py")
    _model("samsvae").train(max_epochs=1, batch_size=64, early_stopping=False, enable_progress_bar=False)
    assert host_reads and host_reads[0][0] == "__float__"
