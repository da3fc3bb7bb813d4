"""Job types: what one (model, sweep point, split seed) of an experiment runs.

Each task has a schema (the keys its config sections take, :class:`Task`) and a function
``run(config, workdir) -> result`` where ``result`` is a JSON-able mapping:

- ``metrics``: the model's numbers (floats);
- ``baselines``: ``{name: {metric: value}}`` for predictors that do not depend on the
  model (the additive sum, chance levels); the report shows each once per split seed;
- ``info``: anything else worth keeping (sizes, held-out labels, timings).

The jobs call the library (:func:`cellpert.runs.train_run`, :func:`cellpert.runs.evaluate_ate`,
the models) through the benchmark scripts' functions, so a reproduction computes what
``make bench-*`` computes. Imports of torch and the library are inside the functions: the
runner's main process stays light and each worker sets its thread count first.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from experiments._config import REPO, ConfigError, Field, expand_path

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module (the folder is not a package)."""
    key = f"_cellpert_benchmark_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def _floats(row: dict, keys=None) -> dict[str, float]:
    """The numeric entries of a row (NaN and None dropped), as plain floats."""
    out = {}
    for k, v in row.items():
        if keys is not None and k not in keys:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if v is not None and math.isfinite(float(v)):
            out[k] = float(v)
    return out


@dataclass(frozen=True)
class Task:
    """A job type: schema of its config sections and the function that runs one job.

    ``model_options=None`` means the options are free here and checked by ``validate``
    (e.g. by cellpert's own run-option table); ``models=None`` any model name.
    """

    name: str
    run: Callable[[dict, Path], dict]
    data: dict[str, Field]
    split: dict[str, Field]
    training: dict[str, Field]
    evaluation: dict[str, Field]
    model_options: dict[str, Field] | None
    models: tuple[str, ...] | None = None
    required: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: sections whose other keys pass (``check`` validates them)
    open_sections: tuple[str, ...] = ()
    #: the job imports torch (the runner sets its thread count first)
    uses_torch: bool = True
    check: Callable[[dict, str], None] | None = None

    def validate(self, config: dict, where: str) -> None:
        if self.check is not None:
            self.check(config, where)

    def describe_models(self) -> str:
        return ", ".join(self.models) if self.models else "any model the task runs"


DATA_DOC = {
    "description": Field("str", "what the data is"),
    "recipe": Field("str", "the command that writes data.path, e.g. make data-norman", nullable=True),
}
SEEDS = {"seeds": Field("list[int]", "split seeds")}


# ------------------------------------------------------------------------ screens
def _run_screen(config: dict, workdir: Path) -> dict:
    """Train a cellpert model on a screen file and score its ATEs and IWELBO (the SAMS-VAE
    paper's protocol by default; ``evaluation`` overrides it)."""
    bench = load_benchmark("norman_combinations")
    data, split, model = config["data"], config["split"], config["model"]
    training = dict(config["training"])
    screen_options = {k: data[k] for k in ("subset", "drop_zero_genes", "perturbation_key", "control", "layer")
                      if data.get(k) is not None}  # fmt: skip
    max_steps = training.pop("max_steps")
    seed = training.pop("seed", 0)
    path = expand_path(data["path"])
    info: dict[str, Any] = {}
    if split["kind"] in ("combinations", "data-efficiency"):
        from cellpert.data import eligible_heldout_combinations, load_screen

        screen = load_screen(path, subset=data.get("subset"), warn=False)
        info["heldout"] = list(eligible_heldout_combinations(screen, seed=split["seed"]))
        info["n_combinations"] = len(screen.combination_labels)
    row, baselines = bench.train_and_evaluate(
        path,
        run_dir=workdir / "run",
        name=model["name"],
        model=model["name"],
        options={**model["options"], **training},
        screen_options=screen_options,
        split=split["kind"],
        split_seed=split["seed"],
        fraction=split.get("fraction"),
        max_steps=max_steps,
        seed=seed,
        evaluation=config["evaluation"],
    )
    info.update(n_test_labels=row["n_test_labels"])
    return {
        "metrics": _floats(row),
        "baselines": {name: _floats(b) for name, b in baselines.items()},
        "info": info,
    }


def _check_screen(config: dict, where: str) -> None:
    """Model and training options through cellpert's own run-option table (one line)."""
    from cellpert import CellpertInputError
    from cellpert.runs import resolve_run_config

    options = {"model": config["model"]["name"], **config["model"]["options"], **config["training"]}
    try:
        resolve_run_config(cli_options=options)
    except CellpertInputError as err:
        message = str(err).replace("--model ", "model ").replace(" option(s) ", " model.options/training key(s) ")
        raise ConfigError(f"{where}: {message}") from err
    allowed = {"n_particles", "n_draws", "n_groups", "library_size", "estimator", "data_cells", "top_n",
               "iwelbo_samples", "ceiling", "seed"}  # fmt: skip
    unknown = sorted(set(config["evaluation"]) - allowed)
    if unknown:
        raise ConfigError(f"{where} evaluation: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}.")


SCREEN = Task(
    name="screen",
    run=_run_screen,
    data={
        **DATA_DOC,
        "path": Field("str", "the .h5ad; ${SHARED_DATA} is ../shared/data"),
        "subset": Field("str", "obs query selecting the cells", nullable=True),
        "drop_zero_genes": Field("bool", "drop genes with no counts"),
        "perturbation_key": Field("str", "obs column of labels", nullable=True),
        "control": Field("str", "control label", nullable=True),
        "layer": Field("str", "layer with the counts", nullable=True),
    },
    split={**SEEDS, "kind": Field("str", "random, combinations or data-efficiency"),
           "fraction": Field("float", "fraction f of the other combinations trained on", nullable=True)},  # fmt: skip
    # any option of the model's train() (and constructor), checked by cellpert's table in _check_screen
    training={"max_steps": Field("int", "training steps"), "seed": Field("int", "model seed")},
    open_sections=("training",),
    evaluation={k: Field("any") for k in ("n_particles", "n_draws", "n_groups", "library_size", "estimator", "data_cells",
                                          "top_n", "iwelbo_samples", "ceiling", "seed")},  # fmt: skip
    model_options=None,
    models=("samsvae", "cpa-vae", "conditional-vae", "svae", "svae-plus"),
    required={"data": ("path",), "split": ("kind",), "training": ("max_steps",)},
    check=_check_screen,
)


# ------------------------------------------------------------------ sparse shift
SPARSE_SHIFT_MODELS = ("vae", "ivae", "svae", "svae-plus", "samsvae")


def _run_sparse_shift(config: dict, workdir: Path) -> dict:
    """One model on one seed of the sVAE paper's simulation (benchmarks/sparse_shift_benchmark.py)."""
    bench = load_benchmark("sparse_shift_benchmark")
    data, training, evaluation = config["data"], config["training"], config["evaluation"]
    model = config["model"]
    options = model["options"]
    name = model["name"]
    if name == "svae-plus":
        name = f"svae+K{options['beta_k']:g}"
    args = SimpleNamespace(
        n_cells=data["n_cells_per_perturbation"],
        n_perturbations=data["n_perturbations"],
        n_latent=data["n_latent"],
        n_heldout=data["n_heldout"],
        n_genes=data["n_genes"],
        mode=data["mode"],
        model_seed=training["model_seed"],
        l1=options.get("sparsity_weight", 10.0),
        epochs=training["epochs"],
        warmup=training["warmup"],
        patience=training["patience"],
        stage2_epochs=training["stage2_epochs"],
        perturbation_lr=training.get("perturbation_lr"),
        iwelbo_samples=evaluation["iwelbo_samples"],
    )
    row = bench.run_one(config["split"]["seed"], name, args)
    info = {k: v for k, v in row.items() if isinstance(v, str) and k not in ("model",)}
    return {"metrics": _floats(row, None), "baselines": {}, "info": info}


def _check_sparse_shift(config: dict, where: str) -> None:
    name, options = config["model"]["name"], config["model"]["options"]
    allowed = {"svae": {"sparsity_weight"}, "svae-plus": {"beta_k"}}.get(name, set())
    extra = sorted(set(options) - allowed)
    if extra:
        raise ConfigError(f"{where} model.options: model {name} takes {', '.join(sorted(allowed)) or 'no options'}, "
                          f"not {', '.join(extra)}.")  # fmt: skip
    if name == "svae-plus" and not options.get("beta_k", 0) > 1:
        raise ConfigError(f"{where} model.options.beta_k must be a number > 1 for svae-plus (1 turns sparsity off).")
    if config["data"].get("simulator") != "sparse_shift":
        raise ConfigError(f"{where} data.simulator must be sparse_shift for task sparse_shift.")


SPARSE_SHIFT = Task(
    name="sparse_shift",
    run=_run_sparse_shift,
    data={
        **DATA_DOC,
        "simulator": Field("str", "sparse_shift"),
        "n_perturbations": Field("int", "perturbations"),
        "n_heldout": Field("int", "the last n held out"),
        "n_latent": Field("int", "K, true and fitted"),
        "n_genes": Field("int", "genes"),
        "n_cells_per_perturbation": Field("int", "cells per perturbation (and controls)"),
        "mode": Field("str", "nb or legacy"),
    },
    split=SEEDS,
    training={
        "epochs": Field("int", "max epochs"),
        "warmup": Field("int", "KL warm-up epochs"),
        "patience": Field("int", "early-stopping patience (epochs)"),
        "stage2_epochs": Field("int", "epochs of stage 2 of the OOD protocol"),
        "perturbation_lr": Field("float", "lr of μ and log_alpha", nullable=True),
        "model_seed": Field("int", "model seed"),
    },
    evaluation={"iwelbo_samples": Field("int", "importance samples of the held-out IWELBO")},
    model_options={"sparsity_weight": Field("float", "sVAE λ"), "beta_k": Field("float", "sVAE+ K_beta > 1")},
    models=SPARSE_SHIFT_MODELS,
    required={
        "data": ("simulator", "n_perturbations", "n_heldout", "n_latent", "n_genes", "n_cells_per_perturbation", "mode"),
        "training": ("epochs", "warmup", "patience", "stage2_epochs", "model_seed"),
        "evaluation": ("iwelbo_samples",),
    },
    check=_check_sparse_shift,
)


# ------------------------------------------------------------ comparative: simulation
def _run_comparative_sim(config: dict, workdir: Path) -> dict:
    """One method, one fitted d_t, one seed of benchmarks/comparative_benchmark.py."""
    bench = load_benchmark("comparative_benchmark")
    data, training, evaluation = config["data"], config["training"], config["evaluation"]
    options = config["model"]["options"]
    args = SimpleNamespace(
        n_cells=data["n_cells"],
        n_genes=data["n_genes"],
        library_size=data["library_size"],
        epochs=training["epochs"],
        penalty_weight=options.get("penalty_weight", 1.0),
        constraint_level=options.get("constraint_level", 0.05),
        eval_split=evaluation["eval_split"],
        iwelbo_samples=evaluation["iwelbo_samples"],
    )
    seed, dt = config["split"]["seed"], int(options["fitted_dt"])
    adata = bench.simulate(seed, args)
    row = bench.run_one(adata, seed, dt, config["model"]["name"], args)
    n = int(row["n_eval_target"])
    chance = {"r2_z_from_t_hat": dt / (n - 1), "r2_t_from_z_hat": bench.TRUE_DZ / (n - 1)}
    return {
        "metrics": _floats(row),
        "baselines": {f"chance level p/(n−1), d_t = {dt}": chance},
        "info": {"n_eval_target": n, "true_dz": bench.TRUE_DZ, "true_dt": bench.TRUE_DT},
    }


def _check_comparative(config: dict, where: str) -> None:
    if "fitted_dt" not in config["model"]["options"]:
        raise ConfigError(f"{where} model.options.fitted_dt is missing (the fitted salient dimension; sweepable).")
    if config["data"].get("simulator") != "comparative":
        raise ConfigError(f"{where} data.simulator must be comparative for task comparative_sim.")


COMPARATIVE_SIM = Task(
    name="comparative_sim",
    run=_run_comparative_sim,
    data={
        **DATA_DOC,
        "simulator": Field("str", "comparative"),
        "n_cells": Field("int", "cells per set (background and target)"),
        "n_genes": Field("int", "genes"),
        "library_size": Field("float", "median library size"),
    },
    split=SEEDS,
    training={"epochs": Field("int", "epochs")},
    evaluation={"eval_split": Field("str", "test or test+val"), "iwelbo_samples": Field("int", "0: no IWELBO")},
    model_options={
        "fitted_dt": Field("int", "fitted salient dimension"),
        "penalty_weight": Field("float", "Wasserstein weight w"),
        "constraint_level": Field("float", "ε / d_t of the constrained mode"),
    },
    models=("ours-std", "ours-std-w0", "ours-mo", "ours-co", "cvi", "cvi-w0", "cvi-wp"),
    required={"data": ("simulator", "n_cells", "n_genes", "library_size"), "training": ("epochs",),
              "evaluation": ("eval_split", "iwelbo_samples")},  # fmt: skip
    check=_check_comparative,
)


# ------------------------------------------------------------ comparative: Kang 2018
def _run_kang(config: dict, workdir: Path) -> dict:
    """One method of benchmarks/kang_comparative.py on one split seed."""
    bench = load_benchmark("kang_comparative")
    data, training = config["data"], config["training"]
    options = config["model"]["options"]
    method, seed = config["model"]["name"], config["split"]["seed"]
    args = SimpleNamespace(
        d_z=options.get("d_z", 10),
        d_t=options.get("d_t", 2),
        seed=seed,
        epochs=training["epochs"],
        penalty_weight=options.get("penalty_weight", 1.0),
        mmd_weight=options.get("mmd_weight", 0.0),
        constraint_level=options.get("constraint_level", 0.05),
    )
    adata = bench.load_kang(expand_path(data["path"]), data["n_genes"], seed, data.get("n_cells"))
    t0 = time.time()
    if method == "pca":
        z, t, extra = bench.fit_pca(adata), None, {}
    elif method == "contrastivevi":
        z, t, extra = bench.fit_contrastivevi(adata, args)
    else:
        z, t, extra = bench.fit_comparative(adata, method, args)
    row = {"fit_s": time.time() - t0, **bench.measure(z, t, adata), **extra}
    baselines = {r["method"]: _floats(r) for r in bench.chance_rows(adata)}
    return {"metrics": _floats(row), "baselines": baselines, "info": {"n_cells": adata.n_obs, "n_genes": adata.n_vars}}


KANG = Task(
    name="kang",
    run=_run_kang,
    data={
        **DATA_DOC,
        "path": Field("str", "the Kang .h5ad; ${SHARED_DATA} is ../shared/data"),
        "n_genes": Field("int", "highly variable genes kept"),
        "n_cells": Field("int", "random subsample of cells (null: all)", nullable=True),
    },
    split=SEEDS,
    training={"epochs": Field("int", "epochs")},
    evaluation={},
    model_options={
        "d_z": Field("int", "background latent dimension"),
        "d_t": Field("int", "salient latent dimension"),
        "penalty_weight": Field("float", "Wasserstein weight (λ₀ when constrained)"),
        "mmd_weight": Field("float", "MMD weight (standard+mmd)"),
        "constraint_level": Field("float", "ε / d_t"),
    },
    models=("standard", "multi-objective", "constrained", "standard+mmd", "contrastivevi", "pca"),
    required={"data": ("path", "n_genes"), "training": ("epochs",)},
)


# ------------------------------------------------------------------ echo (tests)
def _run_echo(config: dict, workdir: Path) -> dict:
    """No model: returns ``model.options.value`` + the split seed (to test the runner)."""
    time.sleep(float(config["training"].get("sleep_s", 0.0)))
    value = float(config["model"]["options"].get("value", 0.0)) + config["split"]["seed"]
    return {"metrics": {"value": value, "double": 2 * value}, "baselines": {"zero": {"value": 0.0}}, "info": {}}


ECHO = Task(
    name="echo",
    run=_run_echo,
    data={**DATA_DOC, "path": Field("str", "a file that must exist", nullable=True)},
    split=SEEDS,
    training={"sleep_s": Field("float", "seconds to sleep")},
    evaluation={},
    model_options={"value": Field("float", "the number returned")},
    uses_torch=False,
)

#: Job types by the name a config's ``task:`` gives.
TASKS: dict[str, Task] = {t.name: t for t in (SCREEN, SPARSE_SHIFT, COMPARATIVE_SIM, KANG, ECHO)}
