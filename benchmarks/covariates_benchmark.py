"""Covariates: what a batch or cell-line covariate buys (prints tables; issue 15).

``sim``: the SAMS simulator with two batches that shift the cells (``--batch-effect``,
latent space) and an uneven spread of the perturbations over them (each perturbation
has 80% of its cells in one batch). SAMS-VAE is trained with and without
``batch_key="batch"``; every ATE is compared with the true ATE (the simulator's own
generative model, batches pooled uniformly as the control cells are spread,
:func:`cellpert.data.simulate.sams_true_ate`). Also the data ATEs: computed naively (all
cells of a label against all control cells) and within batch, pooled.

``mcfaline``: the McFaline-Figueroa part of the shared subset (three glioma lines in
``obs.cell_type``), random 64/16/20 cell split. One SAMS-VAE over the three lines with
the line as a covariate (``categorical_covariate_keys=["cell_type"]``), against one
SAMS-VAE per line (trained on that line's cells of the same split) and the per-line
training-cell baselines; every figure is ATE r / top-20 r within a line against that
line's held-out test cells.

Usage::

    python benchmarks/covariates_benchmark.py --parts sim mcfaline --seeds 0 1 2
    python benchmarks/covariates_benchmark.py --quick

Results: benchmarks/RESULTS_covariates.md.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "norman2019_mcfaline2023_subset.h5ad"
SIM_TRAIN = {"lr": 3e-3, "batch_size": 256, "mask_logits_lr": 3e-2}
MCF_MODEL = {"n_latent": 50, "n_hidden": 200, "guide_n_hidden": 200, "guide_n_layers": 2}
MCF_TRAIN = {"lr": 1e-3, "batch_size": 512, "gradient_clip_val": 100, "mask_logits_lr": 3e-2}


def _train(screen, *, steps: int, seed: int, model_kwargs: dict, train_kwargs: dict, **setup):
    from cellpert.models import SAMSVAE, prepare_anndata

    adata = prepare_anndata(screen)
    SAMSVAE.setup_anndata(adata, **setup)
    model = SAMSVAE(adata, seed=seed, **model_kwargs)
    model.train(max_steps=steps, enable_progress_bar=False, enable_model_summary=False, **train_kwargs)
    return model


def _metrics(truth: pd.DataFrame, frame: pd.DataFrame) -> dict:
    from cellpert.evaluate import ate_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, m = ate_metrics(truth, frame[truth.columns], top_n=20)
    return {"r": m["pearson"], "R2": m["r2"], "top_r": m["pearson_top"]}


def sim(seed: int, steps: int, batch_effect: float, n_draws: int) -> list[dict]:
    from cellpert.data import load_screen, read_split
    from cellpert.data.simulate import sams_true_ate, simulate_sams
    from cellpert.evaluate import compute_ate_evaluation, data_ate, level_weights, pooled_ate

    adata = simulate_sams(
        seed=seed, n_perturbations=20, n_latent=8, n_cells_per_perturbation=(100, 20, 20),
        n_control_cells=(200, 40, 40), n_batches=2, batch_effect=batch_effect, batch_imbalance=0.8,
    )  # fmt: skip
    screen = load_screen(adata, warn=False)
    read_split(screen, "cellpert_split")
    labels = [c for c in data_ate(screen).columns]
    truth = sams_true_ate(screen.adata, labels, n_cells=20000, seed=seed)
    truth.index = screen.gene_names
    levels = screen.adata.obs["batch"].astype(str).to_numpy()
    weights = level_weights(levels, screen.is_control, "uniform")
    rows = []

    def row(name: str, frame: pd.DataFrame, **extra) -> None:
        rows.append({"part": "sim", "seed": seed, "predictor": name, **_metrics(truth, frame), **extra})

    # data ATEs of all cells, and of the training cells (the baselines), naive vs within batch
    def within(cells):
        return pooled_ate(lambda m: data_ate(screen, cells=m), levels=levels, weights=weights,
                          cells=cells, is_control=screen.is_control)  # fmt: skip

    every = np.ones(screen.n_cells, bool)
    train = screen.adata.obs["cellpert_split"].astype(str).to_numpy() == "train"
    row("data ATE, all cells, naive", data_ate(screen))
    row("data ATE, all cells, within batch", within(every))
    row("training-cell average, naive", data_ate(screen, cells=train))
    row("training-cell average, within batch", within(train))
    for name, setup in (("SAMS-VAE without covariate", {}), ("SAMS-VAE with batch covariate", {"batch_key": "batch"})):
        t0 = time.perf_counter()
        model = _train(screen, steps=steps, seed=seed, model_kwargs={"n_latent": 8}, train_kwargs=SIM_TRAIN, **setup)
        train_s = time.perf_counter() - t0
        ev = compute_ate_evaluation(screen, model, n_draws=n_draws, level_key="batch", pool="uniform",
                                    ceiling=False, iwelbo_samples=20, seed=seed)  # fmt: skip
        row(name, ev.model_ate.ate, train_s=round(train_s, 1), steps=model.training_summary_["steps"],
            test_iwelbo=ev.iwelbo)  # fmt: skip
    return rows


def mcfaline(seed: int, steps: int, n_draws: int) -> list[dict]:
    import anndata as ad

    from cellpert.data import load_screen, make_split, read_split
    from cellpert.evaluate import compute_ate_evaluation

    full = load_screen(SHARED, subset='dataset == "mcfaline23"', drop_zero_genes=True, warn=False)
    make_split(full, "random", seed=seed)
    rows = []
    t0 = time.perf_counter()
    joint = _train(full, steps=steps, seed=seed, model_kwargs=MCF_MODEL, train_kwargs=MCF_TRAIN,
                   categorical_covariate_keys=["cell_type"])  # fmt: skip
    joint_s = time.perf_counter() - t0
    ev = compute_ate_evaluation(full, joint, n_draws=n_draws, level_key="cell_type", ceiling=False,
                                iwelbo_samples=20, seed=seed)  # fmt: skip
    for line, r in ev.per_level.iterrows():
        for name in ("model", "average"):
            label = "one model, cell line covariate" if name == "model" else "training-cell average (per line)"
            rows.append({"part": "mcfaline", "seed": seed, "line": line, "predictor": label,
                         "r": r[f"{name}_pearson"], "R2": r[f"{name}_r2"], "top_r": r[f"{name}_pearson_top"],
                         "train_s": round(joint_s, 1) if name == "model" else np.nan})  # fmt: skip
    for line in sorted(full.adata.obs["cell_type"].astype(str).unique()):
        sub = full.adata[full.adata.obs["cell_type"].astype(str).to_numpy() == line].copy()
        sub = ad.AnnData(X=sub.X, obs=sub.obs, var=sub.var)
        screen = load_screen(sub, perturbation_key=full.perturbation_key, control=list(full.control_labels), warn=False)
        read_split(screen, "cellpert_split")
        t0 = time.perf_counter()
        model = _train(screen, steps=steps, seed=seed, model_kwargs=MCF_MODEL, train_kwargs=MCF_TRAIN)
        line_s = time.perf_counter() - t0
        ev_line = compute_ate_evaluation(screen, model, n_draws=n_draws, ceiling=False, iwelbo_samples=20, seed=seed)
        s = ev_line.summary["test"]
        rows.append({"part": "mcfaline", "seed": seed, "line": line, "predictor": "one model per line",
                     "r": s["model_pearson"], "R2": s["model_r2"], "top_r": s["model_pearson_top"],
                     "train_s": round(line_s, 1)})  # fmt: skip
    return rows


def _table(frame: pd.DataFrame, by: list[str]) -> str:
    metrics = [c for c in ("r", "R2", "top_r") if c in frame]
    g = frame.groupby(by, sort=False)[metrics]
    mean, sd = g.mean(), g.std()
    out = mean.copy().astype(object)
    for c in metrics:
        out[c] = [f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}" for m, s in zip(mean[c], sd[c], strict=True)]
    out["n"] = g.size()
    return out.to_string()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["sim", "mcfaline"], choices=["sim", "mcfaline"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000, help="Step cap (early stopping usually ends sooner).")
    parser.add_argument("--batch-effect", type=float, default=1.5)
    parser.add_argument("--n-draws", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="One seed, few steps: a smoke run.")
    parser.add_argument("--out", type=Path, help="Also write the rows as CSV.")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.n_draws = [0], 60, 5
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "scvi", "cellpert"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    for part in args.parts:
        for seed in args.seeds:
            t0 = time.perf_counter()
            rows += sim(seed, args.steps, args.batch_effect, args.n_draws) if part == "sim" else mcfaline(seed, args.steps, args.n_draws)
            print(f"[{part} seed {seed}: {time.perf_counter() - t0:.0f} s]", flush=True)
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    if "sim" in args.parts:
        print(f"\nSAMS simulator, 2 batches (latent shift sd {args.batch_effect}, 80% of each perturbation in one batch):"
              " agreement with the true ATE, mean ± sd over seeds")  # fmt: skip
        print(_table(frame[frame.part == "sim"], ["predictor"]))
    if "mcfaline" in args.parts:
        print("\nMcFaline subset, within each cell line, against its held-out test cells, mean ± sd over split seeds")
        print(_table(frame[frame.part == "mcfaline"], ["line", "predictor"]))


if __name__ == "__main__":
    main()
