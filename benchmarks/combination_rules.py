"""Other ways to combine the model's ATE with the training-cell average (prints a table).

cellpert's default (``estimator="combined"``, :func:`cellpert.evaluate.combine_with_average`)
is ``w · average + (1 − w) · posterior`` with one weight ``w`` fitted by least squares on
the validation cells. This script asks whether another rule would do better, scored on
the test cells of the same random 64/16/20 split (never fitted on), for SAMS-VAE trained
as ``ate_benchmark.py`` trains it:

- ``posterior``: the model's posterior estimate alone (w = 0);
- ``combined``: the default (one least-squares weight, fitted on the validation cells);
- ``eb``: one weight per (gene, label), ``τ² / (τ² + se²)`` with ``se`` the standard error
  of that entry's training-cell average and ``τ²`` (the model's squared error) chosen on
  the validation cells: more of the average where it is precise;
- ``ash``: adaptive shrinkage (Stephens 2017) of the average towards the model: a
  mixture-of-Normals prior for ``truth − model`` fitted by EM on the validation cells'
  residuals (with their standard errors), then each entry's posterior mean given its
  training-cell average;
- ``js``: positive-part James–Stein per label, shrinking the average towards the model
  by ``1 − (G − 2) / Σ_g ((a − m) / se)²`` (no validation cells);
- ``half``: w = 1/2 fixed.

The average's standard errors and the validation target come from cellpert's evaluation
helpers (private: this script is a study, not an API user). EM for the mixture prior is
written here: scikit-learn's mixtures fit free variances, not a prior convolved with each
entry's known standard error, and the R package ``ashr`` has no Python port.

Usage::

    python benchmarks/combination_rules.py --datasets sim norman mcfaline --seeds 0 1 2 --work /tmp/rules --jobs 2
    python benchmarks/combination_rules.py --quick    # one seed, 100 steps: a smoke run (make bench-combination-rules)
    python benchmarks/combination_rules.py --datasets mcfaline mcfaline-covariate --seeds 0 1 2 3 4 5 6 7 8 9 \
        --defaults --work /tmp/rules_defaults --jobs 2    # cellpert's defaults, with and without the line covariate

Trained models' outputs are kept in ``--work`` (one pickle per data set and seed) and
reused. Results: benchmarks/RESULTS_ate.md, *Other combination rules (session 17)*.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

HERE = Path(__file__).resolve().parent
RULES = ("posterior", "combined", "eb", "ash", "js", "half", "average")


def dump(dataset: str, seed: int, path: Path, steps: int, defaults: bool = False, lr: float | None = None) -> None:
    """Train SAMS-VAE on one split and keep what every rule needs (``defaults``: with
    cellpert's own model and training defaults, as ``cellpert train`` would, instead of the
    benchmark's per-data-set settings; ``lr`` then overrides the default learning rate)."""
    import torch

    sys.path.insert(0, str(HERE))
    import ate_benchmark as ab

    from cellpert.evaluate import _evaluate as ev_mod
    from cellpert.evaluate import compute_ate_evaluation, data_ate
    from cellpert.models import prepare_anndata

    torch.set_num_threads(1)
    screen = ab._screen(dataset, seed)
    adata = prepare_anndata(screen)
    if defaults:
        from cellpert.models import SAMSVAE

        covariates = ab.SETTINGS.get(dataset, {}).get("covariates")
        SAMSVAE.setup_anndata(adata, **({"categorical_covariate_keys": covariates} if covariates else {}))
        model = SAMSVAE(adata, seed=seed)
        model.train(max_steps=steps, enable_model_summary=False, **({"lr": lr} if lr is not None else {}))
    else:
        model = ab._model("samsvae", adata, dataset, seed)
        ab.train_model(model, "samsvae", dataset, steps)
    ev = compute_ate_evaluation(screen, model, estimator="posterior", n_draws=100, ceiling=False,
                                iwelbo_samples=5, seed=seed)  # fmt: skip
    split_values = ev_mod._split_values(screen, model, None)
    labels = list(ev.model_ate.ate.columns)
    splits = ev_mod.label_splits(screen.labels, split_values, screen.control_labels).reindex(labels)

    def ate_of(cells=None, standard_error=False):
        return data_ate(screen, cells=cells, standard_error=standard_error)

    out = {"model": ev.model_ate.ate}
    for s in ("val", "test"):
        chosen = [c for c in labels if bool(splits.loc[c, s])]
        target = ev_mod._split_target(screen, split_values, s, chosen, ate_of)
        out[f"{s}_se"] = target.attrs["standard_error"]
        out[s] = pd.DataFrame(target)
        out[s].attrs = {}
    baselines, train_ate, _ = ev_mod._training_baselines(screen, split_values, labels, ate_of)
    out["average"] = baselines["average"]
    out["average_se"] = ev_mod._training_standard_errors(train_ate, labels, screen)
    out["truth"] = None
    if dataset == "sim":
        from cellpert.data.simulate import sams_true_ate

        out["truth"] = sams_true_ate(screen.adata, labels, n_cells=20000, seed=seed)
        out["truth"].index = screen.gene_names
    out["training"] = model.training_summary_
    path.write_bytes(pickle.dumps(out))


# ----------------------------------------------------------------------------- rules
def _eb(m: np.ndarray, a: np.ndarray, se: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-entry weight τ² / (τ² + se²), τ² chosen on the validation target ``t``."""

    def blend(tau2: float) -> np.ndarray:
        w = np.where(se > 0, tau2 / (tau2 + np.where(se > 0, se, 1.0) ** 2), 1.0)
        return w * a + (1 - w) * m

    ok = np.isfinite(t)
    grid = np.r_[0.0, np.geomspace(1e-6, 10.0, 60)]
    errors = [float(((blend(tau2) - t)[ok] ** 2).sum()) for tau2 in grid]
    return blend(float(grid[int(np.argmin(errors))]))


def _normal_pdf(x: np.ndarray, var: np.ndarray) -> np.ndarray:
    return stats.norm.pdf(x, scale=np.sqrt(var))


def _ash(m: np.ndarray, a: np.ndarray, se: np.ndarray, t: np.ndarray, t_se: np.ndarray) -> np.ndarray:
    """Mixture-of-Normals prior for truth − model from the validation residuals, then the
    posterior mean of each entry given its training-cell average."""
    r, s = (t - m).ravel(), t_se.ravel()
    ok = np.isfinite(r) & np.isfinite(s) & (s > 0)
    r, s = r[ok], s[ok]
    top = np.sqrt(max(float((r**2).max() - (s**2).min()), 1e-12)) * 2
    sd = np.r_[0.0, np.geomspace(max(float(s.min()) / 10, 1e-6), top, 20)]
    like = _normal_pdf(r[:, None], sd[None, :] ** 2 + s[:, None] ** 2)
    pi = np.full(sd.size, 1.0 / sd.size)
    for _ in range(200):  # EM on the mixture weights
        post = like * pi
        post /= post.sum(1, keepdims=True) + 1e-300
        pi = post.mean(0) + 1e-10
        pi /= pi.sum()
    resid, s_a = (a - m).ravel(), se.ravel()
    shrunk = np.zeros_like(resid)
    ok = np.isfinite(resid) & (s_a > 0)
    var = sd[None, :] ** 2
    w = _normal_pdf(resid[ok, None], var + s_a[ok, None] ** 2) * pi
    w /= w.sum(1, keepdims=True) + 1e-300
    shrunk[ok] = (w * resid[ok, None] * var / (var + s_a[ok, None] ** 2)).sum(1)
    return m + shrunk.reshape(m.shape)


def _james_stein(m: np.ndarray, a: np.ndarray, se: np.ndarray) -> np.ndarray:
    z2 = np.where(se > 0, ((a - m) / np.where(se > 0, se, 1.0)) ** 2, np.nan)
    q, g = np.nansum(z2, axis=0), np.isfinite(z2).sum(0)
    w = np.clip(1 - (g - 2) / np.where(q > 0, q, np.inf), 0.0, 1.0)
    return m + w * (a - m)


def test_ceiling(dataset: str, seed: int, labels: list[str]) -> dict[str, float]:
    """Noise ceiling of the test cells' data ATE (split halves), as ``compute_ate_evaluation`` prints it."""
    sys.path.insert(0, str(HERE))
    import ate_benchmark as ab

    from cellpert.evaluate import _evaluate as ev_mod
    from cellpert.evaluate import noise_ceiling

    screen = ab._screen(dataset, seed)
    split_values = ev_mod._split_values(screen, None, None)
    cells, _ = ev_mod._target_cells(screen, split_values, "test", labels)
    return noise_ceiling(screen.counts, screen.labels, control=screen.control_labels, cells=cells,
                         evaluated=labels, top_n=20, seed=seed)  # fmt: skip


def score(path: Path) -> list[dict]:
    from cellpert.evaluate import ModelATE, ate_metrics, combine_with_average

    d = pickle.loads(path.read_bytes())
    dataset, seed = path.stem.rsplit("_", 1)
    test = d["test"]
    labels = [c for c in test.columns if c in d["average"].columns and c in d["val"].columns]
    genes = test.index

    def grab(key: str) -> np.ndarray:
        return d[key].reindex(index=genes)[labels].to_numpy(float)

    m, a, se, v, v_se = grab("model"), grab("average"), grab("average_se"), grab("val"), grab("val_se")
    frame_of = lambda x: pd.DataFrame(x, index=genes, columns=labels)  # noqa: E731
    # the default, by cellpert's own code: one least-squares weight on the validation cells
    combined = combine_with_average(ModelATE(ate=frame_of(m), lo=frame_of(m), hi=frame_of(m)), frame_of(a), frame_of(v))
    w = combined.config["combined"]["weight"]
    ceiling = test_ceiling(dataset, int(seed), labels)
    preds = {
        "posterior": m, "combined": combined.ate.to_numpy(), "eb": _eb(m, a, se, v), "ash": _ash(m, a, se, v, v_se),
        "js": _james_stein(m, a, se), "half": 0.5 * (a + m), "average": a,
    }  # fmt: skip
    rows = []
    for rule, p in preds.items():
        frame = frame_of(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, s = ate_metrics(test[labels], frame, top_n=20)
        row = {"dataset": dataset, "seed": int(seed), "rule": rule, "r": s["pearson"], "top20_r": s["pearson_top"],
               "r2": s["r2"], "w": w, "ceiling_r": ceiling["pearson"], "ceiling_top20_r": ceiling["pearson_top"]}  # fmt: skip
        if d["truth"] is not None:
            _, t = ate_metrics(d["truth"].reindex(index=genes)[labels], frame, top_n=20)
            row.update(truth_r=t["pearson"], truth_r2=t["r2"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sim", "norman", "mcfaline"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8000, help="cap on the training steps (early stopping)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cellpert_rules"))
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (one thread each)")
    parser.add_argument("--defaults", action="store_true",
                        help="train with cellpert's own defaults (as `cellpert train`), not the benchmark's settings")  # fmt: skip
    parser.add_argument("--lr", type=float, default=None, help="with --defaults: this learning rate instead")
    parser.add_argument("--quick", action="store_true", help="sim, one seed, 100 steps: a smoke run")
    parser.add_argument("--single", nargs=2, default=None, help=argparse.SUPPRESS)  # child: dataset seed
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.seeds, args.steps = ["sim"], [0], 100
        args.work = args.work.with_name(args.work.name + "_quick")
    warnings.filterwarnings("ignore")
    if args.single is not None:
        dataset, seed = args.single[0], int(args.single[1])
        dump(dataset, seed, args.work / f"{dataset}_{seed}.pkl", args.steps, defaults=args.defaults, lr=args.lr)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    todo = [(d, s) for d in args.datasets for s in args.seeds if not (args.work / f"{d}_{s}.pkl").is_file()]
    running: list[subprocess.Popen] = []
    for dataset, seed in todo:
        while len(running) >= args.jobs:
            running.pop(0).wait()
        cmd = [sys.executable, __file__, "--single", dataset, str(seed), "--work", str(args.work), "--steps", str(args.steps),
               *(["--defaults"] if args.defaults else []), *(["--lr", str(args.lr)] if args.lr is not None else [])]  # fmt: skip
        running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    for p in running:
        p.wait()
    rows = [r for d in args.datasets for s in args.seeds for r in score(args.work / f"{d}_{s}.pkl")]
    frame = pd.DataFrame(rows)
    metrics = [c for c in ("r", "top20_r", "r2", "truth_r", "truth_r2") if c in frame.columns]
    for dataset, sub in frame[frame.rule == "average"].groupby("dataset", sort=False):
        print(f"{dataset}: noise ceiling of the test cells (what a perfect predictor reaches): r "
              f"{sub.ceiling_r.mean():.3f} ± {sub.ceiling_r.std():.3f}, top-20 r "
              f"{sub.ceiling_top20_r.mean():.3f} ± {sub.ceiling_top20_r.std():.3f}")  # fmt: skip
    print("| data | rule | " + " | ".join(metrics) + " | n |")
    print("|---|---|" + "---|" * (len(metrics) + 1))
    for (dataset, rule), sub in frame.groupby(["dataset", "rule"], sort=False):
        cells = [f"{sub[c].mean():.4f} ± {sub[c].std():.4f}" if sub[c].notna().any() else "" for c in metrics]
        print(f"| {dataset} | {rule} | " + " | ".join(cells) + f" | {len(sub)} |")
    print("\npaired difference from the training-cell average, mean ± standard error over splits:")
    for dataset, sub in frame.groupby("dataset", sort=False):
        for metric in ("r", "top20_r"):
            wide = sub.pivot(index="seed", columns="rule", values=metric)
            diff = wide.drop(columns="average").sub(wide["average"], axis=0)
            text = ", ".join(f"{k} {diff[k].mean():+.4f} ± {diff[k].std() / np.sqrt(len(diff)):.4f}" for k in RULES if k in diff)
            print(f"  {dataset} {metric}: {text}")


if __name__ == "__main__":
    main()
