"""annbatch on the loader bench's h5ad files (runs in .bench-venv-annbatch: annbatch needs
Python >= 3.12, anndata >= 0.12 and zarr 3, which our environment cannot hold).

annbatch reads zarr only (h5ad-backed datasets are refused: "Cannot add CSRDataset
backed by h5ad at the moment"), so each h5ad's X is first written once with annbatch's
own ``write_sharded`` (its recommended layout: lz4, 64 cells a chunk) next to the files.

``python bench/loader_annbatch.py MODE N_BATCHES WARMUP MAX_LEN ZARR_DIR FILE...``; MODE is
"random" (chunk_size=1: every cell drawn independently, like our sampler) or "chunked"
(annbatch's default chunks of 512 contiguous cells, which only approximates random
order). Prints one JSON line: cells/s of raw batches and of batches with the same gene
selection as ours ("random expr": the expressed genes, a random max_len of them when more,
then random unexpressed genes), and peak RSS. Uniform sampling: annbatch has no per-cell
weighted sampler.
"""

import json
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from annbatch import Loader


def select(batch, max_len: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(x, genes) of shape (B, max_len) from a CSR batch, the Collator's way, in numpy."""
    B, V = batch.shape
    x = np.zeros((B, max_len), dtype=np.float32)
    genes = np.zeros((B, max_len), dtype=np.int32)
    for r in range(B):
        a, b = batch.indptr[r], batch.indptr[r + 1]
        idx, val = batch.indices[a:b], batch.data[a:b]
        if len(idx) > max_len:
            pick = rng.choice(len(idx), max_len, replace=False)
            idx, val = idx[pick], val[pick]
        n = len(idx)
        x[r, :n] = val
        genes[r, :n] = idx
        if n < max_len:
            zero = np.setdiff1d(np.arange(V), idx, assume_unique=True)
            genes[r, n:] = rng.choice(zero, max_len - n, replace=False)
    return x, genes


def as_zarr(files: list[str], folder: Path) -> list[Path]:
    """Each file's X (and nothing else) as annbatch's sharded zarr, written once."""
    import zarr
    from annbatch import write_sharded

    out = []
    for f in files:
        target = folder / (Path(f).stem + ".zarr")
        if not (target / ".done").exists():
            with h5py.File(f, "r") as h:
                X = ad.io.sparse_dataset(h["X"]).to_memory()
            # uncompressed, small chunks: what per-cell random access wants (lz4 + 64-cell
            # chunks, the default, measured ~3x slower here in random order)
            write_sharded(
                zarr.open_group(target, mode="w"), ad.AnnData(X), n_obs_per_chunk=8, compressors=()
            )
            (target / ".done").write_text("")
        out.append(target)
    return out


def measure(mode: str, n_batches: int, warmup: int, max_len: int, stores: list, top: bool):
    import zarr

    datasets = [ad.io.sparse_dataset(zarr.open_group(s, mode="r")["X"]) for s in stores]
    chunk = 1 if mode == "random" else 512
    loader = Loader(
        chunk_size=chunk,
        preload_nchunks=1024 if mode == "random" else 4,
        batch_size=64,
        shuffle=True,
        preload_to_gpu=False,
        rng=np.random.default_rng(0),
    ).add_datasets(datasets)
    rng = np.random.default_rng(1)
    cells, start = 0, None
    for i, batch in enumerate(loader):
        batch = batch["X"]  # annbatch yields {"X": csr, "obs": ...}
        if i == warmup:
            start, cells = time.perf_counter(), 0
        if top:
            select(batch, max_len, rng)
        cells += batch.shape[0]
        if i + 1 == warmup + n_batches:
            break
    return cells / (time.perf_counter() - start)


def main():
    mode, n_batches, warmup, max_len = sys.argv[1], *map(int, sys.argv[2:5])
    folder, files = Path(sys.argv[5]), sys.argv[6:]
    folder.mkdir(parents=True, exist_ok=True)
    stores = as_zarr(files, folder)
    raw = measure(mode, n_batches, warmup, max_len, stores, top=False)
    topk = measure(mode, n_batches, warmup, max_len, stores, top=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"raw": raw, "selected": topk, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
