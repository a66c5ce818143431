"""Gene-level inputs of the model read from the pipeline's parquet files.

- gene_embeddings.parquet: index ``ensembl_gene_id``, float32 columns "0".."E-1".
- gene_positions.parquet: index ``ensembl_gene_id``, columns organism, chrom, start, end,
  pos (genomic rank within the organism).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scprint.io import StageError


def read_gene_embeddings(path: str | Path, genes: list[str]) -> np.ndarray:
    """Rows of the embedding table for ``genes``, in that order: (len(genes), E) float32."""
    path = Path(path)
    if not path.exists():
        raise StageError(
            f"gene embeddings {path} do not exist: run the gene_embeddings rule (`scprint "
            "gene-embeddings`) or set data.gene_embeddings to an existing parquet"
        )
    table = pd.read_parquet(path)
    missing = pd.Index(genes).difference(table.index)
    if len(missing):
        raise StageError(
            f"{len(missing)} of {len(genes)} genes have no row in {path} (e.g. "
            f"{', '.join(missing[:3])}): the gene list and the embeddings come from different "
            "gene tables; recompute the embeddings for this collection's organisms"
        )
    return table.loc[genes].to_numpy(dtype=np.float32)


def gene_ranks(positions: pd.DataFrame, genes: list[str], tolerance: int | None) -> list[int]:
    """Genomic rank per gene, in ``genes`` order.

    With ``tolerance`` None the parquet's ``pos`` is used as is. Otherwise ranks are
    recomputed per organism: genes sorted by (chrom, start) share a rank while each starts
    within ``tolerance`` bp of the previous one (neighbouring genes look alike to the model),
    and a new chromosome always starts a new rank. Genes without a position get one rank
    past the last.
    """
    known = positions.loc[positions.index.intersection(genes)]
    if tolerance is None:
        ranks = known["pos"].astype(np.int64)
    else:
        parts = []
        for _, df in known.groupby("organism", sort=True):
            df = df.sort_values(["chrom", "start"], kind="stable")
            new_chrom = df["chrom"].ne(df["chrom"].shift())
            far = df["start"].diff().fillna(0).abs().gt(tolerance)
            step = (new_chrom | far).astype(np.int64)
            step.iloc[0] = 0
            parts.append(step.cumsum())
        ranks = pd.concat(parts) if parts else pd.Series(dtype=np.int64)
    unplaced = int(ranks.max()) + 1 if len(ranks) else 0
    return [int(r) for r in ranks.reindex(genes).fillna(unplaced).astype(np.int64)]
