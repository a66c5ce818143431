"""`scprint report-genes`: the Genes category of the report.

- embedding coverage per organism: genes with an ESM2 embedding, protein-coding genes
  without a protein in the FASTA (the gene_embeddings missing report) and the other genes
  of the positions table (non-coding: no protein expected);
- genes per chromosome per organism from the gene positions, split by whether they have an
  embedding, with the number of distinct genomic ranks (``pos``) per chromosome.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scprint.report.common import pyplot, save_figure

log = logging.getLogger(__name__)

MAX_CHROMOSOMES = 30  # named chromosomes first; further scaffolds are summed as "other"


def coverage(positions, embedded: set[str], missing):
    """Per organism: genes with an embedding, protein-coding without one, the rest."""
    import pandas as pd

    rows = []
    for organism, genes in positions.groupby("organism", sort=True):
        has = genes.index.isin(list(embedded))
        no_protein = int((missing["organism"] == organism).sum())
        rows.append(
            {
                "organism": organism,
                "with embedding": int(has.sum()),
                "protein-coding, no protein": no_protein,
                "other genes": max(0, len(genes) - int(has.sum()) - no_protein),
            }
        )
    return pd.DataFrame(rows).set_index("organism")


def plot_coverage(table, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.6 * len(table)))
    left = np.zeros(len(table))
    colors = ("#31a354", "#e34a33", "#bdbdbd")
    y = np.arange(len(table))
    for column, color in zip(table.columns, colors, strict=True):
        ax.barh(y, table[column], left=left, color=color, label=column)
        left += table[column].to_numpy()
    labels = [f"{o}\n{row['with embedding']:,} embedded" for o, row in table.iterrows()]
    ax.set_yticks(y, labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("genes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Gene embedding coverage per organism")
    save_figure(fig, out)


def plot_chromosomes(positions, embedded: set[str], out: Path) -> None:
    from scprint.data.organisms import chrom_sort_key

    plt = pyplot()
    organisms = sorted(positions["organism"].unique())
    fig, axes = plt.subplots(len(organisms), 1, figsize=(10, 3 * len(organisms)), squeeze=False)
    for ax, organism in zip(axes[:, 0], organisms, strict=True):
        genes = positions[positions["organism"] == organism]
        chroms = sorted(genes["chrom"].astype(str).unique(), key=chrom_sort_key)
        shown = chroms[:MAX_CHROMOSOMES]
        chrom = genes["chrom"].astype(str).where(genes["chrom"].astype(str).isin(shown), "other")
        order = shown + (["other"] if len(chroms) > len(shown) else [])
        has = genes.index.isin(list(embedded))
        with_emb = chrom[has].value_counts().reindex(order, fill_value=0)
        without = chrom[~has].value_counts().reindex(order, fill_value=0)
        ranks = genes.groupby(chrom)["pos"].nunique().reindex(order, fill_value=0)
        x = np.arange(len(order))
        ax.bar(x, with_emb, color="#31a354", label="with embedding")
        ax.bar(x, without, bottom=with_emb, color="#bdbdbd", label="without")
        ax.plot(x, ranks, "k.", label="genomic ranks (pos)")
        ax.set_xticks(x, order, rotation=90, fontsize=8)
        ax.set_ylabel("genes")
        ax.set_title(f"{organism}: {len(genes):,} genes on {len(chroms)} sequences")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positions", required=True, help="data/main/gene_positions.parquet")
    parser.add_argument("--embeddings", required=True, help="data/main/gene_embeddings.parquet")
    parser.add_argument("--missing", required=True, help="results/gene_embeddings_missing.tsv")
    parser.add_argument("--coverage", required=True, help="PNG: embedding coverage")
    parser.add_argument("--chromosomes", required=True, help="PNG: genes per chromosome")


def run(args: argparse.Namespace) -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    positions = pd.read_parquet(args.positions)
    schema = pq.read_schema(args.embeddings)
    index = schema.pandas_metadata["index_columns"][0] if schema.pandas_metadata else None
    column = index if isinstance(index, str) else "ensembl_gene_id"
    embedded = set(pq.read_table(args.embeddings, columns=[column]).column(0).to_pylist())
    missing = pd.read_csv(args.missing, sep="\t")
    table = coverage(positions, embedded, missing)
    plot_coverage(table, Path(args.coverage))
    plot_chromosomes(positions, embedded, Path(args.chromosomes))
    log.info("genes report:\n%s", table.to_string())
