"""Options shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpert.data import as_list

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
BackedOpt = Annotated[
    bool | None,
    typer.Option(
        "--backed/--in-memory",
        help="Read the counts from the file as they are needed instead of loading them (screens larger "
        "than memory; X must hold the raw counts as CSR). Default: in memory for train, as trained otherwise.",
    ),
]
DropZeroGenesOpt = Annotated[
    bool, typer.Option("--drop-zero-genes", help="Drop genes with zero counts in every selected cell.")
]


def control_list(control: str | None) -> list[str] | None:
    """Split a comma-separated ``--control`` value."""
    return as_list(control)


def quiet_libraries() -> None:
    """Keep Lightning and scvi-tools to warnings (unless ``--debug``).

    They set their loggers to INFO when imported (tips, "max_steps reached", "Using column
    names from ..."), after the root callback has set the levels, so the commands that
    train or load a model import them first and set the levels again. This is the
    command line's job; the library never touches other packages' loggers.
    """
    import logging

    import lightning.pytorch  # noqa: F401  (sets its loggers on import)
    import scvi  # noqa: F401

    if _THREADS:
        import torch

        torch.set_num_threads(_THREADS[0])
    if not logging.getLogger("cellpert").isEnabledFor(logging.DEBUG):
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "scvi"):
            logging.getLogger(name).setLevel(logging.WARNING)


#: Thread count chosen with ``cellpert --threads`` (None: not set yet).
_THREADS: list[int] = []


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (default: the cores this process may use, from its CPU
    affinity) in torch and in the BLAS / OpenMP libraries; returns the number."""
    import os

    n = int(threads) if threads is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)  # read by the BLAS libraries when they load
    _THREADS[:] = [n]
    return n
