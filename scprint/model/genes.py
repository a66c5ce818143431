"""Gene-level inputs of the model read from the pipeline's parquet files.

- gene_embeddings.parquet: index ``ensembl_gene_id``, float32 columns "0".."E-1".
- gene_positions.parquet: index ``ensembl_gene_id``, columns organism, chrom, start, end,
  pos (genomic rank within the organism, computed once by `scprint gene-positions`:
  scprint/embeddings/positions.py holds the rule and its tolerance).
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


def gene_ranks(positions: pd.DataFrame, genes: list[str]) -> list[int]:
    """Genomic rank per gene, in ``genes`` order: the positions parquet's ``pos`` as is, so
    training and the positions stage never disagree. Genes without a position get one rank
    past the last."""
    ranks = positions["pos"].reindex(genes)
    unplaced = int(ranks.max()) + 1 if ranks.notna().any() else 0
    return [int(r) for r in ranks.fillna(unplaced).astype(np.int64)]
