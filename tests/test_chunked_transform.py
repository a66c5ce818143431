"""The chunked path's per-chunk transform against scanpy's QC on the same cells, on what the
whole-file comparisons (tests/test_preprocess.py) don't hold: explicit stored zeros, genes
unknown to the registry, var in an order other than the registry's, empty and filtered
cells. A hand-made gene table: no database needed, well under a second."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scprint.data import chunked


def registry(n: int = 60) -> pd.DataFrame:
    """A gene table shaped like scdataloader's load_genes (index: Ensembl id)."""
    ids = [f"ENSG{i:011d}" for i in range(n)]
    symbols = [f"MT-{i}" if i < 4 else f"RPL{i}" if i < 10 else f"HB{i}" if i < 12 else f"G{i}"
               for i in range(n)]  # fmt: skip
    genes = pd.DataFrame({"symbol": symbols}, index=pd.Index(ids, name="ensembl_gene_id"))
    genes["mt"] = genes.symbol.str.startswith("MT-")
    genes["ribo"] = genes.symbol.str.startswith("RPL")
    genes["hb"] = genes.symbol.str.startswith("HB")
    return genes


@pytest.mark.parametrize("min_nnz_genes", [0, 8, 10**6])
def test_transform_equals_scanpy_qc_on_the_remapped_cells(min_nnz_genes):
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(3)
    genes = registry()
    known = list(rng.permutation(genes.index[:50]))  # registry order shuffled; 10 absent
    ids = known[:25] + [f"UNKNOWN{i}" for i in range(5)] + known[25:]
    var = pd.DataFrame(index=ids)
    counts = sp.random(40, len(ids), density=0.3, random_state=4, format="csr", dtype=np.float32)
    counts.data = rng.integers(0, 6, counts.nnz).astype(np.float32)  # some stored zeros
    counts.data[counts.indptr[7] : counts.indptr[8]] = 0  # a cell with stored zeros only
    assert (counts.data == 0).any()

    genemap = chunked.map_genes(var, genes, is_symbol=False)
    part = chunked.transform(counts, genemap, min_nnz_genes, np.float32)

    # the reference: the cells kept, each count moved to its gene's column by name
    dense = counts.toarray()
    expressed = (dense > 0).sum(axis=1)
    keep = expressed >= min_nnz_genes
    moved = np.zeros((keep.sum(), len(genemap.var)), np.float32)
    for j, gene in enumerate(ids):
        if gene in genemap.var.index:
            moved[:, genemap.var.index.get_loc(gene)] = dense[keep, j]
    assert list(genemap.var.index) == sorted(genes.index)  # padded to the registry, sorted
    assert genemap.unseen == sorted(set(genes.index) - set(known))

    assert part.X.has_sorted_indices and (part.X != sp.csr_matrix(moved)).nnz == 0
    assert not (part.X.data == 0).any()  # stored zeros gone, as scanpy's QC leaves X
    assert np.array_equal(part.n_genes, expressed)
    reference = ad.AnnData(sp.csr_matrix(moved), var=genemap.flags)
    cells, per_gene = sc.pp.calculate_qc_metrics(
        reference, qc_vars=chunked.QC_VARS, percent_top=[20], inplace=False
    )
    ours = part.obs.drop(columns=["nnz", "n_genes"])
    pd.testing.assert_frame_equal(ours, cells.reset_index(drop=True), check_exact=True)
    assert np.array_equal(part.obs["nnz"], (dense != 0).sum(axis=1)[keep])
    assert np.array_equal(part.gene_cells, per_gene["n_cells_by_counts"].to_numpy())
    assert np.array_equal(part.gene_totals, moved.sum(axis=0, dtype=np.float64))
