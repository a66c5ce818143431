"""Labeled cells from h5ad files, as the batches the network reads.

The files are read whole with anndata (no laminDB collection needed): fine-tuning sets
are small. Genes are mapped to the checkpoint's vocabulary (Ensembl ids, version
suffixes ignored); the others are dropped and counted. Each cell becomes ``max_len``
tokens: its most expressed vocabulary genes in decreasing order ("most expr", so the
linear probe, training and evaluation see the same tokens), padded with unexpressed
genes measured in its file, chosen by a generator seeded with the cell's index.
``depth`` is the cell's total count over all of its file's genes, as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scprint.data.organisms import ORGANISMS
from scprint.io import StageError

log = logging.getLogger(__name__)
ORGANISM = "organism_ontology_term_id"
# Ensembl gene-id prefix of each organism the data stages support (a vocabulary's
# organisms are read from its ids when the checkpoint does not list them)
GENE_PREFIX = {
    "NCBITaxon:9606": "ENSG0",
    "NCBITaxon:10090": "ENSMUSG",
    "NCBITaxon:7955": "ENSDARG",
    "NCBITaxon:7227": "FBgn",
    "NCBITaxon:6239": "WBGene",
    "NCBITaxon:9541": "ENSMFAG",
    "NCBITaxon:9544": "ENSMMUG",
    "NCBITaxon:9483": "ENSCJAG",
    "NCBITaxon:9598": "ENSPTRG",
}


@dataclass
class LabeledCells:
    """Cells in vocabulary space: ``counts`` (N, n_vocab) CSR, ``depth`` (N,), ``label``
    (N,) codes into ``labels``, ``measured`` per file the vocabulary indices it holds."""

    counts: sp.csr_matrix
    depth: np.ndarray
    label: np.ndarray
    labels: list[str]
    file_of: np.ndarray
    measured: list[np.ndarray]
    report: dict


def vocabulary_organisms(genes: list[str], configured: list[str] | None = None) -> set[str]:
    """Organisms a checkpoint was trained on: its config's data.organisms, else those
    whose gene ids its vocabulary holds."""
    if configured:
        return set(configured)
    return {org for org, p in GENE_PREFIX.items() if any(g.startswith(p) for g in genes)}


def _file_organism(adata, path) -> str | None:
    if ORGANISM in adata.obs:
        values = adata.obs[ORGANISM].astype(str).unique().tolist()
        if len(values) > 1:
            raise StageError(
                f"{path}: obs[{ORGANISM!r}] holds several organisms {values}: fine-tune on one "
                "organism's cells per file (split the file)"
            )
        return values[0] if values else None
    return adata.uns.get(ORGANISM)


def _counts_matrix(adata, path) -> sp.csr_matrix:
    """Raw counts: X, or raw.X where X was normalised (CELLxGENE's usual layout)."""
    for source, matrix in (("X", adata.X), ("raw.X", adata.raw.X if adata.raw else None)):
        if matrix is None:
            continue
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        sample = matrix.data[:100_000]
        if sample.size and (sample.min() < 0 or not np.allclose(sample, np.round(sample))):
            continue
        if source == "raw.X":
            log.info("%s: X is not raw counts; reading raw.X", path)
        return matrix
    raise StageError(
        f"{path}: neither X nor raw.X holds raw counts (non-negative integers): fine-tune on "
        "the preprocessed file (data/processed/<dataset>.h5ad) or put counts in X"
    )


def read_labeled(
    paths: list[str | Path],
    label_key: str,
    genes: list[str],
    organisms: set[str],
    min_cells_per_label: int = 2,
) -> LabeledCells:
    """Read, check and map the files; every refusal names the file and the fix."""
    import anndata as ad

    index = {g: i for i, g in enumerate(genes)}
    blocks, depths, raw_labels, file_of, measured, files = [], [], [], [], [], []
    for k, path in enumerate(paths):
        try:
            adata = ad.read_h5ad(path)
        except (OSError, KeyError, ValueError) as err:
            raise StageError(f"cannot read {path} as h5ad: {err}") from err
        if label_key not in adata.obs:
            raise StageError(
                f"{path}: no obs column {label_key!r} (it has: {', '.join(map(str, adata.obs.columns))}): "
                "set data.label_key to one of them"
            )
        organism = _file_organism(adata, path)
        if organisms and organism is not None and organism not in organisms:
            name = ORGANISMS[organism].name if organism in ORGANISMS else organism
            raise StageError(
                f"{path}: its cells are {name} ({organism}) but the checkpoint was trained on "
                f"{sorted(organisms)} only: its gene vocabulary has no {name} genes; fine-tune "
                "a checkpoint pre-trained on this organism"
            )
        ids = [str(g).split(".")[0] for g in adata.var_names]
        cols = np.array([index.get(g, -1) for g in ids])
        keep = cols >= 0
        dropped = int((~keep).sum())
        if not keep.any():
            raise StageError(
                f"{path}: none of its {len(ids)} genes (e.g. {ids[:3]}) is in the checkpoint's "
                f"vocabulary of {len(genes)} Ensembl ids (e.g. {genes[:2]}): give var Ensembl "
                "gene ids (run `scprint preprocess`) of an organism the checkpoint knows"
            )
        log.info(
            "%s: %d cells; %d of %d genes are not in the checkpoint's vocabulary: dropped",
            path, adata.n_obs, dropped, len(ids),
        )  # fmt: skip
        counts = _counts_matrix(adata, path)
        depths.append(np.asarray(counts.sum(axis=1)).ravel())
        mapped = sp.csr_matrix(
            (np.ones(keep.sum(), np.float32), (np.flatnonzero(keep), cols[keep])),
            shape=(len(ids), len(genes)),
        )
        blocks.append(sp.csr_matrix(counts @ mapped))
        raw_labels.append(adata.obs[label_key].astype(object).to_numpy())
        file_of.append(np.full(adata.n_obs, k))
        measured.append(np.sort(cols[keep]))
        files.append({"path": str(path), "cells": adata.n_obs, "genes": len(ids),
                      "genes_dropped": dropped, "organism": organism})  # fmt: skip
    values = np.concatenate(raw_labels)
    known = np.array([v is not None and v == v and str(v) != "" for v in values])  # v==v: NaN
    values = np.where(known, values.astype(str), "")
    names, sizes = np.unique(values[known], return_counts=True)
    rare = {str(n): int(c) for n, c in zip(names, sizes, strict=True) if c < min_cells_per_label}
    if rare:
        log.warning(
            "labels with fewer than %d cells are left out (a held-out split needs a cell on "
            "each side): %s", min_cells_per_label, rare,
        )  # fmt: skip
    labels = [str(n) for n, c in zip(names, sizes, strict=True) if c >= min_cells_per_label]
    if len(labels) < 2:
        raise StageError(
            f"{label_key!r} has {len(labels)} label(s) with at least {min_cells_per_label} "
            f"cells in {[str(p) for p in paths]} (left out: {rare}): a classifier needs two; "
            "choose another data.label_key or add cells"
        )
    code = {name: i for i, name in enumerate(labels)}
    label = np.array([code.get(v, -1) for v in values])
    keep = label >= 0
    if (~known).sum():
        log.warning("%d cells without a %s label are left out", int((~known).sum()), label_key)
    report = {
        "files": files,
        "cells": int(keep.sum()),
        "cells_left_out": int((~keep).sum()),
        "labels_left_out": rare,
    }
    return LabeledCells(
        counts=sp.vstack(blocks, format="csr")[keep],
        depth=np.concatenate(depths)[keep].astype(np.float32),
        label=label[keep],
        labels=labels,
        file_of=np.concatenate(file_of)[keep],
        measured=measured,
        report=report,
    )


def split(label: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) cell indices: per label round(held_out * n) cells
    held out, at least one on each side."""
    if not 0 < held_out < 1:
        raise StageError(f"data.held_out={held_out}: give a share of cells between 0 and 1")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for code in np.unique(label):
        cells = rng.permutation(np.flatnonzero(label == code))
        n = min(max(1, round(held_out * len(cells))), len(cells) - 1)
        test.append(cells[:n])
        train.append(cells[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class CellTokens(torch.utils.data.Dataset):
    """Cell i -> {"genes" (L,), "x" (L,), "depth", "label"} (see the module docstring)."""

    def __init__(self, cells: LabeledCells, indices: np.ndarray, max_len: int, seed: int = 0):
        self.cells, self.indices, self.max_len, self.seed = cells, indices, max_len, seed
        fewest = min(len(m) for m in cells.measured)
        if fewest < max_len:
            raise StageError(
                f"data.max_len={max_len} but a file has only {fewest} genes in the "
                "checkpoint's vocabulary: lower data.max_len"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        cell = int(self.indices[i])
        row = self.cells.counts[cell]
        order = np.lexsort((row.indices, -row.data))[: self.max_len]  # most expressed first
        genes, x = row.indices[order], row.data[order]
        missing = self.max_len - len(genes)
        if missing > 0:
            pool = np.setdiff1d(self.cells.measured[self.cells.file_of[cell]], row.indices)
            rng = np.random.default_rng([self.seed, cell])
            pad = rng.choice(pool, size=missing, replace=False)
            genes = np.concatenate([genes, pad])
            x = np.concatenate([x, np.zeros(len(pad), np.float32)])
        return {
            "genes": torch.from_numpy(genes.astype(np.int64)),
            "x": torch.from_numpy(x.astype(np.float32)),
            "depth": torch.tensor(self.cells.depth[cell]),
            "label": torch.tensor(int(self.cells.label[cell])),
        }
