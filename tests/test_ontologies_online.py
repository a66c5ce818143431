"""`scprint ontologies --source online`: bionty's own import from its public asset store,
served by a real HTTP server on 127.0.0.1 that s3fs reaches through AWS_ENDPOINT_URL (the
same variable a site with an S3 mirror of bionty-assets sets). Nothing leaves loopback.
"""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest
from bionty_assets import current_sources, gene_sample, ontology_sample, serve_assets
from conftest import cli_env, run_cli
from http_server import FileServer

from scprint.data.ontologies import REGISTRIES

HUMAN = "NCBITaxon:9606"
N_TERMS = 25  # sampled per ontology, before adding their ancestors
N_GENES = 300


def db(workdir):
    return workdir / "lamin" / "storage" / ".lamindb" / "lamin.db"


def query(workdir, sql: str, *params):
    with sqlite3.connect(f"file:{db(workdir)}?mode=ro", uri=True) as con:
        return con.execute(sql, params).fetchall()


def parent_pairs(workdir, registry: str) -> set[tuple[str, str]]:
    name = registry.lower()
    return set(
        query(
            workdir,
            f"SELECT c.ontology_id, p.ontology_id FROM bionty_{name}_parents l "
            f"JOIN bionty_{name} c ON c.id = l.from_{name}_id "
            f"JOIN bionty_{name} p ON p.id = l.to_{name}_id",
        )
    )


def new_instance(tmp_path_factory, name: str):
    workdir = tmp_path_factory.mktemp(name)
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=workdir)
    return workdir


# sources bionty marks current that scdataloader does not use, keyed like `sources` below
DECOYS = {("bionty.Disease", "doid"): "DOID", ("bionty.Phenotype", "hp"): "HP"}


def decoy_table(prefix: str) -> pd.DataFrame:
    """Three terms of an ontology we must not import, in bionty's table layout."""
    ids = [f"{prefix}:{n:07d}" for n in (1, 2, 3)]
    return pd.DataFrame(
        {
            "name": [f"{prefix} decoy {n}" for n in (1, 2, 3)],
            "definition": None,
            "synonyms": None,
            "parents": [[], [ids[0]], [ids[0]]],
        },
        index=pd.Index(ids, name="ontology_id"),
    )


ARGS = ["ontologies", "--source", "online", "--organism", HUMAN, "--out", "results/ontologies.json"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An instance populated online from the stand-in store, then populated again."""
    workdir = new_instance(tmp_path_factory, "online")
    # ontologies by (entity, source name); genes by (entity, organism)
    sources = {
        (s.entity, s.organism if s.entity == "bionty.Gene" else s.name): s
        for s in current_sources(db(workdir))
    }
    served = {}
    for spec in REGISTRIES:
        for ontology in spec.ontologies:
            source = sources[(f"bionty.{spec.registry}", ontology.lower())]
            served[source] = ontology_sample(ontology, N_TERMS)
    gene_source = sources[("bionty.Gene", "human")]
    served[gene_source] = gene_sample(HUMAN, N_GENES)
    # bionty also marks DOID (Disease) and HP (Phenotype) current: serve them too, so an
    # import of every current source would land them and test_only_the_ontologies... fails
    decoys = {sources[key]: decoy_table(prefix) for key, prefix in DECOYS.items()}
    with FileServer() as server:
        serve_assets(server, served | decoys)
        env = cli_env(workdir, AWS_ENDPOINT_URL=server.url(""))
        env.pop("BIONTY_ROOT_DIR", None)
        first = run_cli(ARGS, cwd=workdir, env=env)
        result = json.loads((workdir / "results" / "ontologies.json").read_text())
        gets_first = sum(r.method == "GET" for r in server.requests)
        counts_first = {
            spec.registry: result["ontologies"][spec.registry]["n_terms"] for spec in REGISTRIES
        }
        run_cli(ARGS, cwd=workdir, env=env)
        rerun = json.loads((workdir / "results" / "ontologies.json").read_text())
        gets_rerun = sum(r.method == "GET" for r in server.requests) - gets_first
    return {
        "workdir": workdir,
        "served": served,
        "decoys": decoys,
        "requested": {r.path.rsplit("/", 1)[-1] for r in server.requests},
        "sources": sources,
        "result": result,
        "rerun": rerun,
        "counts_first": counts_first,
        "gets_first": gets_first,
        "gets_rerun": gets_rerun,
        "log": first.stderr,
    }


def test_each_registry_holds_what_the_store_served(store):
    workdir, result = store["workdir"], store["result"]
    assert result["source"] == "online"
    for spec in REGISTRIES:
        tables = [
            store["served"][store["sources"][(f"bionty.{spec.registry}", o.lower())]]
            for o in spec.ontologies
        ]
        served_ids = set().union(*(set(t.index) for t in tables))
        extras = {oid for oid, _ in spec.extras}
        table = f"bionty_{spec.registry.lower()}"
        have = [oid for (oid,) in query(workdir, f"SELECT ontology_id FROM {table}")]
        assert len(have) == len(set(have)), spec.registry  # no duplicates
        assert set(have) == served_ids | extras, spec.registry
        served_links = {(c, p) for t in tables for c, ps in t["parents"].items() for p in ps}
        assert parent_pairs(workdir, spec.registry) == served_links, spec.registry
        entry = result["ontologies"][spec.registry]
        assert entry["source"] == "online: bionty public sources"
        assert entry["n_terms"] == len(served_ids | extras)
        assert entry["n_parent_links"] == len(served_links)
        for ontology in spec.ontologies:
            source = store["sources"][(f"bionty.{spec.registry}", ontology.lower())]
            assert entry["version"][source.name] == source.version


def test_only_the_ontologies_scdataloader_uses(store):
    """bionty also marks DOID (Disease) and HP (Phenotype) as current; the stand-in store
    serves them, and they are neither downloaded nor imported."""
    workdir = store["workdir"]
    assert len(store["decoys"]) == 2  # both are current sources of a fresh instance
    assert not {s.filename for s in store["decoys"]} & store["requested"]
    assert query(
        workdir, "SELECT count(*) FROM bionty_disease WHERE ontology_id LIKE 'DOID:%'"
    ) == [(0,)]
    assert query(
        workdir, "SELECT count(*) FROM bionty_phenotype WHERE ontology_id LIKE 'HP:%'"
    ) == [(0,)]


def test_genes_from_the_store(store):
    workdir, result = store["workdir"], store["result"]
    genes = store["served"][store["sources"][("bionty.Gene", "human")]]
    rows = query(
        workdir,
        "SELECT g.ensembl_gene_id, g.symbol, o.name FROM bionty_gene g "
        "JOIN bionty_organism o ON o.id = g.organism_id",
    )
    assert {r[0] for r in rows} == set(genes.ensembl_gene_id)
    assert {r[2] for r in rows} == {"human"}
    assert result["genes"][HUMAN]["n_genes"] == len(genes)
    assert result["genes"][HUMAN]["version"].startswith("ensembl release-")
    assert query(workdir, "SELECT name FROM bionty_organism WHERE ontology_id = ?", HUMAN) == [
        ("human",)
    ]


def test_scdataloader_extra_terms(store):
    workdir = store["workdir"]
    assert query(workdir, "SELECT name FROM bionty_disease WHERE ontology_id='PATO:0000461'") == [
        ("normal",)
    ]
    for spec in REGISTRIES:
        table = f"bionty_{spec.registry.lower()}"
        assert query(workdir, f"SELECT name FROM {table} WHERE ontology_id='unknown'"), table


def test_downloads_cached_beside_the_instance(store):
    """bionty's cache goes to resources/bionty (its package folder may be read-only), and a
    rerun reads it instead of downloading again, with the same registries."""
    cached = {p.name for p in (store["workdir"] / "resources" / "bionty").glob("*.parquet")}
    assert {s.filename for s in store["served"]} <= cached
    assert store["gets_first"] >= len(store["served"])
    assert store["gets_rerun"] == 0
    rerun = {
        spec.registry: store["rerun"]["ontologies"][spec.registry]["n_terms"] for spec in REGISTRIES
    }
    assert rerun == store["counts_first"]


def test_unreachable_store_is_a_clear_error_and_leaves_registries_empty(tmp_path_factory):
    workdir = new_instance(tmp_path_factory, "online-down")
    with FileServer() as server:
        dead = server.url("")  # a loopback port nobody listens on once stopped
    env = cli_env(workdir, AWS_ENDPOINT_URL=dead, AWS_MAX_ATTEMPTS="1")
    proc = run_cli(ARGS, cwd=workdir, env=env, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "online import of CellType (cl " in proc.stderr
    assert "--source offline" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr
    assert query(workdir, "SELECT count(*) FROM bionty_celltype") == [(0,)]
    assert not (workdir / "results" / "ontologies.json").exists()
