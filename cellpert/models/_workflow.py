"""Training runs and exports: what ``cellpert train`` and ``cellpert export-latents`` do.

A run directory holds everything needed to reuse a trained model::

    DIR/model/            the scvi-tools model (``model.pt``)
    DIR/config.yaml       the resolved options (defaults < config file < command line)
    DIR/history.csv       the training history (one row per epoch)
    DIR/split.csv         obs name and split (train / val / test / unused) of every cell used
    DIR/genes.txt         the genes the model was trained on, in order
    DIR/perturbations.txt the perturbations (columns of D), in order
    DIR/training.json     steps, epochs, wall time, steps/s, best step, whether it stopped early
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from cellpert import __version__
from cellpert._config import read_config_file, resolve_options
from cellpert._errors import CellpertInputError
from cellpert.data import (
    DEFAULT_SPLIT_KEY,
    UNS_KEY,
    PerturbationScreen,
    load_screen,
    make_split,
    read_h5ad,
    read_split,
    save_results,
    to_uns,
)
from cellpert.evaluate import ica_rotate, mask_recovery, mcc
from cellpert.models._prepare import prepare_anndata

__all__ = ["MODELS", "ModelEntry", "TrainedRun", "export_latents", "load_run", "model_key", "train_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """A model the command line can train."""

    name: str
    """Name on the command line (``--model``)."""
    target: str
    """``module:Class`` of the scvi-tools model class."""
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments implied by the name."""

    def load_class(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


#: Models known to ``cellpert train``; later families register here.
MODELS: dict[str, ModelEntry] = {
    "samsvae": ModelEntry("samsvae", "cellpert.models.samsvae:SAMSVAE", "SAMS-VAE (MODELS.md §2)"),
    "cpa-vae": ModelEntry("cpa-vae", "cellpert.models.samsvae:CPAVAE", "CPA-VAE baseline (MODELS.md §3)"),
    "conditional-vae": ModelEntry(
        "conditional-vae", "cellpert.models.samsvae:ConditionalVAE", "conditional VAE baseline (MODELS.md §3)"
    ),
    "comparative": ModelEntry(
        "comparative",
        "cellpert.models.comparative:ComparativeVAE",
        "comparative VAE, background vs target (MODELS.md §5)",
    ),
    "svae": ModelEntry("svae", "cellpert.models.svae:SVAE", "sVAE, expected-edge L1 sparsity (MODELS.md §4)"),
    "svae-plus": ModelEntry("svae-plus", "cellpert.models.svae:SVAEPlus", "sVAE+, Beta(1, K_beta) sparsity (MODELS.md §4)"),
}

#: Options of a run that are not model or training arguments.
DATA_OPTIONS: dict[str, Any] = {
    "model": None,
    "perturbation_key": None,
    "control": None,
    "layer": None,
    "dosage_key": None,
    "subset": None,
    "drop_zero_genes": False,
    "split_key": None,
    "split": None,
    "split_seed": 0,
    "fraction": 1.0,
    "heldout": None,
}


def model_key(name: str) -> str:
    """Prefix of a model's output keys: ``obsm["X_<key>_latent"]`` (``cpa-vae`` -> ``cpa_vae``)."""
    return name.replace("-", "_")


def _entry(name: str | None) -> ModelEntry:
    if name not in MODELS:
        raise CellpertInputError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name]


def _accepted(func) -> set[str]:
    params = inspect.signature(func).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self", "adata"}


#: setup_anndata arguments the workflow sets itself.
_WORKFLOW_SETUP_ARGS = {"layer", "split_key"}


def _setup_args(cls: type) -> set[str]:
    """``setup_anndata`` arguments a run may set (those not already data options)."""
    return _accepted(cls.setup_anndata) - _WORKFLOW_SETUP_ARGS - set(DATA_OPTIONS) - {"cls"}


def resolve_run_config(
    *, config_file: str | os.PathLike | None = None, cli_options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Resolve a run's options into (data options, setup kwargs, model kwargs, training kwargs).

    Any argument of the model class's ``setup_anndata`` (e.g. ``background`` of the
    comparative model), constructor or ``train`` method may be given in the config file
    (e.g. ``mask_prior_prob: 0.1``); command-line options override the file.
    """
    file_options = read_config_file(config_file) if config_file else {}
    cli_options = {k: v for k, v in (cli_options or {}).items() if v is not None}
    name = cli_options.get("model", file_options.get("model"))
    entry = _entry(name)
    cls = entry.load_class()
    init_args, train_args, setup_args = _accepted(cls.__init__), _accepted(cls.train), _setup_args(cls)
    known = set(DATA_OPTIONS) | init_args | train_args | setup_args
    unknown = sorted(set(cli_options) - known)
    if unknown:
        raise CellpertInputError(f"--model {name} does not take option(s) {', '.join(unknown)}.")
    merged = resolve_options(DATA_OPTIONS, file_options=file_options, cli_options=cli_options, known=known)
    data = {k: merged[k] for k in DATA_OPTIONS}
    setup_kwargs = {k: v for k, v in merged.items() if k in setup_args and v is not None}
    model_kwargs = {k: v for k, v in merged.items() if k in init_args}
    model_kwargs.update(entry.fixed)
    train_kwargs = {k: v for k, v in merged.items() if k in train_args and k not in DATA_OPTIONS}
    return data, setup_kwargs, model_kwargs, train_kwargs


def _load_screen(path: str | os.PathLike | ad.AnnData, data: dict[str, Any]) -> PerturbationScreen:
    control = data.get("control")
    if isinstance(control, str):
        control = [c.strip() for c in control.split(",") if c.strip()]
    return load_screen(
        path,
        perturbation_key=data.get("perturbation_key"),
        control=control,
        layer=data.get("layer"),
        dosage_key=data.get("dosage_key"),
        subset=data.get("subset"),
        drop_zero_genes=bool(data.get("drop_zero_genes")),
    )


def _apply_split(screen: PerturbationScreen, data: dict[str, Any]) -> str:
    if data.get("split_key"):
        read_split(screen, data["split_key"])
        return data["split_key"]
    kind = data.get("split")
    if kind is None:
        if DEFAULT_SPLIT_KEY in screen.adata.obs.columns:
            # e.g. a simulated screen: keep the split it came with
            read_split(screen, DEFAULT_SPLIT_KEY)
            logger.info("using the split recorded in obs[%r]", DEFAULT_SPLIT_KEY)
            return DEFAULT_SPLIT_KEY
        kind = "random"
    heldout = data.get("heldout")
    if isinstance(heldout, str):
        heldout = [h.strip() for h in heldout.split(",") if h.strip()]
    make_split(
        screen,
        kind,
        seed=int(data.get("split_seed") or 0),
        fraction=float(data.get("fraction", 1.0)),
        heldout=heldout or (),
    )
    return DEFAULT_SPLIT_KEY


@dataclass
class TrainedRun:
    """A trained model with its screen and run directory."""

    model: Any
    screen: PerturbationScreen
    directory: Path
    config: dict[str, Any]


def _history_frame(history: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frames = [df for df in (history or {}).values() if isinstance(df, pd.DataFrame) and len(df)]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, axis=1)
    out.index.name = "epoch"
    return out


def train_run(
    screen_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress_bar: bool = True,
    **options: Any,
) -> TrainedRun:
    """Train a model on a screen and save the run directory (see module docstring).

    Parameters
    ----------
    screen_path
        The screen (``.h5ad``); it is only read.
    out_dir
        Run directory to create.
    config_file
        YAML or TOML file with any option (``options`` override it).
    overwrite
        Replace an existing run directory's model.
    **options
        ``model`` (required), data options (:data:`DATA_OPTIONS`), and any argument of
        the model class's constructor or ``train`` method.
    """
    data, setup_kwargs, model_kwargs, train_kwargs = resolve_run_config(config_file=config_file, cli_options=options)
    out = Path(out_dir)
    if (out / "model").exists() and not overwrite:
        raise CellpertInputError(f"{out} already holds a model; choose another --out or pass --overwrite.")
    entry = _entry(data["model"])
    cls = entry.load_class()
    _quiet_libraries()
    screen = _load_screen(screen_path, data)
    split_key = _apply_split(screen, data)
    adata = prepare_anndata(screen, split_key=split_key)
    setup_kwargs = _complete_setup(setup_kwargs, screen)
    cls.setup_anndata(adata, layer=screen.layer, split_key=split_key, **setup_kwargs)
    model = cls(adata, **model_kwargs)
    train_kwargs.setdefault("enable_progress_bar", progress_bar)
    logger.info("training %s on %d cells x %d genes", entry.name, screen.n_cells, screen.n_genes)
    start = time.perf_counter()
    model.train(**train_kwargs)
    training = _training_summary(model, time.perf_counter() - start)

    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out / "model"), overwrite=True, save_anndata=False)
    config = {
        "cellpert_version": __version__,
        "screen": str(Path(screen_path).resolve()),
        **data,
        "split_key": split_key,
        "setup_kwargs": setup_kwargs,
        "model_kwargs": model_kwargs,
        "train_kwargs": {k: v for k, v in train_kwargs.items() if k != "enable_progress_bar"},
        "n_cells": screen.n_cells,
        "n_genes": screen.n_genes,
        "n_perturbations": screen.n_perturbations,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    (out / "training.json").write_text(json.dumps(_plain(training), indent=2) + "\n")
    config["training"] = training
    _history_frame(model.history).to_csv(out / "history.csv")
    pd.DataFrame({"obs_name": screen.obs_names, "split": read_split(screen, split_key)}).to_csv(
        out / "split.csv", index=False
    )
    (out / "genes.txt").write_text("\n".join(map(str, screen.gene_names)) + "\n")
    (out / "perturbations.txt").write_text("\n".join(screen.perturbation_names) + "\n")
    return TrainedRun(model=model, screen=screen, directory=out, config=config)


def _training_summary(model: Any, wall_s: float) -> dict[str, Any]:
    """Steps, wall time and steps/s of a finished ``model.train`` (any family)."""
    summary = dict(getattr(model, "training_summary_", None) or {})
    trainer = getattr(model, "trainer", None)
    steps = summary.get("steps", int(trainer.global_step) if trainer is not None else None)
    summary.setdefault("steps", steps)
    summary.setdefault("epochs", int(trainer.current_epoch) if trainer is not None else None)
    summary.setdefault("wall_time_s", round(wall_s, 3))
    if steps and summary.get("steps_per_s") is None and wall_s > 0:
        summary["steps_per_s"] = round(steps / wall_s, 3)
    return summary


def _complete_setup(setup_kwargs: dict[str, Any], screen: PerturbationScreen) -> dict[str, Any]:
    """Background values without a column refer to the screen's perturbation labels, and a
    background column equal to the perturbation column defaults to the control labels."""
    out = dict(setup_kwargs)
    if out.get("background") is not None and not out.get("background_key"):
        out["background_key"] = screen.perturbation_key
    if out.get("background_key") and out.get("background") is None and out["background_key"] == screen.perturbation_key:
        out["background"] = list(screen.control_labels)
    if isinstance(out.get("background"), str):
        out["background"] = [b.strip() for b in out["background"].split(",") if b.strip()]
    return out


def _quiet_libraries() -> None:
    """Lightning and scvi-tools set their loggers to INFO on import (tips, "max_steps
    reached", "Using column names from ..."): keep them to warnings unless debugging."""
    if not logging.getLogger("cellpert").isEnabledFor(logging.DEBUG):
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "scvi"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _plain(obj: Any) -> Any:
    """YAML-safe copy (numpy scalars and tuples to Python)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_run_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The resolved config of a run directory."""
    path = Path(model_dir) / "config.yaml"
    if not path.is_file() or not (Path(model_dir) / "model").is_dir():
        raise CellpertInputError(
            f"{model_dir} is not a cellpert run directory (no config.yaml and model/); "
            "give the --out directory of `cellpert train`."
        )
    return yaml.safe_load(path.read_text())


def _check_matches(screen: PerturbationScreen, model_dir: Path) -> None:
    genes = (model_dir / "genes.txt").read_text().split()
    perts = (model_dir / "perturbations.txt").read_text().split()
    if list(map(str, screen.gene_names)) != genes:
        missing = sorted(set(genes) - set(map(str, screen.gene_names)))
        detail = f"{len(missing)} of the model's genes are missing (e.g. {', '.join(missing[:3])})" if missing else (
            f"the screen has {screen.n_genes} genes in another order or with extras, the model {len(genes)}"
        )
        raise CellpertInputError(
            f"the screen's genes do not match the model's: {detail}; use the screen the model was trained on."
        )
    if screen.perturbation_names != perts:
        extra = sorted(set(screen.perturbation_names) - set(perts))
        missing = sorted(set(perts) - set(screen.perturbation_names))
        raise CellpertInputError(
            "the screen's perturbations do not match the model's"
            + (f": unknown to the model {', '.join(extra[:3])}" if extra else "")
            + (f": missing {', '.join(missing[:3])}" if missing else "")
            + "; use the screen the model was trained on."
        )


def load_run(screen: str | os.PathLike | ad.AnnData, model_dir: str | os.PathLike) -> TrainedRun:
    """Load a trained run on a screen, checking that genes and perturbations match."""
    model_dir = Path(model_dir)
    config = read_run_config(model_dir)
    entry = _entry(config["model"])
    cls = entry.load_class()
    _quiet_libraries()
    loaded = _load_screen(screen, config)
    _check_matches(loaded, model_dir)
    split_key = config.get("split_key") or DEFAULT_SPLIT_KEY
    split = pd.read_csv(model_dir / "split.csv")
    recorded = pd.Series(split["split"].to_numpy(), index=split["obs_name"].astype(str))
    values = recorded.reindex(loaded.obs_names.astype(str)).fillna("unused").to_numpy()
    loaded.adata.obs[split_key] = pd.Categorical(values, categories=["train", "val", "test", "unused"])
    adata = prepare_anndata(loaded, split_key=split_key)
    model = cls.load(str(model_dir / "model"), adata=adata)
    return TrainedRun(model=model, screen=loaded, directory=model_dir, config=config)


def export_latents(
    screen_path: str | os.PathLike,
    *,
    model_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    batch_size: int | None = None,
    ica: bool = False,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Write what a trained model learned into the screen's h5ad (through the safe writer).

    Writes
    ------
    ``obsm["X_<model>_<name>"]``
        For each cell-level output of the model (SAMS-VAE family: ``basal`` z^b and
        ``latent`` z, posterior means); cells outside the run's ``subset`` get NaN.
    ``obsm["X_<model>_ica"]``
        With ``ica=True``: the ``latent`` output whitened and rotated by FastICA
        (MODELS.md §7).
    ``uns["cellpert"]["models"]["<model>"]``
        The model's global outputs (e.g. ``embeddings``, ``mask_probabilities`` as
        perturbation x latent DataFrames), ``config`` (the run's resolved options) and,
        with ``ica=True`` on a screen with ground truth (``obsm["X_true_latent"]``),
        ``ica_mcc`` (MCC before and after ICA). With ``ica=True`` for SAMS-VAE and
        CPA-VAE also ``ica_shifts`` and ``ica_masks`` (perturbation x ICA dimension:
        each perturbation's latent shift in the ICA basis and its support, see
        :meth:`~cellpert.models.SAMSVAE.get_ica_masks`) and, when the screen holds the
        simulator's true mask, ``ica_mask_f1`` (mask F1 of q(M) before and of the ICA
        masks after).

    Returns
    -------
    The path written, and what was written (``{"obsm": [...], "uns": [...]}``, plus
    ``"ica_mcc"`` when computed).
    """
    run = load_run(screen_path, model_dir)
    key = model_key(run.config["model"])
    fields = run.model.export_fields(batch_size=batch_size)
    full = read_h5ad(screen_path)
    rows = _subset_rows(full, run.config.get("subset"))
    written: dict[str, list[str]] = {"obsm": [], "uns": []}
    for name, values in fields.get("obsm", {}).items():
        values = np.asarray(values)
        array = np.full((full.n_obs, values.shape[1]), np.nan, dtype=np.float32)
        array[rows] = values
        obsm_key = f"X_{key}_{name}"
        full.obsm[obsm_key] = array
        written["obsm"].append(obsm_key)
    entry = {name: to_uns(value) for name, value in fields.get("uns", {}).items()}
    entry["config"] = to_uns(run.config)
    if ica:
        latent = np.asarray(fields.get("obsm", {}).get("latent"))
        if latent.ndim != 2:
            raise CellpertInputError(f"--ica needs a latent representation; {run.config['model']} exports none.")
        found = None
        if "embeddings" in fields.get("uns", {}):  # SAMS-VAE and CPA-VAE: masks in the ICA basis
            found = run.model.get_ica_masks(seed=seed, latent=latent)
            rotated = found["latent"]
            entry["ica_shifts"] = to_uns(found["shifts"])
            entry["ica_masks"] = to_uns(found["masks"])
        else:
            rotated = ica_rotate(latent, seed=seed)
        array = np.full((full.n_obs, rotated.shape[1]), np.nan, dtype=np.float32)
        array[rows] = rotated
        full.obsm[f"X_{key}_ica"] = array
        written["obsm"].append(f"X_{key}_ica")
        if "X_true_latent" in full.obsm:
            truth = np.asarray(full.obsm["X_true_latent"])[rows]
            before, after = mcc(truth, latent), mcc(truth, rotated)
            entry["ica_mcc"] = {"before": float(before), "after": float(after)}
            written["ica_mcc"] = entry["ica_mcc"]
            true_mask = _true_mask(full, run.model)
            if found is not None and true_mask is not None:
                f1 = {"after": mask_recovery(true_mask, found["masks"].to_numpy(), matching=after)["f1"]}
                if "mask_probabilities" in fields["uns"]:
                    probs = fields["uns"]["mask_probabilities"].to_numpy()
                    f1["before"] = mask_recovery(true_mask, probs, matching=before)["f1"]
                entry["ica_mask_f1"] = f1
                written["ica_mask_f1"] = f1
    uns = full.uns.setdefault(UNS_KEY, {})
    models = uns.setdefault("models", {})
    models[key] = entry
    written["uns"] = [f"uns/{UNS_KEY}/models/{key}/{name}" for name in entry]
    path = save_results(full, screen_path, out=out)
    return path, written


def _true_mask(adata: ad.AnnData, model: Any) -> np.ndarray | None:
    """The simulator's perturbation x latent mask, rows in the model's perturbation order."""
    truth = adata.uns.get(UNS_KEY, {}).get("ground_truth", {})
    if "mask" not in truth or "perturbation_names" not in truth:
        return None
    names = [str(n) for n in truth["perturbation_names"]]
    wanted = [str(n) for n in getattr(model, "perturbation_names", [])]
    if not wanted or not set(wanted) <= set(names):
        return None
    return np.asarray(truth["mask"])[[names.index(n) for n in wanted]]


def _subset_rows(adata: ad.AnnData, subset: str | None) -> np.ndarray:
    if not subset:
        return np.arange(adata.n_obs)
    return np.flatnonzero(np.asarray(adata.obs.eval(subset), dtype=bool))
