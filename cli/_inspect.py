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
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a screen: cells, genes, perturbations, controls, libraries, problems.

    Examples:

        cellpert inspect screen.h5ad

        cellpert inspect norman.h5ad --perturbation-key condition --control control --subset 'dataset == "norman19"'

        cellpert inspect cpa_format.h5ad --layer counts --json
    """
    from cellpert.data import load_screen, screen_description

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
    lines.append("problems          " + ("none" if not desc["problems"] else ""))
    lines += [f"  - {p}" for p in desc["problems"]]
    typer.echo("\n".join(lines))
