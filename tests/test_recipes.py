"""Data recipes on tiny fake copies of the public files (offline)."""

from __future__ import annotations

import gzip
import io
import sys
import urllib.error
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
from data_recipes import norman2019, replogle2022  # noqa: E402
from data_recipes._common import RecipeError, download, seurat_v3_select  # noqa: E402
from data_recipes.norman2019 import guide_identity_to_label, preprocess_norman2019  # noqa: E402
from data_recipes.replogle2022 import preprocess_replogle2022  # noqa: E402

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


def _norman_counts(n_genes: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """Cells x genes counts with varied gene means (so loess has something to fit)."""
    rng = np.random.default_rng(seed)
    means = np.exp(rng.uniform(-2, 3, size=n_genes))
    return rng.negative_binomial(2, 2 / (2 + means), size=(n_cells, n_genes)).astype(np.int64)


def _gz_write(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def make_fake_geo(raw: Path, *, n_genes: int = 40, reps: int = 4) -> tuple[np.ndarray, list[str], list[str], list]:
    """Write the four GSE133344 raw files; return cells x genes counts, barcodes, symbols, identity rows."""
    raw.mkdir(parents=True, exist_ok=True)
    rows = [(f"{bc[:-2]}{r}{bc[-2:]}", g, n, cov, lab) for r in range(reps) for bc, g, n, cov, lab in NORMAN_CELLS]
    barcodes = [r[0] for r in rows] + [EXTRA_BARCODE]
    symbols = ["CBL", "UBASH3A", "CEBPE", "KLF1"] + [f"G{j}" for j in range(n_genes - 5)] + ["G0"]  # a duplicate
    counts = _norman_counts(n_genes, len(barcodes))
    # genes x cells on disk, as 10x writes it
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(counts.T), field="integer")
    with gzip.open(raw / "GSE133344_raw_matrix.mtx.gz", "wb") as fh:
        fh.write(buf.getvalue())
    _gz_write(raw / "GSE133344_raw_genes.tsv.gz", "".join(f"ENSG{j:05d}\t{s}\n" for j, s in enumerate(symbols)))
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
    dup = ident[ident["cell_barcode"].str.replace(r"\d-", "-", regex=True).isin(list(DUPLICATED))].copy()
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


def test_preprocess_norman2019_all_genes(tmp_path):
    counts, barcodes, symbols, rows = make_fake_geo(tmp_path / "raw")
    out = tmp_path / "norman.h5ad"
    adata = preprocess_norman2019(tmp_path / "raw", out, n_top_genes=0, chunk_lines=37)

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
    assert np.array_equal(X.data, np.round(X.data))
    rows_in_matrix = [barcodes.index(b) for b in adata.obs_names]
    expected = counts[rows_in_matrix]  # cells x genes
    assert np.array_equal(X.toarray(), expected)
    for i, g in [(0, 0), (3, 7), (len(kept) - 1, len(symbols) - 1)]:
        assert X[i, g] == counts[rows_in_matrix[i], g]
    assert np.allclose(adata.obs["n_counts"], expected.sum(axis=1))

    screen = adata.uns[UNS_KEY]["screen"]
    assert screen["perturbation_key"] == "perturbation"
    assert list(screen["control"]) == ["control"]

    loaded = load_screen(out, warn=False)
    assert loaded.control_labels == ["control"]
    assert loaded.single_labels == ["CEBPE", "KLF1"]
    assert loaded.combination_labels == ["CBL+UBASH3A"]
    assert int(loaded.is_control.sum()) == 2 * 4
    assert sorted(loaded.perturbation_names) == ["CBL", "CEBPE", "KLF1", "UBASH3A"]
    assert loaded.adata.uns[UNS_KEY]["recipe"]["name"] == "norman2019"


def test_preprocess_norman2019_hvg_matches_scanpy(tmp_path):
    import scanpy as sc

    counts, barcodes, symbols, rows = make_fake_geo(tmp_path / "raw", n_genes=60, reps=6)
    full = preprocess_norman2019(tmp_path / "raw", None, n_top_genes=0)
    ref = sc.pp.highly_variable_genes(full, flavor="seurat_v3", n_top_genes=10, inplace=False)
    hvg = set(full.var_names[ref["highly_variable"].to_numpy()])

    adata = preprocess_norman2019(tmp_path / "raw", tmp_path / "n.h5ad", n_top_genes=10)
    targets = {"CBL", "UBASH3A", "CEBPE", "KLF1"}
    assert set(adata.var_names) == hvg | targets
    assert int(adata.var["highly_variable"].sum()) == 10
    assert set(adata.var_names[adata.var["is_target"].to_numpy()]) == targets
    # the counts of the kept genes are the original ones, and n_counts is the full library
    assert np.array_equal(adata.X.toarray(), full[:, adata.var_names].X.toarray())
    assert np.allclose(adata.obs["n_counts"], full.obs["n_counts"])
    assert np.allclose(adata.obs["n_counts"], np.asarray(full.X.sum(axis=1)).ravel())

    exact = preprocess_norman2019(tmp_path / "raw", None, n_top_genes=10, keep_target_genes=False)
    assert set(exact.var_names) == hvg


def test_norman2019_truncated_matrix_is_refused(tmp_path):
    make_fake_geo(tmp_path / "raw")
    path = tmp_path / "raw" / "GSE133344_raw_matrix.mtx.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    _gz_write(path, "\n".join(lines[:-5]) + "\n")
    with pytest.raises(RecipeError, match="is the file complete"):
        preprocess_norman2019(tmp_path / "raw", None)


def test_norman2019_missing_file_is_one_line(tmp_path):
    make_fake_geo(tmp_path / "raw")
    (tmp_path / "raw" / "GSE133344_raw_barcodes.tsv.gz").unlink()
    with pytest.raises(RecipeError, match="barcodes.tsv.gz is missing"):
        preprocess_norman2019(tmp_path / "raw", None)


def test_norman2019_cli_offline_writes_nothing(tmp_path, capsys):
    out = tmp_path / "n.h5ad"
    code = norman2019.main(
        ["--out", str(out), "--cache-dir", str(tmp_path / "c"), "--base-url", "http://127.0.0.1:9/"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot download")
    assert not out.exists()
    assert not any(p.suffix == ".gz" for p in (tmp_path / "c").iterdir())


def test_norman2019_cli_from_local_mirror(tmp_path):
    make_fake_geo(tmp_path / "mirror")
    out = tmp_path / "n.h5ad"
    code = norman2019.main(
        [
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--base-url", (tmp_path / "mirror").as_uri() + "/", "--n-top-genes", "0",
        ]
    )  # fmt: skip
    assert code == 0
    assert load_screen(out, warn=False).combination_labels == ["CBL+UBASH3A"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(norman2019.FILES.values())


# --------------------------------------------------------------------------- Replogle 2022
def make_fake_replogle(path: Path, *, seed: int = 0, groups: dict[str, int] | None = None) -> ad.AnnData:
    """A raw-single-cell-like file: dense counts, obs gene / gene_id / gem_group, var gene_name."""
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
        {"gene_name": symbols, "chr": "chr1", "mean": X.mean(0)},
        index=pd.Index([f"ENSG{j:05d}" for j in range(n_genes)], name="gene_id"),
    )
    obs = pd.DataFrame(
        {
            "gem_group": rng.integers(1, 4, size=len(labels)),
            "gene": pd.Categorical(labels),
            "gene_id": [f"id_{g}" for g in labels],
            "UMI_count": X.sum(1),
        },
        index=[f"CELL{i:04d}-{i % 3 + 1}" for i in range(len(labels))],
    )
    src = ad.AnnData(X=X, obs=obs, var=var)
    src.write_h5ad(path)
    return src


def test_preprocess_replogle2022_layout_and_filters(tmp_path):
    src = make_fake_replogle(tmp_path / "raw.h5ad")
    out = tmp_path / "rep.h5ad"
    adata = preprocess_replogle2022(tmp_path / "raw.h5ad", out, min_cells_per_perturbation=10, chunk_rows=7)

    keep = src.obs["gene"].astype(str) != "POLR2A"  # 6 cells < 10
    assert list(adata.obs_names) == list(src.obs_names[keep])
    expected = np.where(src.obs["gene"][keep] == "non-targeting", "control", src.obs["gene"][keep])
    assert list(adata.obs["perturbation"]) == list(expected)
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.toarray(), src.X[keep.to_numpy()])
    assert list(adata.var_names) == list(src.var["gene_name"])
    assert list(adata.var["gene_id"]) == list(src.var_names)
    assert np.allclose(adata.obs["n_counts"], src.X[keep.to_numpy()].sum(1))
    assert set(adata.var_names[adata.var["is_target"].to_numpy()]) == {"GATA1", "TAF1", "RPL3"}

    loaded = load_screen(out, warn=False)
    assert loaded.control_labels == ["control"]
    assert loaded.single_labels == ["GATA1", "RPL3", "TAF1"]
    assert loaded.combination_labels == []


def test_replogle2022_controls_survive_min_cells(tmp_path):
    make_fake_replogle(tmp_path / "raw.h5ad", groups={"non-targeting": 8, "GATA1": 12, "TAF1": 9})
    adata = preprocess_replogle2022(tmp_path / "raw.h5ad", None, min_cells_per_perturbation=10)
    assert adata.obs["perturbation"].value_counts().to_dict() == {"GATA1": 12, "control": 8}


def test_preprocess_replogle2022_keep_list_control_label_and_cap(tmp_path):
    src = make_fake_replogle(tmp_path / "raw.h5ad")
    adata = preprocess_replogle2022(
        tmp_path / "raw.h5ad",
        tmp_path / "rep.h5ad",
        keep_perturbations=["TAF1", "NOT_THERE"],
        control_label="non-targeting",
        max_cells_per_perturbation=15,
        chunk_rows=9,
    )
    assert adata.obs["perturbation"].value_counts().to_dict() == {"non-targeting": 15, "TAF1": 15}
    assert list(adata.uns[UNS_KEY]["screen"]["control"]) == ["non-targeting"]
    pos = src.obs_names.get_indexer(adata.obs_names)
    assert np.all(np.diff(pos) > 0)  # source order kept
    assert np.array_equal(adata.X.toarray(), src.X[pos])
    assert load_screen(tmp_path / "rep.h5ad", warn=False).single_labels == ["TAF1"]


def test_preprocess_replogle2022_de_filter_keeps_strong_phenotypes(tmp_path):
    make_fake_replogle(tmp_path / "raw.h5ad")
    adata = preprocess_replogle2022(tmp_path / "raw.h5ad", None, min_de_genes=5, chunk_rows=11)
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
    adata = preprocess_replogle2022(
        tmp_path / "raw.h5ad", None, n_top_genes=12, keep_target_genes=False, chunk_rows=13
    )
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
    theirs = sc.pp.highly_variable_genes(src[keep].copy(), flavor="seurat_v3", n_top_genes=7, inplace=False)
    assert np.array_equal(mine["highly_variable"].to_numpy(), theirs["highly_variable"].to_numpy())
    assert np.allclose(mine["variances_norm"], theirs["variances_norm"])


def test_replogle2022_wrong_layout(tmp_path):
    obs = pd.DataFrame({"x": [1, 2, 3]}, index=["a", "b", "c"])
    ad.AnnData(X=np.ones((3, 2), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(RecipeError, match="no 'gene' column"):
        preprocess_replogle2022(tmp_path / "bad.h5ad", None)


def test_replogle2022_cli_with_input(tmp_path):
    make_fake_replogle(tmp_path / "raw.h5ad")
    out = tmp_path / "o" / "rep.h5ad"
    code = replogle2022.main(
        ["--input", str(tmp_path / "raw.h5ad"), "--out", str(out), "--min-cells-per-perturbation", "10"]
    )
    assert code == 0
    assert load_screen(out, warn=False).single_labels == ["GATA1", "RPL3", "TAF1"]


# ------------------------------------------------------------------------------ downloader
class _BrokenResponse(io.BytesIO):
    """A response that delivers ``good`` bytes, then fails like a dropped connection."""

    def __init__(self, good: bytes, total: int):
        super().__init__(good)
        self.status = 200
        self.headers = {"Content-Length": str(total)}

    def read(self, n=-1):
        block = super().read(n)
        if not block:
            raise urllib.error.URLError("connection reset by peer")
        return block


def test_download_failure_midway_leaves_no_final_file(tmp_path):
    dest = tmp_path / "file.bin"
    opener = lambda req, timeout: _BrokenResponse(b"x" * 1000, 5000)  # noqa: E731
    with pytest.raises(RecipeError, match="broke off"):
        download("https://example.org/file.bin", dest, opener=opener)
    assert not dest.exists()
    assert (tmp_path / "file.bin.part").stat().st_size == 1000  # kept for resuming


def test_download_truncated_transfer_is_not_final(tmp_path):
    dest = tmp_path / "file.bin"

    class Short(io.BytesIO):
        status = 200
        headers = {"Content-Length": "5000"}

    with pytest.raises(RecipeError, match="incomplete"):
        download("https://example.org/file.bin", dest, opener=lambda req, timeout: Short(b"y" * 10))
    assert not dest.exists()


def test_download_offline_is_one_line(tmp_path):
    def offline(req, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    with pytest.raises(RecipeError) as info:
        download("https://ftp.ncbi.nlm.nih.gov/geo/x.gz", tmp_path / "x.gz", opener=offline)
    msg = str(info.value)
    assert "\n" not in msg and "internet" in msg and "ftp.ncbi.nlm.nih.gov" in msg
    assert list(tmp_path.iterdir()) == []


def test_download_file_url_checksum_and_resume(tmp_path):
    import hashlib

    payload = bytes(range(256)) * 40
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()

    bad = tmp_path / "bad.bin"
    with pytest.raises(RecipeError, match="sha256"):
        download(src.as_uri(), bad, sha256="0" * 64)
    assert not bad.exists() and not (tmp_path / "bad.bin.part").exists()

    dest = tmp_path / "d" / "out.bin"
    dest.parent.mkdir()
    (tmp_path / "d" / "out.bin.part").write_bytes(payload[:100])  # an earlier, interrupted run
    calls = []

    class Ranged(io.BytesIO):
        def __init__(self, req):
            start = int(req.get_header("Range").split("=")[1].rstrip("-"))
            calls.append(start)
            super().__init__(payload[start:])
            self.status = 206
            self.headers = {"Content-Length": str(len(payload) - start)}

    assert download("https://example.org/out.bin", dest, sha256=sha, opener=lambda req, timeout: Ranged(req)) == dest
    assert calls == [100] and dest.read_bytes() == payload
    assert not (tmp_path / "d" / "out.bin.part").exists()
    # already there: nothing is fetched
    assert download("https://unreachable.invalid/out.bin", dest, sha256=sha) == dest
    # a server that ignores Range restarts from zero
    dest2 = tmp_path / "d" / "out2.bin"
    (tmp_path / "d" / "out2.bin.part").write_bytes(b"garbage")
    assert download(src.as_uri(), dest2, md5=hashlib.md5(payload).hexdigest()).read_bytes() == payload


def test_replogle2022_sparse_source_gives_the_same_screen(tmp_path):
    src = make_fake_replogle(tmp_path / "dense.h5ad")
    src.X = sp.csr_matrix(src.X)
    src.write_h5ad(tmp_path / "sparse.h5ad")
    opts = {"min_cells_per_perturbation": 10, "n_top_genes": 12, "chunk_rows": 8}
    a = preprocess_replogle2022(tmp_path / "dense.h5ad", None, **opts)
    b = preprocess_replogle2022(tmp_path / "sparse.h5ad", None, **opts)
    assert list(a.var_names) == list(b.var_names) and list(a.obs_names) == list(b.obs_names)
    assert (a.X != b.X).nnz == 0


# ------------------------------------------------------------------------------- Kang 2018
def make_fake_kang(raw: Path, *, barcode_header: bool) -> dict[str, np.ndarray]:
    """The six batch-2 GEO files; the two samples share barcodes, as 10x runs do."""
    from data_recipes.kang2018 import FILES

    raw.mkdir(parents=True, exist_ok=True)
    n_genes = 30
    _gz_write(raw / "GSE96583_batch2.genes.tsv.gz", "".join(f"ENSG{j}\tS{j % 28}\n" for j in range(n_genes)))
    counts = {}
    rows = []
    for stim, mtx, bcf in [("ctrl", "GSM2560248_2.1.mtx.gz", "GSM2560248_barcodes.tsv.gz"),
                           ("stim", "GSM2560249_2.2.mtx.gz", "GSM2560249_barcodes.tsv.gz")]:  # fmt: skip
        barcodes = [f"BC{i:02d}-1" for i in range(12)]
        c = _norman_counts(n_genes, len(barcodes), seed=len(stim) + (stim == "stim"))
        counts[stim] = c
        buf = io.BytesIO()
        scipy.io.mmwrite(buf, sp.coo_matrix(c.T), field="integer")
        with gzip.open(raw / mtx, "wb") as fh:
            fh.write(buf.getvalue())
        _gz_write(raw / bcf, "".join(f"{b}\n" for b in barcodes))
        for i, b in enumerate(barcodes):
            if i == 11:
                continue  # not annotated
            multiplet = "doublet" if i == 10 else "singlet"
            rows.append((b, "1015", stim, 3, ["B cells", "NK cells"][i % 2], multiplet))
    annot = pd.DataFrame(rows, columns=["barcode", "ind", "stim", "cluster", "cell", "multiplets"])
    annot = annot.sample(frac=1.0, random_state=2)
    text = annot.to_csv(sep="\t", index=False)
    if not barcode_header:  # R's write.table: the header has no name for the row names
        text = text.split("\t", 1)[1]
    _gz_write(raw / "GSE96583_batch2.total.tsne.df.tsv.gz", text)
    assert sorted(p.name for p in raw.iterdir()) == sorted(FILES)
    return counts


@pytest.mark.parametrize("barcode_header", [True, False])
def test_preprocess_kang2018(tmp_path, barcode_header):
    from data_recipes.kang2018 import preprocess_kang2018

    counts = make_fake_kang(tmp_path / "raw", barcode_header=barcode_header)
    out = tmp_path / "kang.h5ad"
    adata = preprocess_kang2018(tmp_path / "raw", out, n_top_genes=0)
    assert adata.n_obs == 20  # 10 annotated singlets per sample
    assert list(adata.obs["condition"]) == ["control"] * 10 + ["stimulated"] * 10
    assert list(adata.obs_names[:2]) == ["BC00-1_ctrl", "BC01-1_ctrl"]
    assert list(adata.obs["cell_type"][:2]) == ["B cells", "NK cells"]
    assert adata.var_names.is_unique and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.toarray(), np.vstack([counts["ctrl"][:10], counts["stim"][:10]]))
    screen = load_screen(out, warn=False)
    assert screen.control_labels == ["control"] and screen.single_labels == ["stimulated"]
