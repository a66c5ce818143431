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
        --config config/base.yml --config config/pretrain_small.yml \\
        [--init-from CKPT] [-- extra fit args]

Arguments after ``--`` come last, so they override everything (e.g. ``--trainer.max_steps``).

Resuming checks the config first (`check_resume_config`): the checkpoint carries the
config it was trained with, and a run whose config changed since (a new model shape would
crash, a new learning rate would republish the old weights) is refused with the changed
keys, unless each is safe to change (SAFE_TO_CHANGE: how long to train) or named with
``--resume-anyway KEY`` (or ``SCPRINT_RESUME_ANYWAY=KEY,KEY``; ``all`` for any key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    parser.add_argument(
        "--init-from", default=None, help="checkpoint to start from (not when resuming)"
    )
    parser.add_argument("--summary", required=True, help="JSON summary written at the end")
    parser.add_argument(
        "--metrics", default=None, help="CSV of every logged metric (the MetricsLog callback's)"
    )
    parser.add_argument(
        "--config", action="append", required=True, help="training yaml, repeat to merge in order"
    )
    parser.add_argument(
        "--resume-anyway",
        action="append",
        default=[],
        metavar="KEY",
        help="resume although config KEY (e.g. scprint_training.lr) changed; 'all': any key. "
        "Also SCPRINT_RESUME_ANYWAY=KEY,KEY",
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
    elif args.init_from:  # a resumed run already holds the weights init_from gave it
        argv += ["--init_from", args.init_from]
    return argv + list(args.fit_args)


def resume_checkpoint(state: Path) -> Path | None:
    """The newest of last.ckpt (ModelCheckpoint) and hpc_ckpt_N.ckpt (saved on SIGUSR1
    before a Slurm requeue): resuming from an older one would redo finished steps."""
    candidates = [p for p in [state / "last.ckpt", *state.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def validation_history(trainer) -> list[dict]:
    """Each validation loop's metrics (step, epoch, val/acc..., see ValidationMetrics)."""
    from scprint.trainer.validation import ValidationMetrics

    return [
        row for cb in trainer.callbacks if isinstance(cb, ValidationMetrics) for row in cb.history
    ]


# what may change between a run and its resumption: how long to train, and where from
# (init_from is given only to the first run: a resumed run already holds its weights)
SAFE_TO_CHANGE = frozenset(
    {
        "ckpt_path",
        "init_from",
        "config",
        "trainer.max_steps",
        "trainer.max_epochs",
        "trainer.max_time",
    }
)


def flatten(config: dict, prefix: str = "") -> dict:
    """{"trainer": {"max_steps": 3}} -> {"trainer.max_steps": 3}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (old, new) for every value that differs (a missing key reads None)."""
    old, new = flatten(old), flatten(new)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def check_resume_config(checkpoint: Path, new: dict, anyway: set[str]) -> None:
    """Refuse to resume ``checkpoint`` under a config that changed in a key not safe to
    change and not in ``anyway``; log the changes it lets through."""
    import torch

    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    old = (stored.get("scprint") or {}).get("requested_config")
    if old is None:
        log.warning("%s records no config: resuming without comparing configs", checkpoint)
        return
    changed = changed_keys(old, new)
    allowed = changed.keys() if "all" in anyway else SAFE_TO_CHANGE | anyway
    refused = {k: v for k, v in changed.items() if k not in allowed}
    for key in changed.keys() - refused.keys():
        log.info("resuming with %s changed: %r -> %r", key, *changed[key])
    if refused:
        listed = "\n".join(f"  - {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise StageError(
            f"cannot resume from {checkpoint}: the config changed since it was written:\n"
            f"{listed}\nFix: to start afresh, delete {checkpoint.parent} (or pick a new "
            "run name); to resume anyway (only for keys that do not change the model's shape), "
            "pass `--resume-anyway KEY` per key (`all` for every key) or set "
            "SCPRINT_RESUME_ANYWAY=KEY,KEY. Safe to change without it: "
            f"{', '.join(sorted(SAFE_TO_CHANGE))}"
        )


def resume_anyway(args: argparse.Namespace) -> set[str]:
    from_env = os.environ.get("SCPRINT_RESUME_ANYWAY", "")
    return {k.strip() for k in [*args.resume_anyway, *from_env.split(",")] if k.strip()}


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir) / "state"


def run(args: argparse.Namespace) -> None:
    from scprint.trainer.cli import ScprintCLI, build_cli

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
    cli_class = ScprintCLI
    if "--ckpt_path" in argv:
        resumed, anyway = Path(argv[argv.index("--ckpt_path") + 1]), resume_anyway(args)

        class ResumeCheckingCLI(ScprintCLI):
            def parse_arguments(self, parser, args) -> None:
                super().parse_arguments(parser, args)  # sets requested_config
                check_resume_config(resumed, self.requested_config, anyway)

        cli_class = ResumeCheckingCLI
    cli = build_cli(argv, cli_class=cli_class)
    trainer = cli.trainer
    resume = state_dir(args) / "last.ckpt"
    last = Path(args.checkpoint_dir) / "last.ckpt"
    trainer.save_checkpoint(resume)  # the final state, whatever ModelCheckpoint's schedule
    if trainer.is_global_zero:
        with atomic_path(last) as tmp:
            shutil.copyfile(resume, tmp)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        history = metrics_history(state_dir(args))
        write_json(
            args.summary,
            {
                "run": args.run,
                "steps": int(trainer.global_step),
                "epochs": int(trainer.current_epoch),
                "final_losses": metrics,
                "validation": validation_history(trainer),
                "first_last": first_and_last(history),
                "init_from": getattr(cli.model, "init_from_report", None),
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
            with atomic_path(args.metrics) as tmp:
                history.to_csv(tmp, index=False)


def metrics_history(state: Path):
    """The MetricsLog versions of this run (one per start) as one frame of every row."""
    from scprint.trainer.metrics import merge_versions, version_files

    files = version_files(state)
    if not files:
        log.warning("no metrics under %s (MetricsLog not in trainer.callbacks?)", state)
    return merge_versions(files)


def first_and_last(history) -> dict[str, dict]:
    """Each validation metric's first and last logged value (and their steps), so the
    summary says whether the run learned: losses should fall, accuracies and kNN rise.
    From MetricsLog's history (every start of a resumed run); empty when a CSVLogger in
    trainer.logger stands in for it."""
    out = {}
    for name in sorted(c for c in history.columns if c == "val_loss" or c.startswith("val/")):
        logged = history[["step", name]].dropna().sort_values("step", kind="stable")
        if logged.empty:
            continue
        first, last = logged.iloc[0], logged.iloc[-1]
        out[name] = {
            "first": float(first[name]),
            "last": float(last[name]),
            "first_step": int(first["step"]),
            "last_step": int(last["step"]),
            "n": len(logged),
        }
    return out
