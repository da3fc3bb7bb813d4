"""Options shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ScreenArg = Annotated[Path, typer.Argument(help="The screen, an .h5ad file with raw counts.", show_default=False)]
PerturbationKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--perturbation-key",
        "-p",
        help="obs column with perturbation labels ('A', 'A+B', 'A+ctrl'). Default: recorded in the file, else detected.",
    ),
]
ControlOpt = Annotated[
    str | None,
    typer.Option("--control", "-c", help="Control label(s), comma-separated. Default: recorded, else detected (control, ctrl, non-targeting, NT)."),
]
LayerOpt = Annotated[str | None, typer.Option("--layer", "-l", help="Layer with raw counts (default: X).")]
DosageKeyOpt = Annotated[
    str | None,
    typer.Option("--dosage-key", help="obsm DataFrame (cells x perturbations) to use instead of labels."),
]
SubsetOpt = Annotated[
    str | None,
    typer.Option("--subset", help="pandas query on obs selecting cells, e.g. 'dataset == \"norman19\"'."),
]
DropZeroGenesOpt = Annotated[
    bool, typer.Option("--drop-zero-genes", help="Drop genes with zero counts in every selected cell.")
]


def control_list(control: str | None) -> list[str] | None:
    """Split a comma-separated ``--control`` value."""
    if control is None:
        return None
    return [c.strip() for c in control.split(",") if c.strip()]
