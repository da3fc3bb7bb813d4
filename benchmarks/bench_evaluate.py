"""Time and memory of the ATE evaluation at Norman / Replogle scale (prints numbers).

A screen of ``--n-perturbations`` single perturbations x ``--n-genes`` genes is simulated
here (negative binomial counts around random gene means, kept sparse); an *untrained*
SAMS-VAE at the paper's Norman settings (K = 200, H = 400, correlated guide 4 x 400) is
built on it — the cost of the model ATE does not depend on the weights. Measured:

- model ATE (:func:`cellpert.evaluate.model_ate`) for every perturbation, ``--particles``
  particles in 50 groups, ℓ = 1e4, perturbseq space: wall time and the peak RSS increase
  of the process during the call, and its CPU time (less sensitive to other jobs on shared
  cores);
- data ATE (:func:`cellpert.evaluate.data_ate`) streamed over ``--cells`` cells;
- with ``--estimator posterior``, instead of the model ATE: the posterior ATE
  (:func:`cellpert.evaluate.posterior_ate`, the default estimator's model part) of every
  perturbation from its training cells against the training control cells,
  ``--posterior-draws`` draws per cell (default 100, as ``evaluate-ate``).

Usage::

    python benchmarks/bench_evaluate.py                       # 130 perturbations x 5,000 genes, 2,500 particles
    python benchmarks/bench_evaluate.py --n-perturbations 700 --particles 250   # extrapolates to 2,500
    python benchmarks/bench_evaluate.py --estimator posterior --n-genes 2000 --cells 10000
"""

from __future__ import annotations

import argparse
import logging
import resource
import threading
import time
import warnings

import numpy as np


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 1024**3


class _PeakRSS:
    """Samples the resident set size every 50 ms in a thread (peak during a block)."""

    def __enter__(self):
        self.start = _rss_gb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_gb())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gb())


def _screen(n_pert: int, n_genes: int, n_cells: int, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n_cells) % (n_pert + 1) == 0, "control", "")
    names = [f"P{i:04d}" for i in range(n_pert)]
    idx = np.arange(n_cells) % (n_pert + 1)
    labels = np.where(idx == 0, "control", np.array(["control", *names], dtype=object)[idx])
    gene_mean = rng.lognormal(-1.5, 1.5, size=n_genes)
    rows = []
    for start in range(0, n_cells, 5000):  # sparse NB counts, chunk by chunk
        n = min(5000, n_cells - start)
        lam = rng.gamma(2.0, gene_mean / 2.0, size=(n, n_genes)).astype(np.float32)
        rows.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(rows, format="csr")
    split = np.array(["train", "val", "test"], dtype=object)[rng.integers(0, 3, n_cells)]
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels), "cellpert_split": split},
                       index=[f"c{i}" for i in range(n_cells)])  # fmt: skip
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-perturbations", type=int, default=130)
    parser.add_argument("--n-genes", type=int, default=5000)
    parser.add_argument("--cells", type=int, default=20000, help="Cells of the simulated screen (data ATE).")
    parser.add_argument("--particles", type=int, default=2500)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--estimator", choices=["prior", "posterior"], default="prior")
    parser.add_argument("--posterior-draws", type=int, default=100)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from cellpert.data import load_screen
    from cellpert.evaluate import data_ate, model_ate, posterior_ate
    from cellpert.models import SAMSVAE, prepare_anndata

    t0 = time.perf_counter()
    adata = _screen(args.n_perturbations, args.n_genes, max(args.cells, 2 * (args.n_perturbations + 1)))
    screen = load_screen(adata, perturbation_key="perturbation", warn=False)
    prepared = prepare_anndata(screen, split_key="cellpert_split")
    SAMSVAE.setup_anndata(prepared, split_key="cellpert_split")
    model = SAMSVAE(prepared, n_latent=200, n_hidden=400, guide="correlated", guide_n_hidden=400, guide_n_layers=4)
    model.module.eval()
    print(
        f"setup: {screen.n_cells:,} cells x {screen.n_genes:,} genes, {screen.n_perturbations} perturbations, "
        f"untrained SAMS-VAE (K=200, H=400, correlated 4x400), {args.threads} torch threads "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        ate = data_ate(screen)
        t_data = time.perf_counter() - t0
    print(
        f"data ATE: {ate.shape[1]} labels x {ate.shape[0]} genes from {screen.n_cells:,} cells: {t_data:.2f} s, "
        f"peak RSS +{mem.peak - mem.start:.2f} GB",
        flush=True,
    )

    labels = list(ate.columns)
    if args.estimator == "posterior":
        train = np.asarray(prepared.obs["cellpert_split"]) == "train"
        cell_labels = np.asarray(prepared.obs["perturbation"]).astype(str)
        own = {lab: np.flatnonzero(train & (cell_labels == lab)) for lab in labels}
        controls = np.flatnonzero(train & (cell_labels == "control"))
        with _PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            posterior_ate(model, labels, cells=controls, label_cells=own, n_draws=args.posterior_draws, seed=0)
            t_model, cpu_model = time.perf_counter() - t0, time.process_time() - c0
        decoded = sum(len(v) for v in own.values()) + len(controls)
        print(
            f"posterior ATE: {len(labels)} perturbations x {args.n_genes:,} genes, {decoded:,} training cells "
            f"x {args.posterior_draws} draws: {t_model:.1f} s wall, {cpu_model:.1f} s CPU, "
            f"peak RSS {mem.peak:.2f} GB (+{mem.peak - mem.start:.2f} GB during the call)",
            flush=True,
        )
        return 0
    with _PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        pred = model_ate(model, labels, n_particles=args.particles, n_groups=args.groups, seed=0)
        t_model, cpu_model = time.perf_counter() - t0, time.process_time() - c0
    cells = args.particles * (len(labels) + 1)
    print(
        f"model ATE: {args.particles:,} particles x {len(labels)} perturbations x {args.n_genes:,} genes "
        f"({args.groups} groups): {t_model:.1f} s wall, {cpu_model:.1f} s CPU "
        f"({cells * args.n_genes / t_model / 1e6:.0f} M NB draws/s wall), "
        f"peak RSS {mem.peak:.2f} GB (+{mem.peak - mem.start:.2f} GB during the call), "
        f"max interval half-width {float(((pred.hi - pred.lo) / 2).to_numpy().max()):.3g}",
        flush=True,
    )
    if args.particles != 2500:
        scale = 2500 / args.particles
        print(
            f"  -> at 2,500 particles (linear in particles): about {t_model * scale:.0f} s wall, "
            f"{cpu_model * scale:.0f} s CPU"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
