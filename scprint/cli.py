"""The `scprint` command: LightningCLI for training, one subcommand per pipeline stage.

Stage modules are imported only when their subcommand runs, so `scprint download` does
not pay for importing torch and `scprint --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from scprint.io import StageError

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "lamin-init": ("scprint.data.lamin", "create or connect the laminDB instance (works offline)"),
    "ontologies": ("scprint.data.ontologies", "populate the bionty registries scdataloader needs"),
    "demo-data": ("scprint.data.demo", "write the synthetic demo datasets (CELLxGENE schema)"),
    "list-datasets": ("scprint.data.listing", "list CELLxGENE or local datasets to a TSV"),
    "plan": ("scprint.plan", "the bill before the run: data, memory, CPU- and GPU-hours"),
    "download": ("scprint.data.download", "download one dataset, resumable and verified"),
    "preprocess": (
        "scprint.data.preprocess",
        "scdataloader's preprocessing of one dataset, chunked",
    ),
    "collection": ("scprint.data.collection", "register processed datasets as one collection"),
    "gene-positions": ("scprint.embeddings.positions", "genomic rank of every gene"),
    "gene-embeddings": ("scprint.embeddings.esm", "ESM2 protein embeddings per gene"),
    "tiny-esm": ("scprint.embeddings.esm_tiny", "save a tiny random ESM2 model (demo/tests)"),
    "convert": ("scprint.model.convert", "checkpoints to/from upstream scPRINT 2.3.8 (.ckpt)"),
    "train-run": ("scprint.trainer.run", "run `scprint fit` for the workflow and summarise it"),
    "report-datasets": ("scprint.report.datasets", "report figures: datasets table, QC"),
    "report-collection": ("scprint.report.collection", "report figures: collection, sampler"),
    "report-genes": ("scprint.report.genes", "report figures: gene embeddings, positions"),
    "report-training": ("scprint.report.training", "report figures: training curves"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
FINETUNE_HELP = "LoRA fine-tuning on a labeled h5ad (config/finetune.yml)"


def _usage() -> str:
    lines = ["usage: scprint <command> [options]", "", "training (LightningCLI):"]
    lines += [f"  {name:<16}see `scprint {name} --help`" for name in LIGHTNING_SUBCOMMANDS]
    lines += ["", "pipeline stages:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in STAGES.items()]
    lines += [f"  {'finetune':<16}{FINETUNE_HELP}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if not sys.stderr.isatty():  # a log file: library tqdm bars would fill it with \r updates
        os.environ.setdefault("TQDM_DISABLE", "1")  # (ours log a line per 10%: scprint.progress)
    if command == "--version":
        from scprint import __version__

        print(__version__)
        return 0
    if command in LIGHTNING_SUBCOMMANDS:
        from scprint.trainer.cli import lightning_main

        lightning_main([command, *rest])
        return 0
    if command == "finetune":  # jsonargparse config files + dotted overrides, like fit
        from scprint.finetune.run import main as finetune_main

        return finetune_main(rest)
    if command not in STAGES:
        print(f"scprint: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = STAGES[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"scprint {command}", description=help_)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module.run(args)
    except StageError as err:
        print(f"scprint {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
