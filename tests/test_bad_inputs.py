"""A corpus of bad inputs, generated at test time: each one ends in one clear line.

Every case builds its input under a fresh folder (tiny screens made with anndata), runs
the command line in-process (:func:`cellpert_cli.main.run`) and checks: a non-zero exit
code with exactly one ``error:`` line on stderr (or exit 0 with ``warning:`` lines, for
the inputs that are only warned about), no traceback, and every input file
byte-identical afterwards. Option cases must fail before the screen is even opened (the
run options are checked up front, :mod:`cellpert.runs._validate`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellpert import CellpertInputError
from cellpert_cli.main import EXIT_INPUT_ERROR, run

from conftest import make_toy_adata, quiet_training, tree_digest

Outcome = Literal["error", "warning", "ok"]


@dataclass(frozen=True)
class Case:
    """One bad input: how to build it, and what the user must see."""

    id: str
    make: Callable[[Path, pytest.FixtureRequest], list[str]]
    """Writes the inputs into the folder and returns the command line."""
    message: str
    """A part of the ``error:`` line (or of one ``warning:`` line)."""
    outcome: Outcome = "error"
    before_data: bool = False
    """An option check: it must fail before the screen file is opened."""


# ------------------------------------------------------------------ input builders
def _toy(**kwargs) -> ad.AnnData:
    """80 cells (control, A, B, A+B) x 12 genes, labels as plain text."""
    adata = make_toy_adata(**kwargs)
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    return adata


def _write(folder: Path, adata: ad.AnnData, name: str = "screen.h5ad") -> Path:
    path = folder / name
    adata.write_h5ad(path)
    return path


def _out(folder: Path) -> str:
    """Run directory outside the input folder (only inputs are digested)."""
    return str(folder.parent / "out" / "run")


def _train(path: Path, folder: Path, *extra: str, model: str = "samsvae") -> list[str]:
    """A tiny training command; options in ``extra`` come last and win."""
    size = ["--n-background-latent", "2"] if model == "comparative" else ["--n-latent", "2"]
    return ["train", str(path), "-o", _out(folder), "-m", model, "--quiet", "--max-steps", "1", *size, *extra]


def train_with(*extra: str, model: str = "samsvae", adata: Callable[[], ad.AnnData] = _toy):
    """A case builder: a toy screen and ``cellpert train`` with these options."""

    def make(folder: Path, request: pytest.FixtureRequest) -> list[str]:
        return _train(_write(folder, adata()), folder, *extra, model=model)

    return make


def config(text: str, name: str = "c.yaml", model: str = "samsvae"):
    """A case builder: a toy screen trained with this config file."""

    def make(folder: Path, request: pytest.FixtureRequest) -> list[str]:
        path = _write(folder, _toy())
        (folder / name).write_text(text)
        return ["train", str(path), "-o", _out(folder), "-m", model, "--config", str(folder / name)]

    return make


def screen(adata: Callable[[], ad.AnnData], *extra: str, command: str = "inspect"):
    """A case builder: write this screen and run ``inspect`` (or a tiny ``train``) on it."""

    def make(folder: Path, request: pytest.FixtureRequest) -> list[str]:
        path = _write(folder, adata())
        return _train(path, folder, *extra) if command == "train" else ["inspect", str(path), *extra]

    return make


def _counts(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[], ad.AnnData]:
    def build() -> ad.AnnData:
        adata = _toy()
        adata.X = sp.csr_matrix(change(adata.X.toarray()))
        return adata

    return build


def _labels(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[], ad.AnnData]:
    def build() -> ad.AnnData:
        adata = _toy()
        adata.obs["perturbation"] = change(adata.obs["perturbation"].to_numpy(dtype=object).copy())
        return adata

    return build


def _set(values: dict[int, object]) -> Callable[[np.ndarray], np.ndarray]:
    def change(x: np.ndarray) -> np.ndarray:
        for row, value in values.items():
            x[row] = value
        return x

    return change


def _zero_cells(x: np.ndarray) -> np.ndarray:
    x[[1, 25, 50]] = 0
    return x


def _negative(x: np.ndarray) -> np.ndarray:
    x[3, 2] = -1
    return x


def _nan(x: np.ndarray) -> np.ndarray:
    x[5, 1] = np.nan
    return x


def _duplicate_cells() -> ad.AnnData:
    adata = _toy()
    names = adata.obs_names.to_numpy().copy()
    names[1] = names[0]
    adata.obs_names = names
    return adata


def _duplicate_genes() -> ad.AnnData:
    adata = _toy()
    adata.var_names = ["g0", "g0", *adata.var_names[2:]]
    return adata


def _no_perturbation_column() -> ad.AnnData:
    adata = _toy()
    adata.obs = adata.obs.rename(columns={"perturbation": "guide_identity"})
    return adata


def _numeric_labels() -> ad.AnnData:
    adata = _toy()
    codes = {"control": 0, "A": 1, "B": 2, "A+B": 3}
    adata.obs["perturbation"] = adata.obs["perturbation"].map(codes).astype(np.int64)
    return adata


def _only(*labels: str) -> Callable[[], ad.AnnData]:
    def build() -> ad.AnnData:
        adata = _toy()
        return adata[adata.obs["perturbation"].isin(labels).to_numpy()].copy()

    return build


def _dosage(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[], ad.AnnData]:
    def build() -> ad.AnnData:
        adata = _toy()
        labels = adata.obs["perturbation"]
        d = pd.DataFrame(
            {"A": labels.str.contains("A").astype(float), "B": labels.str.contains("B").astype(float)},
            index=adata.obs_names,
        )
        adata.obsm["doses"] = change(d)
        return adata

    return build


def _dose_at(value: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(d: pd.DataFrame) -> pd.DataFrame:
        d.iloc[30, 0] = value
        return d

    return change


def _dose_words(d: pd.DataFrame) -> pd.DataFrame:
    return d.assign(A=d["A"].map({1.0: "high", 0.0: "none"}))


def _missing_file(folder: Path, request: pytest.FixtureRequest) -> list[str]:
    return ["inspect", str(folder / "absent.h5ad")]


def _random_bytes(folder: Path, request: pytest.FixtureRequest) -> list[str]:
    path = folder / "screen.h5ad"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return ["inspect", str(path)]


def _hdf5_not_anndata(folder: Path, request: pytest.FixtureRequest) -> list[str]:
    path = folder / "screen.h5ad"
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros((2, 2))
        f["X"].attrs["encoding-type"] = "something-else"
    return ["inspect", str(path)]


def _directory(folder: Path, request: pytest.FixtureRequest) -> list[str]:
    (folder / "screen.h5ad").mkdir()
    return ["inspect", str(folder / "screen.h5ad")]


def _evaluate_on(adata: Callable[[], ad.AnnData]):
    """A case builder: ``evaluate-ate`` of the module's tiny run on another screen."""

    def make(folder: Path, request: pytest.FixtureRequest) -> list[str]:
        run_dir = request.getfixturevalue("tiny_run")
        return ["evaluate-ate", str(_write(folder, adata())), "--model", str(run_dir), "--no-write"]

    return make


def _fewer_genes() -> ad.AnnData:
    return _toy()[:, 1:].copy()


def _extra_perturbation() -> ad.AnnData:
    adata = _toy()
    adata.obs.iloc[70:, 0] = "C"
    return adata


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A SAMS-VAE run of 2 steps on the toy screen (for the evaluation cases)."""
    from cellpert.runs import train_run

    folder = tmp_path_factory.mktemp("tiny_run")
    path = _write(folder, _toy())
    with quiet_training():
        train_run(path, out_dir=folder / "run", progress_bar=False, model="samsvae", guide="mean_field",
                  n_latent=2, max_steps=2)  # fmt: skip
    return folder / "run"


_HAS_CUDA = False
try:  # torch is installed with the models; the GPU case only makes sense without a GPU
    import torch

    _HAS_CUDA = bool(torch.cuda.is_available())
except ImportError:  # pragma: no cover
    pass


def _option(id: str, message: str, *extra: str, model: str = "samsvae") -> Case:
    return Case(id, train_with(*extra, model=model), message, before_data=True)


def _config(id: str, text: str, message: str, *, name: str = "c.yaml", model: str = "samsvae") -> Case:
    return Case(id, config(text, name, model), message, before_data=True)


CASES: list[Case] = [
    # --- run options on the command line (checked before the screen is opened)
    _option("max-steps-zero", "--max-steps must be an integer >= 1 (cap on the training steps), not 0.", "--max-steps", "0"),
    _option("max-steps-negative", "--max-steps must be an integer >= 1", "--max-steps", "-5"),
    _option("max-epochs-negative", "--max-epochs must be an integer >= 1", "--max-epochs", "-1"),
    _option("max-epochs-zero", "--max-epochs must be an integer >= 1", "--max-epochs", "0"),
    _option("lr-zero", "--lr must be a number > 0 (Adam learning rate), not 0.0.", "--lr", "0"),
    _option("lr-negative", "--lr must be a number > 0", "--lr", "-1e-3"),
    _option("batch-size-zero", "--batch-size must be an integer >= 1 (minibatch size), not 0.", "--batch-size", "0"),
    _option("batch-size-negative", "--batch-size must be an integer >= 1", "--batch-size", "-4"),
    _option("n-latent-zero", "--n-latent must be an integer >= 1 (latent dimensions), not 0.", "--n-latent", "0"),
    _option("fraction-above-one", "--fraction must be a number in [0, 1]", "--split", "data-efficiency", "--fraction", "1.5"),
    _option("fraction-negative", "--fraction must be a number in [0, 1]", "--split", "data-efficiency", "--fraction", "-0.1"),
    _option("split-seed-negative", "--split-seed must be an integer in [0, 4294967295] (seed of the split), not -1.", "--split-seed", "-1"),
    _option("seed-negative", "--seed must be an integer in [0, 4294967295]", "--seed", "-3"),
    _option("devices-nonsense", "--devices must be 'auto', a number of devices >= 1", "--devices", "banana"),
    _option("devices-zero", "--devices must be 'auto'", "--devices", "0"),
    _option("accelerator-unknown", "--accelerator must be one of auto, cpu, gpu, cuda, mps, tpu", "--accelerator", "tpu2"),
    _option("guide-unknown", "--guide must be one of correlated, mean_field (SAMS-VAE guide), not 'foo'.", "--guide", "foo"),
    _option("split-unknown", "--split must be one of random, combinations, data-efficiency, heldout", "--split", "nope"),
    _option("strategy-unknown", "--strategy must be one of auto, ddp, ddp_spawn, ddp_fork", "--strategy", "nope"),
    _option("heldout-split-without-labels", "--split heldout needs the labels to hold out", "--split", "heldout"),
    _option("mode-unknown", "--mode must be one of standard, multi-objective, constrained", "--mode", "fast", model="comparative"),
    _option("penalty-weight-negative", "--penalty-weight must be a number >= 0", "--penalty-weight", "-1", model="comparative"),
    _option("constraint-level-above-one", "--constraint-level must be a number in (0, 1]", "--constraint-level", "2", model="comparative"),
    _option("n-salient-latent-zero", "--n-salient-latent must be an integer >= 1", "--n-salient-latent", "0", model="comparative"),
    _option("option-of-another-model", "--model svae does not take option(s) guide", "--guide", "correlated", model="svae"),
    _option("unknown-model", "unknown model 'nope'; choose one of", model="nope"),
    *(
        []
        if _HAS_CUDA
        else [_option("accelerator-gpu-without-gpu", "--accelerator gpu: this machine has no CUDA GPU", "--accelerator", "gpu")]
    ),
    Case(
        "no-model",
        lambda folder, request: ["train", str(_write(folder, _toy())), "-o", _out(folder)],
        "no model given: pass --model",
        before_data=True,
    ),
    # --- typer's own checks, now one line too
    Case("threads-zero", lambda f, r: ["--threads", "0", "inspect", "x.h5ad"], "Invalid value for '--threads'"),
    Case("max-steps-not-a-number", train_with("--max-steps", "abc"), "Invalid value for '--max-steps'", before_data=True),
    Case("unknown-option", train_with("--maxsteps", "3"), "No such option: --maxsteps", before_data=True),
    # --- config files: types, ranges, unknown keys, broken files
    _config("config-max-steps-text", 'max_steps: "abc"\n', "max_steps in config c.yaml must be an integer >= 1 (cap on the training steps), not 'abc'."),
    _config("config-lr-list", "lr: [1]\n", "lr in config c.yaml must be a number > 0 (Adam learning rate), not [1]."),
    _config("config-max-steps-bool", "max_steps: true\n", "max_steps in config c.yaml must be an integer >= 1"),
    _config("config-mask-prior-prob-above-one", "mask_prior_prob: 1.5\n", "mask_prior_prob in config c.yaml must be a number in (0, 1)"),
    _config("config-mask-prior-prob-zero-toml", "mask_prior_prob = 0\n", "mask_prior_prob in config c.toml must be a number in (0, 1)", name="c.toml"),
    _config("config-patience-negative", "early_stopping_patience: -2\n", "early_stopping_patience in config c.yaml must be an integer >= 0"),
    _config("config-flag-as-text", 'drop_zero_genes: "yes"\n', "drop_zero_genes in config c.yaml must be true or false"),
    _config("config-dropout-rate-one", "dropout_rate: 1\n", "dropout_rate in config c.yaml must be a number in [0, 1)", model="svae"),
    _config("config-beta-k-one", "beta_k: 1\n", "beta_k in config c.yaml must be a number > 1", model="svae-plus"),
    _config("config-unknown-key", "max_stepz: 3\n", "unknown option(s) in the config file: max_stepz; valid options:"),
    _config("config-invalid-yaml", "max_steps: [1\n", "is not valid YAML"),
    _config("config-not-a-mapping", "- 1\n- 2\n", "must hold a mapping of option: value"),
    _config("config-wrong-suffix", "{}", "must end in .yaml, .yml or .toml", name="c.json"),
    Case(
        "config-missing",
        lambda folder, request: [*_train(_write(folder, _toy()), folder), "--config", str(folder / "absent.yaml")],
        "not found; check the --config path",
        before_data=True,
    ),
    # --- files
    Case("missing-file", _missing_file, "no such file"),
    Case("not-hdf5-random-bytes", _random_bytes, "is not an HDF5/.h5ad file"),
    Case("hdf5-not-anndata", _hdf5_not_anndata, "is HDF5 but not a readable AnnData file"),
    Case("directory", _directory, "is a directory"),
    # --- counts
    Case("counts-negative", screen(_counts(_negative)), "X contains negative values (e.g. -1 in cell row 3)"),
    Case("counts-fractional", screen(_counts(np.log1p)), "X contains non-integer values"),
    Case("counts-nan", screen(_counts(_nan)), "X contains NaN values (first in cell row 5)"),
    Case("layer-missing", screen(_toy, "--layer", "counts"), "layer 'counts' not found"),
    # --- cells and genes
    Case("duplicate-cell-names", screen(_duplicate_cells), "1 cell name(s) occur more than once (e.g. 'c0')"),
    Case("duplicate-gene-names", screen(_duplicate_genes), "1 gene name(s) are duplicated (e.g. g0)"),
    Case("subset-invalid", screen(_toy, "--subset", "perturbation =="), "is not a valid query on obs"),
    Case("subset-empty", screen(_toy, "--subset", 'perturbation == "Z"'), "selects no cells"),
    # --- labels
    Case("no-perturbation-column", screen(_no_perturbation_column), "no perturbation column found in obs"),
    Case("perturbation-key-missing", screen(_toy, "--perturbation-key", "nope"), "obs has no column 'nope'"),
    Case("labels-missing", screen(_labels(_set({4: None, 9: None}))), "obs['perturbation'] has 2 missing labels"),
    Case("labels-empty", screen(_labels(_set({4: "", 9: "", 30: ""}))), "obs['perturbation'] has 3 cell(s) with an empty label (e.g. cell 'c4'"),
    Case("labels-whitespace", screen(_labels(_set({4: "   "}))), "has 1 cell(s) with an empty label"),
    Case("labels-separator-only", screen(_labels(_set({4: "+"}))), "has 1 cell(s) with an empty label"),
    Case("control-unknown", screen(_toy, "--control", "Control"), "control label(s) 'Control' match no cell in obs['perturbation']; check the spelling (labels are case-sensitive); did you mean 'control'?"),
    Case("no-control-cells", screen(_only("A", "B", "A+B")), "no control cells found"),
    Case("no-control-cells-with-dosage", screen(_dosage(lambda d: d.assign(A=1.0)), "--dosage-key", "doses"), "control cells need an all-zero row in obsm['doses']"),
    Case("no-perturbed-cells", screen(_only("control"), "--control", "control"), "no perturbed cells"),
    # --- dosage matrices
    Case("dosage-negative", screen(_dosage(_dose_at(-1.0)), "--dosage-key", "doses"), "obsm['doses'] holds 1 negative dose(s) (e.g. -1 for cell 'c30' and 'A')"),
    Case("dosage-nan", screen(_dosage(_dose_at(np.nan)), "--dosage-key", "doses"), "obsm['doses'] holds 1 NaN dose(s)"),
    Case("dosage-not-numbers", screen(_dosage(_dose_words), "--dosage-key", "doses"), "obsm['doses'] holds values that are not numbers"),
    Case("dosage-zero-cell-perturbation", screen(_dosage(lambda d: d.assign(EMPTY=0.0)), "--dosage-key", "doses"), "EMPTY in obsm['doses'] have zero cells"),
    # --- options that need the data, and training vs evaluation
    Case("backed-with-subset", screen(_toy, "--backed", "--subset", 'perturbation != "B"', command="train"), "--subset cannot be combined with --backed"),
    Case("genes-changed-since-training", _evaluate_on(_fewer_genes), "the screen's genes do not match the model's: 1 of the model's genes are missing (e.g. g0)"),
    Case("perturbations-changed-since-training", _evaluate_on(_extra_perturbation), "the screen's perturbations do not match the model's: unknown to the model C"),
    # --- only warned about: the run goes on (exit 0)
    Case("zero-count-cells", screen(_counts(_zero_cells), command="train"), "3 of 80 cells have zero total counts (e.g. 'c1', 'c25', 'c50'); they are kept, with their library size clamped to 1", "warning"),
    Case("labels-differ-by-case", screen(_labels(_set(dict.fromkeys(range(20, 30), "a"))), command="train"), "1 perturbation name(s) differ from another only by case (e.g. 'A' and 'a')", "warning"),
    Case("labels-differ-by-spaces", screen(_labels(_set(dict.fromkeys(range(20, 30), "A "))), command="train"), "written both with and without spaces around names (e.g. 'A' and 'A ')", "warning"),
    Case("label-with-empty-part", screen(_labels(_set(dict.fromkeys(range(20, 30), "A+"))), command="train"), "have an empty part (e.g. 'A+')", "warning"),
    Case("numeric-perturbation-column", screen(_numeric_labels, "--control", "0", command="train"), "obs['perturbation'] holds numbers (int64); they are read as text labels ('0', '1', '2', ...)", "warning"),
    Case("fraction-without-its-split", train_with("--fraction", "0.5"), "--fraction is only used by the data-efficiency split; it is ignored with the default split.", "warning"),
    Case("heldout-without-its-split", train_with("--heldout", "A+B", "--split", "random"), "--heldout is only used by the heldout split; it is ignored with the random split.", "warning"),
    # --- accepted as it is
    Case("single-perturbation", screen(_only("control", "A"), command="train"), "", "ok"),
]


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch, request):
    folder = tmp_path / "in"
    folder.mkdir()
    argv = case.make(folder, request)
    before = tree_digest(folder)
    if case.before_data:

        def opened(*args, **kwargs):
            raise AssertionError("the screen was opened before the options were checked")

        monkeypatch.setattr("cellpert.data._screen.read_h5ad", opened)
    capsys.readouterr()
    code = run(["--threads", "1", "--quiet", *argv])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    lines = captured.err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    warned = [line for line in lines if line.startswith("warning:")]
    assert "Traceback" not in output
    assert "unexpected" not in output, output
    if case.outcome == "error":
        assert code == EXIT_INPUT_ERROR, output
        assert len(errors) == 1, output
        assert case.message in errors[0], errors[0]
        assert all(line.startswith(("error:", "warning:")) for line in lines), output
    else:
        assert code == 0, output
        assert not errors, output
        if case.outcome == "warning":
            assert any(case.message in line for line in warned), output
        else:
            assert not warned, output
    assert tree_digest(folder) == before, "an input file changed"
    if case.before_data:
        assert not Path(_out(folder)).exists(), "a run directory was started"


# ------------------------------------------------------------------ the table itself
def _literal_strings(func: Callable, name: str) -> set[str] | None:
    """The strings of a ``Literal[...]`` in the annotation of ``func``'s argument ``name``."""
    annotation = inspect.signature(func).parameters[name].annotation
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, func.__globals__)  # noqa: S307 - the package's own annotations
        except Exception:
            return None
    found: set[str] = set()

    def walk(t: object) -> None:
        if typing.get_origin(t) is Literal:
            found.update(a for a in typing.get_args(t) if isinstance(a, str))
        for arg in typing.get_args(t):
            walk(arg)

    walk(annotation)
    return found or None


def test_choices_match_the_models_signatures():
    """Each ``Literal`` option of every model has exactly the table's choices."""
    from cellpert.runs import MODELS
    from cellpert.runs._validate import option_table

    checked = 0
    for name, entry in MODELS.items():
        cls = entry.load_class()
        table = option_table(name)
        trains = [c.__dict__["train"] for c in cls.__mro__ if "train" in c.__dict__ and c.__module__.startswith("cellpert.")]
        for func in (cls.__init__, cls.setup_anndata, *trains):
            for param in inspect.signature(func).parameters:
                strings = _literal_strings(func, param) if param in table else None
                if strings is None:
                    continue
                spec = table[param]
                allowed = set(spec.allowed()) if spec.kind == "choice" else set(spec.also)
                assert allowed == strings, (name, param, allowed, strings)
                checked += 1
    assert checked >= 10


def test_values_are_converted_and_objects_pass_through():
    from cellpert.runs._validate import validate_options

    out = validate_options(
        {"lr": "1e-3", "max_steps": "50", "devices": "2", "control": [0, "ctrl"], "n_hidden": 8.0, "new_option": "x"},
        model="samsvae",
    )
    assert out == {"lr": 1e-3, "max_steps": 50, "devices": 2, "control": ["0", "ctrl"], "n_hidden": 8, "new_option": "x"}
    strategy = object.__new__(type("MyStrategy", (), {}))
    assert validate_options({"strategy": strategy, "devices": [0, 1]})["strategy"] is strategy
    assert validate_options({"mask_logits_init": "prior"}, model="samsvae")["mask_logits_init"] == "prior"
    with pytest.raises(CellpertInputError, match=r"--mask-logits-init must be a number \(initial logit"):
        validate_options({"mask_logits_init": "prior"}, model="svae")
    with pytest.raises(CellpertInputError, match=r"--lr must be a number > 0 \(Adam learning rate\), not nan"):
        validate_options({"lr": float("nan")})

