"""The training loader (scprint.trainer.batches behind ScprintDataModule) on a real tiny
laminDB collection: the same batches as scdataloader's reader + Collator, weighted
sampling kept, worker processes, and every ``data.*`` key changing what the module does.

laminDB settings are read once per process, so everything runs in one subprocess
(tests/loader_probe.py) that prints its observations; the tests below judge them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env
from test_fit import build_tiny_collection, write_gene_files

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("loader")
    info = build_tiny_collection(workdir)
    write_gene_files(workdir, info["genes"])
    proc = subprocess.run(
        [sys.executable, str(TESTS / "loader_probe.py"), str(workdir)],
        cwd=workdir,
        env=cli_env(workdir, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line[len("PROBE ") :])


@pytest.mark.parametrize("how", ["most expr", "random expr"])
def test_batches_agree_with_scdataloaders_collator(probe, how):
    """All 110 cells through both paths. "most expr" with max_len 48 (cells have 31-74
    expressed genes: top-k and fill both happen); "random expr" with max_len 150 (every
    expressed gene is taken, so the sets must be equal)."""
    got = probe["agree"][how]
    assert got["keys"] == ["class", "depth", "genes", "tp", "x"]
    assert got["dtypes"] == got["stock_dtypes"]
    assert got["class_equal"] and got["has_unknown"]  # same encoders, unknown = -1
    assert got["depth_equal"] and got["tp_equal"]
    rows = got["rows"]
    assert len(rows) == 110
    assert any(r["n_expr"] > 48 for r in rows) and any(r["n_expr"] < 48 for r in rows)
    for r in rows:
        assert r["same_counts"]  # the same multiset of counts (incl. zero fill)
        assert r["same_genes_above_cut"]  # same chosen genes (ties at the cut aside)
        assert r["counts_match_genes"]  # each count belongs to its gene
        assert r["distinct"] and r["fill_unexpressed"]
    if how == "most expr":
        assert all(r["descending"] for r in rows)


def test_weighted_sampling_oversamples_rare_cell_types(probe):
    got = probe["sampling"]
    population, drawn = got["population"], got["weighted"]
    n_pop, n_drawn = sum(population.values()), sum(drawn.values())
    assert n_drawn == 1600
    rare = min(population, key=population.get)
    assert drawn[rare] / n_drawn > 1.3 * population[rare] / n_pop
    # clss_to_weight: weighting by organism (one class here) draws cells uniformly
    uniform = got["weighted_by_organism"]
    assert uniform[rare] / n_drawn < 1.3 * population[rare] / n_pop


def test_workers_and_pickling(probe):
    got = probe["sampling"]
    assert got["spawn_workers_cells"] == 110  # spawn: the dataset pickles into workers
    assert got["fork_workers"] == 2 and got["fork_workers_cells"] == 1600
    assert got["seeded_repeatable"]  # (seed, cells) fix the genes, not numpy's global state
    assert got["pickled_same"]  # a pickled copy gives the same batches
    assert got["other_seed_other_genes"]


def test_training_loader_resumes_mid_epoch(probe):
    """scprint.trainer.resume.ResumableLoader: an epoch is a function of (seed, epoch), the
    same whatever the global generators did and with workers; restored at batch 3 it reads
    only the 5 batches left; two ranks share an epoch out (disjoint positions, padded to
    equal shares as torch's DistributedSampler does)."""
    got = probe["resume"]
    assert got["batches"] == [8, 8, 8]  # 64 draws in batches of 8
    assert got["epochs_differ"] and got["epoch_1_again_with_workers"]
    assert got["resumed_tail"] and got["cells_read"] == 5 * 8  # 3 batches skipped unread
    assert got["state_after"] == {
        "epoch": 1, "batches": 8, "seed": 0, "world_size": 1, "batch_size": 8
    }  # fmt: skip
    assert got["other_world_tail"] == 5  # another world size: Lightning's count still holds
    assert got["ranks_len"] == [64, 32, 32]
    assert got["ranks_partition_the_epoch"] and got["ranks_differ"]
    assert got["odd_world_pads"] == [22, 22, 22]  # 64 -> 66 over 3 ranks


def test_every_data_key_changes_behaviour(probe):
    k = probe["keys"]
    base = k["base"]
    assert "no collection 'nope'" in k["collection_name"]
    assert "NCBITaxon:10090" in k["organisms"]
    assert (base["n_classes"], k["clss_to_predict"]) == (3, 1)
    assert base["hierarchy"] == ["cell_type_ontology_term_id"] and k["hierarchical_clss"] == []
    # weight_scaler 0: one pass over the 88 training cells; 5: n_samples_per_epoch draws
    assert (base["n_train_batches"], k["n_samples_per_epoch"]) == (88 // 8, 80 // 8)
    assert (base["n_val"], k["validation_split"]) == (22, 55)
    assert base["test"] == 0 and k["test_split"] > 0
    assert base["batch"] == [8, 48] and k["max_len_batch_size"] == [5, 20]  # + batch_size
    assert k["how_most_descending"] and not k["how_random_descending"]
    assert (base["n_genes"], k["gene_embeddings"]) == (180, 200)
    assert base["gene_pos"] is None and k["gene_positions"] == [0, 1, 2, 3]
    assert k["gene_positions_as_is"]  # the positions stage's ranks, not recomputed
    assert k["assays_kept_files"] == [0, 1] and k["assays_to_drop_files"] == [0]
    assert k["replacement"]["True"][0] == 300 and k["replacement"]["True"][1] < 300
    assert k["replacement"]["False"][0] == k["replacement"]["False"][1]  # no repeats
    assert (base["num_workers"], k["num_workers"]) == (0, 2)
    one, two = k["sampler_workers_child_cpu_s"]
    assert one == pytest.approx(0, abs=0.01) and two > 0  # 2: index built in processes
    assert {"train_labels.npy", "valid_idx.npy", "klass_indices.pt"} <= set(k["store_files"])
    assert k["store_same_split"] and not k["nostore_same_split"]
    # clss_to_weight, weight_scaler: also test_weighted_sampling_oversamples_rare_cell_types


def write_interleaved_csr(path: Path, rng) -> tuple:
    """An h5ad-shaped CSR X whose data and indices are chunked and written alternately,
    so each is many runs of chunks with the other's chunks between them (a cell can
    cross from one run into the next)."""
    import h5py

    lengths = rng.integers(0, 40, size=50)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    data = rng.random(indptr[-1], dtype=np.float32)
    indices = rng.integers(0, 300, size=indptr[-1]).astype(np.int32)
    with h5py.File(path, "w", rdcc_nbytes=0) as f:  # no chunk cache: written in turn
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "shape": (50, 300)})
        X["indptr"] = indptr
        ds = [X.create_dataset(k, (0,), a.dtype, chunks=(16,), maxshape=(None,)) for k, a in
              (("data", data), ("indices", indices))]  # fmt: skip
        for start in range(0, len(data), 16):  # one chunk of each, in turn
            for d, a in zip(ds, (data, indices), strict=True):
                d.resize((min(start + 16, len(a)),))
                d[start:] = a[start : start + 16]
        f.create_group("var").attrs["_index"] = "_index"
        f["var/_index"] = np.array([f"g{i}" for i in range(300)], dtype="S")
    return indptr, data, indices


def test_byte_ranges_are_the_bytes_read_rows_reads(tmp_path):
    """The cold-cache read-ahead asks for each row's pages: the byte ranges CellFile
    computes are where the rows' values lie (checked with os.pread), runs crossed included."""
    import os

    from scprint.trainer.batches import CellFile, read_ahead

    path = tmp_path / "x.h5ad"
    indptr, data, indices = write_interleaved_csr(path, np.random.default_rng(0))
    cell_file = CellFile(str(path))
    assert cell_file.mapped and len(cell_file.data_extents.starts) > 10  # many runs
    rows = np.arange(50)
    got_data, got_idx = cell_file.read_rows(rows)
    for r in rows:
        assert np.array_equal(got_data[r], data[indptr[r] : indptr[r + 1]])
        assert np.array_equal(got_idx[r], indices[indptr[r] : indptr[r + 1]])
    fd = os.open(path, os.O_RDONLY)
    try:
        for (offsets, lengths), values in zip(
            cell_file.byte_ranges(rows), (data, indices), strict=True
        ):
            cut = 0
            for r, off, n in zip(rows, offsets.tolist(), lengths.tolist(), strict=True):
                count = n // values.itemsize
                first = values[indptr[r] : indptr[r] + count]
                assert os.pread(fd, n, off) == first.tobytes()
                cut += count < indptr[r + 1] - indptr[r]
            assert cut > 0  # some rows cross into the next run
    finally:
        os.close(fd)
    read_ahead(cell_file.wanted(rows[::3]))  # the madvise calls accept every range


def resident_pages(path: Path) -> np.ndarray:
    """Which pages of the file are in the page cache (mincore on a private map of it)."""
    import ctypes
    import mmap

    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        n = (len(mm) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        buf = ctypes.c_char.from_buffer(mm)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.addressof(buf), len(mm), vec) == 0, ctypes.get_errno()
        del buf
        return np.frombuffer(vec, dtype=np.uint8) & 1
    finally:
        mm.close()


def test_cold_reads_fetch_only_the_pages_a_batch_needs(tmp_path):
    """On a cold page cache, reading a row brings in its own pages, not the device's
    read-ahead window around them (MADV_RANDOM), and read_ahead() brings in exactly the
    rows' pages, in one process_madvise call or a madvise call a range (a 32 MB file: larger than any usual read-ahead window)."""
    import mmap
    import os
    import time

    import h5py

    from scprint.trainer.batches import CellFile, read_ahead

    path = tmp_path / "big.h5ad"
    nnz = 2000
    indptr = np.arange(0, 2001 * nnz, nnz)
    with h5py.File(path, "w") as f:
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "shape": (2000, 20_000)})
        X["indptr"] = indptr
        X["data"] = np.ones(indptr[-1], dtype=np.float32)
        X["indices"] = np.tile(np.arange(0, 20_000, 10, dtype=np.int32), 2000)
        f.create_group("var").attrs["_index"] = "_index"
        f["var/_index"] = np.array([f"g{i}" for i in range(20_000)], dtype="S")
    cell_file = CellFile(str(path))

    def evict() -> np.ndarray:
        """The pages still cached after the eviction (a few stay here, the file's own)."""
        fd = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        left = resident_pages(path)
        if left.sum() > 16:
            pytest.skip(f"this filesystem keeps the file's pages cached ({left.sum()} pages)")
        return left

    def wanted(rows):
        pages = np.zeros(len(resident_pages(path)), dtype=np.uint8)
        for offsets, lengths in cell_file.byte_ranges(rows):
            for at, n in zip(offsets, lengths, strict=True):
                pages[at // mmap.PAGESIZE : (at + n - 1) // mmap.PAGESIZE + 1] = 1
        return pages

    left = evict()
    data, idx = cell_file.read_rows(np.array([1000]))
    assert data[0].sum() == nnz and idx[0][-1] == 19_990  # touches every page of the row
    read = resident_pages(path) & ~left
    assert 0 < read.sum() <= wanted(np.array([1000])).sum() + 2

    for one_call in (True, False):  # process_madvise, a madvise a range
        left = evict()
        rows = np.array([3, 700, 701, 1500])
        want = wanted(rows) & ~left
        read_ahead(cell_file.wanted(rows), one_call=one_call)
        deadline = time.monotonic() + 10  # asynchronous: mincore counts finished reads
        while True:
            got = resident_pages(path) & ~left
            assert not (got & ~want).any()  # nothing but the rows' pages
            if np.array_equal(got, want) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert np.array_equal(got, want), (one_call, got.sum(), want.sum())
