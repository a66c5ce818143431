"""Preprocess at CELLxGENE scale: peak RSS and cells/s of ``scprint preprocess`` (chunked) on
generated CELLxGENE-shaped files (normalized X + raw.X counts, 60,000 genes in var, ~2,000
non-zeros a cell), with scdataloader's Preprocessor on the whole file as the baseline on the
smallest size (``--whole-file``: the same CLI, checks and write, the Preprocessor in between).

Sizes: 100,000 cells, and 1,000,000 with ``--sizes 100000,1000000`` (a ~32 GB input and
tens of minutes on 2 cores). Goals: the 1M peak <= 6 GB and <= 1.5x the 100k peak; cells/s
>= the Preprocessor's on 100k. Rows also go to the section's ``sizes`` list as
{"n_cells", "peak_rss_mb", "cells_per_s"}, written after each run (a later size that fails
keeps the earlier ones). ``--time-limit`` stops a run that takes longer and records it as a
partial row ("partial": true, cells/s from the cells done, the peak RSS until then).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import Row, section_parser, write_section
from bench.preprocess import HUMAN, ontology_workdir

N_GENES = 60_000
NNZ_PER_CELL = 2_000
WRITE_CHUNK = 20_000


def make_input(path: Path, n_cells: int, seed: int = 0) -> None:
    """Write the file a chunk at a time (bounded memory), then rename it into place."""
    if path.exists():
        return
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    from scprint.data.organisms import gene_table

    genes = gene_table(HUMAN).drop_duplicates("ensembl_gene_id").head(N_GENES)
    var = pd.DataFrame(
        {"feature_name": genes.symbol.astype(str).values, "feature_is_filtered": False},
        index=genes.ensembl_gene_id.values,
    )
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for start in range(0, n_cells, WRITE_CHUNK):
            n = min(WRITE_CHUNK, n_cells - start)
            # ~2,000 distinct genes a cell, counts 1 + Poisson(1)
            cols = np.sort(rng.integers(0, len(var), size=(n, NNZ_PER_CELL)), axis=1)
            counts = sp.csr_matrix(
                (
                    (1 + rng.poisson(1.0, size=cols.size)).astype(np.float32),
                    cols.ravel(),
                    np.arange(0, cols.size + 1, NNZ_PER_CELL),
                ),
                shape=(n, len(var)),
            )
            counts.sum_duplicates()
            norm = counts.multiply(1e4 / counts.sum(axis=1)).tocsr().astype(np.float32)
            norm.data = np.log1p(norm.data)
            for key, part in (("raw/X", counts), ("X", norm)):
                if start == 0:
                    write_elem(f, key, part)
                else:
                    sparse_dataset(f[key]).append(part)
        cells = np.arange(n_cells)
        obs = pd.DataFrame(index=[f"cell-{i:07d}" for i in cells])
        obs["organism_ontology_term_id"] = HUMAN
        obs["cell_type_ontology_term_id"] = np.array(["CL:0000236", "CL:0000084"])[cells % 2]
        obs["tissue_ontology_term_id"] = "UBERON:0000178"
        obs["disease_ontology_term_id"] = "PATO:0000461"
        obs["development_stage_ontology_term_id"] = "HsapDv:0000087"
        obs["self_reported_ethnicity_ontology_term_id"] = "HANCESTRO:0005"
        obs["assay_ontology_term_id"] = "EFO:0009922"
        obs["sex_ontology_term_id"] = np.array(["PATO:0000383", "PATO:0000384"])[cells % 2]
        annotations = ad.AnnData(obs=obs, var=var)
        annotations.strings_to_categoricals()
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        f["raw"].attrs["encoding-type"], f["raw"].attrs["encoding-version"] = "raw", "0.1.0"
        write_elem(f, "obs", annotations.obs)
        write_elem(f, "var", annotations.var)
        write_elem(f, "raw/var", annotations.var)
        write_elem(f, "uns", {})
        for empty in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, empty, {})
    os.replace(tmp, path)


def measure(cmd: list[str], cwd: Path, env: dict, limit: float | None):
    """Run ``cmd``: (seconds, its own peak RSS in MB, cells done, finished). The peak comes
    from wait4 on that one process (the bench's other runs don't count), also when it is
    stopped at ``limit``; cells done from its last progress line."""
    log = cwd / "scale-run.log"
    with open(log, "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        stopped = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if limit and time.perf_counter() - started > limit:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                stopped = True
                break
            time.sleep(0.5)
    took = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    finished = proc.returncode == 0
    text = log.read_text()
    if not finished and not stopped:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    done = re.findall(r"\(([\d,]+)/[\d,]+ cells", text)
    cells = None if finished else int(done[-1].replace(",", "")) if done else 0
    return took, usage.ru_maxrss / 1024, cells, finished


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--sizes", default="100000", help="comma-separated cell counts")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds a run may take (then: partial)"
    )
    args = parser.parse_args()
    sizes = [2_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    work, env = ontology_workdir(args.workdir)
    rows, sizes_out = [], []
    for i, n_cells in enumerate(sizes):
        raw = work / f"cxg-{n_cells}.h5ad"
        make_input(raw, n_cells)
        impls = [("scprint preprocess (chunked)", [])]
        if i == 0:
            impls.append(("scdataloader Preprocessor (whole file)", ["--whole-file"]))
        for impl, extra in impls:
            cmd = [sys.executable, "-m", "scprint", "preprocess", "--dataset", "bench",
                   "--input", str(raw), "--out", "out.h5ad", "--report", "out.json", *extra]  # fmt: skip
            took, rss, done, finished = measure(cmd, work, env, args.time_limit)
            (work / "out.h5ad").unlink(missing_ok=True)
            for tmp in work.glob(".out.h5ad*"):  # a stopped run's temporary
                tmp.unlink()
            rate = (n_cells if finished else done) / took
            note = "" if finished else f"partial: stopped after {took:.0f} s, {done:,} cells done"
            figure = f"preprocess {n_cells:,} cells x {N_GENES:,} genes"
            base = bool(extra)
            rows += [
                Row(figure, impl, rate, "cells/s", baseline=base, note=note),
                Row(figure, impl, rss, "MB peak", baseline=base, higher_is_better=False, note=note),
            ]
            size = {"impl": impl, "n_cells": n_cells, "peak_rss_mb": round(rss, 1),
                    "cells_per_s": round(rate, 1)}  # fmt: skip
            if not finished:
                size.update(partial=True, cells_done=done, seconds=round(took))
            sizes_out.append(size)
            print(size, flush=True)
            write_section(args.json, "preprocess-scale", rows, sizes=sizes_out, n_genes=N_GENES)


if __name__ == "__main__":
    main()
