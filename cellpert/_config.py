"""Run configurations: defaults < config file (YAML or TOML) < command-line options."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomllib
import yaml

from cellpert._errors import CellpertInputError

__all__ = ["read_config_file", "resolve_options"]


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
