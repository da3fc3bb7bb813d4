"""Comparative VAE (MODELS.md §5): objectives, training modes, minibatches, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro.distributions import GammaPoisson
from scipy.special import gammaln

from cellpert._errors import CellpertInputError
from cellpert.data import load_screen, write_h5ad_atomic
from cellpert.data.simulate import simulate_comparative
from cellpert.evaluate import block_leakage
from cellpert.models import prepare_anndata
from cellpert.models._components import nb_log_prob_log_mean, poisson_log_prob_log_mean
from cellpert.models.comparative import (
    ComparativeVAE,
    dual_ascent_step,
    gaussian_kl,
    min_norm_coefficient,
    mmd,
    wasserstein_to_zero,
)
from cellpert.models.comparative._datasplitter import ProportionalBatchSampler
from cellpert_cli.main import EXIT_INPUT_ERROR, run


# ---------------------------------------------------------------- min-norm direction
@pytest.mark.parametrize(
    ("g_b", "g_t", "expected"),
    [
        ([1.0, 0.0], [0.0, 1.0], 0.5),  # orthogonal, equal norms: halfway
        ([2.0, 0.0], [1.0, 0.0], 0.0),  # g_t is the shorter vector on the segment: α* = 0
        ([1.0, 0.0], [3.0, 0.0], 1.0),  # g_b shorter: α* = 1
        ([1.0, 1.0], [1.0, 1.0], 0.5),  # identical gradients: any α, ½ by convention
        ([3.0, 0.0], [0.0, 1.0], 0.1),  # closed form (g_t − g_b)·g_t / ‖g_b − g_t‖² = 1 / 10
    ],
)
def test_min_norm_coefficient_closed_form(g_b, g_t, expected):
    alpha = min_norm_coefficient(torch.tensor(g_b), torch.tensor(g_t))
    assert torch.is_tensor(alpha) and alpha.dim() == 0  # stays on the device: no host read
    assert float(alpha) == pytest.approx(expected, abs=1e-6)


def test_min_norm_coefficient_minimises_the_norm_on_random_gradients():
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 20001)
    for _ in range(20):
        g_b, g_t = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
        norms = ((grid[:, None].double() * g_b + (1 - grid[:, None].double()) * g_t) ** 2).sum(1)
        best = float(grid[norms.argmin()])
        assert float(min_norm_coefficient(g_b, g_t)) == pytest.approx(best, abs=1e-4)


# ---------------------------------------------------------------------- dual ascent
def test_dual_ascent_moves_the_multiplier_towards_the_constraint():
    assert dual_ascent_step(1.0, value=0.5, level=0.1, lr=0.5) == pytest.approx(1.2)  # violated: λ grows
    assert dual_ascent_step(1.0, value=0.0, level=0.1, lr=0.5) == pytest.approx(0.95)  # slack: λ shrinks
    assert dual_ascent_step(0.01, value=0.0, level=1.0, lr=1.0) == 0.0  # projected onto λ ≥ 0
    # the training step's path: tensors in, a 0-d tensor out, the same numbers
    step = dual_ascent_step(torch.tensor(1.0), value=torch.tensor(0.5), level=0.1, lr=0.5)
    assert torch.is_tensor(step) and float(step) == pytest.approx(1.2)
    assert float(dual_ascent_step(torch.tensor(0.01), value=torch.tensor(0.0), level=1.0, lr=1.0)) == 0.0



# -------------------------------------------------------------------- loss pieces
def test_loss_pieces_match_hand_computations():
    loc, scale = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.3]])
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    assert torch.allclose(gaussian_kl(loc, scale), expected_kl)
    # squared 2-Wasserstein distance to δ_0: ‖μ‖² + Σσ² = 0.25 + 1 + 4 + 0.09
    assert float(wasserstein_to_zero(loc, scale)) == pytest.approx(5.34)
    x = torch.tensor([[0.0, 3.0, 10.0]])
    mu = torch.tensor([[0.5, 2.0, 12.0]])
    log_theta = torch.tensor([0.3, -1.0, 2.0])
    reference = GammaPoisson(torch.exp(log_theta), torch.exp(log_theta) / mu).log_prob(x).sum(-1)
    assert torch.allclose(nb_log_prob_log_mean(x, torch.log(mu), log_theta), reference, atol=1e-5)
    assert torch.allclose(
        poisson_log_prob_log_mean(x, torch.log(mu)), torch.distributions.Poisson(mu).log_prob(x).sum(-1), atol=1e-5
    )


def test_nb_log_mean_form_stays_accurate_for_large_dispersion_parameters():
    """θ up to 1e8 (near-Poisson genes after long training): the float32 value matches the
    float64 log-pmf to 1e-3 nats per gene (the former θ log θ − (θ + x) log(θ + μ) form was
    off by hundreds)."""
    from scipy.stats import nbinom

    x = np.array([[0.0, 3.0, 10.0, 50.0, 7.0]])
    mu = np.array([[0.5, 2.0, 12.0, 40.0, 7.0]])
    theta = np.array([1.0, 1e3, 1e5, 1e6, 1e8])
    expected = nbinom.logpmf(x, theta, theta / (theta + mu)).sum()
    got = nb_log_prob_log_mean(torch.tensor(x, dtype=torch.float32), torch.log(torch.tensor(mu, dtype=torch.float32)),
                               torch.log(torch.tensor(theta, dtype=torch.float32)))  # fmt: skip
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, abs=5e-3)
    # particles: a (P, B, G) log mean against (B, G) counts gives (P, B)
    many = nb_log_prob_log_mean(torch.tensor(x, dtype=torch.float32),
                                torch.log(torch.tensor(mu, dtype=torch.float32)).expand(3, 1, 5),
                                torch.log(torch.tensor(theta, dtype=torch.float32)))  # fmt: skip
    assert many.shape == (3, 1) and torch.allclose(many, got.expand(3, 1))


def test_nb_log_mean_form_matches_the_pmf_and_its_gradient_for_many_cells_and_per_cell_dispersions():
    """Σ_g lgamma(θ_g) is taken once per gene and broadcast over the cells: values and the
    gradient in log θ must equal GammaPoisson's for B > 1, with θ per gene (G,) and per
    cell (B, G) (``dispersion="gene-batch"``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(4, 6, generator=gen) * 5, generator=gen)
    log_mu = torch.randn(4, 6, generator=gen)
    for shape in ((6,), (4, 6)):
        log_theta = torch.randn(*shape, generator=gen).requires_grad_(True)
        got = nb_log_prob_log_mean(x, log_mu, log_theta)
        (grad,) = torch.autograd.grad(got.sum(), log_theta)
        lt = log_theta.detach().double().requires_grad_(True)
        theta = torch.exp(lt)
        reference = GammaPoisson(theta, theta / torch.exp(log_mu.double())).log_prob(x.double()).sum(-1)
        (ref_grad,) = torch.autograd.grad(reference.sum(), lt)
        assert got.shape == (4,)
        assert torch.allclose(got.double(), reference, atol=1e-4)
        assert torch.allclose(grad.double(), ref_grad, atol=1e-4)


def test_nb_log_mean_form_has_finite_gradients_where_the_softmax_underflows():
    log_mu = torch.tensor([[-200.0, 2.0]], requires_grad=True)  # exp(-200) is 0 in float32
    value = nb_log_prob_log_mean(torch.tensor([[0.0, 3.0]]), log_mu, torch.zeros(2))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(log_mu.grad).all()
    # and they are the right ones: the NB log-pmf in float64 (θ = 1), where exp(-200) is a
    # number; d/dlog μ = x − (x + θ) μ / (θ + μ) per gene
    x, mu, theta = np.array([0.0, 3.0]), np.exp(np.array([-200.0, 2.0])), 1.0
    logpmf = gammaln(x + theta) - gammaln(theta) - gammaln(x + 1) + theta * np.log(theta / (theta + mu)) + x * np.log(mu / (theta + mu))
    assert value.item() == pytest.approx(logpmf.sum(), rel=1e-6)
    np.testing.assert_allclose(log_mu.grad.numpy().ravel(), x - (x + theta) * mu / (theta + mu), rtol=1e-5, atol=1e-6)


def test_mmd_separates_shifted_samples():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 3, generator=gen), torch.randn(200, 3, generator=gen)
    assert float(mmd(a, b)) < 0.05
    assert float(mmd(a, b + 3.0)) > 10 * float(mmd(a, b))
    assert float(mmd(a, b[:0])) == 0.0


def test_mmd_between_groups_equals_mmd_of_the_indexed_rows():
    from cellpert.models.comparative._module import mmd_between_groups

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    in_a = (torch.rand(50, generator=gen) < 0.3).double()
    z = z + 2.0 * in_a[:, None]  # two groups apart
    value = mmd_between_groups(z, in_a, 1.0 - in_a)
    assert float(value) == pytest.approx(float(mmd(z[in_a.bool()], z[~in_a.bool()])), rel=1e-10)
    assert float(mmd_between_groups(z, torch.zeros(50), torch.ones(50))) == 0.0  # one group empty


def test_block_leakage_flags_an_over_specified_salient_space():
    """Constructed case: t̂ holds the true t plus copies of two z dimensions (d_t = 4 > 2)."""
    rng = np.random.default_rng(3)
    z, t = rng.normal(size=(3000, 5)), rng.normal(size=(3000, 2))
    clean = block_leakage(z, t, z @ rng.normal(size=(5, 5)), t @ rng.normal(size=(2, 2)))
    leaky = block_leakage(z, t, z, np.hstack([t, z[:, :2]]))
    assert clean["r2_z_from_t_hat"] < 0.01 and clean["r2_t_from_t_hat"] > 0.99
    assert leaky["r2_z_from_t_hat"] == pytest.approx(0.4, abs=0.03)  # 2 of 5 unit-variance dims
    assert leaky["r2_t_from_t_hat"] > 0.99


# --------------------------------------------------------------------- minibatches
def test_proportional_batches_cover_every_cell_once_in_proportion():
    is_target = np.r_[np.zeros(90, bool), np.ones(910, bool)]
    sampler = ProportionalBatchSampler(is_target, batch_size=128, shuffle=True)
    batches = list(iter(sampler))
    assert len(batches) == len(sampler) == 8
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), np.arange(1000))  # nothing dropped, nothing twice
    for batch in batches:
        n_bg = int((~is_target[batch]).sum())
        assert 11 <= n_bg <= 12  # 90 / 8 background cells per batch
    # fewer background cells than batches: fewer, larger batches, each with background cells
    tiny = ProportionalBatchSampler(np.r_[np.zeros(3, bool), np.ones(997, bool)], batch_size=128)
    assert len(tiny) == 3 and all((~np.r_[np.zeros(3, bool), np.ones(997, bool)][b]).sum() == 1 for b in tiny)


def test_block_shuffled_proportional_batches_read_few_blocks():
    """From a file on disk: still every cell once and the sets in proportion, but each
    minibatch comes from a few blocks of consecutive rows (the window of fetch_factor
    minibatches' share of each set), far fewer than a full shuffle's, in a seeded order."""

    def blocks(batch) -> int:  # blocks of 64 consecutive positions of each set (background: 0-1999)
        b = np.asarray(batch)
        return len(np.unique(np.where(b < 2000, b // 64, 1000 + (b - 2000) // 64)))

    is_target = np.r_[np.zeros(2000, bool), np.ones(8000, bool)]
    torch.manual_seed(0)
    full = list(ProportionalBatchSampler(is_target, batch_size=256))
    torch.manual_seed(0)
    batches = list(ProportionalBatchSampler(is_target, batch_size=256, block_size=64, fetch_factor=4))
    assert len(batches) == len(full) == 40
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(10_000))
    for batch in batches:
        assert 50 <= int((~is_target[batch]).sum()) <= 51  # 2000 / 40 background cells per batch
    # each set's window is 4 minibatches' share (4 x 200 target rows: 12.5 blocks; 4 x 50
    # background rows: 3.1 blocks), shuffled: a minibatch touches more than one window's
    # worth of neither, and more blocks than a plain run of consecutive rows would
    touched = [blocks(b) for b in batches]
    assert max(touched) <= 14 + 5 and min(touched) > 6
    assert np.mean(touched) < 0.2 * np.mean([blocks(b) for b in full])
    torch.manual_seed(0)
    again = list(ProportionalBatchSampler(is_target, batch_size=256, block_size=64, fetch_factor=4))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


# -------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def simulated():
    return simulate_comparative(seed=0, n_background=600, n_target=600, n_background_latent=3, n_salient_latent=2, n_genes=60)


def _setup(adata, **kwargs):
    prepared = prepare_anndata(load_screen(adata.copy(), warn=False))
    ComparativeVAE.setup_anndata(prepared, **kwargs)
    return prepared


@pytest.fixture(scope="module")
def trained(simulated):
    adata = _setup(simulated)
    model = ComparativeVAE(adata, n_background_latent=3, n_salient_latent=2, n_hidden=64, seed=0)
    model.train(max_epochs=40, enable_progress_bar=False)
    return model


def test_membership_from_controls_and_from_an_obs_column(simulated):
    adata = _setup(simulated)
    assert np.array_equal(adata.obs["cellpert_is_target"].to_numpy() == 1, simulated.obs["perturbation"].to_numpy() == "target")
    by_column = _setup(simulated, background_key="perturbation", background="control")
    assert np.array_equal(by_column.obs["cellpert_is_target"], adata.obs["cellpert_is_target"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"background_key": "perturbation", "background": "ctrl"}, "do not occur"),
        ({"background_key": "perturbation", "background": ["control", "target"]}, "every cell is a background"),
        ({"background_key": "nope", "background": "control"}, "no column 'nope'"),
    ],
)
def test_bad_membership_is_a_clear_error(simulated, kwargs, message):
    with pytest.raises(CellpertInputError, match=message):
        _setup(simulated, **kwargs)


def test_recovers_the_blocks_when_correctly_specified(trained, simulated):
    test = simulated.obs["cellpert_split"].to_numpy() != "train"
    target = trained.is_target() & test
    z_hat = trained.get_latent_representation()
    t_hat = trained.get_latent_representation(kind="salient")
    scores = block_leakage(
        simulated.obsm["X_true_background"][target], simulated.obsm["X_true_salient"][target], z_hat[target], t_hat[target]
    )
    assert scores["r2_z_from_z_hat"] > 0.8 and scores["r2_t_from_t_hat"] > 0.8
    assert scores["r2_z_from_t_hat"] < 0.2 and scores["r2_t_from_z_hat"] < 0.2
    # background cells' salient posteriors are pushed to 0
    assert np.mean(np.sum(t_hat[~trained.is_target()] ** 2, 1)) < 0.1 * np.mean(np.sum(t_hat[target] ** 2, 1))


def test_training_improves_the_heldout_iwelbo(simulated, trained):
    fresh = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=64, seed=0)
    before = fresh.get_iwelbo(split="test", n_samples=20)
    after = trained.get_iwelbo(split="test", n_samples=20)
    assert after > before + 10
    # IWELBO >= ELBO with the same 20 draws (same seed): per cell log mean_s w_s >= mean_s log w_s,
    # and the ELBO differs from mean_s log w_s only by the analytic KL in place of its
    # sampled estimate, a Monte Carlo error of mean 0 whose average over the 120 test cells
    # has SD ~0.03 nats (measured), far below the gap (~0.7 nats per cell at this training)
    iw = trained.get_iwelbo(split="test", n_samples=20, return_mean=False)
    el = trained.get_elbo(split="test", n_samples=20, return_mean=False)
    assert (iw - el).mean() > 0.1, (iw - el).mean()


def test_seeded_training_is_deterministic_and_save_load_round_trips(simulated, tmp_path):
    def fit():
        model = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=32, seed=5)
        model.train(max_epochs=3, mode="multi-objective", enable_progress_bar=False)
        return model

    first, second = fit(), fit()
    assert np.array_equal(first.get_latent_representation(), second.get_latent_representation())
    first.save(tmp_path / "model", save_anndata=False)
    loaded = ComparativeVAE.load(str(tmp_path / "model"), adata=_setup(simulated))
    for kind in ("background", "salient"):
        assert np.allclose(
            loaded.get_latent_representation(kind=kind), first.get_latent_representation(kind=kind)
        )
    assert loaded.get_iwelbo(split="test", n_samples=10) == pytest.approx(first.get_iwelbo(split="test", n_samples=10))


def test_multi_objective_keeps_the_penalty_out_of_the_min_norm_weights(simulated):
    """α* balances the two ELBOs only: a large penalty weight (inside g_b it would drive α*
    to ~0.01 and leave the background ELBO unoptimised) does not move it to 0."""
    model = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=32)
    model.train(max_epochs=2, mode="multi-objective", penalty_weight=100.0, gradient_clip_val=1e3, enable_progress_bar=False)
    alpha = model.history["mgda_alpha"].to_numpy(dtype=float).ravel()
    assert alpha.shape[0] == 2 and np.all((alpha > 0.2) & (alpha <= 1))
    penalty = model.history["wasserstein_train"].to_numpy(dtype=float).ravel()
    assert penalty[-1] < penalty[0]  # the penalty still acts


@pytest.mark.parametrize(("level", "direction"), [(0.001, 1), (0.9, -1)])
def test_constrained_mode_moves_the_multiplier_towards_the_constraint(simulated, level, direction):
    """ε far below the background penalty raises λ; ε far above it lowers λ (to 0)."""
    model = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=32)
    model.train(
        max_epochs=4, mode="constrained", constraint_level=level, penalty_weight=1.0, dual_lr=0.05, enable_progress_bar=False
    )
    trajectory = model.history["penalty_weight"]["penalty_weight"].to_numpy()
    assert len(trajectory) == 4
    assert np.sign(model.final_penalty_weight_ - 1.0) == direction
    assert np.all(np.sign(np.diff(trajectory)) == direction) or (direction < 0 and trajectory[-1] == 0)


def test_predictive_means_background_and_target_rows(trained, simulated):
    rows = trained.dosage_from_labels(["control", "target"])
    assert rows.tolist() == [[0.0], [1.0]]
    means = trained.get_predictive_means(rows, n_samples=200, transform="rho", seed=0)
    assert means.shape == (2, simulated.n_vars) and np.allclose(means.sum(1), 1.0, atol=1e-4)
    again = trained.get_predictive_means(rows, n_samples=200, transform="rho", seed=0)
    assert np.array_equal(means, again)
    assert np.abs(means[1] - means[0]).max() > 1e-3  # the salient latent changes the prediction


def test_bad_training_options_are_clear_errors(simulated):
    # an untrained model: a bad option must not reach (or change) the shared trained one
    model = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=16)
    with pytest.raises(CellpertInputError, match="unknown mode"):
        model.train(max_epochs=1, mode="pareto")
    with pytest.raises(CellpertInputError, match="constraint_level"):
        model.train(max_epochs=1, mode="constrained", constraint_level=2.0)
    assert not model.is_trained_


# ---------------------------------------------------------------------------- CLI
def test_cli_train_export_evaluate(tmp_path, simulated, capsys):
    path = tmp_path / "cmp.h5ad"
    write_h5ad_atomic(simulated, path)
    run_dir = tmp_path / "run"
    code = run(
        ["train", str(path), "-m", "comparative", "-o", str(run_dir), "--mode", "constrained",
         "--n-background-latent", "3", "--n-salient-latent", "4", "--max-epochs", "3", "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert run(["export-latents", str(path), "--model", str(run_dir)]) == 0
    capsys.readouterr()
    assert run(["evaluate-ate", str(path), "--model", str(run_dir), "--n-particles", "50"]) == 0
    report = capsys.readouterr().out
    assert "test IWELBO -" in report and "nan" not in report.split("test IWELBO")[1].split()[0]
    import anndata as ad

    out = ad.read_h5ad(path)
    assert out.obsm["X_comparative_background"].shape == (out.n_obs, 3)
    assert out.obsm["X_comparative_salient"].shape == (out.n_obs, 4)
    assert out.uns["cellpert"]["models"]["comparative"]["training"]["mode"] == "constrained"
    assert "ate_comparative" in out.varm
    assert "comparative" in out.uns["cellpert"]["ate_metrics"]


def test_cli_background_value_errors_are_one_line(tmp_path, simulated, capsys):
    path = tmp_path / "cmp.h5ad"
    write_h5ad_atomic(simulated, path)
    code = run(["train", str(path), "-m", "comparative", "-o", str(tmp_path / "r"), "--background", "ctrl", "--quiet"])
    assert code == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert "error: background value(s) ['ctrl'] do not occur" in err and "Traceback" not in err


def test_poisson_likelihood_trains_and_predicts(simulated):
    model = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=32, likelihood="poisson")
    theta_before = model.module.decoder.log_theta.detach().clone()
    model.train(max_epochs=2, enable_progress_bar=False)
    # (a separate untrained model: evaluating this one first would leave it in eval mode for fit)
    fresh = ComparativeVAE(_setup(simulated), n_background_latent=3, n_salient_latent=2, n_hidden=32, likelihood="poisson")
    untrained = fresh.get_iwelbo(split="test", n_samples=10)
    # training under the Poisson likelihood improves the held-out IWELBO (measured: from
    # -1033 to -887 nats per cell after 2 epochs; the 10-sample estimate varies by ~2 nats)
    assert model.get_iwelbo(split="test", n_samples=10) > untrained + 10
    assert torch.equal(model.module.decoder.log_theta, theta_before)  # no dispersion under Poisson
    counts = model.get_predictive_means(np.array([[0.0], [1.0]]), n_samples=20, transform="counts")
    assert counts.shape == (2, simulated.n_vars) and np.all(counts >= 0)
    with pytest.raises(CellpertInputError, match="likelihood"):
        ComparativeVAE(_setup(simulated), likelihood="zinb")


def test_nb_sample_draws_negative_binomial_counts_in_parallel_parts():
    """The parallel CPU path (large draws) gives NB(μ, θ) counts: mean μ, variance
    μ + μ²/θ (checked against the moments and SciPy's pmf), the same counts for any thread
    count under one seed, and the small path is Pyro's GammaPoisson."""
    from scipy.stats import nbinom

    from cellpert.models._components import _likelihood as lik

    mu = torch.tensor([0.2, 3.0, 40.0]).repeat(4, 133_334, 1)  # (4, 133334, 3): 1.6M values
    theta = torch.tensor([0.5, 2.0, 10.0])
    assert mu.numel() >= lik.PARALLEL_SAMPLE_MIN
    draws = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            draws[n] = lik.nb_sample(mu, theta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[1], draws[2])
    # under inference mode (evaluation), as a caller's in-place update needs
    for n in (1, 2):
        torch.set_num_threads(n)
        with torch.inference_mode():
            torch.manual_seed(0)
            inside = lik.nb_sample(mu, theta)
            inside += 0
        torch.set_num_threads(threads)
        assert torch.equal(inside, draws[1])
    x = draws[1].reshape(-1, 3).double()
    m, t = mu[0, 0].double(), theta.double()
    assert torch.allclose(x.mean(0), m, rtol=0.01)
    assert torch.allclose(x.var(0), m + m**2 / t, rtol=0.03)
    p0 = (x[:, 0] == 0).double().mean()
    assert float(p0) == pytest.approx(nbinom.pmf(0, 0.5, 0.5 / (0.5 + 0.2)), abs=2e-3)
    torch.manual_seed(1)
    small = lik.nb_sample(mu[:1, :10], theta)
    torch.manual_seed(1)
    assert torch.equal(small, GammaPoisson(theta.expand(1, 10, 3), theta / mu[:1, :10], validate_args=False).sample())
