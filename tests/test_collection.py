"""`scprint collection` on datasets preprocessed for real, then scdataloader's DataModule.

One laminDB instance for the module; the tests run in file order, each starting from the
registry state the previous one left (failure, kill, rerun, a changed set, DataModule).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from test_preprocess import HUMAN, SMALL_PANEL, make_dataset, preprocess

KEY = "scprint-pretrain"
DATASETS = ["ds-a", "ds-b"]


def query(workdir: Path, sql: str, *params):
    db = workdir / "lamin" / "storage" / ".lamindb" / "lamin.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute(sql, params).fetchall()


def n_artifacts(workdir: Path) -> int:
    return query(workdir, "SELECT count(*) FROM lamindb_artifact WHERE key LIKE 'scprint/%'")[0][0]


def collections(workdir: Path) -> list[tuple]:
    return query(
        workdir, "SELECT uid, is_latest FROM lamindb_collection WHERE key = ? ORDER BY id", KEY
    )


def collection_cli(workdir: Path, datasets: list[str], out: str, check=True, **env):
    processed = [f"data/processed/{d}.h5ad" for d in datasets]
    return run_cli(
        ["collection", "--processed", *processed, "--key", KEY, "--out", out],
        cwd=workdir,
        env=cli_env(workdir, **env),
        check=check,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("collection")
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=workdir)
    run_cli(["ontologies", "--organism", HUMAN, "--out", "results/ontologies.json"], cwd=workdir)
    (workdir / "data" / "raw").mkdir(parents=True)
    for seed, dataset in enumerate(DATASETS):
        make_dataset(seed=seed, layout="raw" if seed else "X").write_h5ad(
            workdir / "data" / "raw" / f"{dataset}.h5ad"
        )
        preprocess(workdir, dataset, *SMALL_PANEL)
    return workdir


def test_failure_after_first_artifact_registers_nothing(workdir):
    proc = collection_cli(
        workdir, DATASETS, "results/collection.json", check=False,
        SCPRINT_FAULT_COLLECTION="fail-after:1",
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"collection '{KEY}'" in proc.stderr and "Nothing was registered" in proc.stderr
    assert n_artifacts(workdir) == 0
    assert collections(workdir) == []
    assert not (workdir / "results" / "collection.json").exists()
    assert not list((workdir / "lamin" / "storage" / ".lamindb").glob("*.h5ad"))


def test_kill_after_first_artifact_then_rerun(workdir):
    proc = collection_cli(
        workdir, DATASETS, "results/collection.json", check=False,
        SCPRINT_FAULT_COLLECTION="kill-after:1",
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert n_artifacts(workdir) == 1  # the first dataset stays registered ...
    assert collections(workdir) == []  # ... but no collection exists
    assert not (workdir / "results" / "collection.json").exists()
    (first_uid,) = query(workdir, "SELECT uid FROM lamindb_artifact WHERE key LIKE 'scprint/%'")[0]

    collection_cli(workdir, DATASETS, "results/collection.json")
    summary = json.loads((workdir / "results" / "collection.json").read_text())
    assert n_artifacts(workdir) == 2  # reused, not duplicated
    assert summary["datasets"][0]["artifact_uid"] == first_uid
    assert collections(workdir) == [(summary["uid"], 1)]
    assert summary["key"] == KEY
    assert summary["n_datasets"] == 2
    assert summary["n_cells"] == 240
    assert [d["dataset"] for d in summary["datasets"]] == DATASETS
    assert summary["organisms"] == [HUMAN]
    linked = query(
        workdir,
        "SELECT a.key FROM lamindb_collectionartifact l JOIN lamindb_collection c "
        "ON c.id = l.collection_id JOIN lamindb_artifact a ON a.id = l.artifact_id "
        "WHERE c.uid = ? ORDER BY l.id",
        summary["uid"],
    )
    assert linked == [(f"scprint/processed/{d}.h5ad",) for d in DATASETS]


def test_rerun_with_the_same_set_changes_nothing(workdir):
    before = json.loads((workdir / "results" / "collection.json").read_text())
    collection_cli(workdir, list(reversed(DATASETS)), "results/rerun.json")  # order-free
    assert json.loads((workdir / "results" / "rerun.json").read_text()) == before
    assert n_artifacts(workdir) == 2
    assert collections(workdir) == [(before["uid"], 1)]


def test_a_changed_set_is_a_new_version(workdir):
    first = json.loads((workdir / "results" / "collection.json").read_text())
    collection_cli(workdir, DATASETS[:1], "results/one.json")
    one = json.loads((workdir / "results" / "one.json").read_text())
    assert one["uid"] != first["uid"] and one["n_datasets"] == 1 and one["n_cells"] == 120
    assert collections(workdir) == [(first["uid"], 0), (one["uid"], 1)]
    # back to both datasets: the first version (laminDB keeps one per set) is latest again
    collection_cli(workdir, DATASETS, "results/collection.json")
    again = json.loads((workdir / "results" / "collection.json").read_text())
    assert again == first
    assert collections(workdir) == [(first["uid"], 1), (one["uid"], 0)]
    assert n_artifacts(workdir) == 2


def test_unprocessed_file_is_refused(workdir):
    proc = run_cli(
        ["collection", "--processed", "data/raw/ds-a.h5ad", "--key", KEY, "--out", "x.json"],
        cwd=workdir,
        check=False,
    )
    assert proc.returncode == 1
    assert "not an output of `scprint preprocess`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refused_dataset_skipped_or_stops_and_versions_recorded(workdir):
    """A dataset preprocess refused (its cell-less record) is left out and listed with
    its reason (skip), or stops the stage (stop); each file's version comes from its row."""
    from scprint.data.listing import DatasetRow, format_listing
    from scprint.data.preprocess import write_refused

    write_refused(workdir / "data/processed/ds-r.h5ad", "ds-r", "dataset ds-r: no raw counts")
    rows = workdir / "results" / "listing"
    rows.mkdir(parents=True, exist_ok=True)
    for dataset in [*DATASETS, "ds-r"]:
        row = DatasetRow(
            dataset, "t", (HUMAN,), (), 120, "u", None, dataset_version_id=f"v2-{dataset}"
        )
        (rows / f"{dataset}.tsv").write_text(format_listing([row]))
    before = json.loads((workdir / "results" / "collection.json").read_text())
    args = ["collection", "--processed", *[f"data/processed/{d}.h5ad" for d in [*DATASETS, "ds-r"]],
            "--key", KEY, "--listing", *sorted(rows.glob("*.tsv"))]  # fmt: skip
    proc = run_cli([*args, "--out", "stop.json", "--on-refused", "stop"], cwd=workdir, check=False)
    assert proc.returncode == 1 and not (workdir / "stop.json").exists()
    assert (
        "1 dataset(s) were refused" in proc.stderr
        and "ds-r: dataset ds-r: no raw counts" in proc.stderr
    )
    assert "datasets.on_refused: skip" in proc.stderr

    run_cli([*args, "--out", "skip.json", "--on-refused", "skip"], cwd=workdir)
    summary = json.loads((workdir / "skip.json").read_text())
    assert summary["uid"] == before["uid"]  # the same two datasets: the same collection
    assert [d["dataset_version_id"] for d in summary["datasets"]] == ["v2-ds-a", "v2-ds-b"]
    (refused,) = summary["refused"]
    assert refused["dataset"] == "ds-r" and refused["reason"] == "dataset ds-r: no raw counts"
    assert n_artifacts(workdir) == 2  # nothing of ds-r registered


DATAMODULE_SCRIPT = """
import json, sys
from scprint.data.lamin import connect
connect()
from scdataloader import DataModule

classes = ["organism_ontology_term_id", "cell_type_ontology_term_id",
           "sex_ontology_term_id", "assay_ontology_term_id"]
dm = DataModule(
    collection_name=sys.argv[1], organisms=["NCBITaxon:9606"], clss_to_predict=classes,
    hierarchical_clss=["cell_type_ontology_term_id"], how="random expr", max_len=64,
    weight_scaler=0, batch_size=8, num_workers=0, validation_split=0.2, test_split=0,
)
dm.setup()
batch = next(iter(dm.train_dataloader()))
print("RESULT " + json.dumps({
    "shapes": {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
    "n_samples": dm.n_samples, "num_datasets": dm.num_datasets, "classes": dm.classes,
    "x_sum": float(batch["x"].sum()), "genes_max": int(batch["genes"].max()),
    "n_genes": len(dm.genes),
    "b_cell_parents": len(dm.labels_hierarchy["cell_type_ontology_term_id"]),
}))
"""


def test_datamodule_yields_batches(workdir):
    proc = subprocess.run(
        [sys.executable, "-c", DATAMODULE_SCRIPT, KEY],
        cwd=workdir,
        env=cli_env(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["n_samples"] == 240 and result["num_datasets"] == 2
    assert result["shapes"]["x"] == [8, 64] and result["shapes"]["genes"] == [8, 64]
    assert result["shapes"]["class"] == [8, 4]
    assert result["x_sum"] > 0  # real counts came through
    assert result["genes_max"] < result["n_genes"]
    assert result["classes"]["cell_type_ontology_term_id"] == 3
    assert result["classes"]["sex_ontology_term_id"] == 2
    assert result["b_cell_parents"] > 0  # hierarchy from the parent links
