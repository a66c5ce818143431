"""DAG scale: ``snakemake -n all`` time and peak memory with 100, 1,000 and 5,000 datasets.

Ours: the real workflow (workflow/Snakefile, config/config.yaml) in a fresh project folder
whose listing checkpoint already ran (results/datasets.tsv holds N datasets), so the dry
run plans every download and preprocess job, the collection, genes and training.
Baseline: a bare Snakefile of the same shape (checkpoint -> N downloads -> N preprocess ->
collection), no config schema and no helper functions: what Snakemake itself costs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Row, section_parser, write_section

REPO = Path(__file__).resolve().parents[1]

BARE_SNAKEFILE = """
import csv

checkpoint listing:
    output: "results/datasets.tsv"
    shell: "false"

def processed(wildcards):
    with checkpoints.listing.get().output[0].open() as f:
        ids = [row["dataset_id"] for row in csv.DictReader(f, delimiter="\\t")]
    return expand("data/processed/{dataset}.h5ad", dataset=ids)

rule all:
    input: "results/collection.json"

rule collection:
    input: processed
    output: "results/collection.json"
    shell: "false"

rule download:
    input: "results/datasets.tsv"
    output: "data/raw/{dataset}.h5ad"
    shell: "false"

rule preprocess:
    input: "data/raw/{dataset}.h5ad"
    output: "data/processed/{dataset}.h5ad"
    shell: "false"
"""

MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "took = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])\n"
    "print(p.returncode, took, rss)\n"
)


def listing(n: int) -> str:
    from scprint.data.listing import COLUMNS

    lines = ["\t".join(COLUMNS)]
    for i in range(n):
        values = {
            "dataset_id": f"ds-{i:05d}",
            "title": f"bench dataset {i}",
            "organism": "NCBITaxon:9606",
            "assay": "EFO:0009922",
            "n_cells": "10000",
            "url": f"http://127.0.0.1:9/ds-{i:05d}.h5ad",
            "size_bytes": "1000000",
            "md5": "0" * 32,
        }
        lines.append("\t".join(values[c] for c in COLUMNS))
    return "\n".join(lines) + "\n"


def dry_run(project: Path, snakefile: Path, configfile: Path | None, n: int):
    """(seconds, peak MB, planned jobs) of one dry run in a fresh project folder."""
    shutil.rmtree(project, ignore_errors=True)
    (project / "results").mkdir(parents=True)
    (project / "results" / "datasets.tsv").write_text(listing(n))
    (project / "config").symlink_to(REPO / "config")  # the train rule reads config/*.yml
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "1"]
    cmd += ["--snakefile", str(snakefile), "--directory", str(project)]
    cmd += [f"--configfile={configfile}"] if configfile else []
    cmd += ["all"]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=project
    )
    code, took, rss = proc.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"dry run with {n} datasets failed:\n{proc.stderr}")
    jobs = _planned(proc.stderr, "download")
    if jobs != n:
        raise RuntimeError(f"dry run planned {jobs} downloads, expected {n}:\n{proc.stderr}")
    return float(took), float(rss)


def _planned(output: str, rule: str) -> int:
    """The job count of ``rule`` in Snakemake's job-stats table."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == rule and parts[1].isdigit():
            return int(parts[1])
    return -1


def main() -> None:
    args = section_parser(__doc__).parse_args()
    sizes = [20, 100] if args.quick else [100, 1000, 5000]
    work = args.workdir.resolve() / "dag"
    work.mkdir(parents=True, exist_ok=True)
    bare = work / "Snakefile.bare"
    bare.write_text(BARE_SNAKEFILE)
    rows = []
    for n in sizes:
        start = time.perf_counter()
        ours_s, ours_mb = dry_run(
            work / "ours", REPO / "workflow" / "Snakefile", REPO / "config" / "config.yaml", n
        )
        bare_s, bare_mb = dry_run(work / "bare", bare, None, n)
        figure = f"snakemake -n all, {n:,} datasets"
        rows += [
            Row(figure, "scprint workflow", ours_s, "s", higher_is_better=False),
            Row(figure, "bare Snakefile, same shape", bare_s, "s", baseline=True,
                higher_is_better=False),
            Row(figure, "scprint workflow", ours_mb, "MB peak", higher_is_better=False),
            Row(figure, "bare Snakefile, same shape", bare_mb, "MB peak", baseline=True,
                higher_is_better=False),
        ]  # fmt: skip
        print(f"{n} datasets: ours {ours_s:.1f} s / {ours_mb:.0f} MB, bare {bare_s:.1f} s / "
              f"{bare_mb:.0f} MB ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    shutil.rmtree(work / "ours", ignore_errors=True)
    shutil.rmtree(work / "bare", ignore_errors=True)
    write_section(args.json, "dag", rows, sizes=sizes)


if __name__ == "__main__":
    main()
