"""The lr after every training step and each validation loss, recorded on both sides of
tests/test_upstream_losses.py: imported there (our venv) and by upstream_losses.py (the
upstream venv), so it needs nothing but lightning."""

from __future__ import annotations

import lightning as L


class RecordSteps(L.Callback):
    def __init__(self):
        self.lr, self.val_loss = [], []

    def on_train_batch_end(self, trainer, *args):
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_end(self, trainer, pl_module):
        self.val_loss.append(float(trainer.callback_metrics["val_loss"]))
