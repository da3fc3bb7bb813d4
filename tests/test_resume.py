"""Interrupted training and the run directory's provenance (issue 16, *Reliability*).

- resume equals uninterrupted: a run stopped by SIGTERM halfway and resumed from its
  checkpoint ends with the same parameters (bit for bit on CPU) and the same history as
  the same run trained straight through, for every model family;
- a signal to ``cellpert train`` saves a checkpoint, prints one line saying how to
  continue and exits with 128 + the signal; ``--resume`` then finishes (slow: subprocesses);
- a damaged, foreign or newer run directory, or a damaged checkpoint, is one line saying
  what is wrong and what to do;
- ``run.json`` records the format version, package versions, seed and the screen's sha256;
  a screen whose file changed (but not its genes or perturbations) only warns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellpert import CellpertInputError, CellpertWarning
from cellpert.data import load_screen, write_h5ad_atomic
from cellpert.data.simulate import simulate_sams, simulate_sparse_shift
from cellpert.models import SAMSVAE, SVAE, prepare_anndata
from cellpert.models._checkpoint import RunCheckpoint
from cellpert.models.comparative import ComparativeVAE
from cellpert.runs import (
    RUN_FORMAT_VERSION,
    TrainingInterrupted,
    checkpoint_path,
    load_run,
    read_run_manifest,
    train_run,
)
from cellpert.runs._rundir import file_sha256
from cellpert_cli.main import EXIT_INPUT_ERROR, run

from conftest import file_digest

CELLPERT = Path(sys.executable).with_name("cellpert")
#: 274 training cells in minibatches of 32: 9 steps per epoch, validation every epoch
RUN_OPTIONS = {
    "model": "samsvae", "guide": "mean_field", "n_latent": 3, "n_hidden": 16, "max_steps": 24,
    "batch_size": 32, "lr": 1e-2, "check_val_every_n_epoch": 1, "early_stopping": True,
    "early_stopping_patience": 2, "checkpoint_every": 7,
}  # fmt: skip
STOP_AT = 10  # mid-epoch (the first step of the second epoch)


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", CellpertWarning)
        yield


def _sams_screen() -> ad.AnnData:
    return simulate_sams(
        seed=0, n_perturbations=6, n_latent=3, n_genes=30, n_cells_per_perturbation=(28, 6, 6), n_combinations=2
    )


@pytest.fixture(scope="module")
def screen_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "screen.h5ad"
    write_h5ad_atomic(_sams_screen(), path)
    return path


class _SignalAt(pl.Callback):
    """Send ``signum`` to this process at the end of step ``step`` (as a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.module.state_dict().items()}


def _assert_same_params(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


@pytest.fixture(scope="module")
def straight(screen_file, tmp_path_factory):
    """The run trained without interruption."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        return train_run(screen_file, out_dir=out, progress_bar=False, **RUN_OPTIONS)


@pytest.fixture(scope="module")
def interrupted(screen_file, tmp_path_factory):
    """The same run, stopped by SIGTERM after STOP_AT steps: (run directory, the exception)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    mp = pytest.MonkeyPatch()
    original = RunCheckpoint.on_train_batch_end

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, trainer, *args)

    mp.setattr(RunCheckpoint, "on_train_batch_end", on_train_batch_end)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_num_threads(1)
            with pytest.raises(TrainingInterrupted) as info:
                train_run(screen_file, out_dir=out, progress_bar=False, **RUN_OPTIONS)
    finally:
        mp.undo()
    return out, info.value


@pytest.fixture(scope="module")
def resumed(interrupted):
    out, _ = interrupted
    backup = out.parent / "interrupted_copy"
    shutil.copytree(out, backup)  # the interrupted state, for the tests that need it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        result = train_run(out_dir=out, resume=True, progress_bar=False)
    return result, backup


# ------------------------------------------------------------------ resume equals uninterrupted
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(interrupted):
    out, err = interrupted
    assert err.signum == signal.SIGTERM and err.exit_code == 143 and err.step == STOP_AT
    assert err.checkpoint == checkpoint_path(out) and err.checkpoint.is_file()
    message = str(err)
    assert "\n" not in message
    assert message == (
        f"interrupted by SIGTERM at step {STOP_AT}: checkpoint {out}/checkpoints/last.ckpt; "
        f"continue with: cellpert train --resume {out}"
    )
    manifest = read_run_manifest(out)
    assert manifest["status"] == "interrupted"
    assert manifest["sessions"][-1]["outcome"] == "SIGTERM" and manifest["sessions"][-1]["step"] == STOP_AT
    assert not (out / "model").exists()


def test_resumed_run_equals_the_uninterrupted_one(straight, resumed):
    result, _ = resumed
    assert result.status == "resumed"
    _assert_same_params(straight.model, result.model)  # bit for bit on CPU
    a = pd.read_csv(straight.directory / "history.csv", index_col=0)
    b = pd.read_csv(result.directory / "history.csv", index_col=0)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    ta = json.loads((straight.directory / "training.json").read_text())
    tb = json.loads((result.directory / "training.json").read_text())
    for key in ("steps", "epochs", "stopped_early", "best_step", "best_validation_loss"):
        assert ta[key] == tb[key], key
    assert tb["resumed_from_step"] == STOP_AT
    # a finished run has no checkpoint left, and its manifest records both sessions
    assert not (result.directory / "checkpoints").exists()
    sessions = read_run_manifest(result.directory)["sessions"]
    assert [s["outcome"] for s in sessions] == ["SIGTERM", "finished"]
    assert sessions[1]["from_step"] == STOP_AT and sessions[1]["step"] == ta["steps"]


def _family(name: str):
    """(screen, setup and constructor, train options) of a small model of each family."""
    common = {"max_steps": 24, "batch_size": 32, "lr": 1e-2, "check_val_every_n_epoch": 1, "checkpoint_every": 5}
    if name == "svae":
        adata = simulate_sparse_shift(seed=0, n_perturbations=8, n_heldout=2, n_cells_per_perturbation=20, n_genes=30)

        def make(ad_):
            SVAE.setup_anndata(ad_)
            return SVAE(ad_, n_latent=4, n_hidden=16)

        return adata, make, {**common, "n_epochs_kl_warmup": 2, "early_stopping_patience": 2}
    adata = simulate_sams(seed=1, n_perturbations=8, n_latent=3, n_cells_per_perturbation=(16, 6, 6),
                          n_control_cells=(16, 6, 6), n_combinations=2, n_genes=30)  # fmt: skip
    if name == "comparative":

        def make(ad_):
            ComparativeVAE.setup_anndata(ad_, background_key="perturbation", background=["control"])
            return ComparativeVAE(ad_, n_background_latent=3, n_salient_latent=2, n_hidden=16)

        return adata, make, {**common, "mode": "constrained"}

    def make(ad_):
        SAMSVAE.setup_anndata(ad_)
        return SAMSVAE(ad_, n_latent=3, n_hidden=16)

    return adata, make, {**common, "early_stopping_patience": 2}


@pytest.mark.parametrize(
    ("family", "stop_at", "extra", "saved_at"),
    [("samsvae", 6, {}, 6), ("samsvae", 18, {"check_val_every_n_epoch": 2}, 19), ("svae", 9, {}, 9),
     ("comparative", 8, {}, 8)],
    ids=["samsvae-epoch-end", "samsvae-unvalidated-epoch-end", "svae", "comparative"],
)  # fmt: skip
def test_every_family_resumes_bit_for_bit(family, stop_at, extra, saved_at, tmp_path):
    """Model level (``train(checkpoint_dir=..., ckpt_path=...)``). SAMS-VAE here has 6 steps
    per epoch: a signal at step 6 is saved after that epoch's validation; at step 18, the
    end of an epoch without validation, it waits for the end of step 19."""
    adata, make, options = _family(family)
    options = {**options, **extra}

    def model():
        return make(prepare_anndata(load_screen(adata.copy(), perturbation_key="perturbation", warn=False)))

    a = model()
    a.train(**options, checkpoint_dir=tmp_path / "a")
    b = model()
    with pytest.raises(TrainingInterrupted) as info:
        b.train(**options, checkpoint_dir=tmp_path / "b", callbacks=[_SignalAt(stop_at)])
    c = model()
    c.train(**options, checkpoint_dir=tmp_path / "b", ckpt_path=info.value.checkpoint)
    assert c.training_summary_["resumed_from_step"] == info.value.step == saved_at
    _assert_same_params(a, c)
    assert set(a.history) == set(c.history)
    for name in a.history:
        np.testing.assert_array_equal(a.history[name].to_numpy(float), c.history[name].to_numpy(float), err_msg=name)
    if family == "comparative":  # the multiplier λ of the constrained mode is in the checkpoint
        assert a.final_penalty_weight_ == c.final_penalty_weight_ != 1.0


def _small_sams():
    adata = simulate_sams(seed=1, n_perturbations=8, n_latent=3, n_cells_per_perturbation=(16, 6, 6),
                          n_control_cells=(16, 6, 6), n_combinations=2, n_genes=30)  # fmt: skip
    ad_ = prepare_anndata(load_screen(adata, perturbation_key="perturbation", warn=False))
    SAMSVAE.setup_anndata(ad_)
    return SAMSVAE(ad_, n_latent=3, n_hidden=16)


class _TwoSigints(pl.Callback):
    """Ctrl-C twice at step 8: the second one stops at once (no new checkpoint)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 8:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def sigint_handled():
    """Ctrl-C as an interactive session has it: a shell that starts a job in the background
    (``nohup``, ``&``) makes it ignore SIGINT, and an ignored signal stays ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    """``preexec_fn`` of the CLI subprocesses: SIGINT not ignored (see :func:`sigint_handled`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_second_ctrl_c_stops_at_once(tmp_path, sigint_handled):
    model = _small_sams()
    options = {"max_steps": 24, "batch_size": 32, "check_val_every_n_epoch": 1, "checkpoint_every": 6}
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as info:
        model.train(**options, checkpoint_dir=tmp_path, callbacks=[_TwoSigints()])
    err = info.value
    assert err.immediate and err.exit_code == 130 and err.step == 8
    # the last periodic checkpoint (end of the first epoch, step 6) is what is left
    assert str(err) == (
        f"interrupted by SIGINT at step 8 (second Ctrl-C: stopped at once): checkpoint {tmp_path}/last.ckpt (step 6)"
    )
    assert not model.is_trained_
    assert {signum: signal.getsignal(signum) for signum in before} == before  # handlers given back


def test_without_a_checkpoint_dir_signals_are_lightnings(capsys, sigint_handled):
    """Plain ``model.train()``: SIGTERM stops through Lightning (no checkpoint), without
    scvi-tools' ``Exception raised during training. <class 'NameError'>``; Ctrl-C is a
    KeyboardInterrupt (Lightning turns it into sys.exit(1))."""
    model = _small_sams()
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as info:
        model.train(max_steps=24, batch_size=32, callbacks=[_SignalAt(3)])
    assert info.value.checkpoint is None and info.value.exit_code == 143
    assert str(info.value).startswith("interrupted by SIGTERM at step ")
    assert str(info.value).endswith(": no checkpoint was saved, a resume starts from the beginning")
    assert "NameError" not in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        _small_sams().train(max_steps=24, batch_size=32, callbacks=[_SignalAt(3, signal.SIGINT)])
    assert {signum: signal.getsignal(signum) for signum in before} == before


# ------------------------------------------------------------------ the run directory around a resume
def test_resuming_a_finished_run_says_so(resumed, capsys):
    result, _ = resumed
    capsys.readouterr()
    assert run(["train", "--resume", str(result.directory)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{result.directory} already finished training ({result.config['training']['steps']} steps); nothing to resume."
    )
    again = train_run(out_dir=result.directory, resume=True, progress_bar=False)
    assert again.status == "finished"


def test_resume_takes_no_other_options(resumed, capsys):
    _, backup = resumed
    assert run(["train", "--resume", str(backup), "--max-steps", "50", "--lr", "1"]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --resume continues {backup} with the options recorded in {backup}/config.yaml; remove --max-steps, --lr."
    )
    with pytest.raises(CellpertInputError, match="takes its options from"):
        train_run(out_dir=backup, resume=True, max_steps=50)


def test_an_interrupted_run_is_neither_loaded_nor_trained_over(resumed, screen_file):
    _, backup = resumed
    with pytest.raises(CellpertInputError) as info:
        load_run(screen_file, backup)
    assert str(info.value) == (
        f"{backup} was interrupted by SIGTERM at step {STOP_AT}; continue it with `cellpert train --resume {backup}`."
    )
    with pytest.raises(CellpertInputError, match="holds an unfinished run with a checkpoint; continue it with"):
        train_run(screen_file, out_dir=backup, **RUN_OPTIONS)


def test_a_second_process_cannot_train_into_the_same_run(resumed, screen_file, tmp_path):
    """E.g. a scheduler's requeue while the first job still runs: refused at once."""
    from filelock import FileLock

    _, backup = resumed
    with FileLock(backup / ".cellpert.lock"):
        with pytest.raises(CellpertInputError) as info:
            train_run(out_dir=backup, resume=True, progress_bar=False)
    assert str(info.value) == (
        f"another process is training into {backup} (it holds {backup}/.cellpert.lock); wait for it to finish, "
        "or choose another --out."
    )
    # a run that fails before writing anything leaves no directory behind
    with pytest.raises(CellpertInputError, match="no column 'nope'"):
        train_run(screen_file, out_dir=tmp_path / "new", **{**RUN_OPTIONS, "perturbation_key": "nope"})
    assert not (tmp_path / "new").exists()


def test_a_damaged_checkpoint_is_one_line(resumed, tmp_path):
    _, backup = resumed
    run_dir = tmp_path / "run"
    shutil.copytree(backup, run_dir)
    ckpt = checkpoint_path(run_dir)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CellpertInputError) as info:
        train_run(out_dir=run_dir, resume=True, progress_bar=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {ckpt} cannot be read (")
    assert message.endswith("it is truncated or not a cellpert checkpoint: delete it to train from the start.")


def test_resume_without_a_checkpoint_starts_again(resumed, straight, tmp_path):
    """A run killed before its first checkpoint: a resume trains from the beginning, the same run."""
    _, backup = resumed
    run_dir = tmp_path / "run"
    shutil.copytree(backup, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    result = train_run(out_dir=run_dir, resume=True, progress_bar=False)
    _assert_same_params(straight.model, result.model)


# ------------------------------------------------------------------ provenance
def test_run_json_records_provenance(straight, screen_file):
    manifest = read_run_manifest(straight.directory)
    assert manifest["format_version"] == RUN_FORMAT_VERSION == 1
    assert manifest["status"] == "finished"
    assert set(manifest["versions"]) >= {"python", "cellpert", "scvi-tools", "torch", "lightning", "anndata", "numpy"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["seed"] == 0
    assert manifest["screen"]["path"] == str(screen_file.resolve())
    assert manifest["screen"]["sha256"] == file_sha256(screen_file) == file_digest(screen_file)
    assert manifest["model_file"]["sha256"] == file_digest(straight.directory / "model" / "model.pt")
    config = yaml.safe_load((straight.directory / "config.yaml").read_text())
    assert config["train_kwargs"]["checkpoint_every"] == 7 and "checkpoint_dir" not in config["train_kwargs"]


def test_the_run_directory_exists_before_training(screen_file, tmp_path, monkeypatch):
    """config.yaml, split, genes and run.json are written before the first step."""
    seen = {}
    original = RunCheckpoint.on_train_start

    def on_train_start(self, trainer, pl_module):
        out = Path(self.dirpath).parent
        seen.update({name: (out / name).is_file() for name in ("config.yaml", "run.json", "split.csv", "genes.txt")})
        seen["status"] = json.loads((out / "run.json").read_text())["status"]
        return original(self, trainer, pl_module)

    monkeypatch.setattr(RunCheckpoint, "on_train_start", on_train_start)
    train_run(screen_file, out_dir=tmp_path / "run", progress_bar=False, **{**RUN_OPTIONS, "max_steps": 2})
    assert seen == {"config.yaml": True, "run.json": True, "split.csv": True, "genes.txt": True, "status": "training"}


def test_a_changed_screen_file_only_warns(straight, screen_file, tmp_path):
    """cellpert writes results into the screen's h5ad: a file with other bytes but the same
    cells, labels and genes loads silently; one with other cells (same genes and
    perturbations) loads with a warning."""
    changed = tmp_path / "screen.h5ad"
    adata = ad.read_h5ad(screen_file)
    adata.uns["results_of_another_tool"] = {"x": 1}
    write_h5ad_atomic(adata, changed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellpertWarning)
        loaded = load_run(changed, straight.directory)  # results written into it: no warning
        load_run(screen_file, straight.directory)  # the same file: no warning
    _assert_same_params(straight.model, loaded.model)
    renamed = tmp_path / "renamed.h5ad"
    adata.obs_names = [*adata.obs_names[:-10], *(f"other{i}" for i in range(10))]  # 10 cells the run never saw
    write_h5ad_atomic(adata, renamed)
    with pytest.warns(CellpertWarning, match="is not the file .* was trained on .* cell names or labels"):
        load_run(renamed, straight.directory)


# ------------------------------------------------------------------ damaged, foreign or newer run directories
@pytest.fixture
def run_copy(straight, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight.directory, out)
    return out


def _load_error(screen_file, run_dir) -> str:
    with pytest.raises(CellpertInputError) as info:
        load_run(screen_file, run_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_truncated_model_file_is_one_line(run_copy, screen_file):
    model = run_copy / "model" / "model.pt"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:1000])
    assert _load_error(screen_file, run_copy) == (
        f"{model} is truncated or was replaced (1,000 bytes; the run wrote {size:,}); restore it from a backup or "
        "train again."
    )


def test_a_corrupted_model_file_is_one_line(run_copy, screen_file):
    model = run_copy / "model" / "model.pt"
    model.write_bytes(np.random.default_rng(0).bytes(model.stat().st_size))  # same size, random bytes
    assert _load_error(screen_file, run_copy) == (
        f"{model} is corrupted or was replaced (its sha256 differs from the one in {run_copy}/run.json); restore it "
        "from a backup or train again."
    )


def test_a_damaged_model_file_of_an_old_run_is_one_line(run_copy, screen_file):
    """Format 0 (no run.json, no recorded checksum): the file's own structure is checked."""
    (run_copy / "run.json").unlink()
    model = run_copy / "model" / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert _load_error(screen_file, run_copy) == (
        f"{model} is not a saved model (not a torch archive: truncated or overwritten); train again."
    )


def test_a_missing_model_file_is_one_line(run_copy, screen_file):
    (run_copy / "model" / "model.pt").unlink()
    assert _load_error(screen_file, run_copy) == (
        f"{run_copy}/model/model.pt is missing; the run directory is incomplete: train again "
        "(cellpert train ... --overwrite)."
    )


def test_a_foreign_directory_is_one_line(screen_file, tmp_path):
    foreign = tmp_path / "not_a_run"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    assert _load_error(screen_file, foreign) == (
        f"{foreign} is not a cellpert run directory (no run.json); give the --out directory of `cellpert train`."
    )
    assert _load_error(screen_file, tmp_path / "missing") == (
        f"{tmp_path / 'missing'} does not exist; give the --out directory of `cellpert train`."
    )
    (foreign / "run.json").write_text("{not json")
    assert _load_error(screen_file, foreign) == (
        f"{foreign}/run.json is unreadable (JSONDecodeError); the run directory is damaged: train again into a new --out."
    )


def test_a_newer_format_is_one_line(run_copy, screen_file):
    manifest = json.loads((run_copy / "run.json").read_text())
    manifest["format_version"] = RUN_FORMAT_VERSION + 1
    manifest["versions"]["cellpert"] = "9.0"
    (run_copy / "run.json").write_text(json.dumps(manifest))
    assert _load_error(screen_file, run_copy) == (
        f"{run_copy} was written by cellpert 9.0 (run format 2); this cellpert reads format 1 and older: "
        "upgrade cellpert."
    )


def test_damaged_runs_through_the_cli_are_one_line(run_copy, screen_file, capsys):
    (run_copy / "model" / "model.pt").write_bytes(b"\0" * 10)
    assert run(["export-latents", str(screen_file), "--model", str(run_copy), "--out", str(run_copy / "x.h5ad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_copy}/model/model.pt is truncated or was replaced (10 bytes; the run wrote "
                   f"{read_run_manifest(run_copy)['model_file']['size_bytes']:,}); restore it from a backup or train again."]  # fmt: skip


# ------------------------------------------------------------------ signals to `cellpert train` (subprocesses)
def _cli_train(screen: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(CELLPERT), "--threads", "1", "train", str(screen), "-o", str(out), "-m", "samsvae",
            "--n-latent", "3", "--batch-size", "32", "--lr", "0.01", "--max-steps", "400", "--no-early-stopping",
            "--checkpoint-every", "1", "--quiet", *extra]  # fmt: skip
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint
    )


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_cellpert_train_saves_and_resume_finishes(screen_file, tmp_path, signum, code):
    out = tmp_path / "run"
    proc = _cli_train(screen_file, out)
    deadline = time.monotonic() + 300
    while not checkpoint_path(out).is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # training runs once the first checkpoint is there
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted by {name} at step ") and last.endswith(
        f": checkpoint {out}/checkpoints/last.ckpt; continue with: cellpert train --resume {out}"
    ), last
    assert "Traceback" not in stderr and "NameError" not in stderr and "NameError" not in stdout
    assert checkpoint_path(out).is_file() and read_run_manifest(out)["status"] == "interrupted"
    step = int(last.split(" at step ")[1].split(":")[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(CELLPERT), "--threads", "1", "train", "--resume", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed at step {step} (400 in all)" in done.stdout
    assert read_run_manifest(out)["status"] == "finished" and (out / "model" / "model.pt").is_file()
    assert load_run(screen_file, out).config["training"]["steps"] == 400
