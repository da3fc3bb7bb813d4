"""The run directory: what ``cellpert train`` writes and every later command reads.

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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from cellpert._errors import CellpertInputError
from cellpert.data import DEFAULT_SPLIT_KEY, PerturbationScreen, read_split
from cellpert.models import prepare_anndata
from cellpert.runs._config import screen_from_options
from cellpert.runs._registry import get_entry

__all__ = ["TrainedRun", "load_run", "read_run_config", "write_run_directory"]


@dataclass
class TrainedRun:
    """A trained model with its screen and run directory."""

    model: Any
    screen: PerturbationScreen
    directory: Path
    config: dict[str, Any]
    rank: int = 0
    """Global rank of this process (DDP); only rank 0 writes the run directory."""


def _history_frame(history: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frames = [df for df in (history or {}).values() if isinstance(df, pd.DataFrame) and len(df)]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, axis=1)
    out.index.name = "epoch"
    return out


def write_run_directory(
    out: Path, *, model: Any, screen: PerturbationScreen, split_key: str, config: dict[str, Any],
    training: dict[str, Any],
) -> None:  # fmt: skip
    """Write a trained model and its run files into ``out`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out / "model"), overwrite=True, save_anndata=False)
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    (out / "training.json").write_text(json.dumps(_plain(training), indent=2) + "\n")
    _history_frame(model.history).to_csv(out / "history.csv")
    pd.DataFrame({"obs_name": screen.obs_names, "split": read_split(screen, split_key)}).to_csv(
        out / "split.csv", index=False
    )
    (out / "genes.txt").write_text("\n".join(map(str, screen.gene_names)) + "\n")
    (out / "perturbations.txt").write_text("\n".join(screen.perturbation_names) + "\n")


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


def check_run_matches(screen: PerturbationScreen, model_dir: Path) -> None:
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


def load_run(
    screen: str | os.PathLike | ad.AnnData, model_dir: str | os.PathLike, *, backed: bool | None = None
) -> TrainedRun:
    """Load a trained run on a screen, checking that genes and perturbations match.

    ``backed``: read the counts from disk (default: as the run was trained).
    """
    model_dir = Path(model_dir)
    config = read_run_config(model_dir)
    entry = get_entry(config["model"])
    cls = entry.load_class()
    options = dict(config) if backed is None else {**config, "backed": bool(backed)}
    loaded = screen_from_options(screen, options)
    check_run_matches(loaded, model_dir)
    split_key = config.get("split_key") or DEFAULT_SPLIT_KEY
    split = pd.read_csv(model_dir / "split.csv")
    recorded = pd.Series(split["split"].to_numpy(), index=split["obs_name"].astype(str))
    values = recorded.reindex(loaded.obs_names.astype(str)).fillna("unused").to_numpy()
    loaded.adata.obs[split_key] = pd.Categorical(values, categories=["train", "val", "test", "unused"])
    adata = prepare_anndata(loaded, split_key=split_key)
    model = cls.load(str(model_dir / "model"), adata=adata)
    return TrainedRun(model=model, screen=loaded, directory=model_dir, config=config)
