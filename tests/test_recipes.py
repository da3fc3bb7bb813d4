"""Data recipes on tiny stand-ins of the public files, and the downloader on a local HTTP server.

Nothing here touches the internet: the raw files are generated in ``tmp_path`` in the
layout of the real ones, and downloads go to a Range-capable ``http.server`` started by the
test on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # data_recipes is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from cellpert.data import UNS_KEY, load_screen  # noqa: E402
from data_recipes import kang2018, norman2019, replogle2022  # noqa: E402
from data_recipes._common import (  # noqa: E402
    RecipeError,
    download,
    read_sidecar,
    seurat_v3_select,
    sidecar_path,
)
from data_recipes.kang2018 import preprocess_kang2018  # noqa: E402
from data_recipes.norman2019 import guide_identity_to_label, preprocess_norman2019  # noqa: E402
from data_recipes.replogle2022 import preprocess_replogle2022, read_svae_lists  # noqa: E402


# ------------------------------------------------------------------------------- helpers
class _RangeHandler(BaseHTTPRequestHandler):
    """Serves files of ``server.root``; supports ``Range`` and ``If-Range`` (strong ETag)."""

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        state = self.server
        name = self.path.lstrip("/")
        state.requests.append((name, self.headers.get("Range"), self.headers.get("If-Range")))
        path = state.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and not state.ignore_range and if_range in (None, etag):
            start = int(wanted.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        limit = state.fail_after.pop(name, None)
        self.wfile.write(body if limit is None else body[:limit])  # then the connection closes


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.root = root
        self.requests: list[tuple[str, str | None, str | None]] = []
        self.fail_after: dict[
            str, int
        ] = {}  # file name -> bytes sent before the next response breaks
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = _Server(root)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a recipe given --input tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _same_h5ad(a: Path, b: Path) -> None:
    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    assert x.X.format == y.X.format == "csr" and x.X.dtype == y.X.dtype == np.float32
    assert x.shape == y.shape and (x.X != y.X).nnz == 0
    assert np.array_equal(x.X.indptr, y.X.indptr) and np.array_equal(x.X.indices, y.X.indices)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    pd.testing.assert_frame_equal(x.var, y.var)
    assert (
        x.uns[UNS_KEY]["screen"]["perturbation_key"] == y.uns[UNS_KEY]["screen"]["perturbation_key"]
    )


def _gz_write(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def _write_mtx_gz(path: Path, genes_by_cells: np.ndarray) -> None:
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(genes_by_cells), field="integer")
    with gzip.open(path, "wb") as fh:
        fh.write(buf.getvalue())


def _counts(n_genes: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """Cells x genes counts with varied gene means (so loess has something to fit)."""
    rng = np.random.default_rng(seed)
    means = np.exp(rng.uniform(-2, 3, size=n_genes))
    return rng.negative_binomial(2, 2 / (2 + means), size=(n_cells, n_genes)).astype(np.int64)


# ----------------------------------------------------------------------------- Norman 2019
# (barcode, guide_identity, number_of_cells, good_coverage, expected label or None if dropped)
NORMAN_CELLS = [
    ("AAAC-1", "CBL_UBASH3A__CBL_UBASH3A", 1, True, "CBL+UBASH3A"),
    ("AAAG-1", "UBASH3A_CBL__UBASH3A_CBL", 1, True, "CBL+UBASH3A"),
    ("AACA-1", "CEBPE_NegCtrl0__CEBPE_NegCtrl0", 1, True, "CEBPE"),
    ("AACC-1", "NegCtrl0_CEBPE__NegCtrl0_CEBPE", 1, True, "CEBPE"),
    ("AACG-2", "NegCtrl10_NegCtrl0__NegCtrl10_NegCtrl0", 1, True, "control"),
    ("AACT-2", "NegCtrl1_NegCtrl0__NegCtrl1_NegCtrl0", 1, True, "control"),
    ("AAGA-2", "KLF1_NegCtrl0__KLF1_NegCtrl0", 1, True, "KLF1"),
    ("AAGC-2", "CBL_NegCtrl0__CBL_NegCtrl0", 2, True, None),  # two identities
    ("AAGG-2", "KLF1_NegCtrl0__KLF1_NegCtrl0", 1, False, None),  # bad coverage
    ("AAGT-2", "CEBPE_KLF1__CEBPE_KLF1", 3, False, None),
    ("AATA-1", "CEBPE_NegCtrl0__CEBPE_NegCtrl0", 1, True, None),  # listed twice (below): ambiguous
]
#: identity rows repeated with another guide
DUPLICATED = {"AATA-1": "KLF1_NegCtrl0__KLF1_NegCtrl0"}
#: a barcode in the matrix that has no identity row (dropped)
EXTRA_BARCODE = "ATAT-1"


def make_fake_geo(
    raw: Path, *, n_genes: int = 40, reps: int = 4
) -> tuple[np.ndarray, list[str], list[str], list]:
    """Write the four GSE133344 raw files; return cells x genes counts, barcodes, symbols, identity rows."""
    raw.mkdir(parents=True, exist_ok=True)
    rows = [
        (f"{bc[:-2]}{r}{bc[-2:]}", g, n, cov, lab)
        for r in range(reps)
        for bc, g, n, cov, lab in NORMAN_CELLS
    ]
    barcodes = [r[0] for r in rows] + [EXTRA_BARCODE]
    symbols = (
        ["CBL", "UBASH3A", "CEBPE", "KLF1"] + [f"G{j}" for j in range(n_genes - 5)] + ["G0"]
    )  # a duplicate
    counts = _counts(n_genes, len(barcodes))
    _write_mtx_gz(
        raw / "GSE133344_raw_matrix.mtx.gz", counts.T
    )  # genes x cells on disk, as 10x writes it
    _gz_write(
        raw / "GSE133344_raw_genes.tsv.gz",
        "".join(f"ENSG{j:05d}\t{s}\n" for j, s in enumerate(symbols)),
    )
    _gz_write(raw / "GSE133344_raw_barcodes.tsv.gz", "".join(f"{b}\n" for b in barcodes))
    ident = pd.DataFrame(
        {
            "cell_barcode": [r[0] for r in rows],
            "guide_identity": [r[1] for r in rows],
            "read_count": 100,
            "UMI_count": 10,
            "coverage": 5.0,
            "gemgroup": [int(r[0][-1]) for r in rows],
            "good_coverage": [r[3] for r in rows],
            "number_of_cells": [r[2] for r in rows],
        }
    )
    dup = ident[
        ident["cell_barcode"].str.replace(r"\d-", "-", regex=True).isin(list(DUPLICATED))
    ].copy()
    dup["guide_identity"] = [DUPLICATED[b[:-3] + b[-2:]] for b in dup["cell_barcode"]]
    ident = pd.concat([ident, dup]).sample(frac=1.0, random_state=0)  # not in matrix order
    with gzip.open(raw / "GSE133344_raw_cell_identities.csv.gz", "wt") as fh:
        ident.to_csv(fh, index=False)
    return counts, barcodes, symbols, rows


@pytest.mark.parametrize(
    ("identity", "label"),
    [
        ("CBL_UBASH3A__CBL_UBASH3A", "CBL+UBASH3A"),
        ("CEBPE_NegCtrl0__CEBPE_NegCtrl0", "CEBPE"),
        ("NegCtrl0_CEBPE__NegCtrl0_CEBPE", "CEBPE"),
        ("NegCtrl10_NegCtrl0__NegCtrl10_NegCtrl0", "control"),
        ("ZBTB10_DLX2__ZBTB10_DLX2", "DLX2+ZBTB10"),
    ],
)
def test_guide_identity_to_label(identity, label):
    assert guide_identity_to_label(identity) == label


def test_preprocess_norman2019_all_genes_and_chunks(tmp_path):
    counts, barcodes, symbols, rows = make_fake_geo(tmp_path / "raw")
    out = tmp_path / "norman.h5ad"
    summary = preprocess_norman2019(
        tmp_path / "raw", out, n_top_genes=0, chunk_lines=37, write_rows=3
    )
    adata = ad.read_h5ad(out)

    kept = [r for r in rows if r[4] is not None]
    assert list(adata.obs_names) == [r[0] for r in kept]  # matrix order, filtered
    assert EXTRA_BARCODE not in adata.obs_names
    assert list(adata.obs["perturbation"]) == [r[4] for r in kept]
    assert list(adata.obs["guide_identity"]) == [r[1] for r in kept]
    assert list(adata.obs["gemgroup"]) == [int(r[0][-1]) for r in kept]
    assert adata.shape == (len(kept), len(symbols))
    assert adata.var_names.is_unique and list(adata.var["gene_symbol"]) == symbols

    X = adata.X
    assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float32
    assert X.indptr.dtype == np.int64  # written for appends beyond 2**31 entries
    rows_in_matrix = [barcodes.index(b) for b in adata.obs_names]
    expected = counts[rows_in_matrix]  # cells x genes
    assert np.array_equal(X.toarray(), expected)
    assert np.allclose(adata.obs["n_counts"], expected.sum(axis=1))

    screen = adata.uns[UNS_KEY]["screen"]
    assert screen["perturbation_key"] == "perturbation" and list(screen["control"]) == ["control"]
    loaded = load_screen(out, warn=False)
    assert loaded.control_labels == ["control"]
    assert loaded.single_labels == ["CEBPE", "KLF1"]
    assert loaded.combination_labels == ["CBL+UBASH3A"]
    assert int(loaded.is_control.sum()) == 2 * 4
    assert loaded.adata.uns[UNS_KEY]["recipe"]["name"] == "norman2019"

    assert (summary.n_cells, summary.n_genes) == adata.shape
    assert (summary.n_perturbations, summary.n_combinations, summary.n_control_cells) == (3, 1, 8)
    assert summary.file_bytes == out.stat().st_size
    # one chunk (and one written block) gives the same file
    preprocess_norman2019(
        tmp_path / "raw", tmp_path / "one.h5ad", n_top_genes=0, chunk_lines=10**6, write_rows=10**6
    )
    _same_h5ad(out, tmp_path / "one.h5ad")


def test_preprocess_norman2019_hvg_matches_scanpy(tmp_path):
    import scanpy as sc

    make_fake_geo(tmp_path / "raw", n_genes=60, reps=6)
    preprocess_norman2019(tmp_path / "raw", tmp_path / "full.h5ad", n_top_genes=0)
    full = ad.read_h5ad(tmp_path / "full.h5ad")
    ref = sc.pp.highly_variable_genes(full, flavor="seurat_v3", n_top_genes=10, inplace=False)
    hvg = set(full.var_names[ref["highly_variable"].to_numpy()])

    preprocess_norman2019(tmp_path / "raw", tmp_path / "n.h5ad", n_top_genes=10, chunk_lines=50)
    adata = ad.read_h5ad(tmp_path / "n.h5ad")
    targets = {"CBL", "UBASH3A", "CEBPE", "KLF1"}
    assert set(adata.var_names) == hvg | targets
    assert int(adata.var["highly_variable"].sum()) == 10
    assert set(adata.var_names[adata.var["is_target"].to_numpy()]) == targets
    # the counts of the kept genes are the original ones, and n_counts is the full library
    assert np.array_equal(adata.X.toarray(), full[:, adata.var_names].X.toarray())
    assert np.allclose(adata.obs["n_counts"], np.asarray(full.X.sum(axis=1)).ravel())

    preprocess_norman2019(
        tmp_path / "raw", tmp_path / "e.h5ad", n_top_genes=10, keep_target_genes=False
    )
    assert set(ad.read_h5ad(tmp_path / "e.h5ad").var_names) == hvg


def test_norman2019_truncated_matrix_is_refused(tmp_path):
    make_fake_geo(tmp_path / "raw")
    path = tmp_path / "raw" / "GSE133344_raw_matrix.mtx.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    _gz_write(path, "\n".join(lines[:-5]) + "\n")
    with pytest.raises(RecipeError, match="is the file complete"):
        preprocess_norman2019(tmp_path / "raw", tmp_path / "n.h5ad", n_top_genes=0)
    assert not (tmp_path / "n.h5ad").exists()


def test_norman2019_non_integer_counts_are_refused(tmp_path):
    make_fake_geo(tmp_path / "raw")
    path = tmp_path / "raw" / "GSE133344_raw_matrix.mtx.gz"
    with gzip.open(path, "rt") as fh:
        text = fh.read().replace(
            "%%MatrixMarket matrix coordinate integer", "%%MatrixMarket matrix coordinate real"
        )
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if not line.startswith("%")) + 1  # first entry
    g, c, _ = lines[i].split()
    lines[i] = f"{g} {c} 0.5"
    _gz_write(path, "\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match="non-integer"):
        preprocess_norman2019(tmp_path / "raw", tmp_path / "n.h5ad", n_top_genes=0)


def test_norman2019_missing_file_is_one_line(tmp_path):
    make_fake_geo(tmp_path / "raw")
    (tmp_path / "raw" / "GSE133344_raw_barcodes.tsv.gz").unlink()
    with pytest.raises(RecipeError, match="barcodes.tsv.gz is missing"):
        preprocess_norman2019(tmp_path / "raw", tmp_path / "n.h5ad")


def test_norman2019_cli_offline_writes_nothing(tmp_path, capsys):
    out = tmp_path / "n.h5ad"
    code = norman2019.main(
        [
            "--out",
            str(out),
            "--raw-dir",
            str(tmp_path / "c"),
            "--mirror",
            "http://127.0.0.1:9/",
            "--no-progress",
        ]
    )
    # (an earlier CLI test may have left INFO logging to stderr on: count the error lines)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot download")
    assert "--input" in err[0]
    assert not out.exists()
    assert not any(p.suffix == ".gz" for p in (tmp_path / "c").iterdir())


def test_norman2019_cli_download_summary_and_sidecars(tmp_path, http_server, capsys):
    make_fake_geo(http_server.root)
    raw, out = tmp_path / "raw", tmp_path / "o" / "n.h5ad"
    args = [
        "--out",
        str(out),
        "--raw-dir",
        str(raw),
        "--mirror",
        http_server.url,
        "--n-top-genes",
        "0",
    ]
    assert norman2019.main(args) == 0
    printed = capsys.readouterr()
    assert (
        f"wrote {out}" in printed.out
        and "perturbations: 3" in printed.out
        and "controls:      8 cells" in printed.out
    )
    assert load_screen(out, warn=False).combination_labels == ["CBL+UBASH3A"]
    for name in norman2019.FILES.values():
        digest = hashlib.sha256((http_server.root / name).read_bytes()).hexdigest()
        assert read_sidecar(raw / name) == digest  # recorded at the first download
    assert not list(raw.glob("*.part*"))

    # a second run reuses the files after checking them against the sidecars: no request
    n_requests = len(http_server.requests)
    assert norman2019.main(args) == 0
    assert len(http_server.requests) == n_requests
    # a damaged raw file is caught by its sidecar
    (raw / norman2019.FILES["barcodes"]).write_bytes(b"damaged")
    assert norman2019.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "recorded at the first download" in err[-1]


def test_norman2019_cli_input_needs_no_network(tmp_path, no_network):
    make_fake_geo(tmp_path / "mine")
    out = tmp_path / "n.h5ad"
    argv = [
        "--input",
        str(tmp_path / "mine"),
        "--out",
        str(out),
        "--n-top-genes",
        "0",
        "--raw-dir",
        str(tmp_path / "x"),
    ]
    assert norman2019.main(argv) == 0
    assert load_screen(out, warn=False).single_labels == ["CEBPE", "KLF1"]
    assert not (tmp_path / "x").exists()  # nothing downloaded, no raw folder made


# --------------------------------------------------------------------------- Replogle 2022
def make_fake_replogle(
    path: Path,
    *,
    seed: int = 0,
    groups: dict[str, int] | None = None,
    sparse: bool = False,
    uns: dict | None = None,
) -> ad.AnnData:
    """A file in the layout of K562_*_raw_singlecell_01.h5ad (dense float32 counts, same columns)."""
    rng = np.random.default_rng(seed)
    n_genes = 50
    groups = groups or {"non-targeting": 40, "GATA1": 25, "TAF1": 20, "POLR2A": 6, "RPL3": 20}
    labels = np.concatenate([[g] * n for g, n in groups.items()])
    labels = labels[rng.permutation(len(labels))]  # cells are not sorted by label
    means = np.exp(rng.uniform(-1.5, 2.5, size=n_genes))
    mu = np.tile(means, (len(labels), 1))
    mu[labels == "GATA1", 5:15] *= 8.0  # strong phenotype
    mu[labels == "TAF1", 20:30] *= 0.05
    X = rng.poisson(mu).astype(np.float32)
    symbols = ["GATA1", "TAF1", "RPL3", "XIST"] + [f"G{j}" for j in range(n_genes - 4)]
    var = pd.DataFrame(
        {
            "gene_name": symbols,
            "chr": "chr1",
            "start": np.arange(n_genes) * 1000,
            "end": np.arange(n_genes) * 1000 + 500,
            "class": "gene_version10",
            "strand": "+",
            "length": 500,
            "in_matrix": True,
            "mean": X.mean(0),
            "std": X.std(0),
            "cv": X.std(0) / np.maximum(X.mean(0), 1e-9),
            "fano": X.var(0) / np.maximum(X.mean(0), 1e-9),
        },
        index=pd.Index([f"ENSG{j:05d}" for j in range(n_genes)], name="gene_id"),
    )
    transcript = np.where(labels == "non-targeting", "non-targeting", "P1P2")
    obs = pd.DataFrame(
        {
            "gem_group": rng.integers(1, 4, size=len(labels)),
            "gene": pd.Categorical(labels),
            "gene_id": [f"ENSG_{g}" for g in labels],
            "transcript": transcript,
            "gene_transcript": [
                f"{i}_{g}_{t}_ENSG_{g}"
                for i, (g, t) in enumerate(zip(labels, transcript, strict=True))
            ],
            "sgID_AB": [f"{g}_+_1.23-P1P2|{g}_-_2.23-P1P2" for g in labels],
            "mitopercent": rng.uniform(0.05, 0.15, size=len(labels)),
            "UMI_count": X.sum(1),
            "z_gemgroup_UMI": rng.normal(size=len(labels)),
            "core_scale_factor": rng.uniform(0.5, 1.5, size=len(labels)),
            "core_adjusted_UMI_count": X.sum(1) / 1.1,
        },
        index=pd.Index(
            [f"CELL{i:04d}-{i % 3 + 1}" for i in range(len(labels))], name="cell_barcode"
        ),
    )
    src = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=var, uns=uns or {})
    src.write_h5ad(path)
    return src


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def test_preprocess_replogle2022_layout_filters_and_chunks(tmp_path):
    src = make_fake_replogle(tmp_path / "raw.h5ad")
    out = tmp_path / "rep.h5ad"
    summary = preprocess_replogle2022(
        tmp_path / "raw.h5ad", out, min_cells_per_perturbation=10, chunk_rows=7
    )
    adata = ad.read_h5ad(out)

    keep = (src.obs["gene"].astype(str) != "POLR2A").to_numpy()  # 6 cells < 10
    assert list(adata.obs_names) == list(src.obs_names[keep])
    expected = np.where(src.obs["gene"][keep] == "non-targeting", "control", src.obs["gene"][keep])
    assert list(adata.obs["perturbation"]) == list(expected)
    assert list(adata.obs["source_gene"]) == list(src.obs["gene"][keep])
    for col in ("gene_transcript", "sgID_AB", "mitopercent", "core_adjusted_UMI_count"):
        assert list(adata.obs[col]) == list(src.obs[col][keep])
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.toarray(), src.X[keep])
    assert list(adata.var_names) == list(src.var["gene_name"])
    assert list(adata.var["gene_id"]) == list(src.var_names)
    assert np.allclose(adata.obs["n_counts"], src.X[keep].sum(1))
    assert set(adata.var_names[adata.var["is_target"].to_numpy()]) == {"GATA1", "TAF1", "RPL3"}
    assert (summary.n_cells, summary.n_genes, summary.n_perturbations, summary.n_control_cells) == (
        105,
        50,
        3,
        40,
    )

    loaded = load_screen(out, warn=False)
    assert loaded.control_labels == ["control"]
    assert loaded.single_labels == ["GATA1", "RPL3", "TAF1"]
    assert loaded.combination_labels == []
    # one block gives the same file as blocks of 7 rows
    preprocess_replogle2022(
        tmp_path / "raw.h5ad",
        tmp_path / "one.h5ad",
        min_cells_per_perturbation=10,
        chunk_rows=10**6,
    )
    _same_h5ad(out, tmp_path / "one.h5ad")


def test_replogle2022_controls_survive_min_cells(tmp_path):
    groups = {"non-targeting": 8, "GATA1": 12, "TAF1": 9}
    make_fake_replogle(
        tmp_path / "raw.h5ad", groups=groups, uns={"pathways": {"ERYTHROID": ["GATA1", "KLF1"]}}
    )
    preprocess_replogle2022(
        tmp_path / "raw.h5ad", tmp_path / "o.h5ad", min_cells_per_perturbation=10
    )
    adata = ad.read_h5ad(tmp_path / "o.h5ad")
    assert adata.obs["perturbation"].value_counts().to_dict() == {"GATA1": 12, "control": 8}
    assert list(adata.uns["pathways"]["ERYTHROID"]) == [
        "GATA1",
        "KLF1",
    ]  # SAMS-VAE's file has these


def test_preprocess_replogle2022_keep_lists_control_label_and_cap(tmp_path):
    src = make_fake_replogle(tmp_path / "raw.h5ad")
    preprocess_replogle2022(
        tmp_path / "raw.h5ad",
        tmp_path / "rep.h5ad",
        keep_perturbations=["TAF1", "NOT_THERE"],
        keep_genes=["G3", "G1", "XIST", "NOPE"],
        control_label="non-targeting",
        max_cells_per_perturbation=15,
        chunk_rows=9,
    )
    adata = ad.read_h5ad(tmp_path / "rep.h5ad")
    assert adata.obs["perturbation"].value_counts().to_dict() == {"non-targeting": 15, "TAF1": 15}
    assert list(adata.uns[UNS_KEY]["screen"]["control"]) == ["non-targeting"]
    assert list(adata.var_names) == [
        "TAF1",
        "XIST",
        "G1",
        "G3",
    ]  # file order; the target gene added
    assert adata.uns[UNS_KEY]["recipe"]["n_requested_genes_absent"] == 1
    pos = src.obs_names.get_indexer(adata.obs_names)
    assert np.all(np.diff(pos) > 0)  # source order kept
    cols = src.var_names.get_indexer(adata.var["gene_id"])
    assert np.array_equal(adata.X.toarray(), src.X[pos][:, cols])
    assert np.allclose(adata.obs["n_counts"], src.X[pos].sum(1))  # full library, not the kept genes
    assert load_screen(tmp_path / "rep.h5ad", warn=False).single_labels == ["TAF1"]


def test_preprocess_replogle2022_de_filter_keeps_strong_phenotypes(tmp_path):
    make_fake_replogle(tmp_path / "raw.h5ad")
    preprocess_replogle2022(
        tmp_path / "raw.h5ad", tmp_path / "o.h5ad", min_de_genes=5, chunk_rows=11
    )
    adata = ad.read_h5ad(tmp_path / "o.h5ad")
    assert set(adata.obs["perturbation"]) == {"control", "GATA1", "TAF1"}
    n_de = adata.uns[UNS_KEY]["recipe"]["n_de_genes"].set_index("perturbation")["n_de_genes"]
    assert n_de["GATA1"] >= 8 and n_de["TAF1"] >= 8


def test_replogle_hvg_chunked_equals_scanpy(tmp_path):
    import scanpy as sc

    make_fake_replogle(tmp_path / "raw.h5ad")
    src = ad.read_h5ad(tmp_path / "raw.h5ad")
    src.X[3, 40] = 60.0  # outliers above sqrt(n_cells) regularised SDs: Seurat v3 clips them
    src.X[7, 41] = 50.0
    src.write_h5ad(tmp_path / "raw.h5ad")
    preprocess_replogle2022(
        tmp_path / "raw.h5ad",
        tmp_path / "o.h5ad",
        n_top_genes=12,
        keep_target_genes=False,
        chunk_rows=13,
    )
    adata = ad.read_h5ad(tmp_path / "o.h5ad")
    assert np.allclose(adata.obs["n_counts"], src.X.sum(1))  # full library, not the HVG subset
    ref = sc.pp.highly_variable_genes(src, flavor="seurat_v3", n_top_genes=12, inplace=False)
    assert list(adata.var["gene_id"]) == list(src.var_names[ref["highly_variable"].to_numpy()])
    assert np.array_equal(
        adata.var["highly_variable_rank"].to_numpy(),
        ref["highly_variable_rank"].to_numpy()[ref["highly_variable"].to_numpy()],
    )
    # the same on a subset of cells, from a sparse in-memory matrix
    keep = np.arange(src.n_obs) % 3 != 2
    mine = seurat_v3_select(sp.csr_matrix(src.X), keep, 7, chunk_rows=5)
    theirs = sc.pp.highly_variable_genes(
        src[keep].copy(), flavor="seurat_v3", n_top_genes=7, inplace=False
    )
    assert np.array_equal(mine["highly_variable"].to_numpy(), theirs["highly_variable"].to_numpy())
    assert np.allclose(mine["variances_norm"], theirs["variances_norm"])


def test_replogle2022_wrong_layout_and_normalised_values(tmp_path):
    obs = pd.DataFrame({"x": [1, 2, 3]}, index=["a", "b", "c"])
    ad.AnnData(X=np.ones((3, 2), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(RecipeError, match="no 'gene' column"):
        preprocess_replogle2022(tmp_path / "bad.h5ad", tmp_path / "o.h5ad")
    src = make_fake_replogle(tmp_path / "raw.h5ad")
    src.X = src.X / 3.0  # like the *_normalized_* files: not counts
    src.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(RecipeError, match="non-integer") as info:
        preprocess_replogle2022(tmp_path / "norm.h5ad", tmp_path / "o.h5ad")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o.h5ad").exists() and not list(tmp_path.glob(".o.h5ad*"))
    (tmp_path / "trunc.h5ad").write_bytes((tmp_path / "raw.h5ad").read_bytes()[:3000])
    with pytest.raises(RecipeError, match="cannot be read as .h5ad"):
        preprocess_replogle2022(tmp_path / "trunc.h5ad", tmp_path / "o.h5ad")


def test_replogle2022_sparse_source_gives_the_same_screen(tmp_path):
    make_fake_replogle(tmp_path / "dense.h5ad")
    make_fake_replogle(tmp_path / "sparse.h5ad", sparse=True)
    opts = {"min_cells_per_perturbation": 10, "n_top_genes": 12, "chunk_rows": 8}
    preprocess_replogle2022(tmp_path / "dense.h5ad", tmp_path / "a.h5ad", **opts)
    preprocess_replogle2022(tmp_path / "sparse.h5ad", tmp_path / "b.h5ad", **opts)
    _same_h5ad(tmp_path / "a.h5ad", tmp_path / "b.h5ad")


def _fake_svae_notebook(path: Path, perturbations: str, genes: str) -> None:
    cells = [
        {"cell_type": "markdown", "source": ["# 3. Filter the data"]},
        {
            "cell_type": "code",
            "source": [
                "# these are copied from the excel files\n",
                f'string = """{perturbations}"""\n',
            ],
        },
        {"cell_type": "code", "source": ['valid_guides = string.replace("\\n", ",").split(",")']},
        {"cell_type": "code", "source": [f'string_genes = """{genes}"""']},
    ]
    path.write_text(json.dumps({"cells": cells, "nbformat": 4}))


def test_replogle2022_filtered_preset_uses_the_svae_lists(tmp_path, no_network, capsys):
    src = make_fake_replogle(tmp_path / "K562_gwps_raw_singlecell_01.h5ad")
    _fake_svae_notebook(tmp_path / "nb.ipynb", "GATA1,TAF1\nTAF1,ABSENT1", "G1,G2,XIST\nG7,NOPE")
    assert read_svae_lists(tmp_path / "nb.ipynb") == (
        ["GATA1", "TAF1", "ABSENT1"],
        ["G1", "G2", "XIST", "G7", "NOPE"],
    )
    out = tmp_path / "f.h5ad"
    code = replogle2022.main(
        [
            "--input",
            str(tmp_path / "K562_gwps_raw_singlecell_01.h5ad"),
            "--dataset",
            "gwps",
            "--preset",
            "filtered",
            "--svae-notebook",
            str(tmp_path / "nb.ipynb"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    adata = ad.read_h5ad(out)
    assert set(adata.obs["perturbation"]) == {"control", "GATA1", "TAF1"}  # the controls are kept
    assert list(adata.var_names) == [
        "XIST",
        "G1",
        "G2",
        "G7",
    ]  # exactly the listed genes: no target genes added
    keep = src.obs["gene"].isin(["GATA1", "TAF1", "non-targeting"]).to_numpy()
    assert np.array_equal(adata.X.toarray(), src.X[keep][:, [3, 5, 6, 11]])
    printed = capsys.readouterr().out
    assert (
        "published set: 116,641 perturbed cells x 1,187 genes; this file: 45 perturbed cells (+ 40 controls)"
        in printed
    )

    _fake_svae_notebook(tmp_path / "other.ipynb", "A,B", "C")
    (tmp_path / "other.ipynb").write_text(
        (tmp_path / "other.ipynb").read_text().replace("string_genes", "genes")
    )
    with pytest.raises(RecipeError, match="no string_genes"):
        read_svae_lists(tmp_path / "other.ipynb")


def test_replogle2022_cli_input_needs_no_network(tmp_path, no_network, capsys):
    make_fake_replogle(tmp_path / "raw.h5ad")
    out = tmp_path / "o" / "rep.h5ad"
    argv = [
        "--input",
        str(tmp_path / "raw.h5ad"),
        "--out",
        str(out),
        "--min-cells-per-perturbation",
        "10",
    ]
    assert replogle2022.main(argv) == 0
    assert load_screen(out, warn=False).single_labels == ["GATA1", "RPL3", "TAF1"]
    assert "perturbations: 3" in capsys.readouterr().out
    # a sidecar beside the input is checked (here: it does not match)
    sidecar_path(tmp_path / "raw.h5ad").write_text("0" * 64 + "  raw.h5ad\n")
    assert replogle2022.main(argv) == 2
    assert "differs from the sha256 recorded" in capsys.readouterr().err


def test_replogle2022_cli_downloads_from_a_mirror(tmp_path, http_server):
    make_fake_replogle(http_server.root / "K562_essential_raw_singlecell_01.h5ad")
    size = (http_server.root / "K562_essential_raw_singlecell_01.h5ad").stat().st_size
    http_server.fail_after["K562_essential_raw_singlecell_01.h5ad"] = (
        size // 3
    )  # the first try breaks off
    raw, out = tmp_path / "raw", tmp_path / "ess.h5ad"
    argv = [
        "--dataset",
        "essential",
        "--mirror",
        http_server.url,
        "--raw-dir",
        str(raw),
        "--out",
        str(out),
        "--retries",
        "0",
    ]
    assert replogle2022.main(argv) == 2  # no retry: the next run resumes
    assert (raw / "K562_essential_raw_singlecell_01.h5ad.part").stat().st_size == size // 3
    assert replogle2022.main(argv) == 0
    assert http_server.requests[-1][1] == f"bytes={size // 3}-"
    assert load_screen(out, warn=False).single_labels == ["GATA1", "POLR2A", "RPL3", "TAF1"]


# ------------------------------------------------------------------------------- Kang 2018
def make_fake_kang(
    raw: Path, *, barcode_header: bool = True, n_genes: int = 30, n_cells: int = 12
) -> dict[str, np.ndarray]:
    """The six batch-2 GEO files; the two samples share barcodes, as 10x runs do."""
    raw.mkdir(parents=True, exist_ok=True)
    _gz_write(
        raw / "GSE96583_batch2.genes.tsv.gz",
        "".join(f"ENSG{j}\tS{j % (n_genes - 2)}\n" for j in range(n_genes)),
    )
    counts = {}
    rows = []
    for stim, mtx, bcf in [
        ("ctrl", "GSM2560248_2.1.mtx.gz", "GSM2560248_barcodes.tsv.gz"),
        ("stim", "GSM2560249_2.2.mtx.gz", "GSM2560249_barcodes.tsv.gz"),
    ]:
        barcodes = [f"BC{i:02d}-1" for i in range(n_cells)]
        c = _counts(n_genes, len(barcodes), seed=len(stim) + (stim == "stim"))
        counts[stim] = c
        _write_mtx_gz(raw / mtx, c.T)
        _gz_write(raw / bcf, "".join(f"{b}\n" for b in barcodes))
        for i, b in enumerate(barcodes):
            if i == n_cells - 1:
                continue  # not annotated
            multiplet = "doublet" if i == n_cells - 2 else "singlet"
            rows.append((b, "1015", stim, 3, ["B cells", "NK cells"][i % 2], multiplet))
    annot = pd.DataFrame(rows, columns=["barcode", "ind", "stim", "cluster", "cell", "multiplets"])
    annot = annot.sample(frac=1.0, random_state=2)
    text = annot.to_csv(sep="\t", index=False)
    if not barcode_header:  # R's write.table: the header has no name for the row names
        text = text.split("\t", 1)[1]
    _gz_write(raw / "GSE96583_batch2.total.tsne.df.tsv.gz", text)
    assert sorted(p.name for p in raw.iterdir()) == sorted(kang2018.FILES)
    return counts


@pytest.mark.parametrize("barcode_header", [True, False])
def test_preprocess_kang2018(tmp_path, barcode_header):
    counts = make_fake_kang(tmp_path / "raw", barcode_header=barcode_header)
    out = tmp_path / "kang.h5ad"
    summary = preprocess_kang2018(
        tmp_path / "raw", out, n_top_genes=0, chunk_lines=23, write_rows=4
    )
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 20  # 10 annotated singlets per sample
    assert list(adata.obs["condition"]) == ["control"] * 10 + ["stimulated"] * 10
    assert list(adata.obs_names[:2]) == ["BC00-1_ctrl", "BC01-1_ctrl"]
    assert list(adata.obs["cell_type"][:2]) == ["B cells", "NK cells"]
    assert adata.var_names.is_unique and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.toarray(), np.vstack([counts["ctrl"][:10], counts["stim"][:10]]))
    assert np.allclose(adata.obs["n_counts"], adata.X.sum(1).A1)
    screen = load_screen(out, warn=False)
    assert screen.control_labels == ["control"] and screen.single_labels == ["stimulated"]
    assert (summary.n_control_cells, summary.n_perturbations) == (10, 1)
    if barcode_header:
        preprocess_kang2018(
            tmp_path / "raw", tmp_path / "one.h5ad", n_top_genes=0, chunk_lines=10**6
        )
        _same_h5ad(out, tmp_path / "one.h5ad")


def test_kang2018_hvg_over_both_samples_matches_scanpy(tmp_path):
    import scanpy as sc

    make_fake_kang(tmp_path / "raw", n_genes=60, n_cells=20)
    preprocess_kang2018(tmp_path / "raw", tmp_path / "full.h5ad", n_top_genes=0)
    full = ad.read_h5ad(tmp_path / "full.h5ad")
    ref = sc.pp.highly_variable_genes(full, flavor="seurat_v3", n_top_genes=15, inplace=False)
    preprocess_kang2018(tmp_path / "raw", tmp_path / "h.h5ad", n_top_genes=15, chunk_lines=40)
    adata = ad.read_h5ad(tmp_path / "h.h5ad")
    assert list(adata.var_names) == list(full.var_names[ref["highly_variable"].to_numpy()])
    assert np.array_equal(adata.X.toarray(), full[:, adata.var_names].X.toarray())


def test_kang2018_cli_input_needs_no_network(tmp_path, no_network, capsys):
    make_fake_kang(tmp_path / "mine")
    out = tmp_path / "k.h5ad"
    assert (
        kang2018.main(["--input", str(tmp_path / "mine"), "--out", str(out), "--n-top-genes", "0"])
        == 0
    )
    assert "controls:      10 cells labelled 'control'" in capsys.readouterr().out
    assert load_screen(out, warn=False).single_labels == ["stimulated"]


# ------------------------------------------------------------------------------ downloader
def _payload(n: int = 300_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def test_download_resumes_an_interrupted_transfer(tmp_path, http_server):
    payload = _payload()
    (http_server.root / "f.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    http_server.fail_after["f.bin"] = 100_000
    dest = tmp_path / "d" / "f.bin"
    url = f"{http_server.url}/f.bin"
    with pytest.raises(RecipeError, match="broke off after 97.7 KiB") as info:
        download(url, dest, sha256=sha, retries=0, block_bytes=8192, progress=False)
    assert "\n" not in str(info.value) and "resume" in str(info.value)
    assert not dest.exists()
    assert (tmp_path / "d" / "f.bin.part").stat().st_size == 100_000  # kept for the next run

    assert download(url, dest, sha256=sha, block_bytes=8192, progress=False) == dest
    assert dest.read_bytes() == payload
    name, sent_range, if_range = http_server.requests[-1]
    assert (
        sent_range == "bytes=100000-" and if_range and if_range.startswith('"')
    )  # resumed, with a validator
    assert read_sidecar(dest) == sha
    assert not list((tmp_path / "d").glob("*.part*"))


def test_download_retries_by_itself_and_checks_against_the_first_download(tmp_path, http_server):
    payload = _payload(seed=1)
    (http_server.root / "f.bin").write_bytes(payload)
    http_server.fail_after["f.bin"] = 50_000
    dest = tmp_path / "f.bin"
    url = f"{http_server.url}/f.bin"
    download(url, dest, retries=2, retry_wait=0.0, block_bytes=4096, progress=True)
    assert dest.read_bytes() == payload
    assert [r[1] for r in http_server.requests] == [None, "bytes=50000-"]
    assert (
        read_sidecar(dest) == hashlib.sha256(payload).hexdigest()
    )  # no published checksum: recorded

    # a second download (e.g. on another day) is checked against the first one
    dest.unlink()
    (http_server.root / "f.bin").write_bytes(_payload(seed=2))  # the server's file changed
    with pytest.raises(RecipeError, match="recorded at the first download") as info:
        download(url, dest, progress=False)
    assert "\n" not in str(info.value)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_download_checksum_mismatch_keeps_nothing(tmp_path, http_server):
    (http_server.root / "f.bin").write_bytes(_payload(20_000))
    dest = tmp_path / "f.bin"
    with pytest.raises(RecipeError, match="differs from the published sha256") as info:
        download(f"{http_server.url}/f.bin", dest, sha256="0" * 64, progress=False)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [http_server.root]  # no file, no .part, no sidecar
    with pytest.raises(RecipeError, match="md5"):
        download(f"{http_server.url}/f.bin", dest, md5="0" * 32, progress=False)
    assert not dest.exists()


def test_download_never_splices_two_versions(tmp_path, http_server):
    old, new = _payload(seed=3), _payload(seed=4)
    (http_server.root / "f.bin").write_bytes(old)
    http_server.fail_after["f.bin"] = 30_000
    dest = tmp_path / "f.bin"
    url = f"{http_server.url}/f.bin"
    with pytest.raises(RecipeError, match="broke off"):
        download(url, dest, retries=0, progress=False)
    (http_server.root / "f.bin").write_bytes(new)  # changed on the server meanwhile
    download(url, dest, progress=False)
    assert dest.read_bytes() == new  # If-Range did not match: the whole new file was sent

    # a server that ignores Range: the .part is read again from byte 0
    dest2 = tmp_path / "g.bin"
    (tmp_path / "g.bin.part").write_bytes(b"garbage")
    http_server.ignore_range = True
    download(url, dest2, progress=False)
    assert dest2.read_bytes() == new


def test_download_complete_part_and_http_errors(tmp_path, http_server):
    payload = _payload(10_000)
    (http_server.root / "f.bin").write_bytes(payload)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(payload)  # killed after the last byte, before the rename
    download(
        f"{http_server.url}/f.bin", dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False
    )
    assert (
        dest.read_bytes() == payload and http_server.requests[-1][1] == "bytes=10000-"
    )  # answered 416
    # a .part longer than the file (the server's copy shrank): 416 again, restarted from 0 at once
    (tmp_path / "g.bin.part").write_bytes(payload + b"tail")
    download(f"{http_server.url}/f.bin", tmp_path / "g.bin", retries=0, progress=False)
    assert (tmp_path / "g.bin").read_bytes() == payload
    assert [r[1] for r in http_server.requests[-2:]] == ["bytes=10004-", None]
    with pytest.raises(RecipeError, match="HTTP 404") as info:
        download(f"{http_server.url}/missing.bin", tmp_path / "m.bin", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "m.bin").exists()


def test_download_offline_is_one_line(tmp_path):
    def offline(req, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    with pytest.raises(RecipeError) as info:
        download(
            "https://ftp.ncbi.nlm.nih.gov/geo/x.gz",
            tmp_path / "x.gz",
            opener=offline,
            progress=False,
        )
    msg = str(info.value)
    assert "\n" not in msg and "internet" in msg and "ftp.ncbi.nlm.nih.gov" in msg
    assert list(tmp_path.iterdir()) == []


def test_download_existing_file_and_file_urls(tmp_path):
    payload = _payload(5_000)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    dest = tmp_path / "d" / "out.bin"
    download(src.as_uri(), dest, md5=hashlib.md5(payload).hexdigest(), progress=False)
    assert (
        dest.read_bytes() == payload and read_sidecar(dest) == hashlib.sha256(payload).hexdigest()
    )
    # already there: checked against the sidecar, nothing fetched
    assert download("https://unreachable.invalid/out.bin", dest, progress=False) == dest
    # a file put there by hand gets its sha256 recorded
    sidecar_path(dest).unlink()
    download("https://unreachable.invalid/out.bin", dest, progress=False)
    assert read_sidecar(dest) == hashlib.sha256(payload).hexdigest()
    dest.write_bytes(b"changed")
    with pytest.raises(RecipeError, match="exists but its sha256"):
        download("https://unreachable.invalid/out.bin", dest, progress=False)


@pytest.mark.slow
def test_replogle2022_never_holds_the_input_or_output_counts(tmp_path):
    """Peak traced memory stays far below the input matrix and the output counts."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n_cells, n_genes = 20_000, 1_000
    labels = rng.choice(["non-targeting"] + [f"T{i}" for i in range(50)], size=n_cells)
    X = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    var = pd.DataFrame(
        {"gene_name": [f"G{j}" for j in range(n_genes)]}, index=[f"E{j}" for j in range(n_genes)]
    )
    obs = pd.DataFrame({"gene": pd.Categorical(labels)}, index=[f"C{i}" for i in range(n_cells)])
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(tmp_path / "big.h5ad")
    input_bytes, output_bytes = X.nbytes, int((X > 0).sum()) * 8  # dense input; CSR data + indices
    del X
    tracemalloc.start()
    try:
        summary = preprocess_replogle2022(
            tmp_path / "big.h5ad", tmp_path / "o.h5ad", chunk_rows=500
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.n_cells == n_cells
    assert peak < 0.35 * min(input_bytes, output_bytes), (peak, input_bytes, output_bytes)
