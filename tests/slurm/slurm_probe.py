"""A Lightning callback the Slurm tests add to `scprint fit` (`--trainer.callbacks+=...`).

It records, per rank and per start of the job (Slurm restarts a requeued job from the
top), what the training process saw: rank, world size, cluster environment, process-group
backend, the step it started from and ended at, and a digest of the weights. With
``pause_at_step`` it stops on the job's first run at that step and waits, so a test can
signal the job at a known point (the signal handler runs while it sleeps).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import lightning as L
import torch


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def job_restarts() -> int:
    """How often Slurm has restarted this job, from its record: the executor plugin's job
    step drops SLURM_RESTART_COUNT (with every SLURM_* variable but the job id)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return 0
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return int(re.search(r"\bRestarts=(\d+)", out).group(1))


class SlurmProbe(L.Callback):
    def __init__(self, out_dir: str = "probe", pause_at_step: int = 0, pause_s: float = 120):
        self.out_dir = Path(out_dir)
        self.pause_at_step = pause_at_step
        self.pause_s = pause_s
        self.restarts = job_restarts()
        self.record: dict = {}

    def _write(self, trainer: L.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}-start{self.restarts}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(path)

    def on_train_start(self, trainer, pl_module) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.record = {
            "rank": trainer.global_rank,
            "host": socket.gethostname(),  # a node's own name in its UTS namespace
            "world_size": trainer.world_size,
            "restarts": self.restarts,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            # what Lightning detected (single-device strategies do not carry it)
            "cluster_environment": type(
                trainer._accelerator_connector.cluster_environment
            ).__name__,
            "backend": torch.distributed.get_backend() if distributed else None,
            "start_step": trainer.global_step,
            "start_digest": weights_digest(pl_module),
        }
        self._write(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restarts == 0 and self.pause_at_step and trainer.global_step == self.pause_at_step:
            self.record["paused_at_step"] = trainer.global_step
            self._write(trainer)
            deadline = time.monotonic() + self.pause_s
            while time.monotonic() < deadline:  # the requeue signal arrives here
                time.sleep(0.2)

    def on_validation_end(self, trainer, pl_module) -> None:
        """The validation metrics this rank logged: gathered over the ranks, they are the
        same on every rank; computed from one rank's cells, they would differ."""
        if trainer.sanity_checking:
            return
        self.record["val_metrics"] = {
            k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")
        }
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end_step"] = trainer.global_step
        self.record["end_digest"] = weights_digest(pl_module)
        self._write(trainer)
