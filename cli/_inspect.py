"""`cellpert inspect`: a readable summary of a screen."""

from __future__ import annotations

import json
import warnings
from typing import Annotated

import typer

from cellpert._errors import CellpertWarning
from cellpert_cli._options import (
    ControlOpt,
    DosageKeyOpt,
    LayerOpt,
    PerturbationKeyOpt,
    ScreenArg,
    SubsetOpt,
    control_list,
)


def inspect(
    screen_path: ScreenArg,
    perturbation_key: PerturbationKeyOpt = None,
    control: ControlOpt = None,
    layer: LayerOpt = None,
    dosage_key: DosageKeyOpt = None,
    subset: SubsetOpt = None,
    covariate_keys: Annotated[
        str | None,
        typer.Option(
            "--covariate-keys",
            help="Comma-separated obs columns to report as covariates (default: columns named batch, "
            "cell_type, donor, ... when present).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a screen: cells, genes, perturbations, controls, libraries, problems.

    Examples:

        cellpert inspect screen.h5ad

        cellpert inspect norman.h5ad --perturbation-key condition --control control --subset 'dataset == "norman19"'

        cellpert inspect cpa_format.h5ad --layer counts --json

        cellpert inspect mcfaline.h5ad --covariate-keys cell_type
    """
    from cellpert.data import (
        as_list,
        covariate_spread,
        find_covariate_columns,
        load_screen,
        screen_description,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellpertWarning)  # reported below as problems
        screen = load_screen(
            screen_path,
            perturbation_key=perturbation_key,
            control=control_list(control),
            layer=layer,
            dosage_key=dosage_key,
            subset=subset,
        )
    desc = screen_description(screen)
    desc["file"] = str(screen_path)
    desc["counts"] = "X" if layer is None else f"layers[{layer!r}]"
    desc["perturbation_key"] = screen.perturbation_key or f"obsm[{dosage_key!r}]"
    desc["problems"] = screen.problems()
    keys = as_list(covariate_keys)
    if keys is None:
        keys = find_covariate_columns(screen.adata.obs, exclude=[screen.perturbation_key or ""])
    desc["covariates"] = [covariate_spread(screen, k) for k in keys]
    for cov in desc["covariates"]:
        desc["problems"] += _covariate_problems(cov)
    if as_json:
        typer.echo(json.dumps(desc, indent=2, default=str))
        return
    q = desc["library_size_quantiles"]
    lines = [
        f"screen            {desc['file']}",
        f"cells x genes     {desc['cells']:,} x {desc['genes']:,}   (counts in {desc['counts']}, "
        f"{100 * desc['sparsity']:.1f}% zeros)",
        f"perturbations     {desc['perturbations']} (from {desc['perturbation_key']}): "
        f"{desc['single_perturbation_labels']} single labels, {desc['combination_labels']} combinations",
        f"control cells     {desc['control_cells']:,} (label {', '.join(desc['control_labels'])})",
        f"cells per label   min {desc['cells_per_label_min']}, median {desc['cells_per_label_median']:g}, "
        f"max {desc['cells_per_label_max']} (perturbed labels)",
        f"cells per pert.   min {desc['cells_per_perturbation_min']}, median "
        f"{desc['cells_per_perturbation_median']:g}, max {desc['cells_per_perturbation_max']} "
        "(alone or in combinations)",
        "library size      " + ", ".join(f"q{int(k * 100)} {v:,.0f}" for k, v in q.items()),
        f"all-zero genes    {desc['all_zero_genes']}",
    ]
    for cov in desc["covariates"]:
        levels = ", ".join(f"{k} {v:,}" for k, v in list(cov["levels"].items())[:8])
        more = f" (+{len(cov['levels']) - 8} more)" if len(cov["levels"]) > 8 else ""
        lines.append(f"covariate         obs[{cov['key']!r}]: {len(cov['levels'])} levels: {levels}{more}")
        lines.append(
            f"                  a label's largest level holds a median {cov['max_share_median']:.0%} of its cells; "
            f"{len(cov['labels_in_one_level'])} label(s) in one level only"
        )
    lines.append("problems          " + ("none" if not desc["problems"] else ""))
    lines += [f"  - {p}" for p in desc["problems"]]
    typer.echo("\n".join(lines))


def _covariate_problems(cov: dict) -> list[str]:
    """Warnings about one covariate's spread (see :func:`cellpert.data.covariate_spread`)."""
    key, out = cov["key"], []
    if cov["missing"]:
        out.append(f"obs[{key!r}] has {cov['missing']} cell(s) without a value; a model cannot use it as a covariate")
    if cov["levels_without_control"]:
        out.append(
            f"obs[{key!r}] level(s) {', '.join(cov['levels_without_control'][:5])} have no control cells: "
            "effects within them cannot be measured"
        )
    if cov["labels_in_one_level"]:
        names = ", ".join(cov["labels_in_one_level"][:5])
        out.append(
            f"{len(cov['labels_in_one_level'])} label(s) seen in only one level of obs[{key!r}] (e.g. {names}): "
            f"their effect cannot be told apart from that level's; train with --batch-key/--covariate-keys {key}"
        )
    elif cov["concentrated_labels"]:
        out.append(
            f"{len(cov['concentrated_labels'])} label(s) have over 80% of their cells in one level of obs[{key!r}]; "
            f"a batch effect would look like their effect unless {key} is a covariate"
        )
    return out
