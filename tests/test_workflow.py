"""`cellpert train` and `cellpert export-latents` end to end on a small simulated screen."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from cellpert import CellpertInputError
from cellpert.data import write_h5ad_atomic
from cellpert.data.simulate import simulate_sams
from cellpert.evaluate import mask_recovery, mcc
from cellpert.runs import load_run, resolve_run_config, train_run
from cellpert_cli.main import EXIT_INPUT_ERROR, run

from conftest import file_digest

SMALL = ["--n-latent", "4", "--max-steps", "6", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def screen_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wf") / "screen.h5ad"
    adata = simulate_sams(
        seed=0, n_perturbations=6, n_latent=4, n_genes=30, n_cells_per_perturbation=(20, 5, 5), n_combinations=2
    )
    adata.obs["batch"] = "b1"  # a user field that must survive every write
    write_h5ad_atomic(adata, path)
    return path


@pytest.fixture(scope="module")
def trained(screen_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = out.parent / "cfg.yaml"
    config.write_text("model: samsvae\nguide: mean_field\nn_hidden: 16\nguide_n_hidden: 8\nlr: 0.5\n")
    code = run(["train", str(screen_file), "--out", str(out), "--config", str(config), "--lr", "0.01", *SMALL])
    assert code == 0
    return out


def test_run_directory_contents(trained, screen_file):
    for name in ("model", "config.yaml", "history.csv", "split.csv", "genes.txt", "perturbations.txt"):
        assert (trained / name).exists(), name
    config = yaml.safe_load((trained / "config.yaml").read_text())
    # defaults < config file < command line
    assert config["model"] == "samsvae"
    assert config["model_kwargs"]["guide"] == "mean_field" and config["model_kwargs"]["n_hidden"] == 16
    assert config["train_kwargs"]["lr"] == 0.01
    assert config["model_kwargs"]["n_latent"] == 4
    split = pd.read_csv(trained / "split.csv")
    truth = ad.read_h5ad(screen_file).obs["cellpert_split"].astype(str).to_numpy()
    # a simulated screen's own split is used when no --split is given
    np.testing.assert_array_equal(split["split"].to_numpy(), truth)
    history = pd.read_csv(trained / "history.csv")
    assert {"train_loss", "validation_loss"} <= set(history.columns)


def test_export_latents_writes_documented_keys(trained, screen_file, tmp_path, capsys):
    out = tmp_path / "with_latents.h5ad"
    before = file_digest(screen_file)
    assert run(["export-latents", str(screen_file), "--model", str(trained), "--out", str(out)]) == 0
    assert file_digest(screen_file) == before  # --out leaves the screen as it was
    back = ad.read_h5ad(out)
    assert back.obsm["X_samsvae_basal"].shape == (back.n_obs, 4)
    assert back.obsm["X_samsvae_latent"].shape == (back.n_obs, 4)
    # the file holds the run's posterior means (stored as float32)
    model = load_run(screen_file, trained).model
    for kind in ("basal", "latent"):
        np.testing.assert_allclose(
            back.obsm[f"X_samsvae_{kind}"], model.get_latent_representation(kind=kind), rtol=1e-6, atol=1e-6
        )
    entry = back.uns["cellpert"]["models"]["samsvae"]
    assert list(entry["embeddings"].index) == list(entry["mask_probabilities"].index)
    assert len(entry["embeddings"].index) == 6
    assert entry["config"]["model"] == "samsvae"
    assert (back.obs["batch"] == "b1").all()  # existing fields kept
    assert "X_true_latent" in back.obsm


def test_export_latents_ica_writes_masks_in_the_ica_basis(trained, screen_file, tmp_path, capsys):
    out = tmp_path / "with_ica.h5ad"
    assert run(["export-latents", str(screen_file), "--model", str(trained), "--out", str(out), "--ica"]) == 0
    text = capsys.readouterr().out
    assert "mask F1 against the true masks" in text and "for the ICA masks" in text
    back = ad.read_h5ad(out)
    entry = back.uns["cellpert"]["models"]["samsvae"]
    shifts, masks = entry["ica_shifts"], entry["ica_masks"]
    r = back.obsm["X_samsvae_ica"].shape[1]
    assert shifts.shape == masks.shape == (6, r) and list(masks.index) == list(entry["embeddings"].index)
    assert set(np.unique(masks.to_numpy())) <= {0.0, 1.0}
    assert (masks.sum(axis=1) >= 1).all()  # each perturbation keeps its largest shift
    assert set(entry["ica_mask_f1"]) == {"before", "after"}
    # the reported F1s are mask_recovery of the written masks against the simulator's, with
    # the latents matched to the true ones as written: q(M) before, the ICA masks after
    gt = back.uns["cellpert"]["ground_truth"]
    names = [str(n) for n in gt["perturbation_names"]]
    truth = np.asarray(gt["mask"])[[names.index(n) for n in masks.index]]
    z = back.obsm["X_true_latent"]
    after = mask_recovery(truth, masks.to_numpy(), matching=mcc(z, back.obsm["X_samsvae_ica"]))["f1"]
    before = mask_recovery(
        truth, entry["mask_probabilities"].loc[masks.index].to_numpy(), matching=mcc(z, back.obsm["X_samsvae_latent"])
    )["f1"]
    assert entry["ica_mask_f1"]["after"] == pytest.approx(after, abs=1e-12)
    assert entry["ica_mask_f1"]["before"] == pytest.approx(before, abs=1e-12)


def test_export_refuses_other_genes(trained, screen_file, tmp_path, capsys):
    other = ad.read_h5ad(screen_file)[:, :-1].copy()
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    before = file_digest(path)
    assert run(["export-latents", str(path), "--model", str(trained)]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert "genes do not match" in err and "Traceback" not in err
    assert file_digest(path) == before


def test_export_refuses_other_perturbations(trained, screen_file, tmp_path, capsys):
    other = ad.read_h5ad(screen_file)
    labels = other.obs["perturbation"].astype(str).replace({"P000": "PX"})
    other.obs["perturbation"] = pd.Categorical(labels)
    path = tmp_path / "other.h5ad"
    other.write_h5ad(path)
    assert run(["export-latents", str(path), "--model", str(trained)]) == EXIT_INPUT_ERROR
    assert "perturbations do not match" in capsys.readouterr().err


def test_reloaded_run_gives_identical_latents(trained, screen_file):
    a = load_run(screen_file, trained).model.get_latent_representation(kind="latent")
    b = load_run(screen_file, trained).model.get_latent_representation(kind="latent")
    np.testing.assert_array_equal(a, b)


def test_train_errors_are_one_line(screen_file, tmp_path, capsys):
    assert run(["train", str(screen_file), "--out", str(tmp_path / "r"), "--model", "nope"]) == EXIT_INPUT_ERROR
    assert "unknown model 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: samsvae\nmax_stepz: 3\n")
    assert run(["train", str(screen_file), "--out", str(tmp_path / "r"), "--config", str(bad)]) == EXIT_INPUT_ERROR
    assert "unknown option(s) in the config file: max_stepz" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(trained, screen_file):
    with pytest.raises(CellpertInputError, match="already holds a model"):
        train_run(screen_file, out_dir=trained, model="samsvae")


def test_model_options_are_routed(tmp_path):
    data, _, model_kwargs, train_kwargs = resolve_run_config(
        cli_options={"model": "cpa-vae", "n_latent": 3, "max_steps": 2, "seed": 4, "split": "random"}
    )
    assert data["split"] == "random"
    assert model_kwargs == {"n_latent": 3, "seed": 4}
    assert train_kwargs == {"max_steps": 2, "seed": 4}
    with pytest.raises(CellpertInputError, match="does not take option"):
        resolve_run_config(cli_options={"model": "cpa-vae", "guide": "correlated"})


def test_svae_train_and_export_with_ica(svae_run, tmp_path, capsys):
    """`cellpert train -m svae` (the session's run, conftest.svae_run) then `export-latents --ica`."""
    path = tmp_path / "shift.h5ad"
    shutil.copy(svae_run.path, path)  # export-latents writes in place: never into the shared screen
    capsys.readouterr()
    assert run(["export-latents", str(path), "--model", str(svae_run.run_dir), "--ica"]) == 0
    text = capsys.readouterr().out
    assert "MCC with the true latents" in text and "before ICA" in text
    back = ad.read_h5ad(path)
    assert back.obsm["X_svae_ica"].shape == (back.n_obs, 15)
    # the run's posterior means, and the MCCs of exactly what was written
    latent = back.obsm["X_svae_latent"]
    np.testing.assert_allclose(latent, svae_run.run.model.get_latent_representation(), rtol=1e-6, atol=1e-6)
    entry = back.uns["cellpert"]["models"]["svae"]
    assert set(entry["ica_mcc"]) == {"before", "after"}
    z = back.obsm["X_true_latent"]
    assert entry["ica_mcc"]["before"] == pytest.approx(float(mcc(z, latent)), abs=1e-6)
    assert entry["ica_mcc"]["after"] == pytest.approx(float(mcc(z, back.obsm["X_svae_ica"])), abs=1e-6)
    assert f"{entry['ica_mcc']['before']:.3f} before ICA, {entry['ica_mcc']['after']:.3f} after" in text
    masks = entry["mask_probabilities"]
    assert masks.shape[1] == 15 and {f"P{i:03d}" for i in range(8)} <= set(masks.index)


def test_the_same_command_twice_gives_the_same_numbers(tmp_path):
    """Reproducibility on CPU (issue 16): two identical `cellpert train` + `evaluate-ate`
    commands give the same parameters and the same metrics; the run records the seed and
    the resolved options needed to repeat it."""
    import json

    import torch

    from cellpert.data.simulate import simulate_sams
    from cellpert_cli.main import run

    screen = tmp_path / "s.h5ad"
    simulate_sams(seed=1, n_perturbations=3, n_latent=3, n_genes=20, n_cells_per_perturbation=(20, 5, 5),
                  n_control_cells=(20, 5, 5)).write_h5ad(screen)  # fmt: skip
    metrics = []
    for name in ("a", "b"):
        copy = tmp_path / f"{name}.h5ad"
        copy.write_bytes(screen.read_bytes())
        assert run(["train", str(copy), "-m", "samsvae", "-o", str(tmp_path / name), "--n-latent", "3",
                    "--max-steps", "15", "--quiet"]) == 0  # fmt: skip
        assert run(["evaluate-ate", str(copy), "-m", str(tmp_path / name), "--n-draws", "4", "--iwelbo-samples", "4",
                    "--metrics-out", str(tmp_path / f"{name}.csv")]) == 0  # fmt: skip
        metrics.append((tmp_path / f"{name}_summary.csv").read_text())
    first = torch.load(tmp_path / "a" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    second = torch.load(tmp_path / "b" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    tensors = [k for k, v in first.items() if torch.is_tensor(v)]
    assert tensors and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in tensors)
    assert metrics[0] == metrics[1]
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["seed"] is not None and record["versions"]["torch"] and record["screen"]["sha256"]
