"""Training loader: cells/s delivered as collated batches, and peak RSS.

``python -m bench.loader --json OUT [--quick] [--workdir DIR]``

One collection (bench/loader_data.py: ~100,000 cells x 20,000 genes, ~1,500 non-zeros a
cell, 8 h5ad files, an offline laminDB instance; generated once into the workdir) and the
training setup of config/base.yml (how="random expr", max_len 2200, batch 64, weighted
sampling over cell type x assay x organism with weight_scaler 50, six predicted classes,
four hierarchical). Each variant runs in a fresh process (its own peak RSS):

- scprint: ScprintDataModule.train_dataloader() (scprint.trainer.batches), 0 and 2 workers;
- stock scdataloader (baseline): the same module's scdataloader_train_dataloader()
  (lamindb MappedCollection per-cell reads + scdataloader's Collator), 0 and 2 workers;
- annbatch (baseline), in its own venv (.bench-venv-annbatch, `make bench-annbatch-venv`),
  set up as its docs say (zarrs codec pipeline): the same cells written as its sharded
  zarr, uniform order (no weighted sampler), raw CSR batches and with the same gene
  selection by our compiled kernel; per-cell random (chunk_size=1), the same in its
  in-memory mode (CSR matrices in RAM), and its default chunked order (only approximately
  random; not comparable, reported for scale).

Cold data (at 50M cells the collection is far larger than RAM): two figures, each next to
a floor: the byte ranges ours read at 0 workers (each cell's data and indices,
CellFile.byte_ranges), read with os.pread in the same order. "cold start": the
collection's pages are evicted from the page cache (os.posix_fadvise POSIX_FADV_DONTNEED,
no root needed) once, before the warm-up; "every batch cold": each batch's own pages are
also evicted just before it is read, as at 50M cells, where RAM holds a sliver of the
collection and almost every read goes to disk (a 1.5 GB collection is otherwise soon all
cached, by the device's read-ahead alone). Ours at COLD_WORKERS, the floor (and the floor
with each batch's ranges hinted first, as ours does), annbatch (its store evicted in its
process before each timed pass); rows have their ratio to the floor. Goal: ours >= 70% of
the floor. ``--cold-only`` runs only these rows, interleaved COLD_REPEATS times, rows
medians (`bench/results/loader-cold.json`; in the whole section: once).

Rows are cells/s after a warm-up (worker start, the compiled kernel's first call, the
sampler's first epoch draw), so the figure is the steady state a training run sees.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import Row, evict, section_parser, write_section

REPO = Path(__file__).resolve().parents[1]
ANNBATCH_PY = REPO / ".bench-venv-annbatch" / "bin" / "python"
FULL = {"cells": 100_000, "files": 8, "genes": 20_000}
QUICK = {"cells": 4_000, "files": 2, "genes": 20_000}
# batches measured (after warm-up) per variant: stock is ~100x slower than ours
BATCHES = {"scprint": 300, "stock": 25, "annbatch": 40}
QUICK_BATCHES = {"scprint": 40, "stock": 6, "annbatch": 16}
COLD_WORKERS = (0, 2, 4)  # num_workers of the cold rows (prefetch_factor: torch's 2)
COLD_REPEATS = 3
DATA = dict(
    clss_to_predict=[
        "organism_ontology_term_id",
        "cell_type_ontology_term_id",
        "tissue_ontology_term_id",
        "disease_ontology_term_id",
        "assay_ontology_term_id",
        "sex_ontology_term_id",
    ],
    hierarchical_clss=[
        "cell_type_ontology_term_id",
        "tissue_ontology_term_id",
        "disease_ontology_term_id",
        "assay_ontology_term_id",
    ],
    clss_to_weight=[
        "cell_type_ontology_term_id",
        "assay_ontology_term_id",
        "organism_ontology_term_id",
    ],
    weight_scaler=50,
    how="random expr",
    max_len=2200,
    batch_size=64,
    validation_split=0.02,
    sampler_workers=1,
)


def ensure_data(root: Path, size: dict) -> dict:
    """Generate the collection unless a finished one with the same sizes is there."""
    ready = root / "ready.json"
    if ready.exists():
        info = json.loads(ready.read_text())
        if (info["n_cells"], info["n_files"], info["n_genes"]) == tuple(size.values()):
            return info
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"generating {size['cells']:,} cells x {size['genes']:,} genes in {root} ...", flush=True)
    cmd = [sys.executable, "-m", "bench.loader_data", str(root), *map(str, size.values())]
    subprocess.run(cmd, check=True, env=_env(root), cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(ready.read_text())


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["LAMIN_SETTINGS_DIR"] = str(root / "lamin" / "settings")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


PAGE = os.sysconf("SC_PAGE_SIZE")


def page_spans(offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first byte, stop byte) of the pages holding the byte ranges, overlapping or
    adjacent pages merged, in file order: the fewest calls for those bytes."""
    keep = lengths > 0
    lo = offsets[keep] // PAGE
    hi = (offsets[keep] + lengths[keep] - 1) // PAGE + 1
    if not len(lo):
        return lo, hi
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], np.maximum.accumulate(hi[order])
    new = np.ones(len(lo), dtype=bool)
    new[1:] = lo[1:] > hi[:-1]
    last = np.append(np.flatnonzero(new)[1:] - 1, len(lo) - 1)
    return lo[new] * PAGE, hi[last] * PAGE


def advise(fd: int, ranges, advice: int) -> None:
    """posix_fadvise ``advice`` on the pages of [(offsets, lengths), ...] of one file."""
    for offsets, lengths in ranges:
        for lo, hi in zip(*page_spans(offsets, lengths), strict=True):
            os.posix_fadvise(fd, int(lo), int(hi - lo), advice)


class BatchEvictor:
    """Evicts a batch's own pages before the dataset reads it (cold="batch"); in each
    process that reads (DataLoader workers fork with it)."""

    def __init__(self, dataset):
        self.dataset, self.fds, self.pid = dataset, {}, None

    def __call__(self, indices) -> None:
        if self.pid != os.getpid():
            self.fds, self.pid = {}, os.getpid()
        ds = self.dataset
        cells = np.asarray(indices, dtype=np.int64)
        files, rows = ds.file_of_cell[cells], ds.row_of_cell[cells]
        for f in np.unique(files).tolist():
            if f not in self.fds:
                self.fds[f] = os.open(ds.files[f].path, os.O_RDONLY)
            ranges = ds.files[f].byte_ranges(np.sort(rows[files == f]))
            advise(self.fds[f], ranges, os.POSIX_FADV_DONTNEED)


def measure_in_process(
    impl: str, workers: int, n_batches: int, warmup: int, cold: str = "", record: str = ""
) -> dict:
    """Runs inside the variant's own process (``--measure``); ``cold`` "start" evicts the
    collection's pages first, "batch" also each batch's pages before it is read;
    ``record`` writes the cells each batch read (0 workers)."""
    import torch

    from scprint.trainer.datamodule import ScprintDataModule

    torch.set_num_threads(1)
    started = time.perf_counter()
    dm = ScprintDataModule(
        "bench-loader",
        n_samples_per_epoch=(n_batches + warmup + 2) * DATA["batch_size"],
        num_workers=workers,
        **DATA,
    )
    dm.setup("fit")
    loader = dm.train_dataloader() if impl == "scprint" else dm.scdataloader_train_dataloader()
    setup_s = time.perf_counter() - started
    dataset = loader.dataset
    drawn, evict_batch = [], BatchEvictor(dataset) if cold == "batch" else None
    read = dataset.__getitems__ if record or evict_batch else None  # ours only

    def wrapped(indices):  # the floor replays the recorded reads
        if record:
            drawn.append(list(indices))
        if evict_batch:
            evict_batch(indices)
        return read(indices)

    if record or evict_batch:
        dataset.__getitems__ = wrapped
    if cold:
        evict([f.path for f in dataset.files])
    cells, start = 0, None
    it = iter(loader)
    for i, batch in enumerate(it):
        if i == warmup:
            start, cells = time.perf_counter(), 0
        cells += batch["x"].shape[0]
        if i + 1 == warmup + n_batches:
            break
    seconds = time.perf_counter() - start
    shape = list(batch["x"].shape)
    if record:
        Path(record).write_text(json.dumps(drawn[warmup : warmup + n_batches]))
    del it, loader  # joins the workers, so RUSAGE_CHILDREN holds their peak
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {
        "rss_anon_mb": int(status.get("RssAnon", "0 kB").split()[0]) / 1024,
        "rss_file_mb": int(status.get("RssFile", "0 kB").split()[0]) / 1024,
        "cells_per_s": cells / seconds,
        "cells": cells,
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "batch_shape": shape,
    }


def floor_in_process(record: str) -> dict:
    """os.pread of the byte ranges ours read (``--floor``), same order: cold start and
    every batch cold (its pages evicted before its reads, in the timing as in ours'), each
    also with each batch's ranges hinted first (WILLNEED, as ours does): the reads with a
    batch's I/O in flight together, no batch building."""
    from scprint.trainer.datamodule import ScprintDataModule

    dm = ScprintDataModule("bench-loader", num_workers=0, **DATA)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    batches = json.loads(Path(record).read_text())
    plans = []  # per batch, per file (rows increasing): [(path, [(offsets, lengths)] x 2)]
    for indices in batches:
        cells = np.asarray(indices, dtype=np.int64)
        files, rows = dataset.file_of_cell[cells], dataset.row_of_cell[cells]
        order = np.lexsort((rows, files))
        plan = []
        for f in np.unique(files[order]):
            cell_file = dataset.files[int(f)]
            plan.append((cell_file.path, cell_file.byte_ranges(rows[order[files[order] == f]])))
        plans.append(plan)
    fds = {path: os.open(path, os.O_RDONLY) for plan in plans for path, _ in plan}
    cells = sum(len(b) for b in batches)
    out = {"cells": cells}
    for cold in ("start", "batch"):
        for hinted in (False, True):
            evict(list(fds))
            start, nbytes = time.perf_counter(), 0
            for plan in plans:
                for path, ranges in plan if cold == "batch" else ():
                    advise(fds[path], ranges, os.POSIX_FADV_DONTNEED)
                for path, ranges in plan if hinted else ():
                    advise(fds[path], ranges, os.POSIX_FADV_WILLNEED)
                for path, ranges in plan:
                    for offsets, lengths in ranges:
                        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
                            nbytes += len(os.pread(fds[path], n, off))
            out[f"{cold}{'-hinted' if hinted else ''}"] = cells / (time.perf_counter() - start)
            out["mb_read"] = nbytes / 1e6
    for fd in fds.values():
        os.close(fd)
    return out


def run_variant(
    root: Path, impl: str, workers: int, n_batches: int, warmup: int, *extra: str
) -> dict:
    cmd = [sys.executable, "-m", "bench.loader", "--measure", impl, "--workers", str(workers)]
    cmd += ["--batches", str(n_batches), "--warmup", str(warmup), "--json", "-", *extra]
    proc = subprocess.run(cmd, env=_env(root), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} ({workers} workers) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_annbatch(root: Path, info: dict, mode: str, n_batches: int) -> dict:
    """annbatch in its own venv; {"error": why} when it cannot run here. ``mode`` "cold":
    per-cell random order, the store's pages evicted before each pass."""
    if not ANNBATCH_PY.exists():
        return {"error": "no .bench-venv-annbatch: run `make bench-annbatch-venv` (annbatch "
                "needs Python >= 3.12, anndata >= 0.12 and zarr 3, so it gets its own venv)"}  # fmt: skip
    cmd = [str(ANNBATCH_PY), str(REPO / "bench" / "loader_annbatch.py"), mode, str(n_batches)]
    cmd += [str(max(4, n_batches // 2)), str(DATA["max_len"]), str(root / "annbatch")]
    proc = subprocess.run(cmd + info["files"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"annbatch failed: {proc.stderr.strip().splitlines()[-1]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = section_parser(__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=["scprint", "stock"], help=argparse_hidden())
    parser.add_argument("--workers", type=int, default=0, help=argparse_hidden())
    parser.add_argument("--batches", type=int, default=100, help=argparse_hidden())
    parser.add_argument("--warmup", type=int, default=3, help=argparse_hidden())
    parser.add_argument("--cold", choices=["start", "batch"], help=argparse_hidden())
    parser.add_argument("--record", default="", help=argparse_hidden())
    parser.add_argument("--floor", default="", help=argparse_hidden())
    parser.add_argument("--cold-only", action="store_true", help="only the cold-cache rows")
    args = parser.parse_args(argv)
    if args.floor:
        print(json.dumps(floor_in_process(args.floor)))
        return 0
    if args.measure:  # one variant, in this (fresh) process
        print(json.dumps(measure_in_process(
            args.measure, args.workers, args.batches, args.warmup, args.cold or "", args.record
        )))  # fmt: skip
        return 0

    size = QUICK if args.quick else FULL
    batches = QUICK_BATCHES if args.quick else BATCHES
    root = (args.workdir / ("loader-quick" if args.quick else "loader")).resolve()
    info = ensure_data(root, size)
    rows: list[Row] = []
    details = {"collection": info, "setup": DATA}
    if args.cold_only:
        rows = cold_rows(root, info, batches, details, 1 if args.quick else COLD_REPEATS)
        write_section(args.json, "loader", rows, details=details)
        return 0
    for impl, label, base in [("scprint", "scprint", False), ("stock", "stock scdataloader", True)]:
        for workers in (0, 2):
            warmup = 3 if impl == "stock" else 10
            r = run_variant(root, impl, workers, batches[impl], warmup)
            details[f"{impl}-{workers}"] = r
            print(f"  {label}, {workers} workers: {r['cells_per_s']:,.0f} cells/s", flush=True)
            note = f"{r['cells']} cells"
            rows.append(Row(f"loader, {workers} workers", label, r["cells_per_s"], "cells/s",
                            baseline=base, note=note))  # fmt: skip
            rss = r["peak_rss_mb"] + (r["worker_peak_rss_mb"] if workers else 0)
            # memory-mapped file pages count in RSS: shared page cache, not our heap
            note = f"main: {r['rss_anon_mb']:,.0f} anon + {r['rss_file_mb']:,.0f} file-backed"
            note += " at the end; + largest worker" if workers else " at the end"
            rows.append(Row(f"loader peak RSS, {workers} workers", label, rss, "MB",
                            baseline=base, higher_is_better=False, note=note))  # fmt: skip
    rows += cold_rows(root, info, batches, details, 1)  # --cold-only: COLD_REPEATS
    orders = {
        "random": ("per-cell random order", "loader, 0 workers"),
        "memory": ("per-cell random order, in-memory mode", "loader, 0 workers"),
        "chunked": ("its chunked order (512 cells)", "loader, 0 workers, chunked order"),
    }
    for mode, (order, figure) in orders.items():
        r = run_annbatch(root, info, mode, batches["annbatch"])
        details[f"annbatch-{mode}"] = r
        if "error" in r:
            print(f"  annbatch ({mode}): not measured: {r['error']}", flush=True)
            continue
        print(f"  annbatch, {order}: {r['selected']:,.0f} cells/s ({r['raw']:,.0f} raw)")
        label = "annbatch in memory" if mode == "memory" else "annbatch (zarrs)"
        rows.append(Row(figure, f"{label} + same compiled selection", r["selected"], "cells/s",
                        baseline=True, note=f"{order}, uniform sampling"))  # fmt: skip
        rows.append(Row(figure, f"{label}, raw CSR batches", r["raw"], "cells/s",
                        note=f"{order}, no gene selection"))  # fmt: skip
        if mode != "chunked":
            rows.append(Row("loader peak RSS, 0 workers", f"{label} + same compiled selection",
                            r["peak_rss_mb"], "MB", higher_is_better=False))  # fmt: skip
    write_section(args.json, "loader", rows, details=details)
    return 0


COLD = {
    "start": "loader, cold start (pages evicted before the warm-up)",
    "batch": "loader, every batch cold (its pages evicted before it is read)",
}


def cold_rows(root: Path, info: dict, batches: dict, details: dict, repeats: int) -> list[Row]:
    """Ours at COLD_WORKERS in both cold modes, the pread floors of ours' reads, annbatch
    cold: each repeat runs every variant once (interleaved, so load from other processes
    hits all); rows are medians, each with its ratio to its floor's median."""
    record = root / "cold-reads.json"
    runs: dict[str, list[dict]] = {}

    def note(key, field="cells_per_s"):
        runs.setdefault(key, [])
        return lambda r: (
            runs[key].append(r),
            print(f"    {key}: {r[field]:,.0f} cells/s", flush=True),
        )

    for rep in range(repeats):
        print(f"  cold, repeat {rep + 1}/{repeats}: load average {os.getloadavg()[0]:.1f}")
        for cold in COLD:
            for workers in COLD_WORKERS:
                extra = ["--cold", cold] + (["--record", str(record)] if workers == 0 else [])
                r = run_variant(root, "scprint", workers, batches["scprint"], 10, *extra)
                note(f"scprint-{workers}-{cold}")(r)
        cmd = [sys.executable, "-m", "bench.loader", "--floor", str(record), "--json", "-"]
        proc = subprocess.run(cmd, env=_env(root), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the pread floor failed:\n{proc.stderr[-3000:]}")
        note("floor", "batch")(json.loads(proc.stdout.strip().splitlines()[-1]))
        if "annbatch-cold" not in details:  # an error once: not measured
            r = run_annbatch(root, info, "cold", batches["annbatch"])
            if "error" in r:
                print(f"    annbatch cold: not measured: {r['error']}", flush=True)
                details["annbatch-cold"] = r
            else:
                note("annbatch", "selected")(r)
    details["cold-runs"] = runs
    details["cold-load-average-at-end"] = os.getloadavg()

    def median(key, field="cells_per_s"):
        values = [r[field] for r in runs[key]]
        return float(np.median(values)), ", ".join(f"{v:,.0f}" for v in values)

    rows = []
    mb = runs["floor"][-1]["mb_read"]
    for cold, figure in COLD.items():
        floor, values = median("floor", cold)
        rows.append(Row(figure, "os.pread floor (same byte ranges, same order)", floor, "cells/s",
                        baseline=True, note=f"{mb:.0f} MB a pass; runs {values}"))  # fmt: skip
        value, values = median("floor", f"{cold}-hinted")
        rows.append(Row(figure, "os.pread, each batch's ranges hinted first (WILLNEED)", value,
                        "cells/s", note=f"{value / floor:.0%} of the floor; runs {values}"))  # fmt: skip
        for workers in COLD_WORKERS:
            value, values = median(f"scprint-{workers}-{cold}")
            cells = runs[f"scprint-{workers}-{cold}"][-1]["cells"]
            rows.append(Row(figure, f"scprint, {workers} workers", value, "cells/s",
                            note=f"{value / floor:.0%} of the floor; {cells} cells; runs {values}"))  # fmt: skip
        if "annbatch" in runs and cold == "start":
            for field, label in (("selected", "+ same compiled selection"), ("raw", "raw CSR")):
                value, values = median("annbatch", field)
                rows.append(Row(figure, f"annbatch (zarrs), {label}", value, "cells/s",
                                note=f"{value / floor:.0%} of the floor; per-cell random order, "
                                     f"its own store (8 cells a chunk); runs {values}"))  # fmt: skip
    return rows


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
