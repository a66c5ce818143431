"""A callback the key tests add to `scprint fit` runs (`--trainer.callbacks+=...`): it
records process-wide state that the top-level config keys set, as the run sees it when
training starts. Not a test module (pytest collects test_*.py only)."""

import json
import os

import lightning as L
import torch


class RunStateProbe(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        state = {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch_initial_seed": torch.initial_seed(),
            "pl_global_seed": os.environ.get("PL_GLOBAL_SEED"),
            "start_step": trainer.global_step,
        }
        with open(self.path, "w") as f:
            json.dump(state, f)
