"""`scprint plan`: the bill before the run, from the listing and the training config.

Prints, before anything heavy runs: datasets, cells per organism, GB to download, GB after
preprocessing, the collection's size, CPU-hours of preprocessing, GPU-hours of training for
the configured steps and the largest dataset's memory need; writes the same as JSON.

Rates come from measured benchmarks in bench/results (each figure says which file and row);
sizes after preprocessing are estimates (each says how it is made). The memory and runtime
formulas are the ones the Slurm profile's resources use (workflow/rules/common.smk), so the
plan and the jobs agree.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from scprint.io import StageError, write_json

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent.parent / "bench" / "results"
NNZ_PER_CELL = 2_000  # CELLxGENE's typical non-zeros a cell, where a row has no size
BYTES_PER_NNZ = 8  # float32 value + int32 column index
GB = 1e9


# -- resources per job (also used by the workflow's resources, attempt = Snakemake's) ------
def estimated_bytes(size_bytes: int | None, n_cells: int | None) -> int:
    if size_bytes:
        return int(size_bytes)
    return int((n_cells or 0) * NNZ_PER_CELL * BYTES_PER_NNZ * 2)  # X and raw.X


def preprocess_mem_mb(n_cells: int | None, attempt: int = 1) -> int:
    """Chunked preprocess: a fixed part (imports, one 20k-cell chunk padded to ~60k genes,
    the gene registry) plus the annotations of every cell (~40 obs columns, ~2 KB a cell);
    each retry asks for 1.5x more."""
    return int((4_000 + 0.002 * (n_cells or 0)) * 1.5 ** (attempt - 1))


def preprocess_runtime_min(n_cells: int | None, attempt: int = 1, cells_per_s: float = 300):
    return int(max(30, 3 * (n_cells or 0) / cells_per_s / 60) * attempt)


def download_runtime_min(size_bytes: int | None, n_cells: int | None, attempt: int = 1) -> int:
    """At a pessimistic 10 MB/s, three times over, at least 30 minutes; more each retry."""
    return int(max(30, 3 * estimated_bytes(size_bytes, n_cells) / 10e6 / 60) * attempt)


def collection_mem_mb(n_datasets: int, attempt: int = 1) -> int:
    """Registering artifacts reads each file's annotations, one at a time."""
    return int((4_000 + 2 * n_datasets) * 1.5 ** (attempt - 1))


def collection_runtime_min(n_datasets: int, attempt: int = 1) -> int:
    """Hashing and registering a file takes seconds to a minute (tens of GB): 6 s each, x3."""
    return int(max(60, n_datasets * 0.3) * attempt)


def row_of(path: str | Path):
    """The one row of a per-dataset listing file (results/listing/<dataset>.tsv)."""
    from scprint.data.listing import read_listing

    (row,) = read_listing(path).values()
    return row


def job_resources(stage: str, row_path: str | Path, attempt: int = 1) -> dict[str, int]:
    """mem_mb and runtime (minutes) of one dataset's job, from its listing row."""
    row = row_of(row_path)
    if stage == "download":
        return {
            "mem_mb": 2_000 * attempt,
            "runtime": download_runtime_min(row.size_bytes, row.n_cells, attempt),
        }
    if stage == "preprocess":
        return {
            "mem_mb": preprocess_mem_mb(row.n_cells, attempt),
            "runtime": preprocess_runtime_min(row.n_cells, attempt),
        }
    raise ValueError(f"no per-dataset resources for stage {stage!r}")


# -- measured rates -------------------------------------------------------------------------
def _rows(name: str, bench: Path) -> list[dict]:
    path = bench / name
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def preprocess_rate(bench: Path) -> tuple[float, str]:
    for name, impl in (
        ("preprocess-scale.json", "scprint preprocess (chunked)"),
        ("preprocess.json", "scprint preprocess"),
    ):
        rows = [r for r in _rows(name, bench) if r["impl"] == impl and r["unit"] == "cells/s"]
        if rows:
            return rows[-1]["value"], f"{bench / name}: {rows[-1]['figure']} ({impl})"
    return 100.0, "no preprocess benchmark in bench/results: assumed 100 cells/s"


def train_rate(config: dict, bench: Path) -> tuple[float, str]:
    """Milliseconds of GPU time a cell, from the GPU benchmark's ms/step of this model size."""
    sizes = {128: "small", 256: "medium", 512: "large"}
    model = config.get("model", {})
    size = sizes.get(model.get("d_model", 128), "small")
    impl = "ours sdpa" + (", checkpoint_activations" if model.get("checkpoint_activations") else "")
    for name in ("gpu-h100/gpu.json", "gpu.json"):
        for row in _rows(name, bench):
            if row["unit"] == "ms/step" and row["impl"] == impl and row["figure"].startswith(size):
                if row["value"] == row["value"]:  # not NaN
                    batch = int(row.get("note", "B=64").split()[0].removeprefix("B="))
                    return row[
                        "value"
                    ] / batch, f"{bench / name}: {row['figure']}, {impl}, B={batch}"
    return 10.0, "no GPU benchmark in bench/results: assumed 10 ms a cell"


# -- the plan ---------------------------------------------------------------------------
def merge(base: dict, more: dict) -> dict:
    out = dict(base)
    for key, value in more.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


def load_config(paths: list[Path]) -> dict:
    import yaml

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def training_cells(config: dict, gpus: int = 1) -> tuple[int, str]:
    """Cells the run trains on. max_steps counts steps of data.batch_size on EVERY rank
    (Lightning's per-device batch), so the cells grow with the GPUs; an epoch's
    n_samples_per_epoch is split across the ranks (Lightning wraps the sampler in its
    DistributedSamplerWrapper), so they do not."""
    trainer, data = config.get("trainer", {}), config.get("data", {})
    batch = int(data.get("batch_size", 64))
    if int(trainer.get("max_steps", -1) or -1) > 0:
        steps = int(trainer["max_steps"])
        return steps * batch * gpus, (
            f"trainer.max_steps {steps} x data.batch_size {batch} x {gpus} GPU"
            + ("s" if gpus > 1 else "")
        )
    epochs = int(trainer.get("max_epochs", 1))
    per_epoch = int(data.get("n_samples_per_epoch", 0))
    return epochs * per_epoch, f"trainer.max_epochs {epochs} x data.n_samples_per_epoch {per_epoch}"


def plan(
    listing: Path, configs: list[Path], bench: Path = BENCH, nodes: int = 1, gpus_per_node: int = 1
) -> dict:
    """The bill. ``nodes`` x ``gpus_per_node`` is the train job's shape (config train.nodes,
    train.gpus_per_node): the job holds every one of those GPUs for its whole wall time,
    so GPU-hours = wall hours x GPUs."""
    from scprint.data.listing import read_listing
    from scprint.slurm import gpu_hours_factor

    rows = list(read_listing(listing).values())
    config = load_config(configs)
    cells = [r.n_cells or 0 for r in rows]
    per_organism: dict[str, int] = {}
    for row in rows:
        key = ";".join(row.organism) or "unknown"
        per_organism[key] = per_organism.get(key, 0) + (row.n_cells or 0)
    download = sum(estimated_bytes(r.size_bytes, r.n_cells) for r in rows)
    processed = download / 2
    pre_rate, pre_source = preprocess_rate(bench)
    ms_cell, train_source = train_rate(config, bench)
    gpus = gpu_hours_factor(nodes, gpus_per_node)
    train_cells, train_how = training_cells(config, gpus)
    # every GPU trains its share of the cells at the measured rate at the same time
    train_wall_hours = train_cells * ms_cell / 3.6e6 / gpus
    largest = max(rows, key=lambda r: r.n_cells or 0, default=None)
    return {
        "datasets": len(rows),
        "cells": sum(cells),
        "cells_per_organism": dict(sorted(per_organism.items())),
        # unique cells: CELLxGENE marks copies of cells other datasets hold non-primary, and
        # preprocess (primary_only) drops them; None where the listing does not say
        "primary_cells": sum(r.n_primary_cells or 0 for r in rows),
        "datasets_without_primary_count": sum(r.n_primary_cells is None for r in rows),
        "download_gb": round(download / GB, 2),
        "processed_gb": round(processed / GB, 2),
        "processed_gb_how": "half the download: CELLxGENE files hold the counts twice "
        "(normalized X and raw.X), the processed file once (padded genes are zeros, not stored)",
        "collection_gb": round(processed / GB, 2),
        "preprocess_cpu_hours": round(sum(cells) / pre_rate / 3600, 2),
        "preprocess_rate": {"cells_per_s": round(pre_rate, 1), "from": pre_source},
        "train_cells": train_cells,
        "train_cells_how": train_how,
        "train_gpu_hours": round(train_wall_hours * gpus, 2),
        "train_wall_hours": round(train_wall_hours, 2),
        "train_shape": {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus},
        "train_rate": {"ms_per_cell": round(ms_cell, 3), "from": train_source},
        "largest_dataset": None
        if largest is None
        else {
            "dataset": largest.dataset_id,
            "cells": largest.n_cells,
            "download_gb": round(estimated_bytes(largest.size_bytes, largest.n_cells) / GB, 2),
            "preprocess_mem_gb": round(preprocess_mem_mb(largest.n_cells) / 1000, 1),
            "download_runtime_min": download_runtime_min(largest.size_bytes, largest.n_cells),
        },
        "configs": [str(c) for c in configs],
        "listing": str(listing),
    }


def render(bill: dict) -> str:
    shape = bill["train_shape"]
    lines = [
        f"datasets:              {bill['datasets']:,}",
        f"cells:                 {bill['cells']:,}",
    ]
    lines += [f"  {org}: {n:,}" for org, n in bill["cells_per_organism"].items()]
    unknown = bill["datasets_without_primary_count"]
    lines.append(
        f"unique (primary) cells: {bill['primary_cells']:,}"
        + (f" (+ {unknown:,} datasets that do not say)" if unknown else "")
    )
    lines += [
        f"download:              {bill['download_gb']:,} GB",
        f"after preprocessing:   {bill['processed_gb']:,} GB ({bill['processed_gb_how']})",
        f"collection:            {bill['collection_gb']:,} GB",
        f"preprocess:            {bill['preprocess_cpu_hours']:,} CPU-hours at "
        f"{bill['preprocess_rate']['cells_per_s']:,} cells/s ({bill['preprocess_rate']['from']})",
        f"training:              {bill['train_gpu_hours']:,} GPU-hours for "
        f"{bill['train_cells']:,} cells ({bill['train_cells_how']}) at "
        f"{bill['train_rate']['ms_per_cell']} ms a cell ({bill['train_rate']['from']})",
        f"  on {shape['nodes']} node(s) x {shape['gpus_per_node']} GPU(s) = {shape['gpus']} "
        f"GPUs: {bill['train_wall_hours']:,} hours of wall time, each GPU held throughout",
    ]
    big = bill["largest_dataset"]
    if big:
        lines.append(
            f"largest dataset:       {big['dataset']} ({big['cells']:,} cells, "
            f"{big['download_gb']} GB): preprocess needs {big['preprocess_mem_gb']} GB memory"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listing", type=Path, default=Path("results/datasets.tsv"))
    parser.add_argument(
        "--config", type=Path, action="append", default=[], help="training yaml (repeatable)"
    )
    parser.add_argument("--bench", type=Path, default=BENCH, help="measured rates (bench/results)")
    parser.add_argument("--out", type=Path, help="also write the plan as JSON here")
    parser.add_argument(
        "--nodes", type=int, default=1, help="nodes of the train job (config train.nodes)"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=1,
        help="GPUs a node of the train job (config train.gpus_per_node)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    if not args.config:
        raise StageError("scprint plan needs the training config: --config config/base.yml ...")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise StageError(
            f"--nodes ({args.nodes}) and --gpus-per-node ({args.gpus_per_node}) must be >= 1 "
            "(config train.nodes / train.gpus_per_node)"
        )
    bill = plan(args.listing, args.config, args.bench, args.nodes, args.gpus_per_node)
    print(render(bill), flush=True)
    if args.out:
        write_json(args.out, bill)
    return bill
