"""The run directory: what ``cellpert train`` writes and every later command reads.

A run directory holds everything needed to reuse a trained model, or to continue its
training::

    DIR/run.json          format version, status, package versions, seed, the screen's path
                          and sha256, the model file's sha256, one entry per training session
    DIR/config.yaml       the resolved options (defaults < config file < command line)
    DIR/split.csv         obs name and split (train / val / test / unused) of every cell used
    DIR/genes.txt         the genes the model was trained on, in order
    DIR/perturbations.txt the perturbations (columns of D), in order
    DIR/checkpoints/      last.ckpt while training runs (removed when it finishes)
    DIR/model/            the scvi-tools model (``model.pt``), once training finished
    DIR/history.csv       the training history (one row per epoch)
    DIR/training.json     steps, epochs, wall time, steps/s, best step, whether it stopped early

``run.json``, ``config.yaml``, ``split.csv``, ``genes.txt`` and ``perturbations.txt`` are
written before training starts (status ``training``), the rest when it finishes (status
``finished``). A run stopped by SIGINT or SIGTERM has status ``interrupted`` and continues
with ``cellpert train --resume DIR`` (:func:`cellpert.runs.train_run`). Run directories of
cellpert before ``run.json`` existed (format 0) still load, without the checksum checks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from cellpert._errors import CellpertInputError, CellpertWarning
from cellpert.data import DEFAULT_SPLIT_KEY, PerturbationScreen, read_split
from cellpert.data._io import atomic_path
from cellpert.models import prepare_anndata
from cellpert.models._checkpoint import CHECKPOINT_NAME
from cellpert.runs._config import screen_from_options
from cellpert.runs._registry import get_entry

__all__ = [
    "MANIFEST_NAME",
    "RUN_FORMAT_VERSION",
    "TrainedRun",
    "checkpoint_path",
    "file_sha256",
    "load_run",
    "package_versions",
    "read_run_config",
    "read_run_manifest",
    "write_run_directory",
]

logger = logging.getLogger(__name__)

#: Version of the run directory's layout; a cellpert that reads format N refuses N + 1.
RUN_FORMAT_VERSION = 1
#: The run's manifest (format version, status, provenance).
MANIFEST_NAME = "run.json"
#: Subdirectory of the training checkpoint.
CHECKPOINT_DIR = "checkpoints"
#: Distributions whose versions a run records.
_PACKAGES = ("cellpert", "scvi-tools", "torch", "lightning", "anndata", "numpy", "scipy", "pandas")
#: Files a finished run adds (removed when a run starts in the directory).
_RESULT_FILES = ("model", "training.json", "history.csv", CHECKPOINT_DIR)
#: Files above this size get a log line before their checksum is computed.
_LOG_CHECKSUM_BYTES = 1 << 30


@dataclass
class TrainedRun:
    """A trained model with its screen and run directory."""

    model: Any
    screen: PerturbationScreen
    directory: Path
    config: dict[str, Any]
    rank: int = 0
    """Global rank of this process (DDP); only rank 0 writes the run directory."""
    status: str = "trained"
    """``"trained"``, ``"resumed"`` (continued from a checkpoint) or ``"finished"`` (a
    resume of a run that had already finished: nothing was trained)."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """The training checkpoint of a run directory (``DIR/checkpoints/last.ckpt``)."""
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run's numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks of ``chunk_size`` bytes (memory stays small).

    It runs at disk speed or the CPU's sha256 speed, whichever is lower (0.4 GB/s measured
    on one shared core: about 25 s for a 10 GB screen); files over 1 GiB get a log line
    first, since ``cellpert train`` computes it before training starts.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > _LOG_CHECKSUM_BYTES:
        logger.info("computing the sha256 of %s (%.1f GB) for the run's record", path, size / 1e9)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through cellpert's one safe writer (:func:`cellpert.data._io.atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "size_bytes": int(stat.st_size),
        "mtime_ns": int(stat.st_mtime_ns),
        "sha256": file_sha256(path),
    }


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    _write_atomic(run_dir / MANIFEST_NAME, json.dumps(_plain(manifest), indent=2) + "\n")


def read_run_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a run directory (``run.json``), checked.

    A one-line :class:`~cellpert.CellpertInputError` when ``run_dir`` is not a cellpert
    run directory, when ``run.json`` is unreadable, or when it was written by a newer
    cellpert (format version above :data:`RUN_FORMAT_VERSION`). A directory of cellpert
    before ``run.json`` (``config.yaml`` and ``model/``) is format 0, status finished.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        if (run_dir / "config.yaml").is_file() and (run_dir / "model").is_dir():
            return {"format_version": 0, "status": "finished"}
        what = "does not exist" if not run_dir.exists() else "is not a cellpert run directory (no run.json)"
        raise CellpertInputError(f"{run_dir} {what}; give the --out directory of `cellpert train`.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CellpertInputError(
            f"{path} is unreadable ({type(err).__name__}); the run directory is damaged: train again into a new --out."
        ) from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise CellpertInputError(f"{path} has no valid format_version; it is not a cellpert run directory.")
    if version > RUN_FORMAT_VERSION:
        written = manifest.get("versions", {}).get("cellpert", "a newer cellpert")
        raise CellpertInputError(
            f"{run_dir} was written by cellpert {written} (run format {version}); this cellpert reads format "
            f"{RUN_FORMAT_VERSION} and older: upgrade cellpert."
        )
    return manifest


def cells_fingerprint(screen: PerturbationScreen) -> str:
    """sha256 of what a run depends on besides the counts: the cell names, their labels and
    the gene names, in order. Writing results into the file (varm, uns, obsm) keeps it."""
    digest = hashlib.sha256()
    for part in (screen.obs_names.astype(str), pd.Index(np.asarray(screen.labels).astype(str)), screen.gene_names.astype(str)):
        digest.update("\n".join(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _start_manifest(*, screen_path: Path, seed: int | None, screen: PerturbationScreen | None = None) -> dict[str, Any]:
    record = _file_record(screen_path)
    if screen is not None:
        record["cells_sha256"] = cells_fingerprint(screen)
    return {
        "format_version": RUN_FORMAT_VERSION,
        "status": "training",
        "created": _now(),
        "finished": None,
        "seed": seed,
        "versions": package_versions(),
        "screen": record,
        "model_file": None,
        "sessions": [],
    }


def start_run_directory(
    out: Path, *, config: dict[str, Any], screen: PerturbationScreen, split_key: str, screen_path: Path,
    seed: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Create a run directory before training: ``run.json`` (status ``training``, with the
    screen's sha256), ``config.yaml``, ``split.csv``, ``genes.txt`` and ``perturbations.txt``.
    The results and checkpoint of an earlier run there are removed (the caller checked
    that they may go)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _RESULT_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    manifest = _start_manifest(screen_path=screen_path, seed=seed, screen=screen)
    _write_atomic(out / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
    pd.DataFrame({"obs_name": screen.obs_names, "split": read_split(screen, split_key)}).to_csv(
        out / "split.csv", index=False
    )
    (out / "genes.txt").write_text("\n".join(map(str, screen.gene_names)) + "\n")
    (out / "perturbations.txt").write_text("\n".join(screen.perturbation_names) + "\n")
    _write_manifest(out, manifest)
    return manifest


def record_session(run_dir: Path, *, outcome: str | None = None, **fields: Any) -> None:
    """Start a training session in ``run.json`` (no ``outcome``: status ``training``) or
    end it (``outcome``: ``"SIGINT"`` / ``"SIGTERM"``, status ``interrupted``; an exception's
    name, status ``failed``). ``fields``: e.g. ``from_step``, ``step``, ``versions``."""
    manifest = read_run_manifest(run_dir)
    sessions = manifest.setdefault("sessions", [])
    if outcome is None:
        sessions.append({"started": _now(), **fields})
        manifest["status"] = "training"
    else:
        if not sessions or "outcome" in sessions[-1]:
            sessions.append({"started": None})
        sessions[-1].update(ended=_now(), outcome=outcome, **fields)
        manifest["status"] = "interrupted" if outcome in ("SIGINT", "SIGTERM") else "failed"
    _write_manifest(run_dir, manifest)


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
    """Write a trained model and its run files into ``out`` (see the module docstring).

    ``run.json`` gets status ``finished`` and the model file's sha256 (a directory without
    ``run.json`` gets one, without the screen's checksum), and the training checkpoint is
    removed, last, once everything else is written.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out / "model"), overwrite=True, save_anndata=False)
    _write_atomic(out / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
    (out / "training.json").write_text(json.dumps(_plain(training), indent=2) + "\n")
    _history_frame(model.history).to_csv(out / "history.csv")
    pd.DataFrame({"obs_name": screen.obs_names, "split": read_split(screen, split_key)}).to_csv(
        out / "split.csv", index=False
    )
    (out / "genes.txt").write_text("\n".join(map(str, screen.gene_names)) + "\n")
    (out / "perturbations.txt").write_text("\n".join(screen.perturbation_names) + "\n")
    if (out / MANIFEST_NAME).is_file():
        manifest = read_run_manifest(out)
    else:
        manifest = {"format_version": RUN_FORMAT_VERSION, "created": _now(), "versions": package_versions(),
                    "seed": getattr(model, "seed", None), "screen": {"path": config.get("screen")}, "sessions": []}  # fmt: skip
    manifest.update(status="finished", finished=_now(), model_file=_file_record(out / "model" / "model.pt"))
    sessions = manifest.setdefault("sessions", [])
    if sessions and "outcome" not in sessions[-1]:
        sessions[-1].update(ended=_now(), outcome="finished", step=training.get("steps"))
    _write_manifest(out, manifest)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def _plain(obj: Any) -> Any:
    """YAML-safe copy (numpy scalars and tuples to Python)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_run_config(model_dir: str | os.PathLike, *, finished: bool = True) -> dict[str, Any]:
    """The resolved config of a run directory (``config.yaml``).

    ``finished``: the run must have finished training (a one-line
    :class:`~cellpert.CellpertInputError` saying how to resume it otherwise).
    """
    model_dir = Path(model_dir)
    manifest = read_run_manifest(model_dir)
    if finished and manifest.get("status") != "finished":
        raise CellpertInputError(_unfinished_message(model_dir, manifest))
    path = model_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise CellpertInputError(f"{path} is missing; the run directory is incomplete: train again.") from err
    except yaml.YAMLError as err:
        raise CellpertInputError(f"{path} is not valid YAML; the run directory is damaged: train again.") from err
    if not isinstance(config, dict) or "model" not in config:
        raise CellpertInputError(f"{path} is not a cellpert run config (no model); train again.")
    return config


def _unfinished_message(run_dir: Path, manifest: dict[str, Any]) -> str:
    sessions = manifest.get("sessions") or [{}]
    last = sessions[-1]
    status = manifest.get("status")
    if status == "interrupted":
        how = f"was interrupted by {last.get('outcome')} at step {last.get('step')}"
    elif status == "failed":
        how = f"stopped with an error ({last.get('outcome')}) at step {last.get('step')}"
    else:
        how = "has not finished training (it is still training, or its process was killed)"
    return f"{run_dir} {how}; continue it with `cellpert train --resume {run_dir}`."


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


def _apply_recorded_split(screen: PerturbationScreen, run_dir: Path, split_key: str) -> None:
    """Give ``screen`` the split of ``run_dir/split.csv`` (cells it lacks: ``unused``)."""
    split = pd.read_csv(run_dir / "split.csv")
    recorded = pd.Series(split["split"].to_numpy(), index=split["obs_name"].astype(str))
    values = recorded.reindex(screen.obs_names.astype(str)).fillna("unused").to_numpy()
    screen.adata.obs[split_key] = pd.Categorical(values, categories=["train", "val", "test", "unused"])


def check_screen_file(
    path: Any, run_dir: Path, manifest: dict[str, Any], screen: PerturbationScreen | None = None
) -> bool:
    """Compare a screen file with the one the run recorded; warn (never refuse) if it differs.

    The file is the same when its size and modification time are the recorded ones;
    otherwise its sha256 decides (a different size decides without reading it). A file
    that differs but whose cells, labels and genes are the recorded ones
    (:func:`cells_fingerprint` of the loaded ``screen``; cellpert wrote results into it)
    is only logged; otherwise a warning says so. Returns whether it matched (True when
    there is nothing to compare: an in-memory AnnData, a run of format 0).
    """
    recorded = manifest.get("screen") or {}
    if not isinstance(path, str | os.PathLike) or not recorded.get("sha256"):
        return True
    path = Path(path)
    stat = path.stat()
    if stat.st_size == recorded.get("size_bytes") and stat.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    if stat.st_size == recorded.get("size_bytes") and file_sha256(path) == recorded["sha256"]:
        return True
    if screen is not None and recorded.get("cells_sha256") == cells_fingerprint(screen):
        logger.debug(
            "%s changed since %s was trained (results written into it?); its cells, labels and genes are the same",
            path, run_dir,
        )
        return False
    warnings.warn(
        f"{path} is not the file {run_dir} was trained on (its sha256 differs from the one in "
        f"{run_dir / MANIFEST_NAME}, and so do its cell names or labels); its genes and perturbations match, so it "
        "is used: check that it holds the cells the model was trained on.",
        CellpertWarning,
        stacklevel=3,
    )
    return False


def _check_model_file(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """``DIR/model/model.pt``, checked against the size and sha256 recorded when it was written."""
    path = run_dir / "model" / "model.pt"
    if not path.is_file():
        raise CellpertInputError(
            f"{path} is missing; the run directory is incomplete: train again (cellpert train ... --overwrite)."
        )
    recorded = manifest.get("model_file") or {}
    size = path.stat().st_size
    if recorded.get("size_bytes") is not None and size != recorded["size_bytes"]:
        raise CellpertInputError(
            f"{path} is truncated or was replaced ({size:,} bytes; the run wrote {recorded['size_bytes']:,}); "
            "restore it from a backup or train again."
        )
    if recorded.get("sha256") and file_sha256(path) != recorded["sha256"]:
        raise CellpertInputError(
            f"{path} is corrupted or was replaced (its sha256 differs from the one in {run_dir / MANIFEST_NAME}); "
            "restore it from a backup or train again."
        )
    if not zipfile.is_zipfile(path):
        raise CellpertInputError(
            f"{path} is not a saved model (not a torch archive: truncated or overwritten); train again."
        )
    return path


def load_run(
    screen: str | os.PathLike | ad.AnnData, model_dir: str | os.PathLike, *, backed: bool | None = None
) -> TrainedRun:
    """Load a trained run on a screen, checking that genes and perturbations match.

    ``backed``: read the counts from disk (default: as the run was trained).

    What is checked, each failure a one-line :class:`~cellpert.CellpertInputError`: that
    ``model_dir`` is a cellpert run directory of a format this cellpert reads, that its
    training finished (else: how to resume it), that ``model/model.pt`` has the size and
    sha256 recorded when it was written (truncated, corrupted or replaced files), that it
    loads as the recorded model, and that the screen's genes and perturbations are the
    run's. The screen *file* may differ from the one trained on (its sha256 is recorded in
    ``run.json``): that only warns (:class:`~cellpert.CellpertWarning`), because cellpert
    writes its results into the screen's h5ad, which changes the file but not its cells.
    """
    model_dir = Path(model_dir)
    manifest = read_run_manifest(model_dir)
    config = read_run_config(model_dir)
    model_file = _check_model_file(model_dir, manifest)
    entry = get_entry(config["model"])
    cls = entry.load_class()
    options = dict(config) if backed is None else {**config, "backed": bool(backed)}
    loaded = screen_from_options(screen, options)
    check_run_matches(loaded, model_dir)
    check_screen_file(screen, model_dir, manifest, loaded)
    split_key = config.get("split_key") or DEFAULT_SPLIT_KEY
    _apply_recorded_split(loaded, model_dir, split_key)
    adata = prepare_anndata(loaded, split_key=split_key)
    try:
        model = cls.load(str(model_dir / "model"), adata=adata)
    except CellpertInputError:
        raise
    except Exception as err:  # torch / scvi-tools errors on a damaged or foreign file vary
        first = (str(err).splitlines() or [""])[0][:200]
        raise CellpertInputError(
            f"{model_file} cannot be loaded as a {config['model']} model ({type(err).__name__}: {first}); "
            "it is damaged or from another run: restore it or train again."
        ) from err
    return TrainedRun(model=model, screen=loaded, directory=model_dir, config=config)
