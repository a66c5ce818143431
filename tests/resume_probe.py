"""A callback for the resume tests (tests/test_resume.py, tests/test_slurm_site.py),
imported by the `scprint train-run` processes they start (tests/ on their PYTHONPATH).
Every run of a test has it, so the commands, and the configs, are the same; the
environment says what it does:

- SCPRINT_TEST_PAUSE_AT=N, SCPRINT_TEST_PAUSE_MARKER=PREFIX: each rank holds the first
  batch after optimizer step N (ModelCheckpoint has written step N's checkpoint at the end
  of step N, ResumableCheckpoint after step N's validation), writes PREFIX.rank<r> and
  sleeps until it is killed: the kill point is a fact, not a race. A rank whose marker
  exists already (a rerun) does not hold. SCPRINT_TEST_PAUSE_RANKS=1 (or 0,1): only those
  ranks hold; the others go on into the next step's collectives and wait there.
- SCPRINT_TEST_BATCHES=DIR: each rank appends, per training batch, a JSON line (epoch,
  batch index, step, a digest of the batch's counts and genes) to DIR/rank<r>.jsonl:
  what each rank trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import lightning as L


def batch_digest(batch: dict) -> str:
    digest = hashlib.sha256()
    for key in ("x", "genes"):
        digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class ResumeProbe(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rank, step = trainer.global_rank, trainer.global_step
        at = os.environ.get("SCPRINT_TEST_PAUSE_AT")
        only = os.environ.get("SCPRINT_TEST_PAUSE_RANKS")  # "1" or "0,1"; default: all
        if only is not None and str(rank) not in only.split(","):
            at = None
        if at is not None and step == int(at):
            marker = Path(f"{os.environ['SCPRINT_TEST_PAUSE_MARKER']}.rank{rank}")
            if not marker.exists():
                marker.write_text(f"{trainer.current_epoch} {batch_idx} {step}\n")
                while True:  # until SIGKILL
                    time.sleep(1)
        folder = os.environ.get("SCPRINT_TEST_BATCHES")
        if folder:
            record = {"epoch": trainer.current_epoch, "batch_idx": batch_idx, "step": step,
                      "digest": batch_digest(batch)}  # fmt: skip
            with open(Path(folder) / f"rank{rank}.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")


def batches(folder: Path, rank: int = 0) -> dict[int, dict]:
    """A rank's records by step (a rerun's records of a step replace the killed run's)."""
    lines = (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}
