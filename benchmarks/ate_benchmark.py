"""Model ATEs against the simple estimates, scored on held-out cells (prints a table).

For each data set, model and split seed: train with cellpert's defaults (early stopping,
``--steps`` as the cap), then score with :func:`cellpert.evaluate.compute_ate_evaluation`
(the held-out target of the test split) and report, for the counterfactual estimator
(default) and the paper's prior estimator, ATE r, R² and top-20 r, next to the
training-cell average ("additive": for a seen label its training cells' average, for a
combination the sum of its parts'), the noise ceiling of the test cells and the r the
training-cell average is expected to reach from noise alone. On the SAMS simulator the
true ATE is known (:func:`cellpert.data.simulate.sams_true_ate`): the script also
reports each predictor's agreement with the truth and the coverage of the models' 90%
intervals.

Models: ``samsvae``, ``cpa-vae``, ``conditional-vae`` (the settings below), ``svae`` and
``svae-plus`` (their own defaults: K = 15, lr 1e-3, batch 128, KL warm-up 50 epochs).

Data sets: ``sim`` (SAMS simulator, 30 perturbations, 6 combinations, K = 8),
``norman`` (shared Norman subset, random 64/16/20 cell split), ``norman-combos`` (held-out
combinations, MODELS.md §6), ``mcfaline`` (shared McFaline subset, random split, cell lines pooled), ``mcfaline-lines``
(the same within its cell lines: the line a covariate of the model and the level of every
data ATE), ``mcfaline-covariate`` (the line a covariate of the model, the target pooled
naively as in ``mcfaline``).

Usage::

    python benchmarks/ate_benchmark.py --datasets sim norman --models samsvae conditional-vae --seeds 0 1 2
    python benchmarks/ate_benchmark.py --quick        # one seed, few steps: a smoke run

Results of a run are in benchmarks/RESULTS_ate.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "norman2019_mcfaline2023_subset.h5ad"

#: Per data set: the screen options and the model settings (K, widths, learning rates).
SETTINGS = {
    "sim": {"model": {"n_latent": 8}, "train": {"lr": 3e-3, "batch_size": 256}},
    "norman": {"model": {"n_latent": 200}, "train": {"lr": 1e-3, "batch_size": 512, "gradient_clip_val": 100}},
    "mcfaline": {
        "model": {"n_latent": 50, "n_hidden": 200},
        "train": {"lr": 1e-3, "batch_size": 512, "gradient_clip_val": 100},
    },
}
SETTINGS["norman-combos"] = SETTINGS["norman"]
#: The McFaline subset within its three cell lines: the line is a covariate of the model
#: and the level of every data ATE (docs/models.md, *Covariates*), so that a target whose
#: cells are spread over the lines unlike the controls is not scored on that difference.
SETTINGS["mcfaline-lines"] = dict(SETTINGS["mcfaline"], covariates=["cell_type"], level_key="cell_type")
#: The line a covariate of the model, the target pooled naively over the lines (as ``mcfaline``):
#: does a model that knows the lines reproduce the pooled target's composition better?
SETTINGS["mcfaline-covariate"] = dict(SETTINGS["mcfaline"], covariates=["cell_type"])
MASK_LR = 3e-2
#: Models trained with their own defaults (not the SAMS-VAE family's settings above).
SVAE_FAMILY = ("svae", "svae-plus")


def _screen(dataset: str, seed: int):
    from cellpert.data import load_screen, make_split, read_split
    from cellpert.data.simulate import simulate_sams

    if dataset == "sim":
        adata = simulate_sams(seed=seed, n_perturbations=30, n_latent=8, n_combinations=6)
        screen = load_screen(adata, warn=False)
        read_split(screen, "cellpert_split")
        return screen
    subset = 'dataset == "mcfaline23"' if dataset.startswith("mcfaline") else 'dataset == "norman19"'
    screen = load_screen(SHARED, subset=subset, drop_zero_genes=True, warn=False)
    make_split(screen, "combinations" if dataset == "norman-combos" else "random", seed=seed)
    return screen


def _model(name: str, adata, dataset: str, seed: int):
    from cellpert.models import CPAVAE, SAMSVAE, SVAE, ConditionalVAE, SVAEPlus

    cls = {"samsvae": SAMSVAE, "cpa-vae": CPAVAE, "conditional-vae": ConditionalVAE, "svae": SVAE,
           "svae-plus": SVAEPlus}[name]  # fmt: skip
    covariates = SETTINGS.get(dataset, {}).get("covariates")
    cls.setup_anndata(adata, **({"categorical_covariate_keys": covariates} if covariates else {}))
    if name in SVAE_FAMILY:  # the paper's architecture and training defaults (K = 15)
        return cls(adata, seed=seed)
    kwargs = dict(SETTINGS[dataset]["model"], seed=seed)
    if name == "samsvae" and dataset.startswith("mcfaline"):
        kwargs.update(guide_n_hidden=200, guide_n_layers=2)
    return cls(adata, **kwargs)


def train_model(model, name: str, dataset: str, steps: int) -> dict:
    """Train with the settings above (early stopping, ``steps`` the cap); the training summary."""
    train = {} if name in SVAE_FAMILY else dict(SETTINGS[dataset]["train"])
    if name == "samsvae":
        train["mask_logits_lr"] = MASK_LR
    model.train(max_steps=steps, enable_model_summary=False, **train)
    return model.training_summary_


ESTIMATOR_ROWS = ("combined", "posterior", "counterfactual", "counterfactual/model-shift", "prior")


def run_one(dataset: str, name: str, seed: int, steps: int, n_draws: int, cache: Path | None = None,
            estimators: tuple[str, ...] = ESTIMATOR_ROWS) -> list[dict]:  # fmt: skip
    from cellpert.data.simulate import sams_true_ate
    from cellpert.evaluate import (
        additive_baseline,
        ate_metrics,
        compute_ate_evaluation,
        score_against_truth,
    )
    from cellpert.models import prepare_anndata

    screen = _screen(dataset, seed)
    adata = prepare_anndata(screen)
    model = _model(name, adata, dataset, seed)
    saved = cache / f"{dataset}_{name}_{seed}_{steps}" if cache is not None else None
    if saved is not None and (saved / "model.pt").is_file():  # a model trained by an earlier run
        model = type(model).load(str(saved), adata=adata)
        summary = json.loads((saved / "training.json").read_text())
    else:
        summary = train_model(model, name, dataset, steps)
        if saved is not None:
            model.save(str(saved), overwrite=True)
            (saved / "training.json").write_text(json.dumps(summary))
    common = {"dataset": dataset, "model": name, "seed": seed, "train_s": summary["wall_time_s"],
              "steps": summary["steps"], "best_step": summary.get("best_step")}  # fmt: skip
    rows = []
    truth = None
    # (name in the table, estimator, latent shift of the counterfactual estimator)
    first = next(e for e in ESTIMATOR_ROWS if e in estimators)  # carries the baselines and the ceiling
    for estimator, kind, shift in (("combined", "combined", "empirical"),
                                   ("posterior", "posterior", "empirical"),
                                   ("counterfactual", "counterfactual", "empirical"),
                                   ("counterfactual/model-shift", "counterfactual", "model"),
                                   ("prior", "prior", "empirical")):  # fmt: skip
        if estimator not in estimators:
            continue
        if kind == "prior" and SETTINGS.get(dataset, {}).get("level_key"):
            continue  # ATEs within levels need the counterfactual estimator
        ev = compute_ate_evaluation(
            screen, model, estimator=kind, n_draws=n_draws, n_particles=1000, n_groups=20,
            ceiling=estimator == first, iwelbo_samples=20, seed=seed, latent_shift=shift,
            level_key=SETTINGS.get(dataset, {}).get("level_key"),
        )  # fmt: skip
        s = ev.summary["test"]
        predictors = {"model": ev.model_ate.ate}
        if any("+" in c for c in ev.data_ate.columns):
            # the sum of the model's own predicted single effects, for the combinations
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predictors["model_additive"] = additive_baseline(ev.model_ate.ate, list(ev.model_ate.ate.columns),
                                                                 parts_of=screen.label_parts)  # fmt: skip
        if estimator == first:
            predictors.update(ev.baselines)
        for pred_name, frame in predictors.items():
            row = dict(common, estimator=estimator if pred_name.startswith("model") else "-", predictor=pred_name)
            if pred_name == "model" and "model_ate_combined" in ev.config:
                row["weight"] = ev.config["model_ate_combined"]["weight"]
            if pred_name == "model_additive":
                _, own = ate_metrics(ev.data_ate, frame, top_n=20)
                row.update({m: own[m] for m in ("pearson", "r2", "pearson_top")})
            else:
                row.update({m: s[f"{pred_name}_{m}"] for m in ("pearson", "r2", "pearson_top")})
            if estimator == first:
                row.update(ceiling=s["ceiling_pearson"], ceiling_top=s["ceiling_pearson_top"],
                           expected_train=s["expected_train_average_pearson"])  # fmt: skip
            if dataset == "sim":
                if truth is None:
                    truth = sams_true_ate(screen.adata, list(ev.data_ate.columns), n_cells=20000, seed=seed)
                    truth.index = screen.gene_names
                if pred_name == "model_additive":
                    _, t = ate_metrics(truth, frame, top_n=20)
                else:  # the figures `cellpert evaluate-ate --truth` prints
                    scored = score_against_truth(ev, truth, top_n=20)
                    t = {m: scored[f"{pred_name}_{m}"] for m in ("pearson", "r2", "pearson_top")}
                row.update(truth_pearson=t["pearson"], truth_r2=t["r2"], truth_pearson_top=t["pearson_top"])
                if pred_name == "model":
                    row.update({k: scored[k] for k in ("coverage", "interval_width", "coverage_calibrated") if k in scored})
            rows.append(row)
    return rows


def _table(frame: pd.DataFrame) -> str:
    metrics = [c for c in ("pearson", "r2", "pearson_top", "weight", "ceiling", "ceiling_top", "expected_train",
                           "truth_pearson", "truth_r2", "truth_pearson_top", "coverage", "coverage_calibrated") if c in frame]  # fmt: skip
    keys = ["dataset", "model", "estimator", "predictor"]
    grouped = frame.groupby(keys, sort=False)[metrics]
    mean, sd = grouped.mean(), grouped.std()
    n = grouped.size()
    lines = ["| " + " | ".join(keys + metrics + ["n"]) + " |", "|" + "---|" * (len(keys) + len(metrics) + 1)]
    for idx in mean.index:
        cells = [
            "" if np.isnan(mean.loc[idx, m]) else f"{mean.loc[idx, m]:.3f} ± {0 if np.isnan(sd.loc[idx, m]) else sd.loc[idx, m]:.3f}"
            for m in metrics
        ]
        lines.append("| " + " | ".join([*map(str, idx), *cells, str(n.loc[idx])]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sim", "norman", "norman-combos", "mcfaline"])
    parser.add_argument("--models", nargs="+", default=["samsvae", "cpa-vae", "conditional-vae"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8000, help="cap on the training steps (early stopping)")
    parser.add_argument("--n-draws", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines")
    parser.add_argument("--cache", type=Path, default=None, help="save trained models here and reuse them")
    parser.add_argument("--quick", action="store_true", help="one seed, 100 steps, sim only")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATOR_ROWS), choices=ESTIMATOR_ROWS,
                        help="estimator rows to compute (the first carries the baselines and the ceiling)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.seeds, args.steps, args.n_draws = ["sim"], [0], 100, 10
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("cellpert").setLevel(logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for dataset in args.datasets:
        for name in args.models:
            for seed in args.seeds:
                new = run_one(dataset, name, seed, args.steps, args.n_draws, args.cache, tuple(args.estimators))
                rows += new
                print(f"# {dataset} {name} seed {seed}: {new[0]['steps']} steps in {new[0]['train_s']} s; "
                      + ", ".join(f"{r['predictor']}/{r['estimator']} r {r['pearson']:.3f}" for r in new), flush=True)  # fmt: skip
                if args.out:
                    with args.out.open("a") as fh:
                        for r in new:
                            fh.write(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v)
                                                 for k, v in r.items()}) + "\n")  # fmt: skip
    frame = pd.DataFrame(rows)
    print(_table(frame))


if __name__ == "__main__":
    main()
