"""Checks of one input dataset, each a small function returning the problem in words (with
its fix) or None, so a whole-file reader and a chunked one can both call them.

They catch what otherwise fails late and cryptically: a zarr store or loom file named
.h5ad (anndata says "unable to open file"), NaN counts (reported as "normalized"), and
duplicated gene ids (scdataloader's "Reindexing only valid with uniquely valued Index").
"""

from __future__ import annotations

from pathlib import Path

from scprint.io import StageError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZARR_MARKERS = (".zgroup", ".zattrs", ".zarray", "zarr.json")


def examples(values, n: int = 5) -> str:
    """The first ``n`` values, repr'd, and how many more there are."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def file_format_problem(path: Path) -> str | None:
    """What ``path`` is when it is not an HDF5 file (h5ad), and how to convert it."""
    path = Path(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in ZARR_MARKERS):
            return (
                f"{path} is a zarr store (a directory), not an h5ad file. Fix: convert it, "
                f"e.g. python -c \"import anndata; anndata.read_zarr('{path}')"
                ".write_h5ad('out.h5ad')\", and point the input at out.h5ad"
            )
        return f"{path} is a directory, not an h5ad file. Fix: point the input at the .h5ad file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{path} is a zip archive (a zipped zarr store?), not an h5ad file. Fix: unzip it "
            "and convert with anndata.read_zarr(store).write_h5ad('out.h5ad')"
        )
    if head.startswith(b"\x1f\x8b"):
        return f"{path} is gzip-compressed. Fix: gunzip it first (the h5ad is inside)"
    if head != HDF5_SIGNATURE:
        return None  # not a known format: the reader's own error says corrupt or truncated
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
    except OSError:
        return None  # a truncated HDF5 file: reported as corrupt by the reader
    if {"matrix", "row_attrs", "col_attrs"} <= keys:
        return (
            f"{path} is a loom file, not an h5ad file. Fix: convert it, e.g. python -c "
            f"\"import anndata; anndata.read_loom('{path}').write_h5ad('out.h5ad')\" "
            "(check that var.index then holds Ensembl ids), and point the input at out.h5ad"
        )
    return None


def value_problem(values) -> str | None:
    """None when ``values`` (a 1-D array, e.g. a sparse matrix's .data) are non-negative
    integers; else what they hold instead."""
    import numpy as np

    if values.size == 0:
        return None
    nan = np.isnan(values)
    if nan.any():
        return (
            f"NaN values ({int(nan.sum())} in the rows checked: missing measurements, or a "
            "failed conversion)"
        )
    if np.isinf(values).any():
        return f"infinite values ({int(np.isinf(values).sum())} in the rows checked)"
    if values.min() < 0:
        return f"negative values (min {values.min():.3g}: scaled or centred data)"
    fractional = values != np.round(values)
    if fractional.any():
        example = values[fractional][0]
        return f"non-integer values (e.g. {example:.4g}, max {values.max():.3g}: normalized or log counts)"
    return None


def duplicated_genes_problem(var_names, where: str = "var.index") -> str | None:
    """Gene ids that occur more than once (scdataloader cannot reindex them)."""
    import pandas as pd

    index = pd.Index(var_names)
    duplicated = index[index.duplicated()].unique()
    if not len(duplicated):
        return None
    return (
        f"{len(duplicated)} gene ids occur more than once in {where} (e.g. "
        f"{examples(duplicated, 3)}). Fix: keep one row per gene, e.g. sum the duplicated "
        "rows' counts per gene (adata[:, ~adata.var_names.duplicated()] keeps the first), or "
        "rebuild var.index from the Ensembl ids if it was made from symbols"
    )


def check_h5ad_file(dataset: str, path: Path) -> None:
    """Refuse a missing input or one that is not an HDF5 file, before any reader opens it."""
    path = Path(path)
    if not path.exists():
        raise StageError(
            f"dataset {dataset}: input {path} does not exist. Fix: download it first "
            "(`scprint download`) or correct the path"
        )
    wrong_format = file_format_problem(path)
    if wrong_format:
        raise StageError(f"dataset {dataset}: {wrong_format}")


def unreadable_h5ad(dataset: str, path: Path, err: Exception) -> StageError:
    """The error for an HDF5 file that h5py/anndata cannot read as an h5ad."""
    return StageError(
        f"dataset {dataset}: cannot read {path} as an h5ad file ({type(err).__name__}: "
        f"{err}). The file is corrupt or truncated (an interrupted download?). Fix: "
        "delete it and download it again; `scprint download` verifies size and checksum"
    )
