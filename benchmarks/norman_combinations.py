"""The Norman combination benchmark (MODELS.md §6, §9): held-out double combinations.

On the Norman 2019 part of the shared subset (or the full Norman 2019 file written by
``data_recipes/norman2019.py``, via ``--screen``), with the combination split
(``split="combinations"``: the double combinations are shuffled with ``--split-seed`` and
the last ⌈25 %⌉ whose parts stay seen in training are held out as the test set), this
trains SAMS-VAE (correlated and mean-field guides), CPA-VAE and the conditional VAE at
the paper's Norman settings (K = 200, H = 400, correlated guide MLP 4 × 400, mask prior
0.01, 5 particles, batch 512, lr 3e-4, weight decay 1e-6, gradient clip 100) for
``--steps`` steps each, evaluates every model with :func:`cellpert.evaluate.evaluate_ate`
(2,500 particles, ℓ = 1e4, data ATE over all cells of each label) and prints one table:
test IWELBO (100 samples), ATE Pearson and top-20 Pearson on the held-out combinations,
for each model and the additive and mean baselines (computed on the training cells).

``--split random`` runs the same models on a random 64/16/20 cell split instead (the
setting of the reference numbers quoted in ``benchmarks/RESULTS_evaluate.md``).

Usage::

    python benchmarks/norman_combinations.py [--steps 2000] [--screen PATH] [--quick]
    python benchmarks/norman_combinations.py --runs-dir runs/norman --reuse   # evaluate saved runs

``--quick`` is a smoke run (20 steps, 200 particles, small networks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPERT_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_SCREEN = SHARED / "norman2019_mcfaline2023_subset.h5ad"
NORMAN_SUBSET = 'dataset == "norman19"'
#: Model name -> (cellpert model, extra options).
MODELS = {
    "samsvae_correlated": ("samsvae", {"guide": "correlated", "guide_n_hidden": 400, "guide_n_layers": 4}),
    "samsvae_mean_field": ("samsvae", {"guide": "mean_field"}),
    "cpa-vae": ("cpa-vae", {}),
    "conditional-vae": ("conditional-vae", {}),
}
PAPER = {"n_latent": 200, "n_hidden": 400, "n_particles": 5, "batch_size": 512, "lr": 3e-4, "gradient_clip_val": 100.0,
         "early_stopping": False}  # fmt: skip
#: The paper trains the mask logits at the common lr (cellpert's default gives them 3e-2).
PAPER_SAMS = {"mask_logits_lr": 3e-4}

logger = logging.getLogger("norman_combinations")


def _screen_options(path: Path, subset: str | None) -> dict:
    """The shared subset needs ``dataset == "norman19"``; a recipe file needs none."""
    if subset is not None:
        return {"subset": subset or None}
    import h5py

    with h5py.File(path, "r") as f:
        has_dataset = "obs" in f and "dataset" in f["obs"]
    return {"subset": NORMAN_SUBSET if has_dataset else None}


def _heldout_report(path: Path, options: dict, split_seed: int) -> dict:
    from cellpert.data import eligible_heldout_combinations, load_screen

    screen = load_screen(path, subset=options.get("subset"), warn=False)
    combos = screen.combination_labels
    heldout = eligible_heldout_combinations(screen, seed=split_seed)
    return {
        "n_cells": screen.n_cells,
        "n_genes": screen.n_genes,
        "n_singles": len(screen.single_labels),
        "n_combinations": len(combos),
        "n_target": math.ceil(0.25 * len(combos)),
        "heldout": heldout,
    }


def _format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<22} {'test IWELBO':>12} {'ATE r':>7} {'top-20 r':>9} {'ATE R²':>8} {'labels':>6} "
        f"{'train s':>8} {'eval s':>7}"
    )
    lines = [head, "-" * len(head)]

    def f(v, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return format(v, fmt) if v is not None and np.isfinite(v) else "-".rjust(width)

    for r in rows:
        lines.append(
            f"{r['name']:<22} {f(r.get('iwelbo'), '12.2f')} {f(r['pearson'], '7.3f')} "
            f"{f(r['pearson_top'], '9.3f')} {f(r['r2'], '8.3f')} {r['n_test_labels']:>6} "
            f"{f(r.get('train_s'), '8.0f')} {f(r.get('eval_s'), '7.1f')}"
        )
    return "\n".join(lines)


#: The paper's evaluation protocol: prior estimator, data ATE over all cells of each label.
PAPER_EVALUATION = {"estimator": "prior", "data_cells": "all"}


def train_and_evaluate(
    screen: Path,
    *,
    run_dir: Path,
    name: str,
    model: str,
    options: dict,
    screen_options: dict | None = None,
    split: str = "combinations",
    split_seed: int = 0,
    fraction: float | None = None,
    max_steps: int = 2000,
    seed: int = 0,
    reuse: bool = False,
    evaluation: dict | None = None,
) -> tuple[dict, dict[str, dict]]:
    """Train one model with :func:`cellpert.runs.train_run`, score it with
    :func:`cellpert.runs.evaluate_ate` on the test split.

    ``options`` are the model and training options of the run (``train_run``'s
    ``**options``), ``screen_options`` its data options (``subset``, ...), ``evaluation``
    options of the evaluation (``n_particles``, ``library_size``, ``seed``; the paper's
    protocol, :data:`PAPER_EVALUATION`, unless overridden). ``reuse``: evaluate the run
    already in ``run_dir`` instead of training when it has a model.

    Returns
    -------
    ``(row, baselines)``: the model's row (``iwelbo``, ``pearson``, ``pearson_top``,
    ``r2``, ``n_test_labels``, timings) and one row per baseline of the evaluation.
    """
    from cellpert.runs import evaluate_ate, train_run

    train_s = None
    if not (reuse and (run_dir / "model").is_dir()):
        t0 = time.perf_counter()
        train_run(
            screen,
            out_dir=run_dir,
            model=model,
            split=split,
            split_seed=split_seed,
            **({"fraction": fraction} if fraction is not None else {}),
            max_steps=max_steps,
            seed=seed,
            overwrite=True,
            progress_bar=False,
            **(screen_options or {}),
            **options,
        )
        train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate_ate(
        screen,
        model_dir=run_dir,
        key_added=name.replace("-", "_"),
        write=False,
        **{"seed": seed, **PAPER_EVALUATION, **(evaluation or {})},
    )
    eval_s = time.perf_counter() - t0
    s = ev.summary["test"]
    row = {
        "name": name,
        "iwelbo": ev.iwelbo,
        "pearson": s["model_pearson"],
        "pearson_top": s["model_pearson_top"],
        "r2": s["model_r2"],
        "n_test_labels": int(s["model_n_perturbations"]),
        "train_s": train_s,
        "eval_s": eval_s,
        "model_ate_s": ev.config["timings"].get("model_ate_s"),
        "iwelbo_s": ev.config["timings"].get("iwelbo_s"),
    }
    baselines = {
        b: {
            "name": f"{b} baseline",
            "iwelbo": None,
            "pearson": s[f"{b}_pearson"],
            "pearson_top": s[f"{b}_pearson_top"],
            "r2": s[f"{b}_r2"],
            "n_test_labels": int(s[f"{b}_n_perturbations"]),
        }
        for b in ev.baselines
    }
    return row, baselines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screen", type=Path, default=DEFAULT_SCREEN, help="Norman screen (.h5ad).")
    parser.add_argument(
        "--subset", default=None, help=f"obs query (default: {NORMAN_SUBSET!r} when obs has 'dataset', else none)."
    )
    parser.add_argument("--split", default="combinations", choices=["combinations", "random"])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--particles", type=int, default=2500)
    parser.add_argument("--library-size", default="fixed", choices=["fixed", "empirical"])
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "runs" / "norman")
    parser.add_argument("--reuse", action="store_true", help="Evaluate runs already in --runs-dir (no training).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 20 steps, 200 particles, small networks.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "scvi", "anndata"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    import torch

    torch.set_num_threads(args.threads)

    settings = dict(PAPER)
    steps, particles = args.steps, args.particles
    if args.quick:
        settings.update(n_latent=10, n_hidden=32)
        steps, particles = 20, 200
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    options = _screen_options(args.screen, args.subset)
    runs = args.runs_dir / args.split
    info = _heldout_report(args.screen, options, args.split_seed) if args.split == "combinations" else {}
    if info:
        print(
            f"combination split (seed {args.split_seed}): {len(info['heldout'])} of {info['n_combinations']} "
            f"combinations held out (target ⌈25%⌉ = {info['n_target']}): {', '.join(info['heldout'])}",
            flush=True,
        )

    rows: list[dict] = []
    baselines: dict[str, dict] = {}
    for name in names:
        model, extra = MODELS[name]
        extra = dict(extra)
        if args.quick and "guide_n_hidden" in extra:
            extra.update(guide_n_hidden=32, guide_n_layers=2)
        row, found = train_and_evaluate(
            args.screen,
            run_dir=runs / name,
            name=name,
            model=model,
            options={**({"mask_prior_prob": 0.01, **PAPER_SAMS} if model == "samsvae" else {}), **settings, **extra},
            screen_options=options,
            split=args.split,
            split_seed=args.split_seed,
            max_steps=steps,
            seed=args.seed,
            reuse=args.reuse,
            evaluation={"n_particles": particles, "library_size": args.library_size, "seed": args.seed},
        )
        rows.append(row)
        baselines.update(found)
        print(_format_table(rows[-1:]).splitlines()[-1], flush=True)
    rows += list(baselines.values())
    n_labels = rows[0]["n_test_labels"] if rows else 0
    print(
        f"\n{args.screen.name} [{options.get('subset') or 'all cells'}], split={args.split} "
        f"(seed {args.split_seed}), {steps} steps, {particles} particles, ℓ={args.library_size}, "
        f"{n_labels} test labels, data ATE over all cells of each label"
    )
    print(_format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"steps": steps, "particles": particles},
                                         "split_info": info, "rows": rows}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
