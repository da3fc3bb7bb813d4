"""Identifiability of the comparative VAE under an over-specified salient dimension (issue 6).

Simulates background and target cells with :func:`cellpert.data.simulate.simulate_comparative`
(MODELS.md §5, §8: true d_z = 5, d_t = 2, a random leaky-ReLU decoder, NB counts), fits each
method with d_z = 5 and a fitted d_t ∈ {2, 4, 8} (4 and 8 over-specify the salient block,
where background variation can leak into t), and reports the block R² of MODELS.md §7 on
held-out TARGET cells (split ``test`` + ``val`` by default, never trained on):

- recovery, near 1 is good: R²(z ← ẑ), R²(t ← t̂);
- leakage, near 0 is good: R²(z ← t̂), R²(t ← ẑ).

Every R² is an in-sample least-squares fit on the held-out cells (:func:`cellpert.evaluate.block_leakage`),
so a predictor with p columns and no information scores about p / (n − 1) on n cells: that
chance level is printed with the table. Also reported: ``‖t̂‖² bg/tg``, the mean squared
norm of the salient posterior means of held-out background cells over that of held-out
target cells (0 when background cells carry no salient signal, the quantity the Wasserstein
penalty pushes down); the held-out IWELBO (K importance samples, mean over held-out cells
of both sets; our models only); the training time.

Methods:

- ``ours-std``: :class:`~cellpert.models.comparative.ComparativeVAE`, standard mode,
  Wasserstein penalty weight w (``--penalty-weight``, default 1);
- ``ours-std-w0``: standard mode with penalty weight 0 (no regulariser: what the penalty buys);
- ``ours-mo``: multi-objective (MGDA) mode, penalty weight w;
- ``ours-co``: constrained mode, ε = level · d_t (``--constraint-level``, default 0.05),
  dual step 0.1, λ₀ = w;
- ``cvi``: scvi-tools' ``ContrastiveVI`` with its defaults (Wasserstein penalty 0, KL
  warm-up over 400 epochs);
- ``cvi-w0``: ``ContrastiveVI`` without KL warm-up, Wasserstein penalty 0 (as ours-std-w0);
- ``cvi-wp``: ``ContrastiveVI`` with ``wasserstein_penalty=w`` and no KL warm-up, so that
  its penalty has weight w throughout, as ours (it multiplies its penalty by the KL
  warm-up weight). ``cvi`` vs ``cvi-w0``: the warm-up; ``cvi-w0`` vs ``cvi-wp``: the penalty.

Our models use no KL warm-up (their default).

ContrastiveVI is trained on the same training cells (``background_indices`` /
``target_indices`` from the ``train`` split, ``train_size=1``), same epochs and batch size
128; it keeps its own defaults otherwise: a ZINB likelihood, one hidden layer, dropout 0.1,
and equal-sized background and target minibatches truncated to the smaller set (with
unequal sets, cells of the larger one are left out of each epoch).

Run::

    python benchmarks/comparative_benchmark.py --quick          # smoke run, under a minute
    python benchmarks/comparative_benchmark.py                  # 3 seeds, about 13 min on 2 cores
    python benchmarks/comparative_benchmark.py --seeds 0 1 2 3 4 --out-csv runs.csv
    python benchmarks/comparative_benchmark.py --summarise runs_a.csv runs_b.csv  # table only

Runs can be split over processes (``--seeds 0``, ``--seeds 1``, ... each with its own
``--out-csv``) and the table rebuilt from the CSVs with ``--summarise``.

Progress goes to stderr, the markdown table to stdout. Results and their reading:
``benchmarks/RESULTS_comparative.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellpert.data import load_screen
from cellpert.data.simulate import simulate_comparative
from cellpert.evaluate import block_leakage
from cellpert.models import prepare_anndata
from cellpert.models.comparative import ComparativeVAE

#: Method name -> family and settings (see the module docstring); a penalty weight of
#: ``None`` stands for ``--penalty-weight``.
METHODS: dict[str, dict] = {
    "ours-std": {"family": "ours", "mode": "standard", "penalty_weight": None},
    "ours-std-w0": {"family": "ours", "mode": "standard", "penalty_weight": 0.0},
    "ours-mo": {"family": "ours", "mode": "multi-objective", "penalty_weight": None},
    "ours-co": {"family": "ours", "mode": "constrained", "penalty_weight": None},
    "cvi": {"family": "cvi", "wasserstein_penalty": 0.0, "kl_warmup": "default"},
    "cvi-w0": {"family": "cvi", "wasserstein_penalty": 0.0, "kl_warmup": None},
    "cvi-wp": {"family": "cvi", "wasserstein_penalty": None, "kl_warmup": None},
}
TRUE_DZ, TRUE_DT = 5, 2
R2_KEYS = ["r2_z_from_z_hat", "r2_t_from_t_hat", "r2_z_from_t_hat", "r2_t_from_z_hat"]
R2_LABELS = {
    "r2_z_from_z_hat": "R²(z←ẑ) ↑",
    "r2_t_from_t_hat": "R²(t←t̂) ↑",
    "r2_z_from_t_hat": "R²(z←t̂) ↓",
    "r2_t_from_z_hat": "R²(t←ẑ) ↓",
}

logger = logging.getLogger("comparative_benchmark")


def simulate(seed: int, args: argparse.Namespace):
    """Simulated comparative data set of one seed, prepared for the models.

    Returns
    -------
    AnnData with counts in ``X``, the split in ``obs['cellpert_split']``, the true latents in
    ``obsm['X_true_background']`` / ``obsm['X_true_salient']`` and the dosage matrix of
    :func:`~cellpert.models.prepare_anndata` (control cells = background).
    """
    sim = simulate_comparative(
        seed=seed,
        n_background=args.n_cells,
        n_target=args.n_cells,
        n_background_latent=TRUE_DZ,
        n_salient_latent=TRUE_DT,
        n_genes=args.n_genes,
        library_size=args.library_size,
    )
    return prepare_anndata(load_screen(sim))


def eval_indices(adata, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the held-out target and background cells (``args.eval_split``)."""
    splits = args.eval_split.split("+")
    held_out = adata.obs["cellpert_split"].astype(str).isin(splits).to_numpy()
    target = (adata.obs["perturbation"].astype(str) != "control").to_numpy()
    return np.flatnonzero(held_out & target), np.flatnonzero(held_out & ~target)


def fit_ours(adata, method: str, dt: int, seed: int, args: argparse.Namespace) -> dict:
    """Fit :class:`ComparativeVAE` in one mode; latents of the held-out cells and IWELBO."""
    spec = METHODS[method]
    ComparativeVAE.setup_anndata(adata)
    t0 = time.time()
    model = ComparativeVAE(adata, n_background_latent=TRUE_DZ, n_salient_latent=dt, seed=seed)
    model.train(
        max_epochs=args.epochs,
        mode=spec["mode"],
        penalty_weight=args.penalty_weight
        if spec["penalty_weight"] is None
        else spec["penalty_weight"],
        constraint_level=args.constraint_level,
        dual_lr=0.1,
        batch_size=128,
        enable_progress_bar=False,
    )
    train_s = time.time() - t0
    tg, bg = eval_indices(adata, args)
    out = {
        "z_hat": model.get_latent_representation(indices=tg),
        "t_hat": model.get_latent_representation(indices=tg, kind="salient"),
        "t_hat_bg": model.get_latent_representation(indices=bg, kind="salient"),
        "train_s": train_s,
        "final_penalty_weight": float(model.final_penalty_weight_),
    }
    if args.iwelbo_samples > 0:
        out["iwelbo"] = float(
            model.get_iwelbo(
                indices=np.sort(np.concatenate([tg, bg])), n_samples=args.iwelbo_samples
            )
        )
    return out


def fit_cvi(adata, method: str, dt: int, seed: int, args: argparse.Namespace) -> dict:
    """Fit scvi-tools' ContrastiveVI on the training cells; latents of the held-out cells."""
    import scvi
    from scvi.external import ContrastiveVI

    spec = METHODS[method]
    scvi.settings.seed = seed
    ContrastiveVI.setup_anndata(adata, layer=None)
    split = adata.obs["cellpert_split"].astype(str).to_numpy()
    target = (adata.obs["perturbation"].astype(str) != "control").to_numpy()
    t0 = time.time()
    model = ContrastiveVI(
        adata,
        n_background_latent=TRUE_DZ,
        n_salient_latent=dt,
        wasserstein_penalty=args.penalty_weight
        if spec["wasserstein_penalty"] is None
        else spec["wasserstein_penalty"],
    )
    plan_kwargs = (
        {} if spec["kl_warmup"] == "default" else {"n_epochs_kl_warmup": spec["kl_warmup"]}
    )
    model.train(
        background_indices=np.flatnonzero((split == "train") & ~target).tolist(),
        target_indices=np.flatnonzero((split == "train") & target).tolist(),
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=128,
        plan_kwargs=plan_kwargs,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train_s = time.time() - t0
    tg, bg = eval_indices(adata, args)
    return {
        "z_hat": model.get_latent_representation(indices=tg, representation_kind="background"),
        "t_hat": model.get_latent_representation(indices=tg, representation_kind="salient"),
        "t_hat_bg": model.get_latent_representation(indices=bg, representation_kind="salient"),
        "train_s": train_s,
    }


def run_one(adata_base, seed: int, dt: int, method: str, args: argparse.Namespace) -> dict:
    """One (seed, fitted d_t, method) fit and its metrics, as a flat row."""
    adata = adata_base.copy()
    fit = fit_ours if METHODS[method]["family"] == "ours" else fit_cvi
    out = fit(adata, method, dt, seed, args)
    tg, _ = eval_indices(adata, args)
    z_true = adata.obsm["X_true_background"][tg]
    t_true = adata.obsm["X_true_salient"][tg]
    row = {"seed": seed, "fitted_dt": dt, "method": method}
    row.update(
        eval_split=args.eval_split, n_eval_target=len(tg), penalty_weight=args.penalty_weight
    )
    row.update(block_leakage(z_true, t_true, out["z_hat"], out["t_hat"]))
    tg_energy = float((out["t_hat"] ** 2).sum(1).mean())
    row["salient_energy_ratio"] = float((out["t_hat_bg"] ** 2).sum(1).mean()) / max(
        tg_energy, 1e-12
    )
    for key in ("iwelbo", "train_s", "final_penalty_weight"):
        row[key] = out.get(key, np.nan)
    return row


def _mean_sd(values: pd.Series, fmt: str) -> str:
    v = values.dropna()
    if len(v) == 0:
        return "—"
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{fmt.format(v.mean())} ± {fmt.format(sd)}"


def summarise(rows: list[dict]) -> pd.DataFrame:
    """Mean ± sd over seeds per (fitted d_t, method)."""
    df = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (dt, method), sub in sorted(
        df.groupby(["fitted_dt", "method"]), key=lambda k: (k[0][0], order[k[0][1]])
    ):
        cells = {"fitted d_t": int(dt), "method": method, "seeds": len(sub)}
        for key in R2_KEYS:
            cells[R2_LABELS[key]] = _mean_sd(sub[key], "{:.3f}")
        cells["‖t̂‖² bg/tg ↓"] = _mean_sd(sub["salient_energy_ratio"], "{:.3f}")
        cells["held-out IWELBO"] = _mean_sd(sub["iwelbo"], "{:.1f}")
        cells["train s"] = f"{sub['train_s'].mean():.0f}"
        out.append(cells)
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table (without the optional ``tabulate`` dependency)."""
    header = list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(map(str, row.tolist())) + " |")
    return "\n".join(lines)


def chance_note(rows: list[dict]) -> str:
    """The chance level p / (n − 1) of the in-sample R² for each predictor width p."""
    n = int(np.median([r["n_eval_target"] for r in rows]))
    widths = sorted({TRUE_DZ, *(int(r["fitted_dt"]) for r in rows)})
    splits = "/".join(sorted({str(r["eval_split"]) for r in rows}))
    levels = ", ".join(f"p={p}: {p / (n - 1):.3f}" for p in widths)
    return (
        f"Held-out target cells ({splits}): n ≈ {n} per seed. R² of an uninformative "
        f"predictor with p columns (chance level, p/(n−1)): {levels}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="data and model seeds (default 0 1 2)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: seed 0, 500 cells per set, 10 epochs, d_t 2 and 8",
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument(
        "--n-cells", type=int, default=1000, help="cells per set (background and target)"
    )
    p.add_argument("--dt", type=int, nargs="+", default=[2, 4, 8], help="fitted salient dimensions")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--penalty-weight",
        type=float,
        default=1.0,
        help="w: Wasserstein penalty weight (see methods)",
    )
    p.add_argument("--constraint-level", type=float, default=0.05, help="ε / d_t of ours-co")
    p.add_argument("--n-genes", type=int, default=100)
    p.add_argument(
        "--library-size", type=float, default=2000.0, help="median library size of the simulator"
    )
    p.add_argument("--eval-split", default="test+val", choices=["test", "test+val"])
    p.add_argument("--iwelbo-samples", type=int, default=100)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the networks are small; more threads only oversubscribe a busy machine)",
    )
    p.add_argument("--out-csv", type=Path, default=None, help="also write one row per fit here")
    p.add_argument(
        "--summarise", type=Path, nargs="+", default=None, help="only print the table of these CSVs"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.n_cells, args.epochs, args.dt = args.seeds[:1], 500, 10, [2, 8]
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the grid, print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.summarise is not None:
        rows = pd.concat([pd.read_csv(f) for f in args.summarise]).to_dict("records")
        print(to_markdown(summarise(rows)))
        print(f"\n{chance_note(rows)}")
        return
    t_start = time.time()
    rows = []
    for seed in args.seeds:
        adata = simulate(seed, args)
        for dt in args.dt:
            for method in args.methods:
                row = run_one(adata, seed, dt, method, args)
                rows.append(row)
                logger.info(
                    "seed %d d_t=%d %-11s %s",
                    seed, dt, method,
                    " ".join(f"{k}={row[k]:.3f}" for k in [*R2_KEYS, "salient_energy_ratio", "iwelbo", "train_s"]),
                )  # fmt: skip
                if args.out_csv is not None:
                    pd.DataFrame(rows).to_csv(args.out_csv, index=False)
    print(
        f"Comparative identifiability (issue 6): true d_z={TRUE_DZ}, d_t={TRUE_DT}; {args.n_cells} background + "
        f"{args.n_cells} target cells, {args.n_genes} genes, library size {args.library_size:g}; "
        f"{args.epochs} epochs; seeds {' '.join(map(str, args.seeds))}; mean ± sd over seeds.\n"
    )
    print(to_markdown(summarise(rows)))
    print(f"\n{chance_note(rows)}")
    print(f"Total wall time {time.time() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
