"""Protein sequences per gene from Ensembl peptide FASTA files (``*.pep.all.fa.gz``).

Headers look like (one line)::

    >ENSP00000493376.2 pep chromosome:GRCh38:1:65565:71585:1 gene:ENSG00000186092.7
    transcript:ENST00000641515.2 gene_biotype:protein_coding
    transcript_biotype:protein_coding gene_symbol:OR4F5 description:olfactory receptor ...

Canonical protein rule (one protein per gene): a protein whose header carries the tag
``Ensembl_canonical`` (as a bare token or inside ``tag:...``) wins; otherwise the longest
protein of the gene; equal lengths go to the smallest protein id, so the choice is
reproducible. Ensembl's own pep files mark the canonical transcript only in other files
(GTF ``tag "Ensembl_canonical"``), so with a stock pep.all file the rule is "longest
isoform"; the tag is honoured for FASTA files a user has annotated.
"""

from __future__ import annotations

import gzip
import logging
import os
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scprint.io import StageError

log = logging.getLogger(__name__)

CANONICAL_RULE = (
    "header tag Ensembl_canonical if present, else the longest protein of the gene, "
    "ties to the smallest protein id"
)
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Protein:
    protein_id: str
    gene_id: str  # unversioned
    transcript_id: str
    gene_biotype: str
    gene_symbol: str
    canonical_tag: bool
    sequence: str


def unversioned(ensembl_id: str) -> str:
    return ensembl_id.split(".", 1)[0]


def parse_header(header: str, where: str) -> dict:
    """Fields of one Ensembl pep header (without the sequence); ``where`` names it in errors."""
    text = header[1:].strip() if header.startswith(">") else header.strip()
    head, _, description = text.partition(" description:")
    tokens = head.split()
    if not tokens:
        raise StageError(f"{where}: empty FASTA header")
    fields = {"protein_id": tokens[0], "description": description, "flags": set()}
    for token in tokens[1:]:
        key, sep, value = token.partition(":")
        if sep:
            fields[key] = value
        else:
            fields["flags"].add(token)
    if not fields.get("gene"):
        raise StageError(
            f"{where}: the header {header[:120]!r} has no gene:<ENSEMBL id> field. This is not "
            "an Ensembl peptide FASTA (*.pep.all.fa.gz) or the file is damaged: use the "
            "Ensembl pep.all file for this organism, or delete the cached copy and run again "
            "to download it afresh."
        )
    return fields


def _is_canonical(fields: dict) -> bool:
    return "Ensembl_canonical" in fields["flags"] or "Ensembl_canonical" in fields.get("tag", "")


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="ascii")
    return open(path, encoding="ascii")


def read_fasta(path: str | Path) -> Iterator[Protein]:
    """Every protein in an Ensembl pep FASTA (gz or plain, told apart by content)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"FASTA {path} does not exist; give an existing file or a URL")
    fix = (
        f"delete {path} and download it again (a cached download is fetched afresh on the "
        "next run), or pass a complete file with --fasta ORG=PATH"
    )
    header, where, chunks, n = None, "", [], 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.startswith(">"):
                    if header is not None:
                        yield _protein(header, where, chunks)
                        n += 1
                    header, where, chunks = line.rstrip("\n"), f"{path}, line {lineno}", []
                    parse_header(header, where)  # fail on the first bad header, not at the end
                elif line.strip():
                    if header is None:
                        raise StageError(
                            f"{path}, line {lineno}: sequence before any '>' header; "
                            f"not a FASTA file. {fix}"
                        )
                    chunks.append(line.strip())
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise StageError(f"{path} is a truncated or corrupt gzip file ({err}); {fix}") from err
    except UnicodeDecodeError as err:
        raise StageError(f"{path} is not a text FASTA file ({err}); {fix}") from err
    if header is None:
        raise StageError(f"{path} holds no FASTA records; {fix}")
    yield _protein(header, where, chunks)
    log.debug("%s: %d proteins", path, n + 1)


def _protein(header: str, where: str, chunks: list[str]) -> Protein:
    fields = parse_header(header, where)
    return Protein(
        protein_id=fields["protein_id"],
        gene_id=unversioned(fields["gene"]),
        transcript_id=fields.get("transcript", ""),
        gene_biotype=fields.get("gene_biotype", ""),
        gene_symbol=fields.get("gene_symbol", ""),
        canonical_tag=_is_canonical(fields),
        sequence="".join(chunks).upper().rstrip("*"),
    )


def _rank(protein: Protein) -> tuple:
    """Smaller is preferred: tagged canonical, then longer, then the smaller protein id."""
    return (not protein.canonical_tag, -len(protein.sequence), protein.protein_id)


def canonical_proteins(proteins) -> dict[str, Protein]:
    """One protein per gene id by the module's canonical rule (empty sequences skipped)."""
    best: dict[str, Protein] = {}
    for protein in proteins:
        if not protein.sequence:
            continue
        current = best.get(protein.gene_id)
        if current is None or _rank(protein) < _rank(current):
            best[protein.gene_id] = protein
    return best


# -- where the FASTA comes from ---------------------------------------------------------


def ensembl_fasta_url(base_url: str, organism: str) -> str:
    """``<base>/<species>/pep/<Species>.<assembly>.pep.all.fa.gz`` for an NCBITaxon id."""
    from scprint.data.organisms import species as species_of
    from scprint.embeddings.organisms import ENSEMBL_ASSEMBLIES

    species = species_of(organism)
    if species not in ENSEMBL_ASSEMBLIES:
        raise StageError(
            f"no Ensembl assembly name known for {organism} ({species}); pass the peptide "
            f"FASTA with --fasta {organism}=PATH_OR_URL"
        )
    assembly = ENSEMBL_ASSEMBLIES[species]
    return f"{base_url.rstrip('/')}/{species}/pep/{species.capitalize()}.{assembly}.pep.all.fa.gz"


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp")


def cache_path(url: str, cache_dir: str | Path) -> Path:
    """Where ``url`` is kept: ``<cache_dir>/<host>/<url path>``, so releases never collide."""
    parsed = urllib.parse.urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    host = parsed.netloc.replace(":", "_")
    if not parts or not host or any(p in (".", "..") for p in parts):
        raise StageError(f"cannot cache {url!r}: the URL must name a file")
    return Path(cache_dir, host, *parts)


def fetch(url: str, cache_dir: str | Path, attempts: int = 3) -> Path:
    """The cached copy of ``url``, downloading it once if absent: through the stages' one
    HTTP path (scprint.data.http: retries, resume of a ``.part`` left by a killed run), then
    gzip-checked and renamed into the cache."""
    from scprint.data.http import discard_part, fetch_to_part

    target = cache_path(url, cache_dir)
    if target.is_file():
        log.info("using cached %s for %s", target, url)
        return target
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise StageError(f"cannot download {url}: only http(s):// urls are fetched; use https")
    log.info("downloading %s -> %s", url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    fetch_to_part(
        url,
        part,
        what=f"downloading {url}",
        label=target.name,
        retries=attempts - 1,
        fix=_offline_advice(target),
        refused_fix=_offline_advice(target),
    )
    problem = _gzip_problem(part, url)
    if problem:
        discard_part(part)  # and its If-Range record
        raise StageError(f"cannot download {url}: {problem}. {_offline_advice(target)}")
    os.replace(part, target)
    return target


def _gzip_problem(path: Path, url: str) -> str | None:
    """A gzip download must decompress to its end, else it is never put in the cache."""
    with open(path, "rb") as fh:
        if fh.read(2) != _GZIP_MAGIC:
            return None
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK):
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        return f"the gzip data from {url} is truncated or corrupt ({err})"
    return None


def _offline_advice(target: Path) -> str:
    return (
        f"On a node without internet, download it on a machine with internet to {target} "
        "(that exact path is the cache), or pass a local file with --fasta ORG=PATH"
    )


def resolve_fasta(
    organism: str, source: str | None, base_url: str, cache_dir: str | Path
) -> tuple[str, Path]:
    """(source as recorded in the metadata, local path) for one organism's peptide FASTA."""
    if source is None:
        source = ensembl_fasta_url(base_url, organism)
    if is_url(source):
        return source, fetch(source, cache_dir)
    path = Path(source)
    if not path.is_file():
        raise StageError(f"--fasta {organism}={source}: no such file")
    return str(path), path
