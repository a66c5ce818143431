"""Preprocess in bounded memory: what scdataloader's Preprocessor does, a chunk of cells at a time.

The Preprocessor loads the whole dataset, pads it to the organism's full gene list (~60-80k
genes) and computes QC metrics on the padded matrix: a CELLxGENE dataset of a million cells
needs tens of GB that way. Here the file is read backed (h5py), one chunk of cells at a
time, and the output is appended to the processed h5ad as it goes, so memory depends on the
chunk size, not on the dataset. Three parts, each replaceable:

- ``Reader``: the backed input (obs, var, uns in memory; the counts matrix on disk).
- ``transform``: one chunk of raw counts -> the kept cells, remapped onto the organism's
  sorted gene list, with their per-cell QC metrics and per-gene sums.
- ``Writer``: appends chunks to the output's ``X`` and writes obs/var/uns at the end.

The result equals the Preprocessor's (X, obs, var, uns; tests/test_preprocess.py compares
them on whole files): the same cell filter (``min_nnz_genes`` expressed genes; ``nnz`` and
``n_genes`` columns), the same gene mapping (Ensembl ids or symbols against the registry,
duplicates dropped, missing genes padded as zeros, genes sorted), the same QC columns
(scanpy's calculate_qc_metrics on mt/ribo/hb, top-20 share, MAD outliers) and the same
drop-amount check. Only scdataloader's optional post-processing (a log-normalised layer
and a PCA, ``do_postp``) needs the whole matrix; it stays on the in-memory path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scprint.data.checks import check_h5ad_file, unreadable_h5ad

CHUNK_CELLS = 20_000  # ~2,000 non-zeros a cell: ~300 MB of counts in flight per chunk
MADOUTLIER = 5  # the Preprocessor's defaults for its outlier flags
PCT_MT_OUTLIER = 8
QC_VARS = ["mt", "ribo", "hb"]


# -- reader -----------------------------------------------------------------------------
class Reader:
    """A backed h5ad: annotations in memory, the counts matrix read a chunk of rows at a time."""

    def __init__(self, dataset: str, path: Path):
        import h5py
        from anndata.io import read_elem

        self.dataset, self.path = dataset, path
        check_h5ad_file(dataset, path)
        try:
            self.file = h5py.File(path, "r")
            self.obs = read_elem(self.file["obs"])
            self.var = read_elem(self.file["var"])
            self.uns = read_elem(self.file["uns"]) if "uns" in self.file else {}
            self.raw_var = read_elem(self.file["raw/var"]) if "raw" in self.file else None
        except Exception as err:  # h5py/anndata raise OSError, KeyError, ValueError...
            raise unreadable_h5ad(dataset, path, err) from err

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def matrix(self, key: str):
        """The backed matrix at ``key`` ('X', 'raw/X', 'layers/counts'), sliceable by rows."""
        from anndata.io import sparse_dataset

        node = self.file[key]
        return node if hasattr(node, "shape") else sparse_dataset(node)

    def places(self) -> list[tuple[str, str, pd.DataFrame]]:
        """Where counts may be, in the order looked at: (label, key, var)."""
        found = []
        if "raw" in self.file and "X" in self.file["raw"]:
            found.append(("raw.X", "raw/X", self.raw_var))
        found.append(("X", "X", self.var))
        if "layers" in self.file and "counts" in self.file["layers"]:
            found.append(("layers['counts']", "layers/counts", self.var))
        return found

    def chunks(self, key: str, size: int = CHUNK_CELLS):
        """csr chunks of rows of the matrix at ``key``, in order."""
        import scipy.sparse as sp

        matrix = self.matrix(key)
        for start in range(0, self.n_obs, size):
            chunk = matrix[start : start + size]
            yield chunk if sp.issparse(chunk) else sp.csr_matrix(chunk)

    def close(self) -> None:
        self.file.close()


# -- gene mapping (once per dataset) ------------------------------------------------------
@dataclass
class GeneMap:
    """Source column -> output column (-1: dropped); the output var, sorted like the Preprocessor's."""

    columns: np.ndarray
    var: pd.DataFrame
    flags: pd.DataFrame  # mt / ribo / hb per output gene (for the QC metrics)
    unseen: list[str]
    n_mapped: int
    monotonic: bool = False  # output columns increase with source columns: no re-sort


def map_genes(var: pd.DataFrame, genes: pd.DataFrame, is_symbol: bool) -> GeneMap:
    """The Preprocessor's gene step on the annotations only: join var to the registry's genes
    (by id, or by symbol), keep the first of duplicated ids, pad the registry's other genes."""
    import anndata as ad
    import scipy.sparse as sp

    genes = genes.copy()
    genes["ensembl_gene_id"] = genes.index
    kept_columns = var.columns.difference(genes.columns)
    if is_symbol:
        by_symbol = genes.drop_duplicates("symbol").set_index("symbol", drop=False)
        new_var = var[kept_columns].merge(by_symbol, left_index=True, right_index=True)
        new_var["symbol"] = new_var.index
        source = var.index.get_indexer(new_var.index)
        new_var.index = new_var["ensembl_gene_id"]
    else:
        new_var = var[kept_columns].merge(genes, left_index=True, right_index=True)
        source = var.index.get_indexer(new_var.index)
    first = ~new_var.index.duplicated(keep="first")
    new_var, source = new_var[first], source[first]
    unseen = sorted(set(genes.index) - set(new_var.index))

    # anndata's outer concat of the two gene sets gives the var (dtypes included) the
    # Preprocessor ends with; zero cells, so it costs nothing
    def empty(frame):
        return ad.AnnData(sp.csr_matrix((0, len(frame)), dtype=np.float32), var=frame)

    out_var = ad.concat(
        [empty(new_var), empty(pd.DataFrame(index=unseen))], axis=1, join="outer", merge="only"
    ).var
    out_var[genes.columns] = genes.loc[out_var.index]
    out_var = out_var.loc[out_var.index.sort_values()]
    columns = np.full(len(var), -1, dtype=np.int32)
    columns[source] = out_var.index.get_indexer(new_var.index)
    flags = out_var[QC_VARS].astype(bool)
    targets = columns[columns >= 0]
    monotonic = bool(np.all(np.diff(targets) > 0))
    return GeneMap(columns, out_var, flags, unseen, n_mapped=len(new_var), monotonic=monotonic)


# -- per-chunk transform ----------------------------------------------------------------
@dataclass
class Chunk:
    X: object  # csr (kept cells x output genes)
    obs: pd.DataFrame  # nnz, n_genes and the QC metrics of the kept cells
    n_genes: np.ndarray  # expressed genes per input cell (kept or not)
    gene_cells: np.ndarray  # per output gene: kept cells expressing it
    gene_totals: np.ndarray  # per output gene: sum of counts (float64)


def per_row(mask: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """How many True entries of ``mask`` (one per stored value) each row holds. Looks only at
    the True ones: called on what is rare (explicit zeros, unmapped genes), it costs little."""
    where = np.flatnonzero(mask)
    rows = np.searchsorted(indptr, where, side="right") - 1
    return np.bincount(rows, minlength=len(indptr) - 1)


def transform(counts, genemap: GeneMap, min_nnz_genes: int, dtype) -> Chunk:
    """Filter cells, move their counts onto the output genes, compute their QC metrics.

    Whole-array numpy steps that look at the rare entries only (explicit zeros, unmapped
    genes, QC genes); sorting each cell's genes is the one per-row step left."""
    import anndata as ad
    import scipy.sparse as sp
    from scanpy.preprocessing._qc import describe_obs  # calculate_qc_metrics' obs half (pinned)

    counts = counts if sp.isspmatrix_csr(counts) else sp.csr_matrix(counts)
    lengths = np.diff(counts.indptr)
    stored_zero = counts.data == 0
    nnz = lengths - per_row(stored_zero, counts.indptr)  # (counts != 0) per cell
    n_genes = lengths - per_row(~(counts.data > 0), counts.indptr)  # (counts > 0) per cell
    keep = n_genes >= min_nnz_genes if min_nnz_genes else np.ones(len(nnz), bool)
    kept = counts if keep.all() else counts[keep]
    target = genemap.columns[kept.indices]
    unmapped = target < 0
    data, indptr = kept.data.astype(dtype, copy=False), kept.indptr
    if unmapped.any():
        # drop the unmapped non-zeros; each row loses as many as it held
        lost = np.concatenate([[0], np.cumsum(per_row(unmapped, indptr))])
        data, target, indptr = data[~unmapped], target[~unmapped], indptr - lost
    X = sp.csr_matrix((data, target, indptr), shape=(kept.shape[0], len(genemap.var)))
    if not (genemap.monotonic and kept.has_sorted_indices):
        X.sort_indices()  # in place; as fast here as two counting sorts (tocsc().tocsr())
    if stored_zero.any():
        X.eliminate_zeros()  # scanpy's QC does it in place on the Preprocessor's X
    obs = pd.DataFrame({"nnz": nnz[keep], "n_genes": n_genes[keep]})
    view = ad.AnnData(X, var=genemap.flags)
    cell_qc = describe_obs(view, qc_vars=(), percent_top=[20], x=X).reset_index(drop=True)
    obs = pd.concat(
        [obs, cell_qc, qc_var_totals(X, genemap.flags, cell_qc["total_counts"])], axis=1
    )
    genes = X.indices.astype(np.int64)  # bincount casts to int64 anyway, slowly
    return Chunk(
        X,
        obs,
        n_genes,
        np.bincount(genes, minlength=X.shape[1]),  # cells expressing each gene
        np.bincount(genes, weights=X.data, minlength=X.shape[1]),  # counts of each gene
    )


def qc_var_totals(X, flags: pd.DataFrame, total: pd.Series) -> pd.DataFrame:
    """scanpy's per-cell columns for each QC gene set (total, log1p, percent), summing the
    same values in the same order as its ``X[:, genes].sum(axis=1)``, but gathering the few
    flagged non-zeros once instead of slicing the chunk by columns three times."""
    import scipy.sparse as sp

    bits = (flags.to_numpy() * (1 << np.arange(flags.shape[1]))).sum(axis=1).astype(np.uint8)
    codes = bits[X.indices]
    flagged = np.flatnonzero(codes)
    rows = np.searchsorted(X.indptr, flagged, side="right") - 1
    columns = {}
    for bit, name in enumerate(flags.columns):
        hit = (codes[flagged] >> bit) & 1 == 1
        per_cell = np.bincount(rows[hit], minlength=X.shape[0])
        part = sp.csr_matrix(
            (X.data[flagged[hit]], np.zeros(hit.sum(), np.int32), np.r_[0, np.cumsum(per_cell)]),
            shape=(X.shape[0], 1),
        )
        columns[f"total_counts_{name}"] = values = np.ravel(part.sum(axis=1))
        columns[f"log1p_total_counts_{name}"] = np.log1p(values)
        with np.errstate(divide="ignore", invalid="ignore"):  # NaN for empty cells, as scanpy
            columns[f"pct_counts_{name}"] = values / total.to_numpy() * 100
    return pd.DataFrame(columns)


# -- writer -----------------------------------------------------------------------------
@dataclass
class Writer:
    """An h5ad written incrementally: X (csr) grows chunk by chunk; the rest at ``finish``."""

    path: Path
    n_vars: int
    n_obs: int = 0
    _file: object = field(default=None, repr=False)

    def append(self, X) -> None:
        import h5py
        from anndata.io import sparse_dataset, write_elem

        if self._file is None:
            self._file = h5py.File(self.path, "w")
            write_elem(self._file, "X", X)
        else:
            sparse_dataset(self._file["X"]).append(X)
        self.n_obs += X.shape[0]

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame, uns: dict) -> None:
        import anndata as ad
        from anndata.io import write_elem

        annotations = ad.AnnData(obs=obs, var=var)
        annotations.strings_to_categoricals()  # as write_h5ad does
        obs, var = annotations.obs, annotations.var

        if self._file is None:
            raise ValueError("no chunk was written")
        f = self._file
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", uns)
        for empty in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, empty, {})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- the whole dataset ------------------------------------------------------------------
def outliers(obs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The Preprocessor's outlier and mt_outlier flags (MADs over the whole dataset)."""
    import anndata as ad
    from scdataloader.utils import is_outlier

    view = ad.AnnData(obs=obs)
    outlier = (
        is_outlier(view, "total_counts", MADOUTLIER)
        | is_outlier(view, "n_genes_by_counts", MADOUTLIER)
        | is_outlier(view, "pct_counts_in_top_20_genes", MADOUTLIER)
    )
    mt = is_outlier(view, "pct_counts_mt", 3) | (obs["pct_counts_mt"] > PCT_MT_OUTLIER)
    return outlier, mt


def gene_qc(var: pd.DataFrame, cells: np.ndarray, totals: np.ndarray, n_obs: int, dtype):
    """scanpy's per-gene QC columns from the sums gathered over the chunks."""
    var["n_cells_by_counts"] = cells
    var["mean_counts"] = totals / n_obs
    var["log1p_mean_counts"] = np.log1p(var["mean_counts"])
    var["pct_dropout_by_counts"] = (1 - cells / n_obs) * 100
    var["total_counts"] = totals.astype(dtype)
    var["log1p_total_counts"] = np.log1p(var["total_counts"])
    return var
