"""Run one validation loop of test_validation's model and batches with ValidationMetrics,
on 1 process or under DDP on 2 CPU processes (gloo), and write each rank's logged
metrics and history to OUT/rank<r>.json. Not a test module (pytest collects test_*.py).

usage: python tests/validation_ddp_probe.py OUT DEVICES
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from test_validation import batches, module
from torch.utils.data import DataLoader

from scprint.trainer.trainer import TrainingMode
from scprint.trainer.validation import ValidationMetrics


def main(out: str, devices: int) -> None:
    torch.set_num_threads(1)
    cb = ValidationMetrics(knn_k=3, knn_class="cell_type")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainingMode(), cb],
    )  # fmt: skip
    data = batches(n=4, B=6)
    trainer.validate(module(), DataLoader(data, batch_size=None, shuffle=False), verbose=False)
    result = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "history": cb.history,
        "world_size": trainer.world_size,
    }
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
