"""Mixed precision (issue 14): the linear layers may run in bfloat16 under autocast, the
likelihood, densities and KL terms stay in float32 (``cellpert.models._training.PRECISIONS``).

CPU autocast supports bfloat16, so the mixed-precision path is exercised here without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from cellpert._errors import CellpertInputError
from cellpert.data import load_screen
from cellpert.data.simulate import simulate_comparative, simulate_sams
from cellpert.models import SAMSVAE, SVAEPlus, prepare_anndata
from cellpert.models.comparative import ComparativeVAE


def _model(name: str):
    if name == "comparative":
        adata = simulate_comparative(seed=0, n_background=200, n_target=200, n_background_latent=3,
                                     n_salient_latent=2, n_genes=40)  # fmt: skip
        cls, kwargs = (
            ComparativeVAE,
            {"n_background_latent": 3, "n_salient_latent": 2, "n_hidden": 32},
        )
    else:
        adata = simulate_sams(seed=0, n_perturbations=4, n_latent=3, n_genes=40, n_cells_per_perturbation=(30, 5, 5),
                              n_control_cells=(30, 5, 5))  # fmt: skip
        cls = SAMSVAE if name == "samsvae" else SVAEPlus
        kwargs = {"n_latent": 3, "n_hidden": 32}
    prepared = prepare_anndata(load_screen(adata, warn=False))
    cls.setup_anndata(prepared)
    return cls(prepared, seed=0, **kwargs)


def _batch(model) -> dict[str, torch.Tensor]:
    loader = model._make_data_loader(model.adata, batch_size=64, shuffle=False)
    return next(iter(loader))


@pytest.mark.parametrize("name", ["samsvae", "svae-plus", "comparative"])
def test_loss_terms_stay_float32_under_bfloat16_autocast(name):
    model = _model(name)
    module = model.module
    module.train()
    batch = _batch(model)
    torch.manual_seed(0)
    _, _, reference = module(batch)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inference, generative, mixed = module(batch)
        # the layers did run in bfloat16 (the test would pass trivially otherwise)
        hidden = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        assert hidden(torch.zeros(1, hidden.in_features)).dtype == torch.bfloat16
    assert mixed.loss.dtype == torch.float32
    assert mixed.reconstruction_loss_sum.dtype == torch.float32
    # every network's outputs (Normal parameters, latent draws, decoder outputs) are float32
    for key, value in {**inference, **generative}.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert value.dtype == torch.float32, key
    # the same draws: only the layers' rounding differs (bfloat16 keeps ~3 significant digits)
    assert torch.isfinite(mixed.loss)
    assert abs(float(mixed.loss.detach()) - float(reference.loss.detach())) < 0.02 * abs(
        float(reference.loss.detach())
    )


def test_training_in_bf16_mixed_keeps_float32_parameters_and_learns():
    model = _model("samsvae")
    # with gradient clipping, as the Norman settings train: Lightning's mixed-precision
    # plugin refuses to clip with a fused optimizer (session 16 fused Adam everywhere)
    model.train(max_steps=60, precision="bf16-mixed", early_stopping=False, batch_size=64, gradient_clip_val=100)
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    history = model.history["elbo_train"].to_numpy().ravel()
    assert history[-1] < history[0]


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(CellpertInputError, match="precision must be one of"):
        _model("samsvae").train(max_steps=1, precision="8")


@pytest.mark.parametrize("param_lrs", [None, {"mask_logits": 3e-2}])
def test_adam_is_fused_on_the_cpu_except_under_mixed_precision(param_lrs):
    """torch's fused Adam (one kernel per parameter) wherever it exists; not under
    ``bf16-mixed`` or ``16-mixed``, whose Lightning plugin refuses clipping with a fused optimizer.
    The fused step is the same update as torch's default loop, up to rounding."""
    from types import SimpleNamespace

    from cellpert.models.samsvae._trainingplan import PerturbationTrainingPlan

    module = _model("samsvae").module
    plan = PerturbationTrainingPlan(module, param_lrs=param_lrs)
    optimizer = plan.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert len(optimizer.param_groups) == (1 if param_lrs is None else 2)
    for precision in ("16-mixed", "bf16-mixed"):  # as a Lightning trainer reports them
        plan._trainer = SimpleNamespace(precision=precision)
        assert not any(group["fused"] for group in plan.configure_optimizers()["optimizer"].param_groups)
    # one step from the same gradients: fused and the default loop agree
    params = [p for p in module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    after = {}
    for fused in (True, False):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6, fused=fused)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        after[fused] = [p.detach().clone() for p in params]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after[True], after[False], strict=True))
