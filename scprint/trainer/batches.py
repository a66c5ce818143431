"""Training batches read a batch at a time, straight from the h5ad files' CSR arrays.

scdataloader's path (lamindb MappedCollection + Collator) reads one cell at a time: it
opens the HDF5 file, reads the cell's CSR slice through h5py, scatters it into a dense
row of every gene, and the Collator then searches that dense row for expressed genes.
Profiled on the loader bench (bench/loader.py; base.yml's six classes): ~20 ms a cell
on a loaded 2-core machine, of which ~54% reading the cell's six obs labels (each a
1-element h5py read plus group and category look-ups), ~35% the X row (three h5py reads,
a dense 20,000-gene scatter), ~4% opening the file again for every cell, ~4% the Collator:
h5py's per-call overhead (15 dataset reads and 40 group look-ups a cell), not I/O.

Here a batch of cell indices (from the same weighted sampler) is served in one call
(``Dataset.__getitems__``): the cells are grouped by file and read in row order from a
memory map of the file (anndata writes X uncompressed, contiguous or in chunks that lie
one after the other; we locate them once), gene selection works on the non-zeros only,
and the batch dict is assembled with a few vectorised numpy operations. For a collection
larger than RAM (cold pages), the batch's exact pages in every file are requested from
disk at once before the first is read (madvise WILLNEED), and the maps do no read-around
on a fault (MADV_RANDOM): the device's read-ahead (8 MB here) would read ~1,000x the few
KB a cell needs (bench/loader.py's cold rows). The result is what scdataloader's Collator
returns for the same cells:

- ``x`` (B, max_len) float32 counts, ``genes`` (B, max_len) int32 indices into the
  model's gene vocabulary (``ScprintDataModule.genes``: the gene table, restricted to
  ``gene_subset``, organisms in blocks), expressed genes first, then randomly chosen
  unexpressed genes of the cell's organism (distinct, never expressed ones);
- ``class`` (B, n_classes) int32 label codes of scdataloader's encoders, unknown = -1,
  columns in ``ScprintDataModule.classes`` order; ``tp`` (B,) zeros; ``depth`` (B,) total
  counts of the cell over all of its genes.

``how``: "random expr" (a random max_len of the expressed genes when there are more),
"most expr" (the max_len highest counts, in decreasing order) or "all" (every gene of
the organism). Cells of organisms outside the vocabulary are dropped, as the Collator
does. Files that cannot be memory-mapped (compressed, dense X) are read through h5py.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from scprint.io import StageError

HOWS = ("random expr", "most expr", "all")


@dataclass
class _Extents:
    """Where the elements of a 1-d HDF5 dataset lie in its file: runs of
    (first element, byte offset, number of elements), adjacent chunks merged."""

    starts: np.ndarray  # (R,) int64
    offsets: np.ndarray  # (R,) int64
    counts: np.ndarray  # (R,) int64
    dtype: np.dtype

    @classmethod
    def of(cls, dataset) -> _Extents | None:
        """None when the data cannot be read by offset (filters, not yet allocated)."""
        dsid = dataset.id
        if dataset.ndim != 1 or dataset.dtype.kind not in "iuf":
            return None
        if dataset.id.get_create_plist().get_nfilters() > 0:
            return None
        itemsize = dataset.dtype.itemsize
        n = dataset.shape[0]
        if dataset.chunks is None:
            offset = dsid.get_offset()
            if offset is None:
                return None if n else cls._empty(dataset.dtype)
            return cls(np.array([0]), np.array([offset]), np.array([n]), np.dtype(dataset.dtype))
        chunk = dataset.chunks[0]
        runs: list[list[int]] = []
        for i in range(dsid.get_num_chunks()):
            info = dsid.get_chunk_info(i)
            first = info.chunk_offset[0]
            count = min(chunk, n - first)
            if info.size != chunk * itemsize or info.filter_mask:
                return None
            last = runs[-1] if runs else None
            if (
                last
                and last[0] + last[2] == first
                and last[1] + last[2] * itemsize == info.byte_offset
            ):
                last[2] += count
            else:
                runs.append([first, info.byte_offset, count])
        covered = sum(r[2] for r in runs)
        if covered != n:  # unallocated chunks (fill values): not worth handling
            return None
        arr = np.array(runs, dtype=np.int64).reshape(-1, 3)
        order = np.argsort(arr[:, 0])
        arr = arr[order]
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], np.dtype(dataset.dtype))

    @classmethod
    def _empty(cls, dtype):
        zero = np.zeros(0, dtype=np.int64)
        return cls(zero, zero, zero, np.dtype(dtype))

    def views(self, buffer) -> list[np.ndarray]:
        """One typed array per run, viewing ``buffer`` (the file's memory map)."""
        return [
            np.frombuffer(buffer, self.dtype, int(n), int(off))
            for n, off in zip(self.counts, self.offsets, strict=True)
        ]

    def read(self, views: list[np.ndarray], first: np.ndarray, stop: np.ndarray) -> list:
        """Elements [first[i], stop[i]) for each i; slices of ``views`` (no copies) unless
        a range crosses runs."""
        run = np.searchsorted(self.starts, first, side="right") - 1
        base = self.starts[run]
        out = []
        for k, a, b in zip(
            run.tolist(), (first - base).tolist(), (stop - base).tolist(), strict=True
        ):
            if b <= len(views[k]):
                out.append(views[k][a:b])
            else:  # crosses into the next run(s)
                out.append(self._crossing(views, k, a, b))
        return out

    @staticmethod
    def _crossing(views, k, a, b):
        pieces = []
        while b > 0:
            pieces.append(views[k][max(a, 0) : b])
            a, b, k = a - len(views[k]), b - len(views[k]), k + 1
        return np.concatenate(pieces)

    def byte_ranges(self, first: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) in the file of elements [first[i], stop[i]); a range that
        crosses into the next run is cut at its run's end (the rest is not included)."""
        size = self.dtype.itemsize
        if len(self.starts) == 1:  # contiguous (the usual layout): no search
            return self.offsets[0] + first * size, (stop - first) * size
        if not len(self.starts):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        run = np.searchsorted(self.starts, first, side="right") - 1
        skip = first - self.starts[run]
        count = np.minimum(stop - first, self.counts[run] - skip)
        return self.offsets[run] + skip * size, count * size


class CellFile:
    """One h5ad file's X (CSR) for batched row reads; opens lazily in each process."""

    def __init__(self, path: str):
        import h5py

        self.path = str(path)
        with h5py.File(self.path, "r") as f:
            X = f["X"]
            if not isinstance(X, h5py.Group) or X.attrs.get("encoding-type") != "csr_matrix":
                kind = X.attrs.get("encoding-type", "dense array") if "X" in f else "missing"
                raise StageError(
                    f"{self.path}: X is {kind}, the training loader reads CSR matrices. Fix: "
                    "rerun `scprint preprocess` for this dataset (it writes CSR)"
                )
            self.n_obs, self.n_vars = (int(v) for v in X.attrs["shape"])
            self.indptr = X["indptr"][...].astype(np.int64)
            self.data_extents = _Extents.of(X["data"])
            self.indices_extents = _Extents.of(X["indices"])
            self.var_names = _read_index(f["var"])
        self.mapped = self.data_extents is not None and self.indices_extents is not None
        self._handle = None
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = state["_pid"] = None
        return state

    def _open(self):
        if self._pid != os.getpid():  # never share a memory map / h5py handle across fork
            if self.mapped:
                with open(self.path, "rb") as fh:
                    buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                # no read-around on a page fault (the device's read-ahead, often MBs, for
                # a few KB a cell): read_ahead() asks for exactly the pages a batch reads
                buffer.madvise(mmap.MADV_RANDOM)
                self._handle = (
                    self.data_extents.views(buffer),
                    self.indices_extents.views(buffer),
                    buffer,
                    np.frombuffer(buffer, np.uint8).ctypes.data,  # the map's address
                )
            else:
                import h5py

                self._handle = h5py.File(self.path, "r")["X"]
            self._pid = os.getpid()
        return self._handle

    def byte_ranges(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(offsets, lengths) of the rows' data, the same of their indices] in the file
        (mapped files only): the bytes read_rows reads, in its order."""
        first, stop = self.indptr[rows], self.indptr[rows + 1]
        return [ext.byte_ranges(first, stop) for ext in (self.data_extents, self.indices_extents)]

    def wanted(self, rows: np.ndarray) -> np.ndarray:
        """(k, 2) uint64 [address, length] in this process of the rows' bytes, page-aligned
        starts (for :func:`read_ahead`); none for files read through h5py."""
        if not self.mapped:
            return np.zeros((0, 2), dtype=np.uint64)
        address = self._open()[3]
        (data_at, data_n), (index_at, index_n) = self.byte_ranges(rows)
        starts = np.concatenate([data_at, index_at])
        stops = starts + np.concatenate([data_n, index_n])
        keep = stops > starts
        page = starts[keep] & -mmap.PAGESIZE  # madvise wants page-aligned starts
        return np.stack([address + page, stops[keep] - page], axis=1).astype(np.uint64)

    def read_rows(self, rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(data, indices) of each row, in the order given (sort ``rows`` for locality)."""
        handle = self._open()
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        if self.mapped:
            data_views, index_views = handle[:2]
            data = self.data_extents.read(data_views, starts, stops)
            idx = self.indices_extents.read(index_views, starts, stops)
        else:
            data = [handle["data"][a:b] for a, b in zip(starts, stops, strict=True)]
            idx = [handle["indices"][a:b] for a, b in zip(starts, stops, strict=True)]
        return data, idx


SYS_PROCESS_MADVISE = 440  # the same on every architecture (Linux >= 5.10)
_ADVISE: dict = {}  # per process: (libc, pidfd or None)


def read_ahead(ranges: np.ndarray, one_call: bool = True) -> None:
    """Start reading the pages of ``ranges`` ((k, 2) [address, length] in this process's
    file maps) from disk, asynchronously (MADV_WILLNEED), so that a batch's reads are in
    flight together instead of one page fault after the other: what a cold page cache (a
    collection larger than RAM) needs. One process_madvise call for all (a batch's ~130
    ranges cost ~25 us when cached, 25x less than a madvise each), else, where the kernel
    refuses it, a madvise call per range. A hint: errors are ignored."""
    import ctypes

    if not len(ranges):
        return
    if os.getpid() not in _ADVISE:  # a pidfd names its process: not the parent's after fork
        try:
            pidfd = os.pidfd_open(os.getpid())
        except (AttributeError, OSError):
            pidfd = None
        _ADVISE.clear()
        _ADVISE[os.getpid()] = [ctypes.CDLL(None, use_errno=True), pidfd]
    libc, pidfd = _ADVISE[os.getpid()]
    iov = np.ascontiguousarray(ranges, dtype=np.uint64)
    if one_call and pidfd is not None:
        done = True
        for at in range(0, len(iov), 1024):  # UIO_MAXIOV
            part = iov[at : at + 1024]
            args = (pidfd, part.ctypes.data, len(part), mmap.MADV_WILLNEED, 0)
            done &= libc.syscall(SYS_PROCESS_MADVISE, *map(ctypes.c_long, args)) >= 0
        if done:
            return
        _ADVISE[os.getpid()][1] = None  # refused here (seccomp, old kernel): per range
    for address, length in iov.tolist():
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_WILLNEED)


def _read_index(var) -> np.ndarray:
    """The var index (gene ids) of an h5ad group, as str."""
    name = var.attrs.get("_index", "_index")
    values = var[name][...]
    if values.dtype.kind in "SO":
        values = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    return values.astype(str)


def passthrough(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` already returns the batch."""
    return batch


class BatchDataset(torch.utils.data.Dataset):
    """The collection's cells as collated batches (see the module docstring).

    ``dataset[list_of_indices]`` / ``dataset.__getitems__(indices)`` returns the batch
    dict; use it with ``DataLoader(..., batch_size=B, sampler=..., collate_fn=passthrough)``.
    Holds no open file or laminDB handle, so it pickles into worker processes.
    """

    def __init__(
        self,
        files: list[CellFile],
        file_of_cell: np.ndarray,
        row_of_cell: np.ndarray,
        labels: np.ndarray,
        organism_block: np.ndarray,
        var_tokens: list[np.ndarray],
        how: str = "random expr",
        max_len: int = 2200,
    ):
        """
        Args:
            files: the collection's files, in the order of ``file_of_cell``'s values.
            file_of_cell, row_of_cell: (n_cells,) where each cell of the collection lies.
            labels: (n_cells, n_classes) int32 encoded labels (-1 unknown).
            organism_block: (n_cells, 2) [first, stop) of the cell's organism in the gene
                vocabulary; (-1, -1) for cells whose organism is not in it (dropped).
            var_tokens: per file, (n_vars,) int32 vocabulary index of each var, -1 if none.
            how, max_len: gene selection (module docstring).
        """
        if how not in HOWS:
            raise StageError(f"data.how={how!r} is not one of {', '.join(HOWS)}")
        self.files = files
        self.file_of_cell = np.asarray(file_of_cell, dtype=np.int32)
        self.row_of_cell = np.asarray(row_of_cell, dtype=np.int64)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.organism_block = np.asarray(organism_block, dtype=np.int64)
        self.var_tokens = var_tokens
        self.how = how
        self.max_len = int(max_len)
        blocks = self.organism_block[self.organism_block[:, 0] >= 0]
        sizes = np.unique(blocks[:, 1] - blocks[:, 0]) if len(blocks) else np.zeros(0, int)
        if how != "all" and len(sizes) and self.max_len > sizes.min():
            raise StageError(
                f"data.max_len={max_len} is more than the {sizes.min()} genes an organism has "
                "in the model's vocabulary: lower data.max_len"
            )
        if how == "all" and len(sizes) > 1:
            raise StageError('data.how="all" needs one gene count for every organism')
        self.vocab_size = int(self.organism_block.max(initial=0))
        self.seed = 0  # the run's seed (ScprintDataModule sets it): see __getitems__
        self._stamp = np.zeros(0, dtype=np.int32)  # per-process scratch of the kernel

    def __len__(self) -> int:
        return len(self.file_of_cell)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stamp"] = np.zeros(0, dtype=np.int32)
        return state

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.__getitems__([int(index)])
        return self.__getitems__(list(index))

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        """The batch of cells ``indices``. Its random genes ("random expr", the unexpressed
        fill) are drawn from ``indices.seed`` when it has one (training batches:
        scprint.trainer.resume.SeededBatch), else from a seed keyed by ``self.seed`` and
        the cells: a pure function of the batch, whichever process builds it, whenever."""
        from scprint.trainer.resume import batch_seed

        seed = batch_seed(self.seed, indices)
        cells = np.asarray(indices, dtype=np.int64)
        cells = cells[self.organism_block[cells, 0] >= 0]  # the Collator drops these too
        B = len(cells)
        # read grouped by file, rows in increasing order: piece p (the non-zeros of one
        # cell, contiguous in `data`) goes to batch row order[p]
        files, rows = self.file_of_cell[cells], self.row_of_cell[cells]
        order = np.lexsort((rows, files))
        data_parts, index_parts, groups = [], [], []
        bounds = np.flatnonzero(np.diff(files[order])) + 1
        by_file = [(int(files[sel[0]]), sel) for sel in np.split(order, bounds)] if B else []
        if by_file:  # every file's reads in flight before the first is needed
            read_ahead(np.concatenate([self.files[f].wanted(rows[sel]) for f, sel in by_file]))
        for f, sel in by_file:
            data, idx = self.files[f].read_rows(rows[sel])
            data_parts += data
            index_parts += idx
            groups.append((self.var_tokens[f], sum(len(i) for i in idx)))
        lengths = np.fromiter((len(d) for d in data_parts), dtype=np.int64, count=B)
        data = np.concatenate(data_parts) if B else np.zeros(0, np.float32)
        index = np.concatenate(index_parts) if B else np.zeros(0, np.int32)
        if all(g[0] is groups[0][0] for g in groups[1:]):  # usually: one gene layout
            token_of = groups[0][0] if B else np.zeros(0, np.int32)
        else:  # map here; the kernel then maps through the identity
            cuts = np.cumsum([n for _, n in groups])[:-1]
            index = np.concatenate(
                [vt[i] for (vt, _), i in zip(groups, np.split(index, cuts), strict=True)]
            )
            token_of = np.arange(self.vocab_size, dtype=np.int32)
            index = np.where(index < 0, self.vocab_size, index)
            token_of = np.append(token_of, -1).astype(np.int32)
        starts = np.cumsum(lengths) - lengths
        lo, hi = self.organism_block[cells, 0], self.organism_block[cells, 1]
        if self.how == "all":
            rows = np.repeat(order, lengths)
            tokens = token_of[index]
            keep = (data > 0) & (tokens >= lo[rows]) & (tokens < hi[rows])
            x, genes = self._all(B, lo, hi, rows[keep], tokens[keep], data[keep])
            depth = np.bincount(rows, weights=data, minlength=B).astype(np.float32)
        else:
            x = np.zeros((B, self.max_len), dtype=np.float32)
            genes = np.zeros((B, self.max_len), dtype=np.int32)
            depth = np.zeros(B, dtype=np.float32)
            if len(self._stamp) < self.vocab_size or self._stamp[-1] > 2**30:
                self._stamp = np.zeros(self.vocab_size + 1, dtype=np.int32)
            _kernels().select_genes(
                data.astype(np.float32, copy=False),
                index.astype(np.int64, copy=False),
                token_of,
                starts,
                lengths,
                order.astype(np.int64),
                lo,
                hi,
                self.how == "most expr",
                seed,
                self._stamp,
                x,
                genes,
                depth,
            )
        return {
            "x": torch.from_numpy(x),
            "genes": torch.from_numpy(genes),
            "class": torch.from_numpy(self.labels[cells]),
            "tp": torch.zeros(B, dtype=torch.float32),
            "depth": torch.from_numpy(depth),
        }

    def _all(self, B, lo, hi, rows_k, tokens_k, data_k):
        width = int((hi - lo).max()) if B else 0
        x = np.zeros((B, width), dtype=np.float32)
        x[rows_k, tokens_k - lo[rows_k]] = data_k
        genes = (lo[:, None] + np.arange(width)[None, :]).astype(np.int32)
        return x, genes


_KERNELS = None


def _kernels():
    """The per-cell gene selection as compiled loops (numba, which scanpy already needs):
    per cell it is a few passes over ~max_len numbers, which numpy can only batch with
    large scatter/gather temporaries (measured: 3x slower). Compiled on first use and
    cached on disk."""
    global _KERNELS
    if _KERNELS is None:
        from scprint.trainer import _batch_kernels

        _KERNELS = _batch_kernels
    return _KERNELS


def from_scdataloader(inner, genes: list[str], how: str, max_len: int) -> BatchDataset | None:
    """A BatchDataset over the cells of scdataloader's DataModule ``inner``, with its label
    encoders (so codes equal the Collator's) and ``genes`` as the vocabulary.

    None when a file is not on a local filesystem (the caller keeps scdataloader's path).
    """
    import h5py
    import pandas as pd

    from scprint.adapters.lamindb import mapped_labels, mapped_layout
    from scprint.adapters.scdataloader import collate_fn, label_encoders, mapped_dataset

    path_list, indices_list, storage_idx, indices = mapped_layout(mapped_dataset(inner))
    paths = [str(p) for p in path_list]
    if not all(os.path.isfile(p) for p in paths):
        return None
    collate = collate_fn(inner)
    class_names = list(inner.classes.keys())
    encoders = label_encoders(inner)
    files, var_names, labels = [], [], []
    for i, path in enumerate(paths):
        cell_file = CellFile(path)
        files.append(cell_file)
        var_names.append(cell_file.var_names)
        cell_file.var_names = None  # only needed here
        with h5py.File(path, "r") as store:
            columns = []
            for name in class_names:
                values = mapped_labels(mapped_dataset(inner), store, name, i)  # pd.Categorical
                lut = np.array([encoders[name][c] for c in values.categories], dtype=np.int32)
                columns.append(lut[values.codes])
            labels.append(np.stack(columns, axis=1)[indices_list[i]])
    labels = np.concatenate(labels)

    # each organism's genes are one block of the vocabulary (genedf lists them in blocks)
    vocab = pd.Index(genes)
    organism_of_gene = inner.dataset.genedf["organism"].reindex(vocab).to_numpy()
    organism_col = class_names.index(collate.organism_name)
    decode = {code: name for name, code in encoders[collate.organism_name].items()}
    block = np.full((len(labels), 2), -1, dtype=np.int64)
    for code in np.unique(labels[:, organism_col]):
        organism = decode.get(int(code))
        where = np.flatnonzero(organism_of_gene == organism)
        if int(code) not in collate.organism_ids or len(where) == 0:
            continue
        block[labels[:, organism_col] == code] = (where[0], where[-1] + 1)

    # var -> vocabulary index (-1: not in it); identical layouts share one array
    tokens_of: dict[tuple, np.ndarray] = {}
    var_tokens = []
    for names in var_names:
        key = tuple(names)
        if key not in tokens_of:
            tokens_of[key] = vocab.get_indexer(names).astype(np.int32)
        var_tokens.append(tokens_of[key])
    return BatchDataset(
        files,
        storage_idx,
        indices,
        labels,
        block,
        var_tokens,
        how=how,
        max_len=max_len,
    )
