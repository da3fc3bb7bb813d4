"""Training from a file on disk (backed) vs in memory, block-shuffled vs fully shuffled (prints a table).

A SAMS simulator screen (``--cells`` cells in total, ``--genes`` genes, 30 perturbations)
is written once as a CSR h5ad. SAMS-VAE (K 8, batch 256, lr 3e-3, ``--steps`` steps,
no early stopping, same seed) is then trained in a fresh process per configuration:

- ``memory/random``: the screen in memory, scvi-tools' fully shuffled loader (the default);
- ``memory/block``: in memory, cellpert's block-shuffled loader (the quality cost of
  block shuffling alone, same data order otherwise);
- ``backed/block``: counts read from the file (``load_screen(..., backed=True)``), the
  block-shuffled loader (the default for a backed screen);
- ``backed/random``: from the file with scvi-tools' loader (random row reads).

Each row: training steps/s, peak RSS of the process, held-out test IWELBO (20 samples)
and ATE r / top-20 r against the test cells' data ATE (counterfactual estimator, 20
draws). Usage::

    python benchmarks/bench_scale.py --cells 20000 --genes 2000 --steps 400
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CONFIGS = ("memory/random", "memory/block", "backed/block", "backed/random")


def _write_screen(path: Path, cells: int, genes: int, seed: int) -> None:
    import scipy.sparse as sp

    from cellpert.data import write_h5ad_atomic
    from cellpert.data.simulate import simulate_sams

    n_labels = 30 + 1
    per = max(cells // n_labels, 10)
    split = (int(per * 0.8), int(per * 0.1), per - int(per * 0.8) - int(per * 0.1))
    adata = simulate_sams(
        seed=seed, n_perturbations=30, n_latent=8, n_genes=genes, n_cells_per_perturbation=split,
        n_control_cells=split,
    )  # fmt: skip
    adata.X = sp.csr_matrix(adata.X)
    write_h5ad_atomic(adata, path)


def _single(path: Path, config: str, steps: int, seed: int, block_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "scvi", "cellpert"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from cellpert.data import load_screen, read_split
    from cellpert.evaluate import compute_ate_evaluation
    from cellpert.models import SAMSVAE, prepare_anndata

    where, loader = config.split("/")
    screen = load_screen(path, warn=False, backed=where == "backed")
    read_split(screen, "cellpert_split")
    adata = prepare_anndata(screen)
    SAMSVAE.setup_anndata(adata)
    model = SAMSVAE(adata, n_latent=8, seed=seed)
    start = time.perf_counter()
    model.train(max_steps=steps, batch_size=256, lr=3e-3, early_stopping=False, loader=loader,
                block_size=block_size, seed=seed)  # fmt: skip
    wall = time.perf_counter() - start
    ev = compute_ate_evaluation(screen, model, n_draws=20, iwelbo_samples=20, ceiling=False, seed=seed)
    s = ev.summary["test"]
    return {
        "config": config,
        "cells": screen.n_cells,
        "genes": screen.n_genes,
        "steps": model.training_summary_["steps"],
        "train_s": round(wall, 2),
        "steps_per_s": round(model.training_summary_["steps"] / wall, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "test_iwelbo": round(float(ev.iwelbo), 3),
        "ate_r": round(float(s["model_pearson"]), 4),
        "ate_top_r": round(float(s["model_pearson_top"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--single", nargs=2, default=None, help=argparse.SUPPRESS)  # child: path config
    args = parser.parse_args()
    if args.single:
        print(json.dumps(_single(Path(args.single[0]), args.single[1], args.steps, args.seed, args.block_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "screen.h5ad"
        _write_screen(path, args.cells, args.genes, args.seed)
        print(f"# screen: {path.stat().st_size / 2**20:.0f} MiB on disk", flush=True)
        rows = []
        for config in args.configs:
            cmd = [sys.executable, __file__, "--single", str(path), config, "--steps", str(args.steps),
                   "--seed", str(args.seed), "--block-size", str(args.block_size)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"# {config} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("# " + json.dumps(rows[-1]), flush=True)
    keys = ["config", "cells", "genes", "steps", "steps_per_s", "peak_rss_gb", "test_iwelbo", "ate_r", "ate_top_r"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
