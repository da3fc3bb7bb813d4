"""ATE evaluation: model ATE, wiring of baselines and metrics, IWELBO, writing, the command."""

from __future__ import annotations

import copy
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from cellpert._errors import CellpertInputError
from cellpert.data import load_screen
from cellpert.evaluate import (
    ate_metrics,
    compute_ate_evaluation,
    data_ate,
    label_splits,
    model_ate,
)
from cellpert.runs import evaluate_ate
from cellpert_cli._evaluate import evaluate_ate as evaluate_ate_command

from conftest import ZERO_GENE, file_digest


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)  # tiny models: more threads only add overhead on shared cores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def trained(sams_run):
    """The session's SAMS-VAE run (conftest.sams_run): screen path, run directory, loaded run.

    A SAMS-VAE (mean-field) briefly trained on a simulated screen with known effects; the
    screen has one extra all-zero gene that the run drops (``drop_zero_genes``).
    """
    return sams_run.path, sams_run.run_dir, sams_run.run


def test_the_loaded_run_is_the_trained_model(sams_run):
    """What ``load_run`` gives back is the model ``train_run`` trained: same weights, same latents."""
    trained, loaded = sams_run.trained.model, sams_run.run.model
    before, after = trained.module.state_dict(), loaded.module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    np.testing.assert_array_equal(
        trained.get_latent_representation(kind="latent"), loaded.get_latent_representation(kind="latent")
    )
    assert loaded.perturbation_names == trained.perturbation_names
    assert ZERO_GENE not in loaded.adata.var_names and loaded.adata.n_vars == trained.adata.n_vars == 40


# ------------------------------------------------------------------ model ATE
def test_model_ate_recovers_known_effects_and_a_broken_model_does_not(trained):
    """Model ATEs track the effects of the simulated screen; zeroed embeddings do not."""
    _, _, run = trained
    ev = compute_ate_evaluation(run.screen, run.model, n_particles=400, n_groups=10, data_cells="split")
    # held-out cells' data ATE (the model never saw them) and all cells'
    assert ev.summary.loc["model_pearson", "test"] > 0.75
    assert ev.summary.loc["model_pearson", "all"] > 0.8
    assert ev.summary.loc["model_pearson_top", "all"] > 0.8
    broken = copy.deepcopy(run.model)
    broken.module.embedding_loc.data.zero_()
    cf = {"estimator": "counterfactual", "latent_shift": "model"}
    own = compute_ate_evaluation(run.screen, run.model, n_particles=400, n_groups=10, **cf)
    assert own.summary.loc["model_pearson", "test"] > 0.75
    bad = compute_ate_evaluation(run.screen, broken, n_particles=400, n_groups=10, **cf)
    # with the model's own shifts, what is left is the part of the effects that all
    # perturbations share (the random embeddings of q(E) move every label alike), far
    # below the trained model
    for col in ("all", "test"):
        assert bad.summary.loc["model_pearson", col] < own.summary.loc["model_pearson", col] - 0.25
    prior = compute_ate_evaluation(run.screen, broken, estimator="prior", n_particles=400, n_groups=10)
    assert prior.summary.loc["model_pearson", "all"] < 0.5


def test_model_ate_is_seeded_vectorised_and_its_interval_shrinks(trained):
    _, _, run = trained
    labels = ["P000", "P003", run.screen.combination_labels[0]]
    a = model_ate(run.model, labels, n_particles=200, n_groups=10, seed=3)
    b = model_ate(run.model, labels, n_particles=200, n_groups=10, seed=3)
    c = model_ate(run.model, labels, n_particles=200, n_groups=10, seed=4)
    pd.testing.assert_frame_equal(a.ate, b.ate)
    assert not np.allclose(a.ate, c.ate)
    assert (a.lo.to_numpy() <= a.ate.to_numpy()).all() and (a.ate.to_numpy() <= a.hi.to_numpy()).all()
    # one label at a time (several calls, max_rows=1) estimates the same thing
    d = model_ate(run.model, labels, n_particles=200, n_groups=10, seed=3, max_rows=1)
    assert np.abs(d.ate.to_numpy() - a.ate.to_numpy()).max() < 4 * (a.hi - a.lo).to_numpy().max()
    # the Monte Carlo interval narrows like 1/sqrt(particles)
    big = model_ate(run.model, labels, n_particles=1600, n_groups=10, seed=3)
    ratio = np.median((big.hi - big.lo).to_numpy() / (a.hi - a.lo).to_numpy())
    assert 0.2 < ratio < 0.55  # expected sqrt(200/1600) = 0.35
    # the interval covers an independent estimate most of the time (90% nominal)
    covered = ((c.ate >= big.lo - (a.hi - a.lo) / 2) & (c.ate <= big.hi + (a.hi - a.lo) / 2)).to_numpy().mean()
    assert covered > 0.7


def test_model_ate_library_size_options(trained):
    _, _, run = trained
    screen = run.screen
    pool = screen.library_size[screen.is_control]
    fixed = model_ate(run.model, ["P000"], n_particles=100, n_groups=5, seed=0)
    emp = model_ate(
        run.model, ["P000"], n_particles=100, n_groups=5, seed=0, library_size="empirical", control_library_sizes=pool
    )
    assert emp.config["library_size"] == "empirical"
    assert emp.config["control_library_median"] == pytest.approx(np.median(pool))
    assert not np.allclose(fixed.ate, emp.ate)
    assert np.corrcoef(fixed.ate["P000"], emp.ate["P000"])[0, 1] > 0.8  # same effect, other depth
    with pytest.raises(CellpertInputError, match="control"):
        model_ate(run.model, ["P000"], n_particles=100, library_size="empirical")
    with pytest.raises(CellpertInputError, match="control label"):
        model_ate(run.model, ["control"], n_particles=100)
    with pytest.raises(CellpertInputError, match="n_groups"):
        model_ate(run.model, ["P000"], n_particles=10, n_groups=20)


# -------------------------------------------------------- wiring and IWELBO
def test_iwelbo_is_at_least_the_elbo_and_is_what_the_evaluation_reports(trained):
    _, _, run = trained
    model = run.model
    test = model.split_indices("test")
    iw = model.get_iwelbo(indices=test, n_samples=30, seed=0, return_mean=False)
    elbo = model.get_elbo(indices=test, n_samples=30, seed=0, return_mean=False)
    assert (iw >= elbo - 1e-6).all()
    assert iw.mean() > elbo.mean() + 1e-3
    ev = compute_ate_evaluation(run.screen, model, n_particles=50, n_groups=5, iwelbo_samples=30)
    assert ev.iwelbo == pytest.approx(float(iw.mean()), rel=1e-9)
    assert ev.summary.loc["iwelbo", "test"] == pytest.approx(ev.iwelbo)
    assert ev.summary.loc["n_iwelbo_cells", "test"] == len(test)
    assert np.isnan(ev.summary.loc["iwelbo", "train"])


def test_baselines_use_training_cells_and_metrics_are_wired(trained):
    _, _, run = trained
    screen = run.screen
    ev = compute_ate_evaluation(screen, run.model, n_particles=50, n_groups=5, data_cells="all")
    split = run.model.split_values()
    train_ate = data_ate(screen, cells=split == "train")
    all_ate = data_ate(screen)
    combo = screen.combination_labels[0]
    a, b = combo.split("+")
    expected = train_ate[a] + train_ate[b]
    np.testing.assert_allclose(ev.baselines["additive"][combo], expected, atol=1e-12)
    # ... and not the effects computed on all cells
    assert np.abs(ev.baselines["additive"][combo] - (all_ate[a] + all_ate[b])).max() > 1e-3
    np.testing.assert_allclose(ev.baselines["additive"]["P000"], train_ate["P000"], atol=1e-12)
    np.testing.assert_allclose(ev.baselines["mean"][combo], train_ate.mean(axis=1), atol=1e-12)
    # per-perturbation and summary metrics are ate_metrics on the right tables
    pd.testing.assert_frame_equal(ev.data_ate, all_ate)
    per, summary = ate_metrics(all_ate, ev.model_ate.ate, top_n=20)
    np.testing.assert_allclose(ev.per_perturbation["model_pearson"], per["pearson"])
    assert ev.summary.loc["model_pearson", "all"] == pytest.approx(summary["pearson"])
    _, add_summary = ate_metrics(all_ate, ev.baselines["additive"], top_n=20)
    assert ev.summary.loc["additive_pearson_top", "all"] == pytest.approx(add_summary["pearson_top"])
    # random-like split: every label in every split, so the columns agree (data ATE over all cells)
    assert set(ev.per_perturbation["split"]) == {"train+val+test"}
    assert ev.summary.loc["model_pearson", "test"] == pytest.approx(ev.summary.loc["model_pearson", "all"])
    # by default each split is scored on its own cells, and the table uses the test cells
    held = compute_ate_evaluation(screen, run.model, n_draws=10, ceiling=False)
    assert held.summary.loc["model_pearson", "test"] != pytest.approx(held.summary.loc["model_pearson", "all"])
    test_ate = held.data_ate
    per, _ = ate_metrics(test_ate, held.model_ate.ate, top_n=20)
    np.testing.assert_allclose(held.per_perturbation.loc[per.index, "model_pearson"], per["pearson"])


def test_label_splits_by_hand():
    labels = np.array(["control", "A", "A", "B", "A+B", "A+B", "C", "control"])
    split = np.array(["train", "train", "val", "train", "test", "test", "unused", "test"])
    out = label_splits(labels, split, ["control"])
    assert out.loc["A", "split"] == "train+val"
    assert out.loc["B", "split"] == "train"
    assert out.loc["A+B", "split"] == "test"
    assert out.loc["C", "split"] == "none"
    assert "control" not in out.index
    assert label_splits(labels, None, ["control"])["split"].eq("none").all()


def test_combination_labels_are_scored_on_test_only(trained):
    """A held-out combination is a test label; the test column scores only it."""
    _, _, run = trained
    screen = run.screen
    combo = screen.combination_labels[0]
    split = np.where(screen.labels == combo, "test", np.where(np.arange(screen.n_cells) % 5 == 0, "val", "train"))
    ev = compute_ate_evaluation(screen, run.model, split=split, n_particles=50, n_groups=5)
    assert ev.per_perturbation.loc[combo, "split"] == "test"
    assert ev.summary.loc["model_n_perturbations", "test"] == 1
    _, s = ate_metrics(ev.data_ate[[combo]], ev.model_ate.ate, top_n=20)
    assert ev.summary.loc["model_pearson", "test"] == pytest.approx(s["pearson"])
    # the baseline never saw the held-out combination's cells
    parts = combo.split("+")
    train_ate = data_ate(screen, cells=split == "train")
    np.testing.assert_allclose(ev.baselines["additive"][combo], train_ate[parts].sum(axis=1), atol=1e-12)


# ------------------------------------------------------------------ writing
def test_results_written_and_read_back_with_plain_anndata(trained, tmp_path):
    path, run_dir, _ = trained
    out = tmp_path / "evaluated.h5ad"
    before = file_digest(path)
    ev = evaluate_ate(path, model_dir=run_dir, out=out, estimator="prior", n_particles=100, n_groups=5)
    assert file_digest(path) == before  # --out leaves the input alone
    back = ad.read_h5ad(out)
    for key in ("ate_data", "ate_samsvae", "ate_samsvae_lo", "ate_samsvae_hi"):
        frame = back.varm[key]
        assert isinstance(frame, pd.DataFrame)
        assert list(frame.index) == list(back.var_names)
        assert list(frame.columns) == list(ev.data_ate.columns)
        assert frame.loc[ZERO_GENE].isna().all()  # dropped by the run
        assert frame.drop(index=ZERO_GENE).notna().all().all()
    np.testing.assert_allclose(back.varm["ate_samsvae"].drop(index=ZERO_GENE), ev.model_ate.ate, rtol=1e-12)
    assert (back.varm["ate_samsvae_lo"] <= back.varm["ate_samsvae_hi"]).drop(index=ZERO_GENE).all().all()
    entry = back.uns["cellpert"]["ate_metrics"]["samsvae"]
    assert isinstance(entry["per_perturbation"], pd.DataFrame)
    assert isinstance(entry["summary"], pd.DataFrame)
    assert entry["summary"].loc["model_pearson", "test"] == pytest.approx(ev.summary.loc["model_pearson", "test"])
    assert set(entry["per_perturbation"].columns) >= {"split", "n_cells", "model_pearson", "additive_pearson_top"}
    assert entry["config"]["model_ate_n_particles"] == 100
    assert entry["model"]["model"] == "samsvae"
    assert entry["model"]["run_dir"] == str(run_dir.resolve())
    # the screen's own uns survives
    assert "ground_truth" in back.uns["cellpert"]


def test_input_untouched_when_evaluation_fails(trained, tmp_path, monkeypatch):
    path, run_dir, _ = trained
    # a screen whose genes do not match the model's
    bad = ad.read_h5ad(path)
    bad.var_names = [f"x{g}" for g in bad.var_names]
    bad_path = tmp_path / "mismatch.h5ad"
    bad.write_h5ad(bad_path)
    before = file_digest(bad_path)
    with pytest.raises(CellpertInputError, match="genes"):
        evaluate_ate(bad_path, model_dir=run_dir, n_particles=50, n_groups=5)
    assert file_digest(bad_path) == before
    # a failure while writing the file: the in-place update is atomic
    copy_path = tmp_path / "copy.h5ad"
    shutil.copy(path, copy_path)
    before = file_digest(copy_path)

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError, match="disk full"):
        evaluate_ate(copy_path, model_dir=run_dir, n_particles=50, n_groups=5)
    assert file_digest(copy_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.h5ad", "mismatch.h5ad"]


# ------------------------------------------------------------------ command
def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate-ate")(evaluate_ate_command)

    @app.callback()
    def _root() -> None:
        """Test app."""

    return app


def test_command_end_to_end(trained, tmp_path):
    path, run_dir, _ = trained
    screen_copy = tmp_path / "screen.h5ad"
    shutil.copy(path, screen_copy)
    runner = CliRunner()
    result = runner.invoke(
        _app(),
        [
            "evaluate-ate", str(screen_copy), "--model", str(run_dir), "--n-particles", "100",
            "--n-groups", "5", "--report", str(tmp_path / "r.html"), "--metrics-out", str(tmp_path / "m.csv"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "IWELBO" in result.output
    for name in ("model", "additive", "mean"):
        assert any(line.startswith(name) for line in result.output.splitlines())
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "model_pearson" in html
    per = pd.read_csv(tmp_path / "m.csv", index_col=0)
    assert "model_pearson_top" in per.columns and len(per) == 9
    back = ad.read_h5ad(screen_copy)  # updated in place
    assert "ate_samsvae" in back.varm and "samsvae" in back.uns["cellpert"]["ate_metrics"]
    # the summary file is the summary written into the screen (same evaluation, same seed),
    # not only some number: model_pearson per split round-trips through the CSV
    summary = pd.read_csv(tmp_path / "m_summary.csv", index_col=0)
    stored = back.uns["cellpert"]["ate_metrics"]["samsvae"]["summary"]
    np.testing.assert_allclose(
        summary.loc["model_pearson", ["test", "all"]].to_numpy(float),
        stored.loc["model_pearson", ["test", "all"]].to_numpy(float),
        rtol=1e-12,
    )
    assert stored.loc["model_pearson", "test"] > 0.75  # the trained model's level (see the first test)

    # data ATE alone, with a PNG figure and a new output file
    out = tmp_path / "data.h5ad"
    result = runner.invoke(_app(), ["evaluate-ate", str(path), "--report", str(tmp_path / "d.png"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    back = ad.read_h5ad(out)
    assert "ate_data" in back.varm and "data" in back.uns["cellpert"]["ate_metrics"]
    assert not any(k.startswith("ate_samsvae") for k in back.varm)
    expected = data_ate(load_screen(path, warn=False))
    np.testing.assert_allclose(back.varm["ate_data"].loc[expected.index, expected.columns], expected)

    # bad options fail before anything is computed
    result = runner.invoke(_app(), ["evaluate-ate", str(path), "--library-size", "huge"])
    assert result.exit_code != 0
    assert isinstance(result.exception, CellpertInputError)


def test_registered_command_errors_are_one_line_and_leave_the_file(trained, tmp_path, capsys):
    from cellpert_cli import main

    if "evaluate-ate" not in {c.name for c in main.app.registered_commands}:
        pytest.skip("evaluate-ate is not registered in cli/main.py yet")
    path, run_dir, _ = trained
    bad = ad.read_h5ad(path)
    bad.var_names = [f"x{g}" for g in bad.var_names]
    bad_path = tmp_path / "mismatch.h5ad"
    bad.write_h5ad(bad_path)
    before = file_digest(bad_path)
    assert main.run(["evaluate-ate", str(bad_path), "--model", str(run_dir), "--n-particles", "20"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "genes" in err
    assert file_digest(bad_path) == before
    assert main.run(["evaluate-ate", str(path), "--no-write"]) == 0
    assert "data ATE of 9 labels" in capsys.readouterr().out


def test_in_memory_evaluation_writes_under_key_added(trained):
    # scanpy style: a fitted model's ATEs into an AnnData, no run directory involved
    from cellpert.evaluate import write_ate_results

    _, _, run = trained
    ev = compute_ate_evaluation(run.screen, run.model, key_added="mine", n_draws=4, iwelbo_samples=5, ceiling=False)
    adata = run.screen.adata.copy()
    written = write_ate_results(adata, ev)
    assert ev.key == "mine" and "varm/ate_mine" in written and "uns/cellpert/ate_metrics/mine" in written
    np.testing.assert_array_equal(adata.varm["ate_mine"][list(ev.model_ate.ate.columns)].to_numpy(),
                                  ev.model_ate.ate.reindex(adata.var_names.astype(str)).to_numpy())  # fmt: skip
    assert adata.uns["cellpert"]["ate_data_source"]["key"] == "mine"
    # a second evaluation under another key (another target) replaces varm["ate_data"] and says so
    other = compute_ate_evaluation(run.screen, run.model, key_added="other", data_cells="all", n_draws=4,
                                   iwelbo_samples=5, ceiling=False)  # fmt: skip
    write_ate_results(adata, other)
    source = adata.uns["cellpert"]["ate_data_source"]
    assert source["key"] == "other" and source["target"] == other.config["target"] != ev.config["target"]
    assert {"mine", "other"} <= set(adata.uns["cellpert"]["ate_metrics"])


# ------------------------------------------------------------------ truth
def test_truth_scores_every_predictor_against_the_simulator(trained, tmp_path):
    """``truth=True`` (``--truth``): each predictor against the simulator's true ATE, the
    same figures as a direct computation; known answers for the scoring; other screens
    are a clear error."""
    import dataclasses

    from cellpert.data.simulate import sams_true_ate
    from cellpert.evaluate import ModelATE, score_against_truth

    path, run_dir, _ = trained
    ev = evaluate_ate(path, model_dir=run_dir, write=False, truth=True, truth_cells=2000, n_draws=4, iwelbo_samples=4)
    got = ev.config["truth"]
    assert got["labels"] == ev.data_ate.shape[1] and got["n_cells_per_label"] == 2000
    truth = sams_true_ate(load_screen(path, warn=False).adata, list(ev.data_ate.columns), n_cells=2000, seed=0)
    for name, frame in {"model": ev.model_ate.ate, **ev.baselines}.items():
        _, direct = ate_metrics(truth.loc[ev.data_ate.index], frame, top_n=20)
        assert got[f"{name}_pearson"] == pytest.approx(direct["pearson"])
        assert got[f"{name}_pearson_top"] == pytest.approx(direct["pearson_top"])
    assert 0.0 <= got["coverage"] <= 1.0
    # known answers: a model equal to the truth, intervals around it or beside it
    t = truth.loc[ev.data_ate.index]
    exact = dataclasses.replace(ev, model_ate=ModelATE(ate=t, lo=t - 1.0, hi=t + 1.0), model_ate_calibrated=None)
    scored = score_against_truth(exact, truth)
    assert scored["model_pearson"] == pytest.approx(1.0) and scored["model_r2"] == pytest.approx(1.0)
    assert scored["coverage"] == 1.0 and scored["interval_width"] == pytest.approx(2.0)
    beside = dataclasses.replace(exact, model_ate=ModelATE(ate=t, lo=t + 1.0, hi=t + 2.0))
    assert score_against_truth(beside, truth)["coverage"] == 0.0
    # the command prints the comparison
    out = tmp_path / "eval.h5ad"
    result = CliRunner().invoke(_app(), ["evaluate-ate", str(path), "-m", str(run_dir), "--truth", "--n-draws", "4",
                                         "--iwelbo-samples", "4", "--out", str(out), "--report", str(tmp_path / "r.html")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "against the simulator's true ATE" in result.output and "intervals cover" in result.output
    assert "the simulator&#x27;s true ATE" in (tmp_path / "r.html").read_text()
    assert "truth" in ad.read_h5ad(out).uns["cellpert"]["ate_metrics"]["samsvae"]["config"]
    # a screen without the simulator's truth
    plain = ad.read_h5ad(path)
    del plain.uns["cellpert"]["ground_truth"]
    plain_path = tmp_path / "plain.h5ad"
    plain.write_h5ad(plain_path)
    with pytest.raises(CellpertInputError, match="--truth needs"):
        evaluate_ate(plain_path, model_dir=run_dir, write=False, truth=True)


def test_the_verdict_compares_the_printed_figures():
    from cellpert_cli._evaluate import _verdict

    assert _verdict((0.9519, 0.9521), (0.9770, 0.9772)) == "ties"  # both print 0.952 / 0.977
    assert _verdict((0.9530, 0.9521), (0.9770, 0.9772)) == "beats"
    assert _verdict((0.9530, 0.9521), (0.9700, 0.9772)) == "beats on one of two metrics"
    assert _verdict((0.9500, 0.9521), (0.9770, 0.9772)) == "does not beat"
