"""How long snakemake-executor-plugin-slurm takes to submit jobs, grouped and not.

Starts the tests' local Slurm cluster (tests/slurm/cluster.py: root and the Debian slurm
packages needed), then runs a Snakefile of K trivial per-dataset jobs through
profiles/slurm twice: every job its own sbatch call (the rule in no group), then the
rule in the profile's `downloads` group (group-components: the profile's datasets per
job). The figure is read from Slurm's own records: the SubmitTime of each sbatch job of
the run (1 s resolution), hence seconds per sbatch call; and the run's wall time to the
last submission. Writes bench/results/slurm-submit.json.

    python -m bench.slurm_submit [--jobs 16] [--grouped-jobs 60]   # as root, ~4 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm.cluster import SNAKEMAKE_OVERRIDES, LocalSlurm  # noqa: E402

OUT = REPO / "bench" / "results" / "slurm-submit.json"
SNAKEFILE = """
GROUP = config.get("group") or None


rule item:
    output:
        "items/{i}.txt",
    group:
        GROUP
    resources:
        dataset_slots=1,
    shell:
        "echo $SLURM_JOB_ID > {output}"
"""
CORPUS_JOBS = 3_000  # ~1,500 datasets: one download and one preprocess job each


def submit_times(cluster: LocalSlurm, run_name: str) -> list[dt.datetime]:
    return sorted(
        dt.datetime.fromisoformat(r["SubmitTime"])
        for r in cluster.jobs()
        if r["JobName"] == run_name
    )


def one_run(cluster: LocalSlurm, root: Path, jobs: int, grouped: bool) -> dict:
    workdir = root / ("grouped" if grouped else "single")
    workdir.mkdir()
    shutil.copytree(REPO / "profiles" / "slurm", workdir / "profiles" / "slurm")
    (workdir / "Snakefile").write_text(SNAKEFILE)
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    per_job = int(profile["group-components"]["downloads"]) if grouped else 1
    env = cluster.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [
        sys.executable, "-m", "snakemake", "-s", "Snakefile", "--profile", "profiles/slurm",
        *SNAKEMAKE_OVERRIDES, *[f"items/{i}.txt" for i in range(jobs)],
        "--config", f"group={'downloads' if grouped else ''}",
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed ({proc.returncode}):\n{output[-6000:]}")
    run_name = re.search(r"SLURM run ID: (\S+)", output).group(1)
    times = submit_times(cluster, run_name)
    assert len(times) == -(-jobs // per_job), (len(times), jobs, per_job)
    span = (times[-1] - times[0]).total_seconds()
    per_call = span / (len(times) - 1) if len(times) > 1 else None
    return {
        "grouped": grouped,
        "dataset_jobs": jobs,
        "datasets_per_sbatch": per_job,
        "sbatch_calls": len(times),
        "first_to_last_submit_s": span,
        "s_per_sbatch": per_call,
        "s_per_dataset_job": per_call / per_job if per_call else None,
        "snakemake_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16, help="per-dataset jobs, ungrouped")
    parser.add_argument("--grouped-jobs", type=int, default=60, help="per-dataset jobs, grouped")
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from importlib.metadata import version

    root = Path(tempfile.mkdtemp(prefix="scprint-slurm-bench-", dir="/tmp"))
    root.chmod(0o755)  # munged (user munge) must reach the cluster's directory below
    cluster = LocalSlurm(root / "cluster")
    try:
        cluster.start()
        rows = [
            one_run(cluster, root, args.jobs, grouped=False),
            one_run(cluster, root, args.grouped_jobs, grouped=True),
        ]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    single = rows[0]["s_per_sbatch"]
    for row in rows:
        per_job = row["datasets_per_sbatch"]
        # the corpus' per-dataset jobs at this run's seconds per sbatch call
        calls = -(-CORPUS_JOBS // per_job)
        row["corpus_submit_min"] = round(calls * (row["s_per_sbatch"] or single) / 60, 1)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs (shared), local test cluster "
        "(tests/slurm/cluster.py, Slurm 22.05, one node)",
        "plugin": f"snakemake-executor-plugin-slurm {version('snakemake-executor-plugin-slurm')}",
        "snakemake": version("snakemake"),
        "corpus_jobs": CORPUS_JOBS,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(
            f"{'grouped' if row['grouped'] else 'single '}: {row['dataset_jobs']} jobs in "
            f"{row['sbatch_calls']} sbatch calls, {row['s_per_sbatch']} s per call, "
            f"{row['s_per_dataset_job']} s per dataset job; {CORPUS_JOBS} jobs: "
            f"{row['corpus_submit_min']} min of submitting"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
