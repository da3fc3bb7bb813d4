"""`cellpert train`: fit a model on a screen and save the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cellpert_cli._options import (
    BackedOpt,
    ControlOpt,
    DosageKeyOpt,
    DropZeroGenesOpt,
    LayerOpt,
    PerturbationKeyOpt,
    ScreenArg,
    SubsetOpt,
    quiet_libraries,
)

if TYPE_CHECKING:  # the CLI imports the library (torch) only when a command runs
    from cellpert.runs import TrainedRun


def train(
    screen_path: ScreenArg = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to create.", show_default=False)] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="samsvae, cpa-vae, conditional-vae, svae, svae-plus or comparative (or from --config).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML or TOML file with any option (also model arguments such as mask_prior_prob)."),
    ] = None,
    guide: Annotated[str | None, typer.Option("--guide", help="SAMS-VAE guide: correlated or mean_field.")] = None,
    perturbation_key: PerturbationKeyOpt = None,
    control: ControlOpt = None,
    layer: LayerOpt = None,
    dosage_key: DosageKeyOpt = None,
    subset: SubsetOpt = None,
    drop_zero_genes: DropZeroGenesOpt = False,
    backed: BackedOpt = None,
    split_key: Annotated[
        str | None, typer.Option("--split-key", help="Use this existing obs column as the split (train/val/test).")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="random (64/16/20 cells), combinations (Norman OOD), data-efficiency, heldout. "
            "Default: obs['cellpert_split'] if the screen has it (simulated screens do), else random.",
        ),
    ] = None,
    split_seed: Annotated[int | None, typer.Option("--split-seed", help="Seed of the split.")] = None,
    fraction: Annotated[
        float | None, typer.Option("--fraction", help="data-efficiency: fraction of training combinations used.")
    ] = None,
    heldout: Annotated[
        str | None, typer.Option("--heldout", help="heldout split: comma-separated labels to hold out.")
    ] = None,
    n_latent: Annotated[int | None, typer.Option("--n-latent", help="Latent dimensions K.")] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="comparative: standard, multi-objective or constrained fitting."),
    ] = None,
    background_key: Annotated[
        str | None,
        typer.Option("--background-key", help="comparative: obs column marking background cells (default: the perturbation column)."),
    ] = None,
    background: Annotated[
        str | None,
        typer.Option("--background", help="comparative: value(s) of --background-key for background cells, comma-separated (default: the control label)."),
    ] = None,
    batch_key: Annotated[
        str | None,
        typer.Option("--batch-key", help="obs column of the batch (10x lane, replicate): a covariate of the decoder."),
    ] = None,
    covariate_keys: Annotated[
        str | None,
        typer.Option("--covariate-keys", help="Comma-separated obs columns of categorical covariates (donor, cell line)."),
    ] = None,
    continuous_covariate_keys: Annotated[
        str | None,
        typer.Option("--continuous-covariate-keys", help="Comma-separated obs columns of continuous covariates."),
    ] = None,
    n_background_latent: Annotated[
        int | None, typer.Option("--n-background-latent", help="comparative: dimensions of the shared latent z.")
    ] = None,
    n_salient_latent: Annotated[
        int | None, typer.Option("--n-salient-latent", help="comparative: dimensions of the salient latent t.")
    ] = None,
    penalty_weight: Annotated[
        float | None,
        typer.Option("--penalty-weight", help="comparative: Wasserstein penalty weight (constrained: initial multiplier)."),
    ] = None,
    constraint_level: Annotated[
        float | None,
        typer.Option("--constraint-level", help="comparative, constrained: allowed fraction of the salient prior's energy in background cells, e.g. 0.05."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Cap on the training steps (SAMS-VAE family: early stopping ends sooner)."),
    ] = None,
    max_epochs: Annotated[int | None, typer.Option("--max-epochs", help="Training epochs (if no --max-steps).")] = None,
    early_stopping: Annotated[
        bool | None,
        typer.Option(
            "--early-stopping/--no-early-stopping",
            help="Stop once the validation loss stops improving (default for SAMS-VAE family and sVAE).",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Minibatch size.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of initialisation and training.")] = None,
    accelerator: Annotated[str | None, typer.Option("--accelerator", help="cpu, gpu or auto.")] = None,
    devices: Annotated[str | None, typer.Option("--devices", help="Number of devices or auto.")] = None,
    strategy: Annotated[
        str | None,
        typer.Option("--strategy", help="Lightning strategy, e.g. ddp (several devices or CPU processes)."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="32 (default), bf16-mixed or 16-mixed: linear layers in half precision; likelihood, KL and "
            "parameters stay float32.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --out.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the interrupted run in this directory from its checkpoint, with its recorded options "
            "(give SCREEN only if the file moved).",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            "--checkpoint-every",
            help="Steps between checkpoints in --out/checkpoints (default 1000; 0: only on Ctrl-C or SIGTERM, "
            "which always save one).",
            min=0,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train a model and save it with its config, history and split in --out.

    Examples:

        cellpert simulate sams -o s.h5ad && cellpert train s.h5ad --model samsvae --out run --max-steps 500

        cellpert train norman.h5ad -m cpa-vae -o run_cpa --subset 'dataset == "norman19"' --split random --split-seed 0

        cellpert train screen.h5ad -o run_cfg --config samsvae.yaml --lr 1e-3

        cellpert train mcfaline.h5ad -m samsvae -o run_lines --covariate-keys cell_type

        cellpert train kang.h5ad -m comparative -o run_cmp -p condition --background control --mode constrained

        cellpert train --resume run   (after Ctrl-C or a scheduler's SIGTERM: continues from run/checkpoints)
    """
    from cellpert.runs import train_run

    quiet_libraries()

    if devices is not None and devices.isdigit():
        devices = int(devices)
    options = {
        "model": model,
        "guide": guide,
        "perturbation_key": perturbation_key,
        "control": control,
        "layer": layer,
        "dosage_key": dosage_key,
        "subset": subset,
        "drop_zero_genes": drop_zero_genes or None,
        "backed": backed,
        "split_key": split_key,
        "split": split,
        "split_seed": split_seed,
        "fraction": fraction,
        "heldout": heldout,
        "n_latent": n_latent,
        "mode": mode,
        "background_key": background_key,
        "background": background,
        "batch_key": batch_key,
        "categorical_covariate_keys": covariate_keys,
        "continuous_covariate_keys": continuous_covariate_keys,
        "n_background_latent": n_background_latent,
        "n_salient_latent": n_salient_latent,
        "penalty_weight": penalty_weight,
        "constraint_level": constraint_level,
        "max_steps": max_steps,
        "max_epochs": max_epochs,
        "early_stopping": early_stopping,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
    }
    options["checkpoint_every"] = checkpoint_every
    if resume is not None:
        run = _resume(resume, screen_path, out=out, config=config, overwrite=overwrite, quiet=quiet, options=options)
        if run is None:
            return
    else:
        if screen_path is None or out is None:
            from cellpert import CellpertInputError

            raise CellpertInputError(
                "give the screen and --out (e.g. cellpert train s.h5ad -m samsvae -o run), or --resume DIR."
            )
        run = train_run(
            screen_path, out_dir=out, config_file=config, overwrite=overwrite, progress_bar=not quiet, **options
        )
    if run.rank != 0:  # DDP: rank 0 reports and wrote the run directory
        return
    history = run.model.history
    # elbo_validation: the per-cell negative ELBO of the validation cells, comparable across
    # families (sVAE+'s training loss is N_train x the per-cell ELBO plus the mask prior)
    shown_keys = ("elbo_validation", "train_loss", "validation_loss")
    last = {name: float(df.iloc[-1, 0]) for name, df in history.items() if len(df) and name in shown_keys}
    shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last.items()))
    typer.echo(f"trained {run.config['model']} on {run.screen.n_cells:,} cells -> {run.directory} ({shown})")
    t = run.config.get("training", {})
    if t.get("wall_time_s") is not None:
        resumed = t.get("resumed_from_step")
        line = f"{t.get('steps') - (resumed or 0)} steps in {t['wall_time_s']:.1f} s"
        if t.get("steps_per_s"):
            line += f" ({t['steps_per_s']:.1f} steps/s)"
        if resumed is not None:
            line += f", resumed at step {resumed} ({t.get('steps')} in all)"
        if t.get("best_step") is not None:
            line += f"; best validation loss at step {t['best_step']}"
        if t.get("stopped_early"):
            line += "; stopped early (validation loss no longer improving)"
        typer.echo(line)


def _resume(resume: Path, screen_path: Path | None, *, out: Path | None, config: Path | None, overwrite: bool,
            quiet: bool, options: dict) -> TrainedRun | None:  # fmt: skip
    """``cellpert train --resume DIR``: the resumed run, or None when DIR had already finished."""
    from cellpert import CellpertInputError
    from cellpert.runs import read_run_manifest, train_run

    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
    given += ["--config"] * (config is not None) + ["--overwrite"] * overwrite
    if out is not None and out.resolve() != resume.resolve():
        given.append("--out")
    if given:
        raise CellpertInputError(
            f"--resume continues {resume} with the options recorded in {resume / 'config.yaml'}; "
            f"remove {', '.join(given)}."
        )
    manifest = read_run_manifest(resume)
    if manifest.get("status") == "finished":
        steps = next((s.get("step") for s in reversed(manifest.get("sessions") or []) if s.get("step") is not None), None)
        typer.echo(f"{resume} already finished training" + (f" ({steps} steps)" if steps else "") + "; nothing to resume.")
        return None
    return train_run(screen_path, out_dir=resume, resume=True, progress_bar=not quiet)
