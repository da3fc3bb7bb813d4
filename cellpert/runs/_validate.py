"""Run options checked up front, from one declarative table.

:data:`RUN_OPTIONS` maps each option (its snake_case name, as in config files and in the
model classes' signatures) to an :class:`Option`: its type, the accepted range or
choices, and a few words on what it is. :func:`validate_options` applies the table to a
run's merged options (:func:`cellpert.runs.resolve_run_config`) before any data is read
or any model is built, so that a bad value is one line naming the option, the value and
what is accepted::

    --max-steps must be an integer >= 1 (cap on the training steps), not 0.
    lr in config run.yaml must be a number > 0 (Adam learning rate), not [1].

Options the table does not list (e.g. a family's new argument) pass through unchecked;
the model checks them itself. :data:`MODEL_OVERRIDES` holds the few options whose
accepted values differ between families. Numbers written as text (YAML reads ``1e-3``
as a string) are converted; ``True``/``False`` are never numbers.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cellpert._errors import CellpertInputError, CellpertWarning

__all__ = [
    "EVALUATE_OPTIONS",
    "EXPORT_OPTIONS",
    "MODEL_OVERRIDES",
    "RUN_OPTIONS",
    "Option",
    "option_table",
    "validate_options",
]

Kind = Literal["int", "float", "bool", "str", "labels", "choice", "devices", "mapping"]

#: Largest seed numpy and Lightning accept (2**32 - 1).
MAX_SEED = 2**32 - 1
#: Choices listed in a message; longer lists are cut after these.
_SHOWN_CHOICES = 8


class _Invalid(Exception):
    """A value an :class:`Option` does not accept (turned into a CellpertInputError)."""


@dataclass(frozen=True)
class Option:
    """What one run option accepts.

    Build them with :func:`integer`, :func:`number`, :func:`choice` and the other
    helpers below rather than by hand.
    """

    kind: Kind
    """Type: ``int``, ``float``, ``bool``, ``str``, ``labels`` (a label or a list of
    labels), ``choice``, ``devices`` (Lightning's) or ``mapping``."""
    description: str
    """A few words on what the option is (shown in the error)."""
    low: float | None = None
    """Lower bound of a number (None: none)."""
    high: float | None = None
    """Upper bound of a number (None: none)."""
    low_open: bool = False
    """Whether ``low`` itself is excluded."""
    high_open: bool = False
    """Whether ``high`` itself is excluded."""
    choices: tuple[str, ...] | Callable[[], Iterable[str]] = ()
    """Accepted values of a ``choice`` (or a function returning them, for lists that
    only a library knows, e.g. Lightning's strategies)."""
    also: tuple[str, ...] = ()
    """Words accepted besides a number (``mask_logits_init: prior``)."""
    objects: bool = False
    """Also accept Python objects that are not plain values (a Lightning ``Strategy``
    or ``Accelerator`` given from Python); they pass through unchecked."""

    def allowed(self) -> tuple[str, ...]:
        """The accepted values of a ``choice``."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def accepted(self) -> str:
        """What the option accepts, in words: ``an integer >= 1``, ``one of a, b``."""
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            text = noun + self._range()
            return text + "".join(f" or {word!r}" for word in self.also)
        if self.kind == "choice":
            allowed = self.allowed()
            if len(allowed) > _SHOWN_CHOICES:  # e.g. Lightning's 27 strategies
                return f"one of {', '.join(allowed[:_SHOWN_CHOICES])}, ... ({len(allowed)} names)"
            return "one of " + ", ".join(allowed)
        return {
            "bool": "true or false",
            "str": "a non-empty text",
            "labels": "a label or a list of labels",
            "devices": "'auto', a number of devices >= 1, -1 (all), or device indices such as 0,1",
            "mapping": "a mapping of name: value",
        }[self.kind]

    def _range(self) -> str:
        lo, hi = self.low, self.high
        fmt = _fmt_bound
        if lo is not None and hi is not None:
            return f" in {'(' if self.low_open else '['}{fmt(lo)}, {fmt(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f" {'>' if self.low_open else '>='} {fmt(lo)}"
        if hi is not None:
            return f" {'<' if self.high_open else '<='} {fmt(hi)}"
        return ""

    def check(self, value: Any) -> Any:
        """The value, converted (``"1e-3"`` -> 0.001); raises ``_Invalid`` when not accepted."""
        if self.objects and not isinstance(value, str | int | float | bool | list | tuple | dict):
            return value
        if self.kind == "int":
            return self._in_range(_as_int(value))
        if self.kind == "float":
            if isinstance(value, str) and value.strip() in self.also:
                return value.strip()
            return self._in_range(_as_float(value))
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise _Invalid
            return value
        if self.kind == "str":
            if not isinstance(value, str) or not value.strip():
                raise _Invalid
            return value
        if self.kind == "labels":
            return _as_labels(value)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.allowed():
                raise _Invalid
            return value
        if self.kind == "devices":
            return _as_devices(value)
        if self.kind == "mapping":
            if not isinstance(value, Mapping):
                raise _Invalid
            return dict(value)
        raise AssertionError(self.kind)  # pragma: no cover

    def _in_range(self, x: int | float) -> int | float:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            raise _Invalid
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            raise _Invalid
        return x


def _fmt_bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid from None
    if not isinstance(value, int | float):
        raise _Invalid
    x = float(value)
    if not math.isfinite(x):
        raise _Invalid
    return x


def _as_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    x = _as_float(value)  # "50", 50.0, "1e4"
    if not x.is_integer():
        raise _Invalid
    return int(x)


def _as_labels(value: Any) -> str | list[str]:
    def one(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise _Invalid
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return [one(v) for v in value]
    return one(value)


_DEVICE_LIST = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*,?\s*$")


def _as_devices(value: Any) -> int | str | list[int]:
    """Lightning's ``devices``: "auto", a count >= 1, -1 (all), indices ([0, 1] or "0,1")."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return text
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif _DEVICE_LIST.match(text) and "," in text:
            return text
        else:
            raise _Invalid
    if isinstance(value, bool):
        raise _Invalid
    if isinstance(value, int):
        if value >= 1 or value == -1:
            return value
        raise _Invalid
    if isinstance(value, Sequence) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return list(value)
    raise _Invalid


# ------------------------------------------------------------------- constructors
def integer(description: str, low: int | None = None, high: int | None = None) -> Option:
    """An integer option in ``[low, high]``."""
    return Option("int", description, low=low, high=high)


def number(
    description: str, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, also: tuple[str, ...] = (),
) -> Option:  # fmt: skip
    """A finite number option between ``low`` and ``high`` (``*_open``: bound excluded)."""
    return Option("float", description, low=low, high=high, low_open=low_open, high_open=high_open, also=also)


def positive(description: str) -> Option:
    """A number > 0."""
    return number(description, 0, low_open=True)


def count(description: str) -> Option:
    """An integer >= 1."""
    return integer(description, 1)


def flag(description: str) -> Option:
    """True or false."""
    return Option("bool", description)


def text(description: str) -> Option:
    """A non-empty string (a key, a column, a query)."""
    return Option("str", description)


def labels(description: str) -> Option:
    """A label, or a list of labels (``"a,b"`` or a YAML / TOML list)."""
    return Option("labels", description)


def choice(description: str, *choices: str) -> Option:
    """One of ``choices``."""
    return Option("choice", description, choices=tuple(choices))


def _lightning_strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


#: Lightning's accelerator names (``gpu`` is an alias of ``cuda``).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

#: What each run option accepts (see the module docstring). One entry per option name;
#: :data:`MODEL_OVERRIDES` replaces an entry for one model.
RUN_OPTIONS: dict[str, Option] = {
    # --- data and split (cellpert.runs.DATA_OPTIONS)
    "perturbation_key": text("obs column with the perturbation labels"),
    "control": labels("control label(s)"),
    "layer": text("layer with the raw counts"),
    "dosage_key": text("obsm key of the dosage matrix"),
    "subset": text("pandas query on obs selecting cells"),
    "drop_zero_genes": flag("drop genes with zero counts in every cell"),
    "backed": flag("read the counts from disk"),
    "split_key": text("obs column with the split"),
    "split": choice("kind of split", "random", "combinations", "data-efficiency", "heldout"),
    "split_seed": integer("seed of the split", 0, MAX_SEED),
    # 0 is a point of the data-efficiency curve: none of the other combinations
    "fraction": number("fraction of the other combinations trained on, data-efficiency split", 0, 1),
    "heldout": labels("labels to hold out, heldout split"),
    # --- setup_anndata
    "library_size_key": text("obs column with the library size"),
    "label_key": text("obs column with one label per cell"),
    "control_labels": labels("labels of the control cells"),
    "background_key": text("obs column marking background cells"),
    "background": labels("value(s) of the background cells"),
    "is_target_key": text("obs column to write the target membership into"),
    "batch_key": text("obs column of the batch"),
    "categorical_covariate_keys": labels("obs columns of categorical covariates"),
    "continuous_covariate_keys": labels("obs columns of continuous covariates"),
    # --- model constructors
    "seed": integer("seed of initialisation and training", 0, MAX_SEED),
    "guide": choice("SAMS-VAE guide", "correlated", "mean_field"),
    "n_latent": count("latent dimensions"),
    "n_hidden": count("hidden units per layer"),
    "n_layers": count("hidden layers"),
    "n_layers_encoder": count("encoder hidden layers"),
    "guide_n_hidden": count("hidden units of the guide"),
    "guide_n_layers": count("hidden layers of the guide"),
    "mask_prior_prob": number("prior probability of a mask entry", 0, 1, low_open=True, high_open=True),
    "embedding_prior_scale": positive("prior scale of the embeddings"),
    "n_particles": count("particles of the ELBO"),
    "mask_temperature": positive("relaxed-Bernoulli temperature"),
    "mask_logits_init": number("initial mask logits", also=("prior",)),
    "encoder_input": choice("encoder input", "offset", "dosage", "none"),
    "mask_gradient": choice("mask gradient estimator", "straight_through", "score"),
    "spike_slab_guide": flag("spike-and-slab guide"),
    "dropout_rate": number("dropout rate", 0, 1, high_open=True),
    "use_batch_norm": flag("batch normalisation"),
    "sparsity_weight": number("weight of the sparsity penalty", 0),
    "beta_k": number("K_beta of the Beta(1, K_beta) sparsity prior", 1, low_open=True),
    "kl_beta": number("weight of the KL term", 0),
    "prior": choice("sVAE latent prior", "shift", "standard"),
    "n_background_latent": count("dimensions of the shared latent z"),
    "n_salient_latent": count("dimensions of the salient latent t"),
    "likelihood": choice("count likelihood", "nb", "poisson"),
    "encode_covariates": flag("give the covariates to the encoder too"),
    "dispersion": choice("NB dispersion", "gene", "gene-batch"),
    # --- train (the shared template cellpert.models._training and the families')
    "max_steps": count("cap on the training steps"),
    "max_epochs": count("cap on the training epochs"),
    "batch_size": count("minibatch size"),
    "lr": positive("Adam learning rate"),
    "weight_decay": number("Adam weight decay", 0),
    "gradient_clip_val": number("gradient-norm clipping value; 0: no clipping", 0),
    "check_val_every_n_epoch": count("epochs between validation checks"),
    "early_stopping": flag("early stopping on the validation loss"),
    "early_stopping_patience": integer("validation checks without improvement before stopping", 0),
    "restore_best": flag("restore the best validation state"),
    "max_time": positive("cap on the training wall time, in seconds"),
    "accelerator": Option("choice", "Lightning accelerator", choices=ACCELERATORS, objects=True),
    "devices": Option("devices", "Lightning devices"),
    "strategy": Option("choice", "Lightning strategy", choices=_lightning_strategies, objects=True),
    "precision": choice("Lightning precision", "32", "32-true", "bf16-mixed", "16-mixed"),
    "loader": choice("minibatch reader", "auto", "random", "block"),
    "block_size": count("cells per shuffled block"),
    "fetch_factor": count("minibatches read at once"),
    "plan_kwargs": Option("mapping", "extra training-plan arguments"),
    "mask_temperature_final": positive("final relaxed-Bernoulli temperature"),
    "mask_logits_lr": positive("learning rate of the mask logits"),
    "perturbation_lr": positive("learning rate of the perturbation parameters"),
    "n_epochs_kl_warmup": integer("epochs of KL warm-up", 0),
    "mode": choice("comparative fitting mode", "standard", "multi-objective", "constrained"),
    "penalty_weight": number("weight of the Wasserstein penalty", 0),
    "mmd_weight": number("weight of the MMD term", 0),
    "constraint_level": number("allowed fraction of the salient prior's energy", 0, 1, low_open=True),
    "dual_lr": positive("dual-ascent step size"),
}

#: Options of ``cellpert evaluate-ate`` (:func:`cellpert.runs.evaluate_ate`).
EVALUATE_OPTIONS: dict[str, Option] = {
    "split": choice("split shown", "train", "val", "test"),
    "data_cells": choice("cells of the data ATE", "split", "all"),
    "estimator": choice("model ATE estimator", "combined", "posterior", "counterfactual", "prior"),
    "n_particles": count("posterior predictive particles"),
    "n_groups": integer("groups of particles of the Monte Carlo interval", 2),
    "n_draws": integer("draws of the global latents", 2),
    "max_cells": integer("cells the posterior estimator decodes per group", 2),
    "library_size": number("library size of the prior estimator", 0, low_open=True, also=("fixed", "empirical")),
    "top_n": count("genes per perturbation of the top-N metrics"),
    "iwelbo_samples": count("importance samples of the IWELBO"),
    "ceiling": flag("compute the noise ceiling"),
    "seed": integer("seed of the model ATE and IWELBO draws", 0, MAX_SEED),
    "level_key": text("obs column to compute ATEs by level"),
    "pool": choice("pooling of the levels", "control", "uniform"),
    "latent_shift": choice("latent shift of the counterfactual estimator", "empirical", "model"),
    "backed": flag("read the counts from disk"),
}
#: Options of ``cellpert export-latents`` (:func:`cellpert.runs.export_latents`).
EXPORT_OPTIONS: dict[str, Option] = {
    "batch_size": count("cells per minibatch"),
    "seed": integer("seed of the export", 0, MAX_SEED),
    "ica": flag("add the ICA latents"),
    "backed": flag("read the counts from disk"),
}

_SVAE_MASK_INIT = number("initial logit of the mask edges")

#: Per-model replacements of :data:`RUN_OPTIONS` entries (keyed by ``--model`` name).
MODEL_OVERRIDES: dict[str, dict[str, Option]] = {
    "svae": {"mask_logits_init": _SVAE_MASK_INIT},
    "svae-plus": {"mask_logits_init": _SVAE_MASK_INIT},
}


def option_table(model: str | None = None) -> dict[str, Option]:
    """:data:`RUN_OPTIONS` with ``model``'s overrides."""
    return {**RUN_OPTIONS, **MODEL_OVERRIDES.get(model or "", {})}


def _source(name: str, cli_options: Mapping[str, Any], config_file: str | os.PathLike | None) -> str:
    """How the user wrote the option: ``--max-steps`` or ``max_steps in config c.yaml``."""
    if name in cli_options or config_file is None:
        return "--" + name.replace("_", "-")
    return f"{name} in config {os.path.basename(os.fspath(config_file))}"


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def validate_options(
    options: Mapping[str, Any],
    *,
    model: str | None = None,
    given: Iterable[str] | None = None,
    cli_options: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
    table: Mapping[str, Option] | None = None,
) -> dict[str, Any]:
    """Check a run's merged options against :func:`option_table` and return them converted.

    Parameters
    ----------
    options
        The merged options (defaults < config file < command line).
    model
        The ``--model`` name (for :data:`MODEL_OVERRIDES`).
    given
        The options the user gave (config file or command line); only these are
        checked, and the checks of options used together apply to them. Default: all.
    cli_options
        The command-line options, to name an option as the user wrote it
        (``--max-steps``; otherwise ``max_steps in config <file>``).
    config_file
        The config file the other options came from.
    table
        Another table (e.g. :data:`EVALUATE_OPTIONS`) instead of the run options'.

    Returns
    -------
    A copy of ``options`` with the given values converted (``"1e-3"`` -> 0.001,
    ``"50"`` -> 50, ``devices="2"`` -> 2). None means "not given" and is never checked.

    Raises
    ------
    CellpertInputError
        On the first value the table does not accept, naming the option, the value and
        what is accepted; or for options that only work together (``--split heldout``
        without ``--heldout``, an accelerator this machine does not have).
    """
    run_options = table is None
    table = option_table(model) if table is None else table
    cli_options = cli_options or {}
    given = set(options) if given is None else set(given)
    out = dict(options)
    for name in sorted(given):
        value = options.get(name)
        spec = table.get(name)
        if value is None or spec is None:
            continue
        try:
            out[name] = spec.check(value)
        except _Invalid:
            raise CellpertInputError(
                f"{_source(name, cli_options, config_file)} must be {spec.accepted()} "
                f"({spec.description}), not {_shown(value)}."
            ) from None
    if run_options:
        _check_together(out, given, lambda n: _source(n, cli_options, config_file))
    return out


def _check_together(options: Mapping[str, Any], given: set[str], where: Callable[[str], str]) -> None:
    """Options that only mean something with another one, and devices this machine lacks."""
    split = options.get("split")
    if split == "heldout" and not options.get("heldout"):
        raise CellpertInputError(
            f"{where('split')} heldout needs the labels to hold out: add --heldout A,B (comma-separated)."
        )
    unused = [
        (name, kind)
        for name, kind in (("heldout", "heldout"), ("fraction", "data-efficiency"))
        if name in given and options.get(name) is not None and split != kind
    ]
    if unused:
        current = (
            f"the split read from obs[{options['split_key']!r}]" if options.get("split_key")
            else f"the {split} split" if split else "the default split"
        )  # fmt: skip
        for name, kind in unused:
            warnings.warn(
                f"{where(name)} is only used by the {kind} split; it is ignored with {current}.",
                CellpertWarning,
                stacklevel=4,
            )
    accelerator = options.get("accelerator")
    if accelerator in ("gpu", "cuda", "mps", "tpu") and "accelerator" in given:
        _check_accelerator(str(accelerator), options.get("devices"), where)


def _check_accelerator(accelerator: str, devices: Any, where: Callable[[str], str]) -> None:
    """An accelerator (and device count) this machine has, before any data is read."""
    import torch

    if accelerator in ("gpu", "cuda"):
        available, what = torch.cuda.device_count(), "CUDA GPU"
    elif accelerator == "mps":
        available, what = int(torch.backends.mps.is_available()), "Apple MPS device"
    else:
        from lightning.pytorch.accelerators import XLAAccelerator

        available, what = (XLAAccelerator.auto_device_count() if XLAAccelerator.is_available() else 0), "TPU"
    if available == 0:
        raise CellpertInputError(
            f"{where('accelerator')} {accelerator}: this machine has no {what}; use --accelerator cpu or auto."
        )
    wanted = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else None
    if wanted is not None and wanted > available:
        raise CellpertInputError(
            f"{where('devices')} {devices}: this machine has {available} {what}(s); ask for at most {available}."
        )
