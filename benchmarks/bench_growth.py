"""How training time and memory grow with cells, genes and perturbations (prints a table, draws a figure).

Every row is a fresh ``cellpert`` process run under GNU time on a SAMS simulator screen
written in row blocks (``cellpert simulate sams --in-blocks``, CSR counts, K 8, library
size 2,000): ``cellpert --threads T train FILE --model M --max-steps S --no-early-stopping
--batch-size 512 --lr 3e-3 [--backed]``, optionally followed by ``evaluate-ate``
(``--n-draws 20 --iwelbo-samples 10``). Reported per row: training steps/s and cells/s
(from the run directory's ``training.json``), the wall time and peak RSS of each
command. ``--loader-only`` rows time the training loader alone (no model step): cells/s
of scvi-tools' random loader in memory and from the file, and of cellpert's
block-shuffled loader from the file, so it is clear whether reading or the step limits.

Grids (``--grid``):

- ``cells``: 10k and 100k cells x 2,000 genes, 30 perturbations, every model in
  ``--models``, in memory and backed (``--sizes`` changes the cell counts; a screen
  already in ``--dir`` is reused);
- ``genes``: 10k cells, 500 / 2,000 / 5,000 genes, 30 perturbations, SAMS-VAE in memory;
- ``perts``: 10k cells, 2,000 genes, 10 / 30 / 100 perturbations, SAMS-VAE in memory;
- ``file``: every model in ``--models`` on an existing screen ``--file`` (e.g. the 1M
  screen of ``benchmarks/scale_1m.sh``), backed.

Usage::

    python benchmarks/bench_growth.py --grid cells genes perts --steps 100 --json /tmp/growth.json
    python benchmarks/bench_growth.py --grid file --file /tmp/cellpert_1m/screen.h5ad --json /tmp/g1m.json
    python benchmarks/bench_growth.py --figure /tmp/growth.json,/tmp/g1m.json --out benchmarks/figures/scale_growth.png
    python benchmarks/bench_growth.py --table /tmp/growth.json,/tmp/g1m.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "cellpert")]
MODELS = ("samsvae", "svae-plus", "comparative")


def _timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under GNU time; its wall time (s) and peak RSS (GB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd], capture_output=True,
                              text=True, cwd=REPO)  # fmt: skip
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        _, rss_kib = out.read().split()[-2:]
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(int(rss_kib) / 1024**2, 3)}


def _screen(directory: Path, cells: int, genes: int, perts: int) -> Path:
    path = directory / f"sams_{cells}x{genes}_{perts}p.h5ad"
    if not path.exists():
        per = max(cells // (perts + 1), 10)
        split = [
            str(int(per * 0.8)),
            str(int(per * 0.1)),
            str(per - int(per * 0.8) - int(per * 0.1)),
        ]
        _timed([*CLI, "simulate", "sams", "-o", str(path), "--seed", "0", "--n-perturbations", str(perts),
                "--n-latent", "8", "--n-genes", str(genes), "--n-cells-per-perturbation", *split,
                "--n-control-cells", *split, "--in-blocks"])  # fmt: skip
    return path


def _train_row(
    path: Path, model: str, *, backed: bool, steps: int, threads: int, evaluate: bool
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [*CLI, "--threads", str(threads), "train", str(path), "--model", model, "--out", str(run),
               "--max-steps", str(steps), "--no-early-stopping", "--batch-size", "512", "--lr", "3e-3",
               "--quiet"]  # fmt: skip
        if model != "comparative":  # the comparative model has its own latent sizes (defaults)
            cmd += ["--n-latent", "8"]
        if backed:
            cmd.append("--backed")
        train = _timed(cmd)
        info = json.loads((run / "training.json").read_text())
        row = {
            "train_wall_s": train["wall_s"],
            "train_peak_rss_gb": train["peak_rss_gb"],
            "steps": info["steps"],
            "steps_per_s": info["steps_per_s"],
            "cells_per_s": round(info["steps_per_s"] * 512, 1),
        }
        if evaluate:
            # evaluate into a copy so the benchmark screen is not rewritten
            copy = Path(tmp) / "screen.h5ad"
            subprocess.run(["cp", str(path), str(copy)], check=True)
            ev = _timed([*CLI, "--threads", str(threads), "evaluate-ate", str(copy), "--model", str(run),
                         "--n-draws", "20", "--iwelbo-samples", "10", "--no-ceiling"])  # fmt: skip
            row.update(eval_wall_s=ev["wall_s"], eval_peak_rss_gb=ev["peak_rss_gb"])
    return row


def _loader_row(path: Path, *, backed: bool, loader: str, batches: int, threads: int) -> dict:
    code = f"""
import json, time, warnings, logging, resource
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
from cellpert.data import load_screen, read_split
from cellpert.models import SAMSVAE, prepare_anndata
screen = load_screen({str(path)!r}, warn=False, backed={backed})
read_split(screen, "cellpert_split")
adata = prepare_anndata(screen)
SAMSVAE.setup_anndata(adata)
model = SAMSVAE(adata, n_latent=8)
train_idx = model.split_indices("train")
if {loader!r} == "block":
    dm = model._datamodule(train_idx, model.split_indices("val"), 512, loader="block", block_size=64,
                           fetch_factor=16, seed=0)
    make = dm.train_dataloader
else:  # scvi-tools' loader, as training uses it
    from scvi.dataloaders import AnnDataLoader
    make = lambda: AnnDataLoader(model.adata_manager, indices=train_idx, batch_size=512, shuffle=True)
n = 0
start = time.perf_counter()
while n < {batches}:
    for batch in make():
        n += 1
        if n >= {batches}:
            break
wall = time.perf_counter() - start
print(json.dumps({{"loader_cells_per_s": round({batches} * 512 / wall, 1),
                  "loader_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _emit(rows: list[dict], row: dict, json_path: Path | None) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=1))


def figure(rows: list[dict], out: Path) -> None:
    """Seconds per training step and peak RSS against cells, genes and perturbations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    panels = [("cells", "cells"), ("genes", "genes"), ("perts", "perturbations")]
    for col, (grid, xlabel) in enumerate(panels):
        sub = [
            r
            for r in rows
            if r.get("grid") in ((grid, "file") if grid == "cells" else (grid,))
            and "steps_per_s" in r
        ]
        series: dict[str, list[dict]] = {}
        for r in sub:
            series.setdefault(f"{r['model']} ({'backed' if r['backed'] else 'memory'})", []).append(
                r
            )
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r[grid if grid != "perts" else "perts"])
            x = [r[grid if grid != "perts" else "perts"] for r in rs]
            axes[0, col].plot(x, [1 / r["steps_per_s"] for r in rs], "o-", label=name)
            axes[1, col].plot(x, [r["train_peak_rss_gb"] for r in rs], "o-", label=name)
        for row in (0, 1):
            axes[row, col].set_xscale("log")
            axes[row, col].set_xlabel(xlabel)
        axes[0, col].set_ylabel("s per step (batch 512)")
        axes[1, col].set_ylabel("peak RSS of train (GB)")
        axes[0, col].legend(fontsize=7)
    fig.suptitle("cellpert training cost, SAMS simulator screens (2-core CPU)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def table(rows: list[dict]) -> str:
    """The rows as two markdown tables: training (and evaluation) rows, and loader rows."""
    train = [r for r in rows if "steps_per_s" in r]
    load = [r for r in rows if "loader_cells_per_s" in r]
    out = [
        "| grid | model | cells | genes | perts | where | steps/s | cells/s | train wall (s) | train peak RSS (GB) "
        "| evaluate-ate wall (s) | evaluate-ate peak RSS (GB) |",
        "|" + "---|" * 12,
    ]
    for r in train:
        out.append(
            f"| {r['grid']} | {r['model']} | {r['cells']:,} | {r['genes']:,} | {r.get('perts', '')} | "
            f"{'backed' if r['backed'] else 'memory'} | {r['steps_per_s']:.2f} | {r['cells_per_s']:,.0f} | "
            f"{r['train_wall_s']:.0f} | {r['train_peak_rss_gb']:.2f} | {r.get('eval_wall_s', '')} | "
            f"{r.get('eval_peak_rss_gb', '')} |"
        )
    out += [
        "",
        "| cells | genes | loader | cells/s (loader alone) | peak RSS (GB) |",
        "|---|---|---|---|---|",
    ]
    for r in load:
        where = f"{'backed' if r['backed'] else 'memory'} / {r['loader']}"
        out.append(
            f"| {r['cells']:,} | {r['genes']:,} | {where} | {r['loader_cells_per_s']:,.0f} | "
            f"{r['loader_peak_rss_gb']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", nargs="+", default=["cells", "genes", "perts"],
                        choices=["cells", "genes", "perts", "file"])  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cellpert_growth")
    parser.add_argument("--file", type=Path, default=None, help="screen for --grid file")
    parser.add_argument("--no-evaluate", action="store_true", help="train only")
    parser.add_argument("--loader-batches", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as they come")
    parser.add_argument(
        "--figure", type=Path, default=None, help="draw the figure of this JSON and exit"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "figures" / "scale_growth.png"
    )
    parser.add_argument(
        "--table", type=Path, default=None, help="print the markdown tables of this JSON and exit"
    )
    args = parser.parse_args()
    if args.table is not None:
        rows = []
        for part in str(args.table).split(","):
            rows += json.loads(Path(part).read_text())
        print(table(rows))
        return
    if args.figure is not None:
        rows = []
        for part in str(args.figure).split(","):
            rows += json.loads(Path(part).read_text())
        figure(rows, args.out)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    evaluate = not args.no_evaluate

    def train(path: Path, grid: str, model: str, backed: bool, **meta) -> None:
        row = _train_row(path, model, backed=backed, steps=args.steps, threads=args.threads,
                         evaluate=evaluate and grid in ("cells", "file"))  # fmt: skip
        _emit(rows, {"grid": grid, "model": model, "backed": backed, **meta, **row}, args.json)

    def loaders(path: Path, grid: str, **meta) -> None:
        for backed, loader in ((False, "random"), (True, "random"), (True, "block")):
            row = _loader_row(
                path,
                backed=backed,
                loader=loader,
                batches=args.loader_batches,
                threads=args.threads,
            )
            _emit(
                rows, {"grid": grid, "loader": loader, "backed": backed, **meta, **row}, args.json
            )

    if "cells" in args.grid:
        for cells in args.sizes:
            path = _screen(args.dir, cells, 2000, 30)
            loaders(path, "cells", cells=cells, genes=2000, perts=30)
            for model in args.models:
                for backed in (False, True):
                    train(path, "cells", model, backed, cells=cells, genes=2000, perts=30)
    if "genes" in args.grid:
        for genes in (500, 2000, 5000):
            train(
                _screen(args.dir, 10_000, genes, 30),
                "genes",
                "samsvae",
                False,
                cells=10_000,
                genes=genes,
                perts=30,
            )
    if "perts" in args.grid:
        for perts in (10, 30, 100):
            train(_screen(args.dir, 10_000, 2000, perts), "perts", "samsvae", False, cells=10_000, genes=2000,
                  perts=perts)  # fmt: skip
    if "file" in args.grid:
        import anndata as ad

        meta = ad.read_h5ad(args.file, backed="r")
        cells, genes = meta.shape
        meta.file.close()
        loaders(args.file, "file", cells=cells, genes=genes)
        for model in args.models:
            train(args.file, "file", model, True, cells=cells, genes=genes)


if __name__ == "__main__":
    main()
