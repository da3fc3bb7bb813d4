"""`cellpert export-latents`: write a trained model's latents into the screen's h5ad."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpert_cli._options import BackedOpt, ScreenArg, quiet_libraries


def export_latents(
    screen_path: ScreenArg,
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by `cellpert train`.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write a new h5ad instead of updating the screen in place.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Cells per batch.")] = None,
    ica: Annotated[
        bool,
        typer.Option(
            "--ica",
            help="Also write obsm['X_<model>_ica']: whitened latents rotated by FastICA "
            "(SAMS-VAE, CPA-VAE: plus the perturbations' shifts and masks in that basis).",
        ),
    ] = False,
    backed: BackedOpt = None,
) -> None:
    """Write latents (obsm) and perturbation embeddings / masks (uns) into the h5ad.

    Keys: obsm["X_<model>_basal"], obsm["X_<model>_latent"] and
    uns["cellpert"]["models"]["<model>"] (embeddings, mask_probabilities, config).

    Examples:

        cellpert export-latents s.h5ad --model run

        cellpert export-latents s.h5ad --model run --out s_with_latents.h5ad

        cellpert export-latents sim.h5ad --model run_svae --ica
    """
    from cellpert.runs import export_latents as _export

    quiet_libraries()

    path, written = _export(screen_path, model_dir=model, out=out, batch_size=batch_size, ica=ica, backed=backed)
    typer.echo(f"wrote {', '.join(written['obsm'] + written['uns'])} -> {path}")
    if "ica_mcc" in written:
        scores = written["ica_mcc"]
        typer.echo(f"MCC with the true latents: {scores['before']:.3f} before ICA, {scores['after']:.3f} after")
    if "ica_mask_f1" in written:
        f1 = written["ica_mask_f1"]
        before = f"{f1['before']:.3f} for q(M), " if "before" in f1 else ""
        typer.echo(f"mask F1 against the true masks: {before}{f1['after']:.3f} for the ICA masks")
