"""annbatch on the loader bench's h5ad files (runs in .bench-venv-annbatch: annbatch needs
Python >= 3.12, anndata >= 0.12 and zarr 3, which our environment cannot hold).

annbatch reads zarr only (h5ad-backed datasets are refused: "Cannot add CSRDataset
backed by h5ad at the moment"), so each h5ad's X is first written once with annbatch's
own ``write_sharded`` (its recommended layout: lz4, 64 cells a chunk) next to the files.

Set up as annbatch's docs say: installed with its ``zarrs`` extra and zarr's codec
pipeline set to ``zarrs.ZarrsCodecPipeline`` (zarr-python's own pipeline reads local
shards many times slower).

``python bench/loader_annbatch.py MODE N_BATCHES WARMUP MAX_LEN ZARR_DIR FILE...``; MODE is
"random" (chunk_size=1: every cell drawn independently, like our sampler), "cold" (the
same, the store's pages evicted from the page cache before each timed pass), "memory" (the
same on in-memory CSR matrices, annbatch's in-memory mode) or "chunked" (annbatch's
default chunks of 512 contiguous cells, which only approximates random order). Prints one
JSON line: cells/s of raw batches and of batches with the same gene selection as ours,
done by the same compiled kernel (scprint/trainer/_batch_kernels.py, "random expr"), and
peak RSS. Uniform sampling: annbatch has no per-cell weighted sampler.
"""

import json
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import zarr
from annbatch import Loader
from common import evict  # bench/common.py: this script runs from bench/ in annbatch's venv

# annbatch's docs: local zarr reads go through zarrs (Rust codec pipeline, the [zarrs] extra)
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def load_kernel():
    """scprint's compiled gene selection (scprint/trainer/_batch_kernels.py, numba), loaded
    from its file: this venv cannot import our package, and annbatch should select genes
    with the same code as ours, not a slower per-cell numpy loop."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scprint" / "trainer" / "_batch_kernels.py"
    spec = importlib.util.spec_from_file_location("scprint_batch_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's on-disk cache finds the module by name
    spec.loader.exec_module(module)
    return module


class Selector:
    """(x, genes, depth) of shape (B, max_len) from a CSR batch, "random expr" as ours:
    every gene of the file is in the vocabulary, one organism block."""

    def __init__(self, n_genes: int, max_len: int):
        self.kernel = load_kernel()
        self.max_len = max_len
        self.token_of = np.arange(n_genes, dtype=np.int32)
        self.stamp = np.zeros(n_genes + 1, dtype=np.int32)
        self.rng = np.random.default_rng(1)

    def __call__(self, batch):
        B = batch.shape[0]
        if self.stamp[-1] > 2**30:  # one stamp value per row: restart before it overflows
            self.stamp[:] = 0
        x = np.zeros((B, self.max_len), dtype=np.float32)
        genes = np.zeros((B, self.max_len), dtype=np.int32)
        depth = np.zeros(B, dtype=np.float32)
        indptr = batch.indptr.astype(np.int64)
        self.kernel.select_genes(
            batch.data.astype(np.float32, copy=False),
            batch.indices.astype(np.int64, copy=False),
            self.token_of,
            indptr[:-1],
            np.diff(indptr),
            np.arange(B, dtype=np.int64),
            np.zeros(B, dtype=np.int64),
            np.full(B, len(self.token_of), dtype=np.int64),
            False,
            int(self.rng.integers(2**31)),
            self.stamp,
            x,
            genes,
            depth,
        )
        return x, genes


def as_zarr(files: list[str], folder: Path) -> list[Path]:
    """Each file's X (and nothing else) as annbatch's sharded zarr, written once."""
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


def in_memory(files: list[str]) -> list:
    """Each file's X as an in-memory CSR matrix (annbatch's in-memory mode)."""
    out = []
    for f in files:
        with h5py.File(f, "r") as h:
            out.append(ad.io.sparse_dataset(h["X"]).to_memory())
    return out


def measure(mode: str, n_batches: int, warmup: int, datasets: list, selector, folder) -> float:
    if mode == "cold":
        evict(p for p in folder.rglob("*") if p.is_file())  # the store's pages
    chunk = 512 if mode == "chunked" else 1
    loader = Loader(
        chunk_size=chunk,
        preload_nchunks=4 if mode == "chunked" else 1024,
        batch_size=64,
        shuffle=True,
        preload_to_gpu=False,
        rng=np.random.default_rng(0),
    ).add_datasets(datasets)
    cells, start = 0, None
    for i, batch in enumerate(loader):
        batch = batch["X"]  # annbatch yields {"X": csr, "obs": ...}
        if i == warmup:
            start, cells = time.perf_counter(), 0
        if selector is not None:
            selector(batch)
        cells += batch.shape[0]
        if i + 1 == warmup + n_batches:
            break
    return cells / (time.perf_counter() - start)


def main():
    mode, n_batches, warmup, max_len = sys.argv[1], *map(int, sys.argv[2:5])
    folder, files = Path(sys.argv[5]), sys.argv[6:]
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "memory":
        datasets = in_memory(files)
    else:
        import zarr

        stores = as_zarr(files, folder)
        datasets = [ad.io.sparse_dataset(zarr.open_group(s, mode="r")["X"]) for s in stores]
    selector = Selector(datasets[0].shape[1], max_len)
    selector(datasets[0][:64])  # compile (or load the cached kernel) before timing
    raw = measure(mode, n_batches, warmup, datasets, None, folder)
    topk = measure(mode, n_batches, warmup, datasets, selector, folder)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"raw": raw, "selected": topk, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
