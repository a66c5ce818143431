"""TrainingMode: the training-only parameters (`scprint_training:` in the configs).

Upstream scPRINT 2.3.8's TrainingMode, key for key (same names, defaults and effect; see
docs/training.md for the few places where upstream ignores its own key and this one does
what the key says). They are not part of the model's shape, so they live in a callback:
the same checkpoint can be fine-tuned with another lr or other objectives. At ``setup``
(before the optimizer is built and before DDP wraps the model) the callback hands them to
the LightningModule, which freezes the modules no active objective uses.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from scprint.model.lightning import Optimization, ScPrintModule
from scprint.model.objectives import Objectives

log = logging.getLogger(__name__)

# keys of earlier versions of this pipeline -> what replaced them (an old config gets an
# error that names the new key instead of jsonargparse's "does not accept option")
RENAMED = {
    "warmup_steps": "warmup_duration (linear warm-up steps)",
    "optimizer": "optim (adamW | adam)",
    "cls_scale": "class_scale",
    "scheduler": "lr_schedule (plateau | cosine)",
    "denoise_scale": "nothing: upstream weighs expression losses 1; drop the key",
    "mask_scale": "nothing: upstream weighs expression losses 1; drop the key",
    "generate_scale": "nothing: upstream weighs expression losses 1; drop the key",
    "randsamp": "nothing: upstream 2.3.8 has no such key (mask passes always draw random "
    "noise levels); drop the key",
}


class TrainingMode(L.Callback):
    def __init__(
        self,
        do_denoise: bool = True,
        noise: list[float] = [0.6],  # noqa: B006  (upstream's; copied, never mutated)
        do_cce: bool = False,
        cce_temp: float = 0.2,
        cce_scale: float = 0.1,
        do_ecs: bool = False,
        ecs_threshold: float = 0.4,
        class_embd_diss_scale: float = 0.1,
        ecs_scale: float = 0.1,
        do_mvc: bool = False,
        mvc_scale: float = 1.0,
        do_adv_cls: bool = False,
        do_next_tp: bool = False,
        do_generate: bool = True,
        class_scale: float = 1.0,
        mask_ratio: list[float | str] = [],  # noqa: B006  (upstream's; copied)
        test_every: int = 20,
        warmup_duration: int = 500,
        fused_adam: bool = False,
        adv_class_scale: float = 0.1,
        lr_reduce_patience: int = 2,
        lr_reduce_factor: float = 0.6,
        lr_reduce_monitor: str | None = "val_loss",
        do_cls: bool = True,
        do_adv_batch: bool = False,
        run_full_forward: bool = False,
        lr: float = 1e-4,
        dropout: float | None = None,
        optim: str = "adamW",
        weight_decay: float = 0.01,
        zinb_and_mse: bool = False,
        var_context_length: bool = False,
        name: str = "",
        set_step: int | None = None,
        lr_schedule: str = "plateau",
        min_lr_ratio: float = 0.01,
        decay_matrices_only: bool = False,
        tf_list: str | None = None,
    ):
        """
        Args:
            do_denoise: denoising passes, one per ``noise`` level (and downsampled input
                for the mask passes).
            noise: noise levels of upstream's downsampling (default [0.6]).
            do_cce, cce_temp, cce_scale: contrastive loss between the cell embeddings of
                every pair of passes (generation included), averaged over pairs.
            do_ecs, ecs_threshold, ecs_scale: elastic cell similarity on every pass.
            class_embd_diss_scale: weight of the cell tokens' independence, every pass.
            do_mvc, mvc_scale: MVC expression decoding from the cell embedding (first pass).
            do_adv_cls, adv_class_scale: adversarial classification (first pass).
            do_next_tp: next time point prediction: upstream 2.3.8 accepts it and does
                nothing; only false is accepted here.
            do_generate: bottleneck generation from the cell tokens.
            class_scale: weight of the classification loss (summed over classes, first pass).
            mask_ratio: masked-expression passes: ratios in (0, 1) or "TF".
            test_every: upstream's cadence (epochs) of its external benchmark suite, which
                needs internet; recorded, not run (docs/training.md).
            warmup_duration: optimizer steps of linear lr warm-up.
            fused_adam: torch's fused Adam/AdamW kernel.
            lr_reduce_patience, lr_reduce_factor, lr_reduce_monitor: ReduceLROnPlateau,
                stepped once per validation loop on the monitored metric; monitor null:
                constant lr after warm-up.
            do_cls: hierarchical classification from the class tokens.
            do_adv_batch: upstream's adversarial batch loss (cannot run in 2.3.8: see
                docs/training.md); only false is accepted.
            run_full_forward: a first pass on the cells as they are; generation decodes
                from its cell tokens.
            lr: peak learning rate (upstream reads model.lr instead: see docs/training.md).
            dropout: when set, the dropout of every layer during training (upstream
                records it and ignores it); null keeps model.dropout.
            optim: adamW or adam.
            weight_decay: on every trainable parameter (upstream's).
            zinb_and_mse: add upstream's MSE term to each expression loss.
            var_context_length: every 5th step, the context is cut to a random length
                in [400, max_len).
            name: run name: the logger's run name (set by the CLI), kept in checkpoints.
            set_step: upstream's step for logging its external benchmark; recorded.
            lr_schedule: ours, opt-in: "plateau" (upstream's warm-up then
                ReduceLROnPlateau) or "cosine" (warm-up, then cosine decay to
                lr x min_lr_ratio at the last step, stepped every optimizer step).
            min_lr_ratio: ours: the floor of the cosine schedule.
            decay_matrices_only: ours, opt-in: weight decay on weight matrices only
                (not biases, norms, embeddings, learned tokens).
            tf_list: ours: a text file of Ensembl gene ids (one a line) that "TF" masking
                favours 20x; null: upstream's effective behaviour (every gene alike).
        """
        super().__init__()
        if do_next_tp:
            raise ValueError(
                "scprint_training.do_next_tp=true: upstream scPRINT 2.3.8 accepts this key and "
                "does nothing with it (its next-time-point task is empty); set it to false"
            )
        if do_adv_batch:
            raise ValueError(
                "scprint_training.do_adv_batch=true: upstream scPRINT 2.3.8's adversarial batch "
                "loss averages the cell tokens to one number before its discriminator and "
                "cannot run; set it to false (use do_adv_cls for adversarial class tokens)"
            )
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"scprint_training.dropout={dropout}: a probability in [0, 1)")
        self.name = name
        self.dropout = dropout
        self.test_every, self.set_step, self.tf_list = test_every, set_step, tf_list
        self.optim = Optimization(
            lr=lr,
            optim=optim,
            weight_decay=weight_decay,
            fused_adam=fused_adam,
            warmup_duration=warmup_duration,
            lr_reduce_patience=lr_reduce_patience,
            lr_reduce_factor=lr_reduce_factor,
            lr_reduce_monitor=lr_reduce_monitor,
            lr_schedule=lr_schedule,
            min_lr_ratio=min_lr_ratio,
            decay_matrices_only=decay_matrices_only,
        )
        self.objectives = Objectives(
            do_denoise=do_denoise,
            noise=list(noise),
            mask_ratio=list(mask_ratio),
            run_full_forward=run_full_forward,
            do_generate=do_generate,
            do_cls=do_cls,
            class_scale=class_scale,
            class_embd_diss_scale=class_embd_diss_scale,
            do_adv_cls=do_adv_cls,
            adv_class_scale=adv_class_scale,
            do_mvc=do_mvc,
            mvc_scale=mvc_scale,
            do_cce=do_cce,
            cce_temp=cce_temp,
            cce_scale=cce_scale,
            do_ecs=do_ecs,
            ecs_threshold=ecs_threshold,
            ecs_scale=ecs_scale,
            zinb_and_mse=zinb_and_mse,
            var_context_length=var_context_length,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ScPrintModule):
            raise TypeError(f"TrainingMode drives ScPrintModule, not {type(pl_module).__name__}")
        tf_weights = None
        if "TF" in self.objectives.mask_ratio:
            tf_weights = self._tf_weights(list(pl_module.hparams.genes))
        pl_module.configure_training(self.objectives, self.optim, tf_weights)
        if self.dropout is not None:
            for module in pl_module.net.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = self.dropout
            for block in pl_module.net.transformer.blocks:
                block.mixer.attn_dropout = self.dropout

    def _tf_weights(self, genes: list[str]) -> torch.Tensor:
        """(n_genes,) draw weight of each gene for "TF" masking: 1 for a listed TF, 0.05
        otherwise. Upstream's list holds gene symbols, its vocabulary Ensembl ids: no gene
        matches and every gene weighs the same; without tf_list this does the same."""
        weights = torch.ones(len(genes))
        if self.tf_list is None:
            log.info("mask_ratio 'TF' without scprint_training.tf_list: every gene alike")
            return weights
        path = Path(self.tf_list)
        if not path.is_file():
            raise FileNotFoundError(
                f"scprint_training.tf_list={self.tf_list!r} does not exist: give a text file "
                "of Ensembl gene ids, one a line, or null"
            )
        tfs = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        is_tf = torch.tensor([g in tfs for g in genes])
        if not is_tf.any():
            raise ValueError(
                f"scprint_training.tf_list={self.tf_list!r}: none of its {len(tfs)} ids is a "
                "gene of the model (Ensembl ids such as ENSG00000100393 are expected)"
            )
        return torch.where(is_tf, 1.0, 0.05)

    def state_dict(self) -> dict:
        """Saved in checkpoints: what this run trained with."""
        return {
            "name": self.name,
            "optim": asdict(self.optim),
            "objectives": asdict(self.objectives),
            "dropout": self.dropout,
            "test_every": self.test_every,
            "set_step": self.set_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resuming keeps the parameters of the command line, not the checkpoint's: a resumed
        run may change lr or objectives on purpose."""
