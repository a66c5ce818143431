"""`scprint fit|validate|test|predict`: LightningCLI over ScPrintModule + ScprintDataModule.

Config sections (several ``--config`` files merge in order; ``--a.b value`` overrides):
- top level: project (W&B project), seed_everything, ckpt_path (resume: step, optimizer
  and scheduler state), set_float32_matmul_precision (true = "high", or a torch value),
  wandblog / log_freq / log_graph (W&B histograms of gradients and/or parameters every
  log_freq steps, the model graph; null / false turn them off: scprint.trainer.watch),
  init_from (start from a checkpoint's weights: scprint.model.init_from);
- trainer: Lightning's Trainer; ``precision: 16-mixed`` falls back to 32-true (with a
  warning) where there is no GPU;
- model: ScPrintModule (network shape); genes, classes, label hierarchy and gene
  positions are linked from the data module, gene_embeddings from data.gene_embeddings;
- data: ScprintDataModule (scdataloader on a laminDB collection);
- scprint_training: the TrainingMode callback (lr, optimizer, objectives, run name);
- checkpoint: ModelCheckpoint's keys (dirpath, every_n_train_steps, save_last, ...), as
  scprint.trainer.checkpointing.ResumableCheckpoint (step checkpoints after validation);
- validation: ValidationMetrics (label accuracy, kNN, denoising score on the validation
  split at the end of each validation loop).
W&B runs offline unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    StochasticWeightAveraging,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from scprint.io import StageError
from scprint.model.lightning import ScPrintModule
from scprint.trainer.checkpointing import ResumableCheckpoint
from scprint.trainer.datamodule import ScprintDataModule
from scprint.trainer.trainer import RENAMED, TrainingMode
from scprint.trainer.validation import ValidationMetrics
from scprint.trainer.watch import WatchModel

log = logging.getLogger(__name__)
MATMUL_PRECISIONS = ("highest", "high", "medium")


class ScprintCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--project", type=str | None, default=None, help="W&B project")
        parser.add_argument(
            "--set_float32_matmul_precision",
            type=bool | str | None,
            default=None,
            help="torch.set_float32_matmul_precision: true = 'high' (TF32), or highest/high/medium",
        )
        parser.add_argument(
            "--wandblog",
            type=str | None,
            default=None,
            help="WandbLogger.watch(log=...): gradients, parameters, all; null: no watching",
        )
        parser.add_argument("--log_freq", type=int, default=500, help="watch every N steps")
        parser.add_argument("--log_graph", type=bool, default=False, help="watch logs the graph")
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="start from this checkpoint's weights (ours or upstream scPRINT's), genes and "
            "classes reconciled with the data; fresh optimizer and step (scprint.model.init_from)",
        )
        # upstream's groups: early stopping on val_loss (patience 5), an lr monitor, TrainingMode
        parser.add_lightning_class_args(EarlyStopping, "scprint_early_stopping")
        parser.set_defaults(
            {"scprint_early_stopping.monitor": "val_loss", "scprint_early_stopping.patience": 5}
        )
        parser.add_lightning_class_args(LearningRateMonitor, "scprint_learning_rate_monitor")
        parser.set_defaults({"scprint_learning_rate_monitor.logging_interval": "epoch"})
        parser.add_lightning_class_args(TrainingMode, "scprint_training")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ValidationMetrics, "validation")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.link_arguments("data.gene_embeddings", "model.gene_embeddings")
        for source, target in [
            ("data.genes", "model.genes"),
            ("data.classes", "model.classes"),
            ("data.labels_hierarchy", "model.labels_hierarchy"),
            ("data.label_decoders", "model.label_decoders"),
            ("data.organisms", "model.organisms"),
            ("data.gene_pos", "model.gene_positions"),
        ]:
            parser.link_arguments(source, target, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # the config as asked for (files + command line), kept before Lightning merges a
        # checkpoint's hyperparameters into `model` (ckpt_path) and before links fill it:
        # what `scprint train-run` compares when it resumes
        cfg = self.config.get(self.config.get("subcommand") or "", self.config)
        self.requested_config = plain_config(cfg)

    @property
    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg
        trainer = cfg.trainer
        if str(trainer.precision) in ("16-mixed", "16") and (
            not torch.cuda.is_available() or trainer.accelerator == "cpu"
        ):
            log.warning(
                "precision %s needs a GPU; none here: training in 32-true", trainer.precision
            )
            trainer.precision = "32-true"
        if cfg.data.gene_embeddings is None and cfg.model.freeze_embeddings:
            # upstream freezes only a table read from embeddings; a random one is learned
            log.info("data.gene_embeddings is null: the gene table starts at random and is learned")
            cfg.model.freeze_embeddings = False
        matmul = cfg.set_float32_matmul_precision
        if matmul not in (None, False):
            value = "high" if matmul is True else str(matmul)
            if value not in MATMUL_PRECISIONS:
                raise StageError(
                    f"set_float32_matmul_precision={matmul!r}: use true or one of "
                    f"{', '.join(MATMUL_PRECISIONS)}"
                )
            torch.set_float32_matmul_precision(value)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            if not hasattr(logger, "class_path"):
                continue  # True/False/None: Lightning's default or no logger
            init = logger.init_args
            if logger.class_path.endswith("WandbLogger"):
                os.environ.setdefault("WANDB_MODE", "offline")
                if cfg.project is not None:
                    init.project = cfg.project
            if cfg.scprint_training.name and "name" in init:
                init.name = cfg.scprint_training.name

    def _watch(self) -> None:
        """wandblog / log_freq / log_graph: the WatchModel callback (see scprint.trainer.watch
        for why not WandbLogger.watch)."""
        cfg = self._cfg
        log = None if cfg.wandblog in (None, "", False) else cfg.wandblog
        if log is None and not cfg.log_graph:
            return
        wandb_loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            raise StageError(
                f"wandblog={cfg.wandblog!r} / log_graph={cfg.log_graph} watch the model with W&B, "
                "but trainer.logger has no WandbLogger: add one, or set wandblog: null and "
                "log_graph: false"
            )
        try:
            watch = WatchModel(wandb_loggers, log, cfg.log_freq, cfg.log_graph)
        except ValueError as err:
            raise StageError(str(err)) from err
        self.trainer.callbacks.append(watch)

    def _record_config(self) -> None:
        """The merged config goes into every checkpoint (ScPrintModule.on_save_checkpoint)."""
        # plain JSON types only: checkpoints must load with torch.load(weights_only=True)
        self.model.run_config = plain_config(self._cfg)
        self.model.requested_config = self.requested_config

    def _init_from(self) -> None:
        """init_from: the checkpoint's weights into the model built for this data."""
        cfg = self._cfg
        if cfg.init_from is None:
            return
        if cfg.ckpt_path is not None:
            raise StageError(
                f"init_from={cfg.init_from!r} and ckpt_path={cfg.ckpt_path!r} are both set: "
                "ckpt_path resumes a run (weights, optimizer, step), init_from starts a new one "
                "from a checkpoint's weights; keep one"
            )
        from scprint.model.init_from import init_from_checkpoint

        self.model.init_from_report = init_from_checkpoint(self.model, cfg.init_from)

    def _check_swa(self) -> None:
        """Lightning's StochasticWeightAveraging replaces the lr schedule at swa_epoch_start
        with SWALR annealing towards swa_lrs: above the lr, training that was converging is
        pushed up (upstream's docs: 0.03, 300x their lr)."""
        lr = self._cfg.scprint_training.lr
        for callback in self.trainer.callbacks:
            if not isinstance(callback, StochasticWeightAveraging):
                continue
            swa_lrs = callback._swa_lrs
            highest = max(swa_lrs) if isinstance(swa_lrs, (list, tuple)) else swa_lrs
            if highest is not None and highest > lr:
                log.warning(
                    "StochasticWeightAveraging(swa_lrs=%s): from swa_epoch_start=%s on, Lightning "
                    "replaces the warm-up + %s schedule with SWALR, which raises the lr to %s "
                    "(%.0fx scprint_training.lr=%s); set swa_lrs at or below the lr, or drop "
                    "the callback",
                    swa_lrs, callback._swa_epoch_start, self._cfg.scprint_training.lr_schedule,
                    highest, highest / lr, lr,
                )  # fmt: skip

    def before_fit(self) -> None:
        self._record_config()
        self._init_from()
        self._watch()
        self._check_swa()

    def before_validate(self) -> None:
        self._record_config()
        self._init_from()

    def before_test(self) -> None:
        self._record_config()
        self._init_from()

    def before_predict(self) -> None:
        self._init_from()


def plain_config(cfg) -> dict:
    """A jsonargparse Namespace as plain JSON types (checkpoints must load with
    torch.load(weights_only=True))."""
    return json.loads(json.dumps(cfg.clone().as_dict(), default=str))


def check_renamed_keys(argv: list[str]) -> None:
    """An old config of ours (or a command line) with a renamed scprint_training key gets
    an error naming the new key, before jsonargparse's generic "does not accept option"."""
    import yaml

    found: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--scprint_training."):
            found.append(arg.split("=", 1)[0].removeprefix("--scprint_training."))
        if arg in ("--config", "-c") and i + 1 < len(argv) and os.path.isfile(argv[i + 1]):
            with open(argv[i + 1]) as f:
                section = (yaml.safe_load(f) or {}).get("scprint_training") or {}
            if isinstance(section, dict):
                found += list(section.get("init_args", section))
    old = [key for key in found if key in RENAMED]
    if old:
        raise StageError(
            "scprint_training keys of an earlier version of this pipeline: "
            + "; ".join(f"{key} -> {RENAMED[key]}" for key in old)
            + " (scprint_training now takes upstream scPRINT 2.3.8's TrainingMode keys: "
            "docs/training.md)"
        )


def build_cli(
    argv: list[str], run: bool = True, cli_class: type[ScprintCLI] = ScprintCLI
) -> ScprintCLI:
    """Parse ``argv`` (subcommand first), build everything and, with ``run``, run it."""
    check_renamed_keys(list(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with warnings.catch_warnings():
        # we pass args on purpose (scprint's dispatcher strips its own argv[0..1])
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class(
            ScPrintModule,
            ScprintDataModule,
            args=list(argv),
            run=run,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
        )


def lightning_main(argv: list[str], run: bool = True) -> ScprintCLI:
    """``scprint <fit|validate|test|predict> ...``; an expected error exits 1 with a message."""
    try:
        return build_cli(argv, run)
    except StageError as err:
        print(f"scprint {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        sys.exit(1)
