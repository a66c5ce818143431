"""Preprocess: cells/s of ``scprint preprocess`` vs scdataloader's Preprocessor called
directly, on the same CELLxGENE-shaped dataset, each from reading the h5ad to writing the
processed one, each in its own process (start-up and imports included in both).

Ours adds the checks that run before the Preprocessor (counts, gene ids, obs columns,
ontology terms against the registries) and the report. The dataset: synthetic Poisson
counts on real GENCODE human gene ids, schema-7 obs; the laminDB instance holds the
offline ontologies (made once, kept in the workdir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import Row, section_parser, write_section
from bench.dag import MEASURE

HUMAN = "NCBITaxon:9606"

DIRECT = """
import sys
from scprint.data.lamin import connect
connect()
import anndata
from scdataloader.preprocess import Preprocessor
adata = anndata.read_h5ad(sys.argv[1])
pre = Preprocessor(organisms=[sys.argv[3]], use_raw=False, force_preprocess=False)
adata = pre(adata, dataset_id="bench")
adata.write_h5ad(sys.argv[2])
"""


def make_input(path: Path, n_cells: int, n_genes: int) -> int:
    """A CELLxGENE-shaped h5ad (cached); returns its non-zeros per cell."""
    if not path.exists():
        from scprint.data.demo import DATASETS, demo_genes, make_dataset

        spec = DATASETS[0].__class__(**{**DATASETS[0].__dict__, "n_cells": n_cells})
        adata = make_dataset(spec, demo_genes(HUMAN, n_genes, seed=0), seed=0)
        tmp = path.with_name(f".{path.name}.tmp")
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X/data"].shape[0] / f["obs/_index"].shape[0])


def measure(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=cwd, env=env
    )
    code, took, rss = proc.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return float(took), float(rss)


def ontology_workdir(workdir: Path) -> tuple[Path, dict]:
    """``<workdir>/preprocess`` with a laminDB instance holding the human ontologies (made
    once, kept between runs) and the environment that finds it."""
    work = workdir.resolve() / "preprocess"
    work.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout's scprint, not another
    env = {**os.environ, "LAMIN_SETTINGS_DIR": str(work / "lamin" / "settings"),
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    ready = work / "results" / "ontologies.json"
    if not ready.exists():
        for stage in (
            ["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"],
            ["ontologies", "--organism", HUMAN, "--out", str(ready)],
        ):
            subprocess.run([sys.executable, "-m", "scprint", *stage], cwd=work, env=env, check=True)
    return work, env


def main() -> None:
    args = section_parser(__doc__).parse_args()
    n_cells, n_genes = (1_000, 20_000) if args.quick else (5_000, 20_000)
    work, env = ontology_workdir(args.workdir)
    raw = work / f"raw-{n_cells}x{n_genes}.h5ad"
    nnz = make_input(raw, n_cells, n_genes)

    ours_s, ours_mb = measure(
        [sys.executable, "-m", "scprint", "preprocess", "--dataset", "bench", "--input",
         str(raw), "--out", "ours.h5ad", "--report", "ours.json"],
        work, env,
    )  # fmt: skip
    direct_s, direct_mb = measure(
        [sys.executable, "-c", DIRECT, str(raw), "direct.h5ad", HUMAN], work, env
    )
    report = json.loads((work / "ours.json").read_text())
    figure = f"preprocess {n_cells:,} cells x {n_genes:,} genes (~{nnz:,} non-zeros a cell)"
    note = f"{report['cells']['after']:,} cells kept; read + checks + Preprocessor {report['duration_s']} s (no write)"
    rows = [
        Row(figure, "scprint preprocess", n_cells / ours_s, "cells/s", note=note),
        Row(figure, "scdataloader Preprocessor", n_cells / direct_s, "cells/s", baseline=True),
        Row(figure, "scprint preprocess", ours_mb, "MB peak", higher_is_better=False),
        Row(figure, "scdataloader Preprocessor", direct_mb, "MB peak", baseline=True,
            higher_is_better=False),
    ]  # fmt: skip
    for name in ("ours.h5ad", "direct.h5ad"):
        (work / name).unlink(missing_ok=True)
    write_section(args.json, "preprocess", rows, cells=n_cells, genes=n_genes, nnz_per_cell=nnz)


if __name__ == "__main__":
    main()
