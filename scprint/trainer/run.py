"""`scprint train-run`: the workflow's train rule. Runs `scprint fit` (same code path) on
the pipeline's collection and gene files and writes a JSON summary (atomically) once
training ends.

Lightning's checkpoints live in ``<checkpoint-dir>/state/`` and training resumes from
``state/last.ckpt`` when it exists. The rule's output, ``<checkpoint-dir>/last.ckpt``, is
published (copied atomically) only when training has finished: Snakemake deletes a job's
declared outputs before it reruns the job, which must not take the resume point with it.

    scprint train-run --run NAME --collection results/collection.json \\
        --gene-embeddings data/main/gene_embeddings.parquet \\
        --gene-positions data/main/gene_positions.parquet \\
        --checkpoint-dir checkpoints/NAME --summary results/train/NAME.json \\
        --config config/base.yml --config config/pretrain_small.yml [-- extra fit args]

Arguments after ``--`` come last, so they override everything (e.g. ``--trainer.max_steps``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from scprint.io import StageError, atomic_path, read_json, write_json

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name (logger run, summary)")
    parser.add_argument("--collection", required=True, help="results/collection.json")
    parser.add_argument("--gene-embeddings", required=True, help="gene_embeddings.parquet")
    parser.add_argument("--gene-positions", default=None, help="gene_positions.parquet")
    parser.add_argument("--checkpoint-dir", required=True, help="where last.ckpt goes")
    parser.add_argument("--summary", required=True, help="JSON summary written at the end")
    parser.add_argument(
        "--metrics", default=None, help="CSV of every logged metric (the MetricsLog callback's)"
    )
    parser.add_argument(
        "--config", action="append", required=True, help="training yaml, repeat to merge in order"
    )
    parser.add_argument("fit_args", nargs="*", help="after --: extra `scprint fit` arguments")


def fit_argv(args: argparse.Namespace, collection: dict) -> list[str]:
    """The `scprint fit` command line this run stands for."""
    argv = ["fit"]
    for config in args.config:
        argv += ["--config", config]
    argv += [
        "--data.collection_name", collection["key"],
        "--data.gene_embeddings", args.gene_embeddings,
        "--checkpoint.dirpath", str(state_dir(args)),
        # Lightning's SLURM requeue saves hpc_ckpt_N.ckpt in default_root_dir: keep it here
        "--trainer.default_root_dir", str(state_dir(args)),
        "--scprint_training.name", args.run,
    ]  # fmt: skip
    if args.gene_positions:
        argv += ["--data.gene_positions", args.gene_positions]
    if collection.get("organisms"):
        argv += ["--data.organisms", json.dumps(list(collection["organisms"]))]
    if not sys.stderr.isatty():  # a log file: MetricsLog writes a line per 10% instead
        argv += ["--trainer.enable_progress_bar", "false"]
    resume = resume_checkpoint(state_dir(args))
    if resume is not None:
        argv += ["--ckpt_path", str(resume)]
    return argv + list(args.fit_args)


def resume_checkpoint(state: Path) -> Path | None:
    """The newest of last.ckpt (ModelCheckpoint) and hpc_ckpt_N.ckpt (saved on SIGUSR1
    before a Slurm requeue): resuming from an older one would redo finished steps."""
    candidates = [p for p in [state / "last.ckpt", *state.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir) / "state"


def run(args: argparse.Namespace) -> None:
    from scprint.trainer.cli import build_cli

    try:
        collection = read_json(args.collection)
        collection["key"]
    except (OSError, ValueError, KeyError) as err:
        raise StageError(
            f"cannot read the collection key from {args.collection}: {err}; run the collection "
            "rule (`scprint collection`) first"
        ) from err
    argv = fit_argv(args, collection)
    log.info("scprint %s", " ".join(argv))
    cli = build_cli(argv)
    trainer = cli.trainer
    resume = state_dir(args) / "last.ckpt"
    last = Path(args.checkpoint_dir) / "last.ckpt"
    trainer.save_checkpoint(resume)  # the final state, whatever ModelCheckpoint's schedule
    if trainer.is_global_zero:
        with atomic_path(last) as tmp:
            shutil.copyfile(resume, tmp)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        write_json(
            args.summary,
            {
                "run": args.run,
                "steps": int(trainer.global_step),
                "epochs": int(trainer.current_epoch),
                "final_losses": metrics,
                "checkpoint": str(last),
                "resumed_from": argv[argv.index("--ckpt_path") + 1]
                if "--ckpt_path" in argv
                else None,
                "collection": {
                    k: collection.get(k) for k in ("key", "uid", "n_cells", "n_datasets")
                },
                "argv": argv,
                "metrics": args.metrics,
                "config": cli.model.run_config,
            },
        )
        if args.metrics:
            publish_metrics(state_dir(args), args.metrics)


def publish_metrics(state: Path, out: str) -> None:
    """The MetricsLog versions of this run (one per start) as one CSV history."""
    from scprint.trainer.metrics import merge_versions, version_files

    files = version_files(state)
    if not files:
        log.warning("no metrics under %s (MetricsLog not in trainer.callbacks?)", state)
    with atomic_path(out) as tmp:
        merge_versions(files).to_csv(tmp, index=False)
