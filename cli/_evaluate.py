"""`cellpert evaluate-ate`: data and model ATEs, baselines, metrics, held-out IWELBO."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from cellpert_cli._options import (
    BackedOpt,
    ControlOpt,
    DropZeroGenesOpt,
    LayerOpt,
    PerturbationKeyOpt,
    ScreenArg,
    SubsetOpt,
    control_list,
    quiet_libraries,
)


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _verdict(*pairs: tuple[float, float]) -> str:
    """The model against a baseline on (model, baseline) metric pairs, compared as printed
    (3 decimals), so equal figures read as a tie, not as a loss or a win."""
    rounded = [(round(float(x), 3), round(float(y), 3)) for x, y in pairs]
    signs = [(x > y) - (x < y) for x, y in rounded]
    if min(signs) >= 0:
        return "ties" if max(signs) == 0 else "beats"
    return "beats on one of two metrics" if max(signs) > 0 else "does not beat"


def _summary_lines(evaluation, split: str) -> list[str]:
    """The terminal table: one row per predictor, the chosen split's metrics."""
    summary = evaluation.summary
    if summary is None:
        per = evaluation.per_perturbation
        top = evaluation.data_ate.abs().max().sort_values(ascending=False)
        lines = [f"data ATE of {per.shape[0]} labels ({evaluation.config['n_control_cells']} control cells)"]
        lines += [f"{'label':<28} {'split':>14} {'cells':>6} {'max |ATE|':>10}"]
        for label in top.index[:20]:
            lines.append(
                f"{label:<28} {per.loc[label, 'split']:>14} {int(per.loc[label, 'n_cells']):>6} {top[label]:>10.3f}"
            )
        if len(top) > 20:
            lines.append(f"... and {len(top) - 20} more labels")
        return lines
    col = split if split in summary.columns else "all"
    n_labels = summary.loc["model_n_perturbations", col]
    if not n_labels == n_labels or n_labels == 0:  # NaN: the split has no labels
        col = "all"
    top_n = evaluation.config.get("top_n", 20)
    lines = [f"{'':<10} {'ATE r':>7} {'ATE R²':>8} {f'top-{top_n} r':>9} {f'top-{top_n} R²':>10} {'labels':>7}"]
    for name in evaluation.predictors:
        lines.append(
            f"{name:<10} {_fmt(summary.loc[f'{name}_pearson', col]):>7} {_fmt(summary.loc[f'{name}_r2', col]):>8} "
            f"{_fmt(summary.loc[f'{name}_pearson_top', col]):>9} {_fmt(summary.loc[f'{name}_r2_top', col]):>10} "
            f"{int(summary.loc[f'{name}_n_perturbations', col]):>7}"
        )
    ceil, ceil_top = summary.loc["ceiling_pearson", col], summary.loc["ceiling_pearson_top", col]
    if ceil == ceil:
        lines.append(f"{'ceiling':<10} {_fmt(ceil):>7} {'':>8} {_fmt(ceil_top):>9}   (a perfect predictor, from split halves)")
        if ceil == 0.0:
            lines.append(f"{'':<10} the split halves of the held-out cells do not agree: at this size the target is noise")
        expected = summary.loc["expected_train_average_pearson", col]
        if expected == expected:
            lines.append(f"{'':<10} the training-cell average is expected to reach r ≈ {expected:.3f} from noise alone")
    if "average" in evaluation.predictors:
        m, b = summary.loc["model_pearson", col], summary.loc["average_pearson", col]
        mt, bt = summary.loc["model_pearson_top", col], summary.loc["average_pearson_top", col]
        if m == m and b == b:
            verdict = _verdict((m, b), (mt, bt))
            lines.append(
                f"the model {verdict} the training-cell average here: r {m:.3f} vs {b:.3f}, "
                f"top-{top_n} r {mt:.3f} vs {bt:.3f}"
            )
    cal = evaluation.config.get("interval_calibration")
    if cal:
        lines.append(
            f"90% intervals: {cal['coverage_before']:.0%} of the validation cells' ATE covered (noise accounted for); "
            f"recalibrated intervals cover {cal['coverage_after']:.0%} (varm ..._cal_lo/_cal_hi)"
        )
    header = f"{evaluation.key}: metrics on the {col!r} labels"
    iw = evaluation.iwelbo
    if iw == iw:
        header += f"; {evaluation.config['iwelbo_split']} IWELBO {iw:.2f} per cell ({evaluation.config['n_iwelbo_cells']} cells)"
    target = evaluation.config.get("target") if col != "all" or evaluation.config.get("data_cells") == "all" else None
    estimator = evaluation.config.get("model_ate_estimator")
    shift = evaluation.config.get("model_ate_latent_shift")
    combined = evaluation.config.get("model_ate_combined")
    if estimator == "combined" and combined:
        estimator = (f"combined ({combined['weight']:.2f} x the training-cell average + {1 - combined['weight']:.2f} "
                     "x the posterior estimate, weight fitted on the validation cells)")  # fmt: skip
    elif estimator in ("posterior", "combined"):
        estimator = ("posterior (each label's training cells against the training control cells, both denoised by "
                     "the model; labels without training cells: counterfactual)")  # fmt: skip
    elif estimator and shift:
        within = ", measured within each level" if evaluation.config.get("model_ate_shift_within_levels") else ""
        estimator = f"{estimator} ({shift} latent shift{within})"
    notes = [f"target: {target}" if target else "target: data ATE of all cells of each label"]
    if estimator:
        notes.append(
            f"model ATE: {estimator} estimator; average = each label's training cells' average effect, "
            "additive = the sum of its parts' (baselines from training cells only)"
        )
    return [header, *notes, *lines]


def _truth_lines(evaluation) -> list[str]:
    """With ``--truth``: each predictor against the simulator's true ATE, the intervals' coverage."""
    truth = evaluation.config.get("truth")
    if not truth:
        return []
    top_n = truth["top_n"]
    lines = [f"against the simulator's true ATE ({truth['labels']} labels, {truth['n_cells_per_label']:,} cells each; "
             f"top-{top_n} genes by |true ATE|): ATE r / R² / top-{top_n} r"]  # fmt: skip
    for name in evaluation.predictors:
        lines.append(
            f"{name:<10} {_fmt(truth.get(f'{name}_pearson')):>7} {_fmt(truth.get(f'{name}_r2')):>8} "
            f"{_fmt(truth.get(f'{name}_pearson_top')):>9}"
        )
    if "average" in evaluation.predictors and "model_pearson" in truth:
        m, b = round(truth["model_pearson"], 4), round(truth["average_pearson"], 4)  # as printed
        verdict = ("closer to the true ATE than" if m > b else "as close to the true ATE as" if m == b
                   else "further from the true ATE than")  # fmt: skip
        lines.append(f"the model is {verdict} the training-cell average: r {m:.4f} vs {b:.4f}")
    if "coverage" in truth:
        cal = truth.get("coverage_calibrated")
        lines.append(
            f"the model's 90% intervals cover {truth['coverage']:.0%} of the true effects"
            + (f" (recalibrated: {cal:.0%})" if cal is not None else "")
        )
    return lines


def _level_lines(evaluation) -> list[str]:
    """Per-level table (with ``--by``): ATE r and top-N r of each predictor within each level."""
    table = evaluation.per_level
    if table is None:
        return []
    key = evaluation.config.get("level_key")
    names = [n for n in evaluation.predictors if f"{n}_pearson" in table.columns]
    top_n = evaluation.config.get("top_n", 20)
    lines = [f"within each level of obs[{key!r}] ({evaluation.config.get('pool')} pooling above): ATE r / top-{top_n} r"]
    lines.append(f"{'level':<16} {'weight':>7} " + " ".join(f"{n:>15}" for n in names))
    for level, row in table.iterrows():
        cells = " ".join(
            f"{_fmt(row.get(f'{n}_pearson')) + ' / ' + _fmt(row.get(f'{n}_pearson_top')):>15}" for n in names
        )
        lines.append(f"{str(level):<16} {row['weight']:>7.0f} {cells}")
    return lines


def _write_metrics(evaluation, path: Path) -> list[Path]:
    from cellpert._errors import CellpertInputError

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise CellpertInputError(f"--metrics-out {path}: use a .csv or .parquet file name.")
    tables = [(path, evaluation.per_perturbation)]
    if evaluation.summary is not None:
        tables.append((path.with_name(f"{path.stem}_summary{path.suffix}"), evaluation.summary))
    if evaluation.per_level is not None:
        tables.append((path.with_name(f"{path.stem}_per_level{path.suffix}"), evaluation.per_level))
    for target, table in tables:
        if suffix == ".csv":
            table.to_csv(target)
        else:
            try:
                table.to_parquet(target)
            except ImportError as err:
                raise CellpertInputError(
                    f"writing {target} needs pyarrow or fastparquet ({err}); use a .csv file name instead."
                ) from err
    return [t for t, _ in tables]


def evaluate_ate(
    screen_path: ScreenArg,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Run directory of `cellpert train`. Without it: the data ATE alone."),
    ] = None,
    n_particles: Annotated[
        int, typer.Option("--n-particles", help="Posterior predictive particles (prior estimator).")
    ] = 2500,
    n_groups: Annotated[
        int, typer.Option("--n-groups", help="Groups of particles for the 90% Monte Carlo interval (prior estimator).")
    ] = 50,
    top_n: Annotated[int, typer.Option("--top-n", help="Genes per perturbation of the top-N metrics.")] = 20,
    split: Annotated[
        str, typer.Option("--split", help="Split whose labels are shown and whose cells give the IWELBO.")
    ] = "test",
    data_cells: Annotated[
        str,
        typer.Option(
            "--data-cells",
            help="split (default): each split scored on its own, held-out cells; "
            "all: against all cells, training cells included (the paper's protocol).",
        ),
    ] = "split",
    estimator: Annotated[
        str,
        typer.Option(
            "--estimator",
            help="combined (default): the posterior estimate and the training-cell average, weighted by one "
            "weight fitted on the validation cells; posterior: each label's training cells against the training "
            "controls, both denoised by the model at their own depth (labels without cells: counterfactual); "
            "counterfactual: "
            "training control cells shifted and decoded at their own depth; prior: z^b from N(0, I), the "
            "paper's estimator.",
        ),
    ] = "combined",
    n_draws: Annotated[
        int, typer.Option("--n-draws", help="Draws per cell (posterior) or of the counterfactual estimator.")
    ] = 100,
    max_cells: Annotated[
        int,
        typer.Option(
            "--max-cells",
            help="Posterior estimator: cells decoded per label and for the controls (larger groups: that many "
            "drawn at random), so that time and memory do not grow with the screen.",
        ),
    ] = 1000,
    latent_shift: Annotated[
        str,
        typer.Option(
            "--latent-shift",
            help="Counterfactual estimator: empirical (default; each label's shift measured where its training "
            "cells lie in the latent space, interval from their sampling) or model (the model's own shift).",
        ),
    ] = "empirical",
    no_ceiling: Annotated[
        bool, typer.Option("--no-ceiling", help="Skip the noise ceiling (split halves of the held-out cells).")
    ] = False,
    library_size: Annotated[
        str,
        typer.Option(
            "--library-size",
            help="Prior estimator: fixed (ℓ = 1e4, the paper's) or empirical (sampled from control cells' "
            "libraries), or a number.",
        ),
    ] = "fixed",
    iwelbo_samples: Annotated[int, typer.Option("--iwelbo-samples", help="Importance samples of the IWELBO.")] = 100,
    key: Annotated[
        str | None, typer.Option("--key", help="Output key (default: the model's, e.g. samsvae, cpa_vae).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write a figure (.png) or a report (.html).")
    ] = None,
    metrics_out: Annotated[
        Path | None,
        typer.Option("--metrics-out", help="Per-perturbation metrics as .csv/.parquet (+ <stem>_summary)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write a new h5ad instead of updating the screen in place.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model ATE and IWELBO draws.")] = 0,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            help="ATEs within the levels of this obs column (cell line, batch), pooled over them; "
            "default: the run's batch or first categorical covariate; 'none': off.",
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option("--pool", help="Pool the levels weighted by their control cells (control) or equally (uniform)."),
    ] = "control",
    perturbation_key: PerturbationKeyOpt = None,
    control: ControlOpt = None,
    layer: LayerOpt = None,
    subset: SubsetOpt = None,
    drop_zero_genes: DropZeroGenesOpt = False,
    backed: BackedOpt = None,
    no_write: Annotated[bool, typer.Option("--no-write", help="Compute and print only; write no h5ad.")] = False,
    truth: Annotated[
        bool,
        typer.Option(
            "--truth",
            help="A screen from `cellpert simulate sams`: also score every predictor against the simulator's "
            "true ATE (uns['cellpert']['ate_metrics'][<key>]['config']['truth']).",
        ),
    ] = False,
) -> None:
    """Average treatment effects: data vs model, additive and mean baselines, held-out IWELBO.

    Each split is scored against the data ATE of its own cells (held-out cells for val
    and test; perturbseq space, log2(1e4 x / total + 1)), next to the noise ceiling of
    those cells; baselines use the training cells; the model ATE (default) contrasts each
    label's training cells with the training controls, both denoised by the model, and
    combines it with the training-cell average by a weight fitted on the validation
    cells (--estimator prior: the paper's estimator). Writes
    varm["ate_data"], varm["ate_<model>"] (+ _lo, _hi) and
    uns["cellpert"]["ate_metrics"]["<model>"] into the h5ad (screen options apply
    without --model; with --model the run's are used).

    Examples:

        cellpert evaluate-ate s.h5ad --model run --report report.html

        cellpert evaluate-ate norman.h5ad -m run_cpa --n-particles 500 --metrics-out m.csv --out eval.h5ad

        cellpert evaluate-ate screen.h5ad --subset 'dataset == "norman19"'

        cellpert evaluate-ate s.h5ad --model run --truth   (s.h5ad from `cellpert simulate sams`)
    """
    from cellpert._errors import CellpertInputError
    from cellpert.evaluate._report import write_ate_report
    from cellpert.runs import evaluate_ate as _evaluate

    quiet_libraries()

    if data_cells not in ("all", "split"):
        raise CellpertInputError(f"--data-cells must be all or split, not {data_cells!r}.")
    if estimator not in ("combined", "posterior", "counterfactual", "prior"):
        raise CellpertInputError(
            f"--estimator must be combined, posterior, counterfactual or prior, not {estimator!r}."
        )
    if pool not in ("control", "uniform"):
        raise CellpertInputError(f"--pool must be control or uniform, not {pool!r}.")
    if max_cells < 2:
        raise CellpertInputError(f"--max-cells must be at least 2, not {max_cells}.")
    if n_draws < 2:
        raise CellpertInputError(f"--n-draws must be at least 2, not {n_draws}.")
    lib: str | float = library_size
    if library_size not in ("fixed", "empirical"):
        try:
            lib = float(library_size)
        except ValueError as err:
            raise CellpertInputError(
                f"--library-size must be fixed, empirical or a number, not {library_size!r}."
            ) from err
    if report is not None and report.suffix.lower() not in (".png", ".html", ".htm"):
        raise CellpertInputError(f"--report {report}: use a .png or .html file name.")
    if metrics_out is not None and metrics_out.suffix.lower() not in (".csv", ".parquet"):
        raise CellpertInputError(f"--metrics-out {metrics_out}: use a .csv or .parquet file name.")
    if model is not None and any(v for v in (perturbation_key, control, layer, subset, drop_zero_genes)):
        typer.echo("note: screen options are taken from the run; --perturbation-key etc. are ignored", err=True)
    evaluation = _evaluate(
        screen_path,
        model_dir=model,
        out=out,
        key_added=key,
        perturbation_key=perturbation_key,
        control=control_list(control),
        layer=layer,
        subset=subset,
        drop_zero_genes=drop_zero_genes,
        backed=backed,
        data_cells=data_cells,  # type: ignore[arg-type]
        estimator=estimator,  # type: ignore[arg-type]
        n_particles=n_particles,
        n_groups=n_groups,
        n_draws=n_draws,
        max_cells=max_cells,
        ceiling=not no_ceiling,
        library_size=lib,  # type: ignore[arg-type]
        top_n=top_n,
        split=split,
        iwelbo_samples=iwelbo_samples,
        seed=seed,
        write=not no_write,
        level_key=None if by is not None and by.lower() == "none" else (by or "auto"),
        pool=pool,  # type: ignore[arg-type]
        latent_shift=latent_shift,  # type: ignore[arg-type]
        truth=truth,
    )
    for line in _summary_lines(evaluation, split) + _level_lines(evaluation) + _truth_lines(evaluation):
        typer.echo(line)
    if report is not None:
        typer.echo(f"report -> {write_ate_report(evaluation, report, split=split)}")
    if metrics_out is not None:
        typer.echo(f"metrics -> {', '.join(map(str, _write_metrics(evaluation, metrics_out)))}")
    if evaluation.path is not None:
        written = ["varm/ate_data"]
        if evaluation.model_ate is not None:
            written += [f"varm/ate_{evaluation.key}{s}" for s in ("", "_lo", "_hi")]
        if evaluation.model_ate_calibrated is not None:
            written += [f"varm/ate_{evaluation.key}{s}" for s in ("_cal_lo", "_cal_hi")]
        if evaluation.per_level is not None:
            written.append(f"varm/ate_data_level_* and varm/ate_{evaluation.key}_level_* ({len(evaluation.per_level)} levels)")
        written.append(f"uns/cellpert/ate_metrics/{evaluation.key}")
        typer.echo(f"wrote {', '.join(written)} -> {evaluation.path}")
