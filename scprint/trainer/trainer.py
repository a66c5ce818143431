"""TrainingMode: the training-only parameters (`scprint_training:` in the configs).

They are not part of the model's shape, so they live in a callback: the same checkpoint
can be fine-tuned with another lr or other objectives. At ``setup`` (before the optimizer
is built and before DDP wraps the model) the callback hands them to the LightningModule,
which freezes the modules no active objective uses.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L

from scprint.model.lightning import OptimParams, ScPrintModule
from scprint.model.objectives import Objectives

# upstream scprint_training keys (its base configs) this pipeline refuses unless false
UPSTREAM_REFUSED = {
    "run_full_forward": "extra forward pass on the un-noised cells each step",
    "zinb_and_mse": "MSE term added to the ZINB loss",
    "var_context_length": "random context length every 5 steps",
    "randsamp": "random-rate downsampling",
}


class TrainingMode(L.Callback):
    def __init__(
        self,
        name: str | None = None,
        lr: float = 1e-4,
        optimizer: str = "adamw",
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.0,
        noise: list[float] | None = None,
        mask_ratio: list[float] | None = None,
        do_generate: bool = True,
        do_cls: bool = True,
        do_mvc: bool = False,
        do_cce: bool = False,
        do_ecs: bool = False,
        denoise_scale: float = 1.0,
        mask_scale: float = 1.0,
        generate_scale: float = 1.0,
        cls_scale: float = 1.0,
        mvc_scale: float = 1.0,
        cce_scale: float = 1.0,
        ecs_scale: float = 1.0,
        cce_temp: float = 0.2,
        ecs_threshold: float = 0.3,
        run_full_forward: bool = False,
        zinb_and_mse: bool = False,
        var_context_length: bool = False,
        randsamp: bool = False,
    ):
        """
        Args:
            name: run name: the logger's run name (set by the CLI), kept in checkpoints.
            lr: peak learning rate.
            optimizer: adamw, adam or sgd (momentum 0.9).
            weight_decay: on weight matrices only (not biases, norms, embeddings).
            warmup_steps: linear warmup from lr/warmup_steps to lr.
            scheduler: cosine, linear (decay to lr * min_lr_ratio at the last step) or
                constant; stepped once per optimizer step.
            min_lr_ratio: the lr floor of cosine/linear decay, as a fraction of lr.
            noise: denoising views: share of the counts removed by binomial downsampling,
                one view per value; [] turns denoising off. Default [0.6].
            mask_ratio: masked-expression views: share of tokens whose expression is hidden;
                [] (default) turns masking off.
            do_generate: bottleneck generation of expression from the cell tokens alone.
            do_cls: hierarchical classification from the class tokens.
            do_mvc: MVC, expression from the cell embedding and gene identity.
            do_cce: contrastive loss between the first two views of each cell.
            do_ecs: elastic cell similarity on the cell embeddings.
            *_scale: weight of each loss term in the total.
            cce_temp: temperature of the contrastive softmax.
            ecs_threshold: the cosine similarity ECS pushes away from.
            run_full_forward, zinb_and_mse, var_context_length, randsamp: upstream scPRINT
                keys of training procedures this pipeline does not have; only false is
                accepted (see UPSTREAM_REFUSED).
        """
        super().__init__()
        given = locals()
        for key, what in UPSTREAM_REFUSED.items():
            if given[key]:
                raise ValueError(
                    f"scprint_training.{key}={given[key]!r} is not supported: this pipeline "
                    f"does not implement upstream's {what}; set it to false"
                )
        self.name = name
        self.optim = OptimParams(
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            scheduler=scheduler,
            min_lr_ratio=min_lr_ratio,
        )
        self.objectives = Objectives(
            noise=[0.6] if noise is None else list(noise),
            mask_ratio=[] if mask_ratio is None else list(mask_ratio),
            do_generate=do_generate,
            do_cls=do_cls,
            do_mvc=do_mvc,
            do_cce=do_cce,
            do_ecs=do_ecs,
            denoise_scale=denoise_scale,
            mask_scale=mask_scale,
            generate_scale=generate_scale,
            cls_scale=cls_scale,
            mvc_scale=mvc_scale,
            cce_scale=cce_scale,
            ecs_scale=ecs_scale,
            cce_temp=cce_temp,
            ecs_threshold=ecs_threshold,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ScPrintModule):
            raise TypeError(f"TrainingMode drives ScPrintModule, not {type(pl_module).__name__}")
        pl_module.configure_training(self.objectives, self.optim)

    def state_dict(self) -> dict:
        """Saved in checkpoints: what this run trained with."""
        return {
            "name": self.name,
            "optim": asdict(self.optim),
            "objectives": asdict(self.objectives),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resuming keeps the parameters of the command line, not the checkpoint's: a resumed
        run may change lr or objectives on purpose."""
