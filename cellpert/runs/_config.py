"""Run configurations: defaults < config file (YAML or TOML) < command-line options.

Also how a run's data options become a screen and a split (:func:`screen_from_options`,
:func:`apply_split`), shared by training and by every command that reloads a run.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import tomllib
import yaml

from cellpert._errors import CellpertInputError
from cellpert.data import (
    DEFAULT_SPLIT_KEY,
    PerturbationScreen,
    as_list,
    load_screen,
    make_split,
    read_split,
)
from cellpert.runs._registry import MODELS, get_entry
from cellpert.runs._validate import validate_options

__all__ = [
    "DATA_OPTIONS",
    "apply_split",
    "read_config_file",
    "resolve_options",
    "resolve_run_config",
    "screen_from_options",
]

logger = logging.getLogger(__name__)


def _normalise_keys(options: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in options.items()}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat mapping of options from a ``.yaml``/``.yml`` or ``.toml`` file.

    Keys may be written in kebab-case (``max-steps``) or snake_case (``max_steps``).
    """
    path = Path(path)
    if not path.is_file():
        raise CellpertInputError(f"config file {path} not found; check the --config path.")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            raise CellpertInputError(f"config file {path} must end in .yaml, .yml or .toml.")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise CellpertInputError(f"config file {path} is not valid {path.suffix[1:].upper()}: {first}") from err
    if not isinstance(data, Mapping):
        raise CellpertInputError(f"config file {path} must hold a mapping of option: value.")
    return _normalise_keys(data)


def resolve_options(
    defaults: Mapping[str, Any],
    *,
    file_options: Mapping[str, Any] | None = None,
    cli_options: Mapping[str, Any] | None = None,
    known: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Merge options: ``defaults``, overridden by the config file, overridden by the CLI.

    ``cli_options`` values that are None mean "not given" and do not override.
    Unknown keys in the config file are an error that lists the valid ones.
    """
    valid = set(known) if known is not None else set(defaults)
    file_options = _normalise_keys(file_options or {})
    unknown = sorted(set(file_options) - valid)
    if unknown:
        raise CellpertInputError(
            f"unknown option(s) in the config file: {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}."
        )
    merged = dict(defaults)
    merged.update(file_options)
    merged.update({k: v for k, v in _normalise_keys(cli_options or {}).items() if v is not None})
    return merged


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
    "backed": False,
}


def _accepted(func, cls: type | None = None) -> set[str]:
    """Named arguments of ``func``; a method that forwards ``**kwargs`` to the same method
    of a base class of ``cls`` (a family's ``train`` -> the shared template) also takes
    the base's."""
    params = inspect.signature(func).parameters
    names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self", "adata"}
    if cls is not None and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for base in cls.__mro__[1:]:
            parent = base.__dict__.get(func.__name__)
            if parent is not None and parent is not func:
                # only cellpert's own template; scvi-tools' **trainer_kwargs are not run options
                return names | _accepted(parent, base) if base.__module__.startswith("cellpert.") else names
    return names


def _owner(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that defines ``name``."""
    return next(c for c in cls.__mro__ if name in c.__dict__)


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

    Every option given is checked here, before any data is read or any model is built,
    against the table of :mod:`cellpert.runs._validate` (type, range or choices): a bad
    value raises a one-line :class:`~cellpert.CellpertInputError` that names the option,
    the value and what is accepted. Unknown options are an error too; options the table
    does not list pass through to the model.
    """
    file_options = read_config_file(config_file) if config_file else {}
    cli_options = {k: v for k, v in (cli_options or {}).items() if v is not None}
    name = cli_options.get("model", file_options.get("model"))
    if name is None:
        raise CellpertInputError(
            f"no model given: pass --model (one of {', '.join(MODELS)}) or set model: in the config file."
        )
    entry = get_entry(name)
    cls = entry.load_class()
    init_args, train_args, setup_args = _accepted(cls.__init__), _accepted(cls.train, _owner(cls, "train")), _setup_args(cls)
    known = set(DATA_OPTIONS) | init_args | train_args | setup_args
    unknown = sorted(set(cli_options) - known)
    if unknown:
        raise CellpertInputError(f"--model {name} does not take option(s) {', '.join(unknown)}.")
    merged = resolve_options(DATA_OPTIONS, file_options=file_options, cli_options=cli_options, known=known)
    merged = validate_options(
        merged, model=name, given=set(file_options) | set(cli_options), cli_options=cli_options, config_file=config_file
    )
    data = {k: merged[k] for k in DATA_OPTIONS}
    setup_kwargs = {k: v for k, v in merged.items() if k in setup_args and v is not None}
    model_kwargs = {k: v for k, v in merged.items() if k in init_args}
    model_kwargs.update(entry.fixed)
    train_kwargs = {k: v for k, v in merged.items() if k in train_args and k not in DATA_OPTIONS}
    return data, setup_kwargs, model_kwargs, train_kwargs


def screen_from_options(path: str | os.PathLike | ad.AnnData, data: dict[str, Any]) -> PerturbationScreen:
    """The screen a run's data options describe (see :data:`DATA_OPTIONS`)."""
    return load_screen(
        path,
        perturbation_key=data.get("perturbation_key"),
        control=as_list(data.get("control")),
        layer=data.get("layer"),
        dosage_key=data.get("dosage_key"),
        subset=data.get("subset"),
        drop_zero_genes=bool(data.get("drop_zero_genes")),
        backed=bool(data.get("backed")),
    )


def apply_split(screen: PerturbationScreen, data: dict[str, Any]) -> str:
    """Give the screen the split the data options ask for; returns its obs column.

    ``split_key``: read that column; else ``split`` (random, combinations, ...); with
    neither, keep ``obs["cellpert_split"]`` when the screen has one (e.g. a simulated
    screen), else a random split.
    """
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
    heldout = as_list(data.get("heldout"))
    make_split(
        screen,
        kind,
        seed=int(data.get("split_seed") or 0),
        fraction=float(data.get("fraction", 1.0)),
        heldout=heldout or (),
    )
    return DEFAULT_SPLIT_KEY
