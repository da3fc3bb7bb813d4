"""``cellpert simulate``: write a simulated screen with known ground truth to an h5ad file."""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import anndata as ad
import typer

from cellpert.data import UNS_KEY, write_h5ad_atomic
from cellpert.data.simulate import simulate_comparative, simulate_sams, simulate_sparse_shift

__all__ = ["simulate_app"]

simulate_app = typer.Typer(
    name="simulate",
    help="Simulate perturbation screens with known ground truth (docs/models.md, *Simulators*).",
    no_args_is_help=True,
    add_completion=False,
)


def _default(function: Any, name: str) -> Any:
    """The library function's default, so that the CLI never disagrees with it."""
    return inspect.signature(function).parameters[name].default


class SparseShiftMode(str, Enum):
    nb = "nb"
    legacy = "legacy"


class Likelihood(str, Enum):
    nb = "nb"
    poisson = "poisson"


Out = Annotated[Path, typer.Option("-o", "--out", help="The .h5ad file to write.", show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same file.")]
LibrarySize = Annotated[float, typer.Option("--library-size", help="Median library size (counts per cell).")]
LibrarySizeLogSd = Annotated[
    float, typer.Option("--library-size-log-sd", help="Standard deviation of the log library size.")
]
NbTheta = Annotated[float, typer.Option("--nb-theta", help="Inverse dispersion of the negative binomial.")]
NGenes = Annotated[int, typer.Option("--n-genes", help="Number of genes.")]


def _write(adata: ad.AnnData, out: Path) -> None:
    """Write the screen and print one summary line."""
    write_h5ad_atomic(adata, out)
    truth = adata.uns[UNS_KEY]["ground_truth"]
    n_pert = len(truth["perturbation_names"])
    n_combos = len(truth.get("combinations", []))
    combos = f" + {n_combos:,} combination{'s' * (n_combos != 1)}" if n_combos else ""
    typer.echo(
        f"simulated {truth['simulator']}: {adata.n_obs:,} cells x {adata.n_vars:,} genes, "
        f"{n_pert:,} perturbation{'s' * (n_pert != 1)}{combos} -> {out}"
    )


@simulate_app.command("sparse-shift")
def sparse_shift(
    out: Out,
    seed: Seed = 0,
    n_perturbations: Annotated[
        int, typer.Option("--n-perturbations", help="Number of perturbations T.")
    ] = _default(simulate_sparse_shift, "n_perturbations"),
    n_latent: Annotated[int, typer.Option("--n-latent", help="Latent dimension K.")] = _default(
        simulate_sparse_shift, "n_latent"
    ),
    n_cells_per_perturbation: Annotated[
        int, typer.Option("--n-cells-per-perturbation", help="Cells per perturbation (paper: 250).")
    ] = _default(simulate_sparse_shift, "n_cells_per_perturbation"),
    n_control_cells: Annotated[
        int, typer.Option("--n-control-cells", help="Number of control cells.")
    ] = _default(simulate_sparse_shift, "n_control_cells"),
    n_genes: NGenes = _default(simulate_sparse_shift, "n_genes"),
    n_heldout: Annotated[
        int, typer.Option("--n-heldout", help="The last N perturbations are held out as test.")
    ] = _default(simulate_sparse_shift, "n_heldout"),
    mode: Annotated[
        SparseShiftMode,
        typer.Option("--mode", help="nb: NB counts, softmax over genes; legacy: the reference's Poisson over cells."),
    ] = SparseShiftMode(_default(simulate_sparse_shift, "mode")),
    library_size: LibrarySize = _default(simulate_sparse_shift, "library_size"),
    library_size_log_sd: LibrarySizeLogSd = _default(simulate_sparse_shift, "library_size_log_sd"),
    nb_theta: NbTheta = _default(simulate_sparse_shift, "nb_theta"),
    effect_mean: Annotated[
        float, typer.Option("--effect-mean", help="Mean magnitude of the latent shifts.")
    ] = _default(simulate_sparse_shift, "effect_mean"),
    effect_sd: Annotated[
        float, typer.Option("--effect-sd", help="Standard deviation of the shift magnitudes.")
    ] = _default(simulate_sparse_shift, "effect_sd"),
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Fraction of non-held-out cells used for validation.")
    ] = _default(simulate_sparse_shift, "val_fraction"),
) -> None:
    """The sVAE sparse mechanism-shift simulation (1-3 target latents per perturbation).

    Example:

        cellpert simulate sparse-shift -o s.h5ad --seed 0 --mode legacy
    """
    adata = simulate_sparse_shift(
        seed=seed, n_perturbations=n_perturbations, n_latent=n_latent,
        n_cells_per_perturbation=n_cells_per_perturbation, n_control_cells=n_control_cells,
        n_genes=n_genes, n_heldout=n_heldout, mode=mode.value, library_size=library_size,
        library_size_log_sd=library_size_log_sd, nb_theta=nb_theta, effect_mean=effect_mean,
        effect_sd=effect_sd, val_fraction=val_fraction,
    )  # fmt: skip
    _write(adata, out)


@simulate_app.command("sams")
def sams(
    out: Out,
    seed: Seed = 0,
    n_perturbations: Annotated[
        int, typer.Option("--n-perturbations", help="Number of single perturbations T.")
    ] = _default(simulate_sams, "n_perturbations"),
    n_latent: Annotated[int, typer.Option("--n-latent", help="Latent dimension K.")] = _default(
        simulate_sams, "n_latent"
    ),
    mask_prob: Annotated[
        float, typer.Option("--mask-prob", help="Probability of each mask entry, in (0, 1).", show_default="2/15")
    ] = _default(simulate_sams, "mask_prob"),
    n_cells_per_perturbation: Annotated[
        tuple[int, int, int],
        typer.Option(
            "--n-cells-per-perturbation",
            help="TRAIN VAL TEST cells per perturbation and combination (paper: 500 100 100).",
        ),
    ] = _default(simulate_sams, "n_cells_per_perturbation"),
    n_control_cells: Annotated[
        tuple[int, int, int],
        typer.Option("--n-control-cells", help="TRAIN VAL TEST control cells."),
    ] = _default(simulate_sams, "n_control_cells"),
    n_combinations: Annotated[
        int, typer.Option("--n-combinations", help="Number of random double perturbations 'A+B'.")
    ] = _default(simulate_sams, "n_combinations"),
    n_genes: NGenes = _default(simulate_sams, "n_genes"),
    library_size: LibrarySize = _default(simulate_sams, "library_size"),
    library_size_log_sd: LibrarySizeLogSd = _default(simulate_sams, "library_size_log_sd"),
    nb_theta: NbTheta = _default(simulate_sams, "nb_theta"),
    decoder_hidden: Annotated[
        list[int],
        typer.Option("--decoder-hidden", help="Width of a hidden decoder layer (repeat for each layer)."),
    ] = _default(simulate_sams, "decoder_hidden"),
    effect_mean: Annotated[
        float, typer.Option("--effect-mean", help="Mean magnitude of the embeddings.")
    ] = _default(simulate_sams, "effect_mean"),
    effect_sd: Annotated[
        float, typer.Option("--effect-sd", help="Standard deviation of the embedding magnitudes.")
    ] = _default(simulate_sams, "effect_sd"),
    n_batches: Annotated[
        int, typer.Option("--n-batches", help="Batches (obs['batch']); 1: none.")
    ] = _default(simulate_sams, "n_batches"),
    batch_effect: Annotated[
        float, typer.Option("--batch-effect", help="Standard deviation of the per-batch shifts.")
    ] = _default(simulate_sams, "batch_effect"),
    batch_space: Annotated[
        str, typer.Option("--batch-space", help="Where batches shift the cells: latent or gene.")
    ] = _default(simulate_sams, "batch_space"),
    batch_imbalance: Annotated[
        float,
        typer.Option("--batch-imbalance", help="0: perturbations spread evenly over batches; 1: each in one batch."),
    ] = _default(simulate_sams, "batch_imbalance"),
    in_blocks: Annotated[
        bool,
        typer.Option(
            "--in-blocks",
            help="Draw the counts in row blocks and append them to the file, so that the count matrix is "
            "never in memory (for screens larger than memory; the same file as without it).",
        ),
    ] = False,
) -> None:
    """The SAMS-VAE simulation: sparse additive shifts, optional combinations, NB counts.

    Example:

        cellpert simulate sams -o s.h5ad --seed 0 --n-combinations 20

        cellpert simulate sams -o b.h5ad --n-batches 2 --batch-effect 1 --batch-imbalance 0.8

        cellpert simulate sams -o big.h5ad --n-perturbations 100 --n-cells-per-perturbation 8000 1000 1000 --n-genes 2000 --in-blocks
    """
    options = dict(
        seed=seed, n_perturbations=n_perturbations, n_latent=n_latent, mask_prob=mask_prob,
        n_cells_per_perturbation=n_cells_per_perturbation, n_control_cells=n_control_cells,
        n_combinations=n_combinations, n_genes=n_genes, library_size=library_size,
        library_size_log_sd=library_size_log_sd, nb_theta=nb_theta,
        decoder_hidden=tuple(decoder_hidden), effect_mean=effect_mean, effect_sd=effect_sd,
        n_batches=n_batches, batch_effect=batch_effect, batch_space=batch_space, batch_imbalance=batch_imbalance,
    )  # fmt: skip
    if in_blocks:
        import anndata as ad

        path = simulate_sams(**options, out=out)
        backed = ad.read_h5ad(path, backed="r")
        typer.echo(f"simulated sams in blocks: {backed.n_obs:,} cells x {backed.n_vars:,} genes -> {path}")
        backed.file.close()
        return
    _write(simulate_sams(**options), out)


@simulate_app.command("comparative")
def comparative(
    out: Out,
    seed: Seed = 0,
    n_background: Annotated[
        int, typer.Option("--n-background", help="Background (control) cells.")
    ] = _default(simulate_comparative, "n_background"),
    n_target: Annotated[int, typer.Option("--n-target", help="Target cells.")] = _default(
        simulate_comparative, "n_target"
    ),
    n_background_latent: Annotated[
        int, typer.Option("--n-background-latent", help="Dimension of the shared latent z.")
    ] = _default(simulate_comparative, "n_background_latent"),
    n_salient_latent: Annotated[
        int, typer.Option("--n-salient-latent", help="Dimension of the salient latent t.")
    ] = _default(simulate_comparative, "n_salient_latent"),
    n_genes: NGenes = _default(simulate_comparative, "n_genes"),
    library_size: LibrarySize = _default(simulate_comparative, "library_size"),
    library_size_log_sd: LibrarySizeLogSd = _default(simulate_comparative, "library_size_log_sd"),
    likelihood: Annotated[
        Likelihood, typer.Option("--likelihood", help="Count noise.")
    ] = Likelihood(_default(simulate_comparative, "likelihood")),
    nb_theta: NbTheta = _default(simulate_comparative, "nb_theta"),
    decoder_hidden: Annotated[
        list[int],
        typer.Option("--decoder-hidden", help="Width of a hidden decoder layer (repeat for each layer)."),
    ] = _default(simulate_comparative, "decoder_hidden"),
) -> None:
    """Background and target cells for comparative models (salient latent only in target).

    Example:

        cellpert simulate comparative -o c.h5ad --seed 0 --n-salient-latent 2
    """
    adata = simulate_comparative(
        seed=seed, n_background=n_background, n_target=n_target,
        n_background_latent=n_background_latent, n_salient_latent=n_salient_latent,
        n_genes=n_genes, library_size=library_size, library_size_log_sd=library_size_log_sd,
        likelihood=likelihood.value, nb_theta=nb_theta, decoder_hidden=tuple(decoder_hidden),
    )  # fmt: skip
    _write(adata, out)
