"""Experiment configs: read, merge, check, expand into jobs, hash.

An experiment is a folder ``experiments/<experiment>/`` with

- ``_experiment.yaml``: what every model of the experiment shares: ``title``, ``task``
  (the job type, :data:`experiments._tasks.TASKS`), ``data``, ``split`` (with the split
  ``seeds``), ``training``, ``evaluation``, ``sweep``, ``report`` and a ``fast:`` section;
- one ``<model>.yaml`` per model: ``model`` (``name``, ``label``, ``options``), any
  section of the experiment file to override, ``reference`` (published numbers) and its
  own ``fast:`` section.

A model's resolved config is the experiment file deep-merged with the model file; with
FAST, then the experiment's ``fast:`` section and the model's ``fast:`` section on top.
Every key is checked against the task's schema: an unknown key or a wrong type is one
line (:class:`ConfigError`) naming the file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent
REPO = EXPERIMENTS_DIR.parent
#: Bump to invalidate every cached result (a change of what a job computes).
CACHE_VERSION = 1
EXPERIMENT_FILE = "_experiment.yaml"

#: Sections of ``_experiment.yaml`` and of a model file.
EXPERIMENT_KEYS = {"title", "task", "data", "split", "model", "training", "evaluation", "sweep", "report", "fast"}
MODEL_FILE_KEYS = {"model", "data", "split", "training", "evaluation", "sweep", "reference", "fast"}
#: Keys of ``report`` (experiment file only).
REPORT_KEYS = {"metrics", "baselines", "derived", "figure", "reference_name", "reference_source", "notes", "order",
               "sweep_labels"}  # fmt: skip
METRIC_KEYS = {"key", "label", "format"}
DERIVED_KEYS = {"key", "of", "model", "where"}
MODEL_KEYS = {"name", "label", "options"}


class ConfigError(Exception):
    """A config problem, as one line: which file, which key, what is accepted."""


def shared_data_dir() -> Path:
    """``$CELLPERT_SHARED_DATA``, else ``../shared/data`` next to the repository."""
    return Path(os.environ.get("CELLPERT_SHARED_DATA", REPO.parent / "shared" / "data"))


def expand_path(value: str) -> Path:
    """A config path: ``${SHARED_DATA}`` expanded, relative paths from the repository root."""
    path = Path(str(value).replace("${SHARED_DATA}", str(shared_data_dir())))
    return path if path.is_absolute() else REPO / path


# ----------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Field:
    """One config key: its type (``int``, ``float``, ``str``, ``bool``, ``list[int]``,
    ``list[str]``, ``any``), whether ``null`` is allowed, and a short meaning."""

    type: str
    meaning: str = ""
    nullable: bool = False


def check_value(value: Any, spec: Field, where: str) -> Any:
    """``value`` converted to ``spec.type`` (numbers written as text are accepted), or
    :class:`ConfigError`."""
    if value is None:
        if spec.nullable or spec.type == "any":
            return None
        raise ConfigError(f"{where} must be {_describe(spec)}, not null.")
    kind = spec.type
    try:
        if kind == "any":
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, float | str) and float(value) == int(float(value)):
                return int(float(value))
        if kind == "float" and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
        if kind.startswith("list[") and isinstance(value, list):
            inner = Field(kind[5:-1])
            return [check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where} must be {_describe(spec)}, not {value!r}.")


def _describe(spec: Field) -> str:
    names = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false",
             "list[int]": "a list of integers", "list[str]": "a list of names", "any": "a value"}  # fmt: skip
    text = names.get(spec.type, spec.type)
    text += " or null" if spec.nullable else ""
    return f"{text} ({spec.meaning})" if spec.meaning else text


def check_keys(section: Any, known: set[str] | dict, where: str) -> None:
    """``section`` must be a mapping (or empty) whose keys are all in ``known``."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping of key: value, not {section!r}.")
    unknown = sorted(set(map(str, section)) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
            f"valid keys: {', '.join(sorted(known))}."
        )


# ----------------------------------------------------------------------------- files
def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is ``{}``)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise ConfigError(f"{_rel(path)} is not valid YAML: {first}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{_rel(path)} must hold a mapping of section: value.")
    return data


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested mappings are merged, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: dict, path: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``path = "a.b"`` (intermediate mappings created)."""
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep key {path!r}: {key!r} is not a section.")
    node[last] = value


def get_dotted(config: dict, path: str, default: Any = None) -> Any:
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """One model of an experiment: its resolved config (FAST applied or not)."""

    experiment: str
    model_id: str
    path: Path
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.config["model"].get("label") or self.model_id)


@dataclass
class Experiment:
    """An experiment folder, loaded: shared settings and one :class:`ModelConfig` per model."""

    name: str
    folder: Path
    fast: bool
    title: str
    task: str
    report: dict[str, Any]
    models: list[ModelConfig] = field(default_factory=list)


@dataclass
class Job:
    """One (model, sweep point, split seed) of an experiment."""

    experiment: str
    model_id: str
    label: str
    seed: int
    sweep: dict[str, Any]
    config: dict[str, Any]
    key: str  # hash of the resolved config

    @property
    def description(self) -> str:
        point = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.sweep.items())
        return f"{self.model_id} seed={self.seed}" + (f" {point}" if point else "")


def _check_raw(raw: dict, allowed: set[str], path: Path, task, *, in_fast: bool = False) -> None:
    """Unknown keys of one file (or of its ``fast:`` section), section by section."""
    where = _rel(path) + (" fast:" if in_fast else "")
    check_keys(raw, allowed - ({"fast"} if in_fast else set()), where)
    for section, known in (("data", task.data), ("split", task.split), ("training", task.training),
                           ("evaluation", task.evaluation)):  # fmt: skip
        if section in raw:
            if section in task.open_sections:
                check_keys(raw[section], set(raw[section] or {}), f"{where} {section}")
            else:
                check_keys(raw[section], known, f"{where} {section}")
    if "model" in raw:
        check_keys(raw["model"], MODEL_KEYS, f"{where} model")
        if "options" in raw["model"] and task.model_options is not None:
            check_keys(raw["model"]["options"] or {}, task.model_options, f"{where} model.options")
    if "sweep" in raw:
        if not isinstance(raw["sweep"], dict):
            raise ConfigError(f"{where} sweep must map a dotted key (e.g. split.fraction) to a list of values.")
        for key, values in raw["sweep"].items():
            if str(key).split(".")[0] not in ("data", "split", "model", "training", "evaluation"):
                raise ConfigError(
                    f"{where} sweep.{key}: a sweep key starts with data., split., model., training. or evaluation."
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where} sweep.{key} must be a non-empty list of values, not {values!r}.")
    if "report" in raw:
        report = raw["report"]
        check_keys(report, REPORT_KEYS, f"{where} report")
        for i, metric in enumerate(report.get("metrics") or []):
            check_keys(metric, METRIC_KEYS, f"{where} report.metrics[{i}]")
        for i, derived in enumerate(report.get("derived") or []):
            check_keys(derived, DERIVED_KEYS, f"{where} report.derived[{i}]")
    if "reference" in raw:
        if not isinstance(raw["reference"], list):
            raise ConfigError(f"{where} reference must be a list of {{where: ..., <metric>: value}} entries.")
    if not in_fast and "fast" in raw:
        _check_raw(raw["fast"] or {}, allowed, path, task, in_fast=True)


def _check_types(config: dict, task, where: str) -> dict:
    """Types of the resolved config; returns it with values converted."""
    out = copy.deepcopy(config)
    for section, known in (("data", task.data), ("split", task.split), ("training", task.training),
                           ("evaluation", task.evaluation)):  # fmt: skip
        values = out.setdefault(section, {}) or {}
        out[section] = values
        for key, spec in known.items():
            if key in values:
                values[key] = check_value(values[key], spec, f"{where} {section}.{key}")
    model = out.get("model") or {}
    if not isinstance(model.get("name"), str):
        raise ConfigError(f"{where} model.name must be the name of a model ({task.describe_models()}).")
    if task.models is not None and model["name"] not in task.models:
        raise ConfigError(
            f"{where} model.name {model['name']!r} is not a model of task {task.name!r}; "
            f"choose from {', '.join(task.models)}."
        )
    model["options"] = dict(model.get("options") or {})
    if task.model_options is not None:
        for key, spec in task.model_options.items():
            if key in model["options"]:
                model["options"][key] = check_value(model["options"][key], spec, f"{where} model.options.{key}")
    out["model"] = model
    seeds = out["split"].get("seeds")
    if seeds is None:
        raise ConfigError(f"{where} split.seeds is missing (the split seeds to run, e.g. [0, 1, 2]).")
    out["split"]["seeds"] = check_value(seeds, Field("list[int]", "split seeds"), f"{where} split.seeds")
    for section in ("data", "split", "training", "evaluation"):
        for key in task.required.get(section, ()):
            if key not in out[section]:
                raise ConfigError(f"{where} {section}.{key} is missing ({getattr(task, section)[key].meaning}).")
    return out


def load_experiment(folder: Path, *, fast: bool) -> Experiment:
    """Read and check an experiment folder (see the module docstring)."""
    from experiments._tasks import TASKS

    folder = Path(folder)
    path = folder / EXPERIMENT_FILE
    if not path.is_file():
        raise ConfigError(f"{_rel(folder)} has no {EXPERIMENT_FILE}; an experiment folder needs one.")
    raw = read_yaml(path)
    task_name = raw.get("task")
    if task_name not in TASKS:
        raise ConfigError(f"{_rel(path)}: task must be one of {', '.join(sorted(TASKS))}, not {task_name!r}.")
    task = TASKS[task_name]
    _check_raw(raw, EXPERIMENT_KEYS, path, task)
    base = {k: v for k, v in raw.items() if k not in ("fast", "report", "title", "task")}
    exp = Experiment(
        name=folder.name,
        folder=folder,
        fast=fast,
        title=str(raw.get("title") or folder.name),
        task=task_name,
        report=raw.get("report") or {},
    )
    files = sorted(p for p in folder.glob("*.yaml") if p.name != EXPERIMENT_FILE and not p.name.startswith("_"))
    if not files:
        raise ConfigError(f"{_rel(folder)} has no model config (<model>.yaml) beside {EXPERIMENT_FILE}.")
    for model_path in files:
        model_raw = read_yaml(model_path)
        _check_raw(model_raw, MODEL_FILE_KEYS, model_path, task)
        merged = deep_merge(base, {k: v for k, v in model_raw.items() if k != "fast"})
        if fast:
            merged = deep_merge(merged, raw.get("fast") or {})
            merged = deep_merge(merged, model_raw.get("fast") or {})
        where = _rel(model_path) + (" (FAST)" if fast else "")
        resolved = _check_types(merged, task, where)  # task.validate runs on each job (after the sweep)
        exp.models.append(ModelConfig(folder.name, model_path.stem, model_path, resolved))
    _check_references(exp)
    order = exp.report.get("order") or []
    rank = {m: i for i, m in enumerate(order)}
    exp.models.sort(key=lambda m: (rank.get(m.model_id, len(rank)), m.model_id))
    return exp


def _check_references(exp: Experiment) -> None:
    """Reference entries name metrics of the report and sweep keys of their model."""
    metrics = {m.get("key") for m in exp.report.get("metrics") or []}
    for model in exp.models:
        sweep = set(model.config.get("sweep") or {})
        for i, entry in enumerate(model.config.get("reference") or []):
            where = f"{_rel(model.path)} reference[{i}]"
            check_keys(entry, (metrics | {"where"}) if metrics else set(entry), where)
            unknown = sorted(set(entry.get("where") or {}) - sweep)
            if unknown:
                raise ConfigError(f"{where} where: {', '.join(unknown)} is not a sweep key of this model "
                                  f"({', '.join(sorted(sweep)) or 'it has no sweep'}).")  # fmt: skip
            for key, value in entry.items():
                if key != "where":
                    check_value(value, Field("float", "a published number"), f"{where} {key}")


def job_key(config: dict) -> str:
    """Hash of what a job computes: task, data, split (one seed), model name and options,
    training and evaluation (not labels, reference numbers or the report)."""
    payload = {
        "cache_version": CACHE_VERSION,
        "task": config["task"],
        "data": {k: v for k, v in config["data"].items() if k not in ("description", "recipe")},
        "split": config["split"],
        "model": {"name": config["model"]["name"], "options": config["model"]["options"]},
        "training": config["training"],
        "evaluation": config["evaluation"],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_jobs(exp: Experiment, *, models: list[str] | None = None, seeds: list[int] | None = None) -> list[Job]:
    """Configs × sweep points × split seeds, in report order."""
    from experiments._tasks import TASKS

    task = TASKS[exp.task]
    jobs: list[Job] = []
    known_models = [m.model_id for m in exp.models]
    for name in models or []:
        if name not in known_models:
            raise ConfigError(f"experiment {exp.name} has no model {name!r}; models: {', '.join(known_models)}.")
    for model in exp.models:
        if models and model.model_id not in models:
            continue
        sweep = model.config.get("sweep") or {}
        keys = list(sweep)
        for point in itertools.product(*(sweep[k] for k in keys)):
            for seed in model.config["split"]["seeds"]:
                if seeds is not None and seed not in seeds:
                    continue
                config = {k: copy.deepcopy(v) for k, v in model.config.items() if k not in ("sweep", "reference")}
                config["task"] = exp.task
                for key, value in zip(keys, point, strict=True):
                    set_dotted(config, key, value)
                    top = key.split(".")[0]  # a swept key must be one the task knows, as in the files
                    _check_raw({top: config[top]}, MODEL_FILE_KEYS, model.path, task)
                config["split"] = {k: v for k, v in config["split"].items() if k != "seeds"}
                config["split"]["seed"] = seed
                where = f"{_rel(model.path)} sweep {dict(zip(keys, point, strict=True))}"
                config = _check_types({**config, "split": {**config["split"], "seeds": [seed]}}, task, where)
                config["split"].pop("seeds")
                config["task"] = exp.task
                task.validate(config, where)
                jobs.append(
                    Job(
                        experiment=exp.name,
                        model_id=model.model_id,
                        label=model.label,
                        seed=seed,
                        sweep=dict(zip(keys, point, strict=True)),
                        config=config,
                        key=job_key(config),
                    )
                )
    return jobs


def list_experiments(root: Path = EXPERIMENTS_DIR) -> list[str]:
    """The experiment folders under ``root`` (those with an ``_experiment.yaml``)."""
    return sorted(p.parent.name for p in Path(root).glob(f"*/{EXPERIMENT_FILE}"))
