"""`wandblog`, `log_freq`, `log_graph`: what W&B's ``watch`` records, for our model.

``wandb.watch`` (what ``WandbLogger.watch`` calls) logs parameters and the model graph from
forward hooks of the module it watches. ScPrintModule's steps call the network's parts
(encode, classify, the decoders) and never ``forward()``, so through ``wandb.watch`` only
gradients would be logged and parameters and the graph silently never. This callback
records all three itself, under the names ``wandb.watch`` uses:

- ``gradients/<parameter>`` and/or ``parameters/<parameter>`` histograms (``wandblog``:
  gradients, parameters or all) every ``log_freq`` optimizer steps, in the W&B row of that
  step (``trainer/global_step``);
- with ``log_graph``, ``graph_0`` in the run summary: the modules the first training step
  ran, with their parameters and output shapes (W&B's TorchGraph).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

WANDBLOG = ("gradients", "parameters", "all")


class WatchModel(L.Callback):
    def __init__(self, loggers: list[WandbLogger], log: str | None, log_freq: int, log_graph: bool):
        if log is not None and log not in WANDBLOG:
            raise ValueError(f"wandblog={log!r}: use one of {', '.join(WANDBLOG)} or null")
        if log_freq < 1:
            raise ValueError(f"log_freq={log_freq}: must be >= 1 (optimizer steps)")
        self.loggers = loggers
        self.log_gradients = log in ("gradients", "all")
        self.log_parameters = log in ("parameters", "all")
        self.log_freq = log_freq
        self.log_graph = log_graph
        self._gradients: dict = {}
        self._graph = None
        self._graph_hooks: list = []
        self._last_logged_step = -1

    @staticmethod
    def _histogram(tensor: torch.Tensor):
        import wandb

        values = tensor.detach().float().flatten().cpu()
        return wandb.Histogram(values[torch.isfinite(values)].numpy())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.log_graph and self._graph is None and trainer.is_global_zero:
            from scprint.adapters.wandb import leaf_graph

            self._graph = leaf_graph(pl_module, self._graph_hooks)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # gradients are final here (accumulated, unscaled under AMP), before the update
        if self.log_gradients and (trainer.global_step + 1) % self.log_freq == 0:
            self._gradients = {
                f"gradients/{name}": self._histogram(p.grad)
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._graph_hooks:
            for hook in self._graph_hooks:
                hook.remove()
            self._graph_hooks = []
            from scprint.adapters.wandb import drop_unrun

            drop_unrun(self._graph)  # modules this configuration never runs
            for logger in self.loggers:
                logger.experiment.summary["graph_0"] = self._graph
        step = trainer.global_step
        if step % self.log_freq or step == self._last_logged_step or not trainer.is_global_zero:
            return
        self._last_logged_step = step
        logged = dict(self._gradients)
        self._gradients = {}
        if self.log_parameters:
            logged.update(
                {f"parameters/{n}": self._histogram(p) for n, p in pl_module.named_parameters()}
            )
        if logged:
            for logger in self.loggers:
                logger.log_metrics(logged, step=step)
