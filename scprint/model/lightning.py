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

from scprint.model import losses, readout
from scprint.model.genes import read_gene_embeddings
from scprint.model.model import ScPrint, ScPrintConfig
from scprint.model.objectives import Corruption, Objectives, compute_losses, set_trainable
from scprint.seeds import HELD_OUT_STEP, TRAIN_STEP, run_seed, seeded_torch

OPTIMIZERS = {"adamW": torch.optim.AdamW, "adam": torch.optim.Adam}
LR_SCHEDULES = ("plateau", "cosine")


@dataclass
class Optimization:
    """The optimizer side of ``scprint_training`` (upstream TrainingMode's keys; the last
    three are ours, opt-in)."""

    lr: float = 1e-4
    optim: str = "adamW"
    weight_decay: float = 0.01
    fused_adam: bool = False
    warmup_duration: int = 500
    lr_reduce_patience: int = 2
    lr_reduce_factor: float = 0.6
    lr_reduce_monitor: str | None = "val_loss"
    lr_schedule: str = "plateau"
    min_lr_ratio: float = 0.01
    decay_matrices_only: bool = False

    def __post_init__(self):
        if self.optim not in OPTIMIZERS:
            raise ValueError(
                f"scprint_training.optim={self.optim!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"scprint_training.lr_schedule={self.lr_schedule!r}: choose one of "
                f"{', '.join(LR_SCHEDULES)}"
            )
        if self.warmup_duration < 0:
            raise ValueError("scprint_training.warmup_duration must be >= 0")

    def warmup_factor(self, step: int) -> float:
        """Upstream's warm-up: lr x (step + 1) / warmup_duration for the first steps."""
        if step >= self.warmup_duration:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_duration)

    def cosine_factor(self, step: int, total_steps: int | None) -> float:
        """lr_schedule cosine: warm-up, then cosine decay to min_lr_ratio at the last step."""
        if step < self.warmup_duration:
            return self.warmup_factor(step)
        if not total_steps or math.isinf(total_steps):
            raise ValueError(
                "scprint_training.lr_schedule=cosine needs a known number of steps: set "
                "trainer.max_steps (or max_epochs), or use lr_schedule: plateau"
            )
        span = max(1, total_steps - self.warmup_duration)
        progress = min(1.0, (step - self.warmup_duration) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


# upstream scPrint keys this network does not implement: the value(s) it accepts, and why
UNSUPPORTED = {
    "cell_specific_blocks": (False, "upstream v2's cross-attention cell transformer"),
    "depth_atinput": (True, "upstream v2's depth in the expression decoder"),
    "use_metacell_token": (False, "upstream v2's metacell token"),
    "compress_class_dim": (None, "upstream v2's FSQ bottleneck of the class tokens"),
    "zinb": (True, "a non-ZINB expression decoder"),
    "prenorm": (True, "post-norm blocks"),
    "fused_dropout_add_ln": (False, "triton kernel fusions (use transformer: flash)"),
    "fused_mlp": (False, "triton kernel fusions"),
    "fused_bias_fc": (False, "triton kernel fusions"),
    "drop_path_rate": (0.0, "stochastic depth"),
    "attn_bias": ("none", "attention biases"),
    "expr_emb_style": ("continuous", "binned expression"),
    "cell_emb_style": ("cls", "other cell-embedding pooling"),
    "num_batch_labels": (0, "the adversarial batch discriminator"),
}


class ScPrintModule(L.LightningModule):
    def __init__(
        self,
        genes: list[str] | None = None,
        organisms: list[str] | None = None,
        classes: dict[str, int] | None = None,
        labels_hierarchy: dict[str, dict[int, list[int]]] | None = None,
        label_decoders: dict[str, dict[int, str]] | None = None,
        gene_positions: list[int] | None = None,
        gene_embeddings: str | None = None,
        freeze_embeddings: bool = True,
        d_model: int = 128,
        nhead: int = 4,
        nlayers: int = 4,
        num_heads_kv: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        transformer: Literal["sdpa", "flash", "normal"] = "sdpa",
        residual_in_fp32: bool = True,
        normalization: Literal["sum", "log"] = "sum",
        expr_encoder_layers: int = 2,
        layers_cls: list[int] | None = None,
        mvc_decoder: Literal["None", "inner product"] = "None",
        pred_embedding: list[str] | None = None,
        checkpoint_activations: bool | Literal["mlp"] = False,
        checkpointing: bool = False,
        cell_specific_blocks: bool = False,
        depth_atinput: bool = True,
        use_metacell_token: bool = False,
        compress_class_dim: dict[str, int] | None = None,
        zinb: bool = True,
        prenorm: bool = True,
        fused_dropout_add_ln: bool = False,
        fused_mlp: bool = False,
        fused_bias_fc: bool = False,
        drop_path_rate: float = 0.0,
        attn_bias: str = "none",
        expr_emb_style: str = "continuous",
        cell_emb_style: str = "cls",
        num_batch_labels: int = 0,
    ):
        """Upstream scPRINT's `model:` keys (same names, same meaning) plus ours.

        Args:
            genes: gene vocabulary (ensembl ids), index order of batch["genes"]. Linked from
                the data module.
            organisms: organism ontology ids of the collection (kept for export).
            classes: class name -> number of leaf labels, in batch["class"] column order.
            labels_hierarchy: class name -> {parent label code: [leaf codes]}.
            label_decoders: class name -> {label code: label name}, so predictions and
                exported checkpoints are readable.
            gene_positions: genomic rank per gene (upstream's gene_pos_enc); None turns the
                position encoding off.
            gene_embeddings: parquet of gene embeddings (upstream's precpt_gene_emb), pooled
                to d_model; None starts from random vectors.
            freeze_embeddings: keep the gene table fixed (True) or learn it.
            d_model, nhead, nlayers, mlp_ratio: transformer width, heads, depth, MLP width.
            num_heads_kv: key/value heads (grouped-query attention); None = nhead.
            dropout: on input tokens, residual branches, encoders/decoders' hidden layers.
            transformer: sdpa (torch fused, default), flash (flash-attn, CUDA fp16/bf16) or
                normal (explicit softmax; drops attention weights in training, as upstream).
            residual_in_fp32: keep the residual stream in fp32 under half precision.
            normalization: expression input x / sum(x) ("sum") or log2(1 + x) ("log").
            expr_encoder_layers: Linear layers of the expression and depth encoders.
            layers_cls: hidden widths of each class head (upstream's small: [128]).
            mvc_decoder: "inner product" adds upstream's MVC decoder (needed by do_mvc).
            pred_embedding: classes whose tokens' mean is the predicted cell embedding
                (empty: mean of all cell tokens).
            checkpoint_activations: in training, recompute in backward what would be kept
                for it: same gradients, less activation memory. "mlp": each MLP's GELU and
                fc2 (~1/5 less memory, little compute). true: whole blocks (~1/3 more
                compute).
            checkpointing: upstream's recompute switch; true acts as
                checkpoint_activations: true.
            cell_specific_blocks ... num_batch_labels: upstream keys of features this
                network does not have; only their off value is accepted (see UNSUPPORTED).
        """
        super().__init__()
        if not genes:
            raise ValueError("model.genes is empty: it is linked from the data module's gene list")
        given = locals()
        for key, (allowed, what) in UNSUPPORTED.items():
            if given[key] != allowed:
                raise ValueError(
                    f"model.{key}={given[key]!r} is not supported: this network does not "
                    f"implement {what}; leave it at {allowed!r}"
                )
        classes = dict(classes or {})
        for name in pred_embedding or []:
            if name not in classes:
                raise ValueError(
                    f"model.pred_embedding names {name!r}, which is not a predicted class "
                    f"({', '.join(classes) or 'none'}): list classes of data.clss_to_predict"
                )
        self.save_hyperparameters()
        table = None
        if gene_embeddings is not None:
            table = torch.from_numpy(read_gene_embeddings(gene_embeddings, list(genes)))
        if checkpointing and checkpoint_activations is False:
            checkpoint_activations = True
        cfg = ScPrintConfig(
            n_genes=len(genes),
            classes=classes,
            d_model=d_model,
            nhead=nhead,
            nlayers=nlayers,
            num_heads_kv=num_heads_kv,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention=transformer,
            residual_in_fp32=residual_in_fp32,
            normalization=normalization,
            expr_encoder_layers=expr_encoder_layers,
            layers_cls=list(layers_cls or []),
            mvc_decoder=mvc_decoder,
            use_positions=gene_positions is not None,
            freeze_embeddings=freeze_embeddings,
            checkpoint_activations=checkpoint_activations,
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
        self.optim = Optimization()
        self.tf_weights: torch.Tensor | None = None  # (n_genes,) "TF" masking weights
        self.corruption = Corruption()  # the step's random draws (tests replay upstream's)
        self.noise_seed: int | None = None  # the run's seed, for each step's draws (setup)
        self.run_config: dict | None = None  # the CLI's merged config, saved in checkpoints
        self.requested_config: dict | None = None  # ... as asked for (resume compares it)

    # ---- set by the TrainingMode callback --------------------------------------------
    def configure_training(
        self,
        objectives: Objectives,
        optim: Optimization,
        tf_weights: torch.Tensor | None = None,
    ) -> None:
        self.objectives, self.optim = objectives, optim
        self.tf_weights = tf_weights
        set_trainable(self.net, objectives)

    def setup(self, stage: str) -> None:
        set_trainable(self.net, self.objectives)
        if self.noise_seed is None:
            self.noise_seed = run_seed()

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
        if self.tf_weights is not None and self.tf_weights.device != self.device:
            self.tf_weights = self.tf_weights.to(self.device)
        out = compute_losses(
            self.net,
            batch,
            self.objectives,
            self.label_sets,
            step=self.global_step,
            tf_weights=self.tf_weights,
            corruption=self.corruption,
        )
        B = batch["x"].shape[0]
        train = prefix == "train"
        self.log_dict(
            {f"{prefix}/{k}": v.detach() for k, v in out.items()},
            on_step=train,
            on_epoch=not train,
            batch_size=B,
            sync_dist=not train,
        )
        if prefix == "val":  # the name ModelCheckpoint / schedulers / early stopping monitor
            self.log("val_loss", out["loss"].detach(), on_epoch=True, batch_size=B, sync_dist=True)
        return out["loss"]

    # Each step draws (noise, masks, dropout) from torch's generator seeded for it, from
    # (run seed, epoch, rank, batch) in training and (run seed, rank, loader, batch) in
    # validation/test, and put back afterwards: the draws depend on the step alone, not on
    # what the process drew before, so a run restarted from a checkpoint draws what the
    # uninterrupted run drew (scprint.trainer.resume says why seeds and not saved generator
    # states). A validation batch gets the same noise in every loop: losses compare.
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = (TRAIN_STEP, self.current_epoch, self.global_rank, batch_idx)
        with self._seeded(*keys):
            return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with self._seeded(HELD_OUT_STEP, self.global_rank, dataloader_idx, batch_idx):
            self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with self._seeded(HELD_OUT_STEP, self.global_rank, dataloader_idx, batch_idx):
            self._step(batch, "test")

    def _seeded(self, *keys: int):
        if self.noise_seed is None:  # a step outside a Trainer's setup
            self.noise_seed = run_seed()
        return seeded_torch(self.device, self.noise_seed, *keys)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Cell embedding and most likely leaf label per class of each cell: its code
        (``pred/<class>``) and name (``pred/<class>/name``, from label_decoders)."""
        cell_states, _ = self.net.encode(batch["genes"].long(), batch["x"], batch.get("depth"))
        preds = {f"pred/{k}": v.argmax(-1) for k, v in self.net.classify(cell_states).items()}
        decoders = self.hparams.get("label_decoders") or {}
        names = {f"{k}/name": readout.label_names(v, decoders.get(k[5:])) for k, v in preds.items()}
        return {"cell_emb": self.cell_embedding(cell_states), **preds, **names}

    def cell_embedding(self, cell_states: torch.Tensor) -> torch.Tensor:
        """(B, D), as upstream's predictions: the mean of the pred_embedding classes' tokens
        (all classes' when empty); of all cell tokens for a model without classes."""
        names = list(self.net.cfg.classes)
        chosen = self.hparams.get("pred_embedding") or names
        if not chosen:
            return self.net.cell_embedding(cell_states)
        return cell_states[:, [2 + names.index(n) for n in chosen]].mean(dim=1)

    # ---- optimizer and schedule, written once --------------------------------------------
    def configure_optimizers(self):
        """Upstream's: Adam(W) over every trainable parameter with weight decay, betas
        (0.9, 0.999), eps 1e-8; the lr warms up in optimizer_step, then ReduceLROnPlateau
        (stepped in on_validation_epoch_end). Ours, opt-in: decay on weight matrices only,
        a cosine schedule."""
        o = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if o.decay_matrices_only:
            matrix = {
                id(p)
                for name, p in self.named_parameters()
                if p.ndim >= 2 and "gene_encoder" not in name and "class_encoder" not in name
            }
            groups = [
                {"params": [p for p in params if id(p) in matrix]},
                {"params": [p for p in params if id(p) not in matrix], "weight_decay": 0.0},
            ]
        else:
            groups = [{"params": params}]
        optimizer = OPTIMIZERS[o.optim](
            groups,
            lr=o.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=o.weight_decay,
            fused=o.fused_adam or None,
        )
        if o.lr_schedule == "cosine":
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
            total = total or self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: o.cosine_factor(step, total)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
            }
        if o.lr_reduce_monitor is None:
            return optimizer
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", patience=o.lr_reduce_patience, factor=o.lr_reduce_factor
        )
        # registered with Lightning so its state is checkpointed; stepped by
        # on_validation_epoch_end only (lr_scheduler_step below ignores Lightning's call)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": plateau,
                "interval": "epoch",
                "monitor": o.lr_reduce_monitor,
                "strict": False,
            },
        }

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return  # once per validation loop, in on_validation_epoch_end
        scheduler.step()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Upstream's warm-up: the first warmup_duration steps set lr x (step + 1) / warmup."""
        step = self.trainer.global_step
        if self.optim.lr_schedule == "plateau" and step < self.optim.warmup_duration:
            for group in optimizer.param_groups:
                group["lr"] = self.optim.warmup_factor(step) * self.optim.lr
        optimizer.step(closure=optimizer_closure)

    def on_validation_epoch_end(self) -> None:
        """ReduceLROnPlateau, once per validation loop (not the sanity check), on every rank
        (the monitored value is synchronised): upstream steps it here on rank 0 only and
        Lightning steps it again at the epoch's end."""
        if self.trainer.sanity_checking or self.optim.lr_schedule != "plateau":
            return
        monitor = self.optim.lr_reduce_monitor
        if monitor is None or not self.trainer.lr_scheduler_configs:
            return
        value = self.trainer.callback_metrics.get(monitor)
        if value is None:
            raise ValueError(
                f"scprint_training.lr_reduce_monitor={monitor!r} was not logged in validation "
                "(val_loss is): set lr_reduce_monitor to a logged metric, or null"
            )
        self.trainer.lr_scheduler_configs[0].scheduler.step(float(value))

    # ---- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["scprint"] = {
            "genes": list(self.hparams.genes),
            "classes": dict(self.hparams.classes or {}),
            "labels_hierarchy": self.hparams.labels_hierarchy,
            "label_decoders": self.hparams.get("label_decoders"),
            "objectives": asdict(self.objectives),
            "optim": asdict(self.optim),
            "config": self.run_config,
            "requested_config": self.requested_config,
            "seed": self.noise_seed,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume (ckpt_path) onto a model built from the data: the gene vocabulary must be
        the checkpoint's, in its order, or every per-gene row would be another gene's."""
        stored = checkpoint.get("scprint") or {}
        if stored.get("seed") is not None:  # a resumed run keeps its first start's seed
            self.noise_seed = int(stored["seed"])
        saved = stored.get("genes")
        if saved is not None and list(saved) != list(self.hparams.genes):
            same_set = set(saved) == set(self.hparams.genes)
            raise ValueError(
                "the checkpoint's gene vocabulary is not the data's "
                + ("(same genes, another order)" if same_set else
                   f"({len(saved)} vs {len(self.hparams.genes)} genes)")
                + ": resume with the collection, organisms and gene embeddings it was trained "
                "on, or start from its weights with init_from (genes matched by name)"
            )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, map_location="cpu", **overrides) -> ScPrintModule:
        """Reload a checkpoint without the training collection or the embeddings parquet."""
        return cls.load_from_checkpoint(
            path, map_location=map_location, gene_embeddings=None, **overrides
        )
