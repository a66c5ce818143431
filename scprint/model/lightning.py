"""The LightningModule around ScPrint: optimizer, LR schedule, logging, checkpoints.

Its ``__init__`` arguments are the `model:` section of the configs (the network's shape
and the data-derived gene list / classes / label hierarchy, linked in by the CLI).
Training-only parameters (lr, optimizer, objectives...) are set by the TrainingMode
callback (`scprint_training:`); the defaults below apply when it is absent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from scprint.model import losses
from scprint.model.genes import read_gene_embeddings
from scprint.model.model import ScPrint, ScPrintConfig
from scprint.model.objectives import Objectives, compute_losses, set_trainable

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class OptimParams:
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    warmup_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio at the last step

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        """Multiplier of lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.scheduler == "constant":
            return 1.0
        if not total_steps or math.isinf(total_steps):
            raise ValueError(
                f"scheduler={self.scheduler!r} needs a known number of steps: set "
                "trainer.max_steps (or max_epochs), or use scheduler: constant"
            )
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        if self.scheduler == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


class ScPrintModule(L.LightningModule):
    def __init__(
        self,
        genes: list[str] | None = None,
        classes: dict[str, int] | None = None,
        labels_hierarchy: dict[str, dict[int, list[int]]] | None = None,
        gene_positions: list[int] | None = None,
        gene_embeddings: str | None = None,
        d_gene_emb: int | None = None,
        freeze_embeddings: bool = True,
        d_model: int = 128,
        nhead: int = 4,
        nlayers: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attention: str = "sdpa",
        use_depth_token: bool = True,
        checkpoint_activations: bool | Literal["mlp"] = False,
    ):
        """
        Args:
            genes: gene vocabulary (ensembl ids), index order of batch["genes"]. Linked from
                the data module.
            classes: class name -> number of leaf labels, in batch["class"] column order.
            labels_hierarchy: class name -> {parent label code: [leaf codes]}.
            gene_positions: genomic rank per gene; None turns the position encoding off.
            gene_embeddings: parquet of gene embeddings (rows for ``genes``); None starts
                from random vectors of width ``d_gene_emb`` (default d_model).
            freeze_embeddings: keep the gene-embedding table fixed (True) or learn it.
            d_model, nhead, nlayers, mlp_ratio: transformer width, heads, depth, MLP width.
            dropout: on residual branches (never inside attention).
            attention: flash (flash-attn, CUDA fp16/bf16), sdpa (torch fused) or normal.
            use_depth_token: add a cell token that carries the cell's total counts.
            checkpoint_activations: in training, recompute in backward what would be kept
                for it: same gradients, less activation memory (the figure that decides
                which GPU a size needs). "mlp": each MLP's GELU and output projection (the
                largest tensor a block keeps; ~1/5 less memory, little compute). true:
                whole blocks, keeping only their inputs (~1/3 more compute).
        """
        super().__init__()
        if not genes:
            raise ValueError("model.genes is empty: it is linked from the data module's gene list")
        self.save_hyperparameters()
        classes = dict(classes or {})
        if gene_embeddings is not None:
            table = torch.from_numpy(read_gene_embeddings(gene_embeddings, list(genes)))
            d_gene_emb = table.shape[1]
        else:
            table, d_gene_emb = None, d_gene_emb or d_model
        self.hparams.d_gene_emb = d_gene_emb  # so a checkpoint reloads without the parquet
        cfg = ScPrintConfig(
            n_genes=len(genes),
            d_gene_emb=d_gene_emb,
            classes=classes,
            d_model=d_model,
            nhead=nhead,
            nlayers=nlayers,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention=attention,
            use_depth_token=use_depth_token,
            checkpoint_activations=checkpoint_activations,
            use_positions=gene_positions is not None,
            freeze_embeddings=freeze_embeddings,
        )
        positions = torch.tensor(gene_positions) if gene_positions is not None else None
        self.net = ScPrint(cfg, table, positions)
        hierarchy = labels_hierarchy or {}
        for i, (name, n_leaves) in enumerate(classes.items()):
            self.register_buffer(
                f"label_sets_{i}",
                losses.label_sets(n_leaves, hierarchy.get(name)),
                persistent=False,
            )
        self.objectives = Objectives()
        self.optim = OptimParams()
        self.run_config: dict | None = None  # the CLI's merged config, saved in checkpoints
        self.requested_config: dict | None = None  # ... as asked for (resume compares it)

    # ---- set by the TrainingMode callback --------------------------------------------
    def configure_training(self, objectives: Objectives, optim: OptimParams) -> None:
        self.objectives, self.optim = objectives, optim
        set_trainable(self.net, objectives)

    def setup(self, stage: str) -> None:
        set_trainable(self.net, self.objectives)

    @property
    def label_sets(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, f"label_sets_{i}") for i, name in enumerate(self.net.cfg.classes)
        }

    # ---- steps --------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Label codes are checked here, on the CPU, before the batch moves to the device."""
        if isinstance(batch, dict) and "class" in batch and self.objectives.do_cls:
            if getattr(self, "_label_sets_cpu", None) is None:  # buffers may be on the GPU
                self._label_sets_cpu = {k: v.cpu() for k, v in self.label_sets.items()}
            losses.check_label_codes(batch["class"].cpu(), self._label_sets_cpu)
        return batch

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        out = compute_losses(self.net, batch, self.objectives, self.label_sets)
        B = batch["x"].shape[0]
        train = prefix == "train"
        self.log_dict(
            {f"{prefix}/{k}": v.detach() for k, v in out.items()},
            on_step=train,
            on_epoch=not train,
            batch_size=B,
            sync_dist=not train,
        )
        if prefix == "val":  # the name ModelCheckpoint / schedulers monitor
            self.log("val_loss", out["loss"].detach(), on_epoch=True, batch_size=B, sync_dist=True)
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Cell embedding and most likely leaf label per class of each cell."""
        cell_states, _ = self.net.encode(batch["genes"].long(), batch["x"], batch.get("depth"))
        preds = {f"pred/{k}": v.argmax(-1) for k, v in self.net.classify(cell_states).items()}
        return {"cell_emb": self.net.cell_embedding(cell_states), **preds}

    # ---- optimizer, written once ------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # weight matrices decay; biases, norms, embeddings and learned tokens do not
            matrix = p.ndim >= 2 and "gene_table" not in name and "cell_tokens" not in name
            (decay if matrix else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {"momentum": 0.9} if self.optim.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[self.optim.optimizer](groups, lr=self.optim.lr, **extra)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        if total is None and self.optim.scheduler != "constant":
            total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.optim.lr_factor(step, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ---- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["scprint"] = {
            "genes": list(self.hparams.genes),
            "classes": dict(self.hparams.classes or {}),
            "labels_hierarchy": self.hparams.labels_hierarchy,
            "objectives": asdict(self.objectives),
            "optim": asdict(self.optim),
            "config": self.run_config,
            "requested_config": self.requested_config,
        }

    @classmethod
    def load(cls, path: str | Path, map_location="cpu", **overrides) -> ScPrintModule:
        """Reload a checkpoint without the training collection or the embeddings parquet."""
        return cls.load_from_checkpoint(
            path, map_location=map_location, gene_embeddings=None, **overrides
        )
