"""`scprint ontologies` offline, on a real laminDB instance (SQLite) in a tmp folder.

One instance for the module: its first populate is killed partway (SIGKILL), the second
completes it, and the tests check the result equals what the ontology files hold, so the
kill-and-rerun path is what every test here sees.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

HUMAN = "NCBITaxon:9606"
# registry table -> cellxgene-ontology-guide ontologies + extra terms we add
EXPECTED = {
    "bionty_celltype": (["CL"], 1),
    "bionty_tissue": (["UBERON"], 1),
    "bionty_disease": (["MONDO"], 2),
    "bionty_developmentalstage": (["HsapDv", "MmusDv"], 1),
    "bionty_ethnicity": (["HANCESTRO"], 2),
    "bionty_experimentalfactor": (["EFO"], 1),
    "bionty_phenotype": (["PATO"], 1),
}


def db_path(workdir: Path) -> Path:
    return workdir / "lamin" / "storage" / ".lamindb" / "lamin.db"


def query(workdir: Path, sql: str, *params):
    with sqlite3.connect(f"file:{db_path(workdir)}?mode=ro", uri=True) as con:
        return con.execute(sql, params).fetchall()


def count(workdir: Path, table: str) -> int:
    return query(workdir, f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """An instance whose first populate was killed after CellType was committed."""
    workdir = tmp_path_factory.mktemp("ontologies")
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=workdir)
    args = [
        "ontologies",
        "--source",
        "offline",
        "--organism",
        HUMAN,
        "--out",
        "results/ontologies.json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scprint.cli", *args],
        cwd=workdir,
        env=cli_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while proc.poll() is None and count(workdir, "bionty_celltype") == 0:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed = {
        "returncode": proc.returncode,
        "celltypes": count(workdir, "bionty_celltype"),
        "genes": count(workdir, "bionty_gene"),
        "output_written": (workdir / "results" / "ontologies.json").exists(),
    }
    first = run_cli(args, cwd=workdir)
    result = json.loads((workdir / "results" / "ontologies.json").read_text())
    return {
        "workdir": workdir,
        "args": args,
        "killed": killed,
        "result": result,
        "log": first.stderr,
    }


def ontology_terms(name: str) -> dict:
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser().cxg_schema.ontology(name)


def test_kill_left_a_partial_database_and_no_output(instance):
    killed = instance["killed"]
    assert killed["returncode"] == -signal.SIGKILL
    assert killed["celltypes"] > 0  # CellType was committed ...
    assert killed["genes"] == 0  # ... genes were not reached
    assert not killed["output_written"]


def test_every_registry_holds_its_ontologies_once(instance):
    workdir = instance["workdir"]
    for table, (ontologies, n_extra) in EXPECTED.items():
        n_file_terms = sum(len(ontology_terms(o)) for o in ontologies)
        assert count(workdir, table) == n_file_terms + n_extra, table
        dupes = query(
            workdir, f"SELECT ontology_id FROM {table} GROUP BY ontology_id HAVING count(*) > 1"
        )
        assert dupes == [], table
    registries = instance["result"]["ontologies"]
    assert registries["CellType"]["n_terms"] == len(ontology_terms("CL")) + 1
    assert registries["CellType"]["version"]["CL"].startswith("v")
    assert "cellxgene-ontology-guide" in registries["Tissue"]["source"]


def test_parent_links_match_the_ontology(instance):
    workdir = instance["workdir"]
    parents = query(
        workdir,
        "SELECT p.ontology_id FROM bionty_celltype_parents l "
        "JOIN bionty_celltype c ON c.id = l.from_celltype_id "
        "JOIN bionty_celltype p ON p.id = l.to_celltype_id WHERE c.ontology_id = ?",
        "CL:0000236",  # B cell
    )
    cl = ontology_terms("CL")
    expected = {a for a, d in cl["CL:0000236"]["ancestors"].items() if d == 1}
    assert {p for (p,) in parents} == expected
    n_links = sum(1 for t in cl.values() for d in t["ancestors"].values() if d == 1)
    assert count(workdir, "bionty_celltype_parents") == n_links
    assert instance["result"]["ontologies"]["CellType"]["n_parent_links"] == n_links


def test_scdataloader_extra_terms_exist(instance):
    workdir = instance["workdir"]
    for table in [*EXPECTED, "bionty_organism"]:
        assert query(workdir, f"SELECT name FROM {table} WHERE ontology_id = 'unknown'") == [
            ("unknown",)
        ], table
    assert query(workdir, "SELECT name FROM bionty_disease WHERE ontology_id='PATO:0000461'") == [
        ("normal",)
    ]
    assert query(workdir, "SELECT name FROM bionty_ethnicity WHERE ontology_id='multiethnic'")


def test_genes_of_the_organism(instance):
    from scprint.data.organisms import gene_table

    workdir = instance["workdir"]
    genes = gene_table(HUMAN)
    rows = query(
        workdir,
        "SELECT g.symbol, g.biotype, o.name FROM bionty_gene g "
        "JOIN bionty_organism o ON o.id = g.organism_id WHERE g.ensembl_gene_id = ?",
        "ENSG00000141510",
    )
    assert rows == [("TP53", "protein_coding", "human")]
    assert count(workdir, "bionty_gene") == len(genes)
    assert instance["result"]["genes"][HUMAN]["n_genes"] == len(genes)
    assert instance["result"]["genes"][HUMAN]["version"].startswith("GENCODE")
    assert instance["result"]["database_bytes"] == db_path(workdir).stat().st_size


def test_scdataloader_reads_the_registries(instance):
    """load_genes and the hierarchy scdataloader builds, in a process of their own."""
    script = (
        "from scprint.data.lamin import connect; connect()\n"
        "import bionty as bt, json\n"
        "from scdataloader.utils import load_genes, get_all_ancestors\n"
        "genes = load_genes('NCBITaxon:9606')\n"
        "df = bt.CellType.filter().to_dataframe(limit=None, include=['parents__ontology_id',"
        " 'ontology_id']).set_index('ontology_id')\n"
        "print('RESULT', json.dumps({'genes': len(genes), 'unique': bool(df.index.is_unique),"
        " 'b_cell_ancestors': sorted(a for a in get_all_ancestors('CL:0000236', df) if a)}))\n"
    )
    workdir = instance["workdir"]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        env=cli_env(workdir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["unique"]
    assert result["genes"] > 60_000
    assert "CL:0000542" in result["b_cell_ancestors"]  # lymphocyte
    assert "CL:0000000" in result["b_cell_ancestors"]  # cell


def test_rerun_is_idempotent(instance):
    workdir = instance["workdir"]
    tables = [*EXPECTED, "bionty_gene", "bionty_organism", "bionty_celltype_parents"]
    before = {t: count(workdir, t) for t in tables}
    run_cli([*instance["args"][:-1], "results/rerun.json"], cwd=workdir)
    assert {t: count(workdir, t) for t in tables} == before
    rerun = json.loads((workdir / "results" / "rerun.json").read_text())
    for volatile in ("duration_s", "database_bytes"):
        rerun.pop(volatile)
    first = dict(instance["result"])
    for volatile in ("duration_s", "database_bytes"):
        first.pop(volatile)
    assert rerun == first


def test_unsupported_organism_is_refused(instance):
    proc = run_cli(
        ["ontologies", "--organism", "NCBITaxon:1", "--out", "results/bad.json"],
        cwd=instance["workdir"],
        check=False,
    )
    assert proc.returncode == 1
    assert "NCBITaxon:1" in proc.stderr and "NCBITaxon:9606 (human)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (instance["workdir"] / "results" / "bad.json").exists()
