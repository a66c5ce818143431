"""Ontologies, preprocessing and the collection on one real laminDB instance (offline).

One instance per module (human only, to keep it quick): `scprint lamin-init`, `scprint
ontologies --source offline`, the demo datasets. Every stage runs as the CLI does, in a
subprocess, and bad inputs are real files built from the demo or shipped with scanpy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import cli_env, run_cli

from scprint.data import demo

HUMAN = "NCBITaxon:9606"
SMALL = ["--min-valid-genes-id", "500"]  # the demo has 1,200 genes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("stages")
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "results/lamin.json"], workdir)
    run_cli(["ontologies", "--organism", HUMAN, "--out", "results/ontologies.json"], workdir)
    demo.write_demo(workdir / "demo", n_genes=1200, seed=0)
    return workdir


def lamin_query(workdir: Path, code: str) -> object:
    """Run ``code`` (which sets ``result``) connected to the instance; returns result."""
    script = textwrap.dedent(
        """
        import json
        from scprint.data.lamin import connect
        ln = connect()
        import bionty as bt
        {code}
        print("RESULT=" + json.dumps(result))
        """
    ).format(code=textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=cli_env(workdir),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT=")[-1])


def preprocess(workdir: Path, dataset: str, source: Path, *extra: str, check=True):
    return run_cli(
        [
            "preprocess", "--dataset", dataset, "--input", source,
            "--out", f"processed/{dataset}.h5ad", "--report", f"reports/{dataset}.json",
            *SMALL, *extra,
        ],
        workdir,
        check=check,
    )  # fmt: skip


def demo_file(workdir: Path, dataset: str) -> Path:
    return workdir / "demo" / "datasets" / f"{dataset}.h5ad"


def test_ontologies_record_versions_and_parent_links(workdir):
    summary = json.loads((workdir / "results" / "ontologies.json").read_text())
    assert summary["genes"][HUMAN]["n_genes"] > 60_000
    assert summary["ontologies"]["CellType"]["n_terms"] > 3_000
    assert summary["ontologies"]["CellType"]["version"]["CL"].startswith("v")
    parents = lamin_query(
        workdir,
        """
        t = bt.CellType.get(ontology_id="CL:0000624")  # CD4-positive, alpha-beta T cell
        result = sorted(p.ontology_id for p in t.parents.all())
        """,
    )
    assert parents, "hierarchical labels need parent links"


def test_ontologies_rerun_is_idempotent(workdir):
    count = "result = [bt.CellType.objects.count(), bt.Gene.objects.count()]"
    before = lamin_query(workdir, count)
    started = time.perf_counter()
    run_cli(["ontologies", "--organism", HUMAN, "--out", "results/ontologies2.json"], workdir)
    assert lamin_query(workdir, count) == before
    first = json.loads((workdir / "results" / "ontologies.json").read_text())
    second = json.loads((workdir / "results" / "ontologies2.json").read_text())
    assert second["ontologies"]["CellType"]["n_terms"] == first["ontologies"]["CellType"]["n_terms"]
    print(f"ontologies rerun took {time.perf_counter() - started:.1f} s")


def test_preprocess_takes_raw_counts_from_raw_x(workdir):
    preprocess(workdir, "demo-human-lung", demo_file(workdir, "demo-human-lung"))
    report = json.loads((workdir / "reports" / "demo-human-lung.json").read_text())
    assert report["counts_from"] == "raw.X" and report["organism"] == HUMAN
    assert report["cells"]["before"] == 300 and report["cells"]["after"] > 0
    processed = ad.read_h5ad(workdir / "processed" / "demo-human-lung.h5ad")
    raw = ad.read_h5ad(demo_file(workdir, "demo-human-lung")).raw
    x = processed[:, raw.var_names].X
    x = x.toarray() if hasattr(x, "toarray") else x
    assert np.array_equal(x, np.round(x)), "processed X must hold the raw counts"
    assert (processed.obs["organism_ontology_term_id"] == HUMAN).all()


def _write_variant(workdir: Path, name: str, change) -> Path:
    adata = ad.read_h5ad(demo_file(workdir, "demo-human-blood"))
    adata = change(adata) or adata
    path = workdir / "bad" / f"{name}.h5ad"
    path.parent.mkdir(exist_ok=True)
    adata.write_h5ad(path)
    return path


def _symbols(adata):
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]


def _drop_cell_type(adata):
    del adata.obs["cell_type_ontology_term_id"]


def _unknown_term(adata):
    adata.obs["cell_type_ontology_term_id"] = "CL:9999999"


def _duplicate_ids(adata):
    adata.obs_names = ["same-cell"] * 5 + list(adata.obs_names[5:])


def _normalized(adata):
    adata.X = adata.X.multiply(1 / (adata.X.sum(axis=1) + 1)).tocsr()


BAD_INPUTS = {
    "gene-symbols": (_symbols, "symbols, not Ensembl ids"),
    "missing-obs": (
        _drop_cell_type,
        "required obs columns are missing: cell_type_ontology_term_id",
    ),
    "unknown-term": (_unknown_term, "CL:9999999"),
    "duplicated-ids": (_duplicate_ids, "cell ids occur more than once"),
    "normalized": (_normalized, "no raw counts anywhere"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_and_no_output(workdir, case):
    change, expected = BAD_INPUTS[case]
    path = _write_variant(workdir, case, change)
    proc = preprocess(workdir, case, path, check=False)
    assert proc.returncode == 1
    assert f"dataset {case}" in proc.stderr and expected in proc.stderr and "Fix" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "processed" / f"{case}.h5ad").exists()
    assert not (workdir / "reports" / f"{case}.json").exists()


def test_scanpy_pbmc68k_reduced_is_refused_as_normalized(workdir):
    import scanpy as sc

    path = workdir / "bad" / "pbmc68k.h5ad"
    path.parent.mkdir(exist_ok=True)
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    proc = preprocess(workdir, "pbmc68k", path, check=False)
    assert proc.returncode == 1 and "dataset pbmc68k" in proc.stderr
    assert "no raw counts anywhere" in proc.stderr


def test_zero_cells_after_filtering(workdir):
    proc = preprocess(
        workdir, "too-strict", demo_file(workdir, "demo-human-blood"), "--min-nnz-genes", "5000",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "zero cells left after filtering" in proc.stderr


def test_truncated_h5ad(workdir):
    data = demo_file(workdir, "demo-human-blood").read_bytes()
    path = workdir / "bad" / "truncated.h5ad"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    proc = preprocess(workdir, "truncated", path, check=False)
    assert proc.returncode == 1 and "corrupt or truncated" in proc.stderr


def test_collection_is_idempotent_versions_on_change_and_feeds_the_datamodule(workdir):
    for dataset in ("demo-human-blood", "demo-human-lung"):
        if not (workdir / "processed" / f"{dataset}.h5ad").exists():
            preprocess(workdir, dataset, demo_file(workdir, dataset))
    one = ["processed/demo-human-blood.h5ad"]
    both = [*one, "processed/demo-human-lung.h5ad"]
    run_cli(["collection", "--processed", *one, "--key", "t", "--out", "c1.json"], workdir)
    run_cli(["collection", "--processed", *both, "--key", "t", "--out", "c2.json"], workdir)
    run_cli(["collection", "--processed", *both, "--key", "t", "--out", "c3.json"], workdir)
    c1, c2, c3 = (json.loads((workdir / f"c{i}.json").read_text()) for i in (1, 2, 3))
    assert c1["n_datasets"] == 1 and c2["n_datasets"] == 2
    assert c2["uid"] != c1["uid"] and c3["uid"] == c2["uid"]  # new version only on change
    assert c2["n_cells"] == 660 and c2["organisms"] == [HUMAN]
    counts = lamin_query(
        workdir,
        """
        result = [ln.Artifact.filter(key__startswith="scprint/processed/").count(),
                  ln.Collection.filter(key="t").count()]
        """,
    )
    assert counts == [2, 2]  # artifacts reused, never duplicated; two collection versions
    batch = lamin_query(
        workdir,
        """
        from scdataloader import DataModule
        dm = DataModule(
            collection_name="t", organisms=["NCBITaxon:9606"],
            clss_to_predict=["organism_ontology_term_id", "cell_type_ontology_term_id"],
            hierarchical_clss=["cell_type_ontology_term_id"], how="random expr",
            max_len=64, weight_scaler=0, batch_size=8, num_workers=0, validation_split=0.1,
            test_split=0,
        )
        dm.setup()
        b = next(iter(dm.train_dataloader()))
        result = {k: list(v.shape) for k, v in b.items() if hasattr(v, "shape")}
        """,
    )
    assert batch["x"] == [8, 64] and batch["genes"] == [8, 64]
