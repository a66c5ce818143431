"""A callback for tests/test_resume.py, imported by the `scprint train-run` processes it
starts (tests/ is on their PYTHONPATH): it makes the kill point a fact, not a race.

With SCPRINT_TEST_PAUSE_AT=N in the environment, the first batch after optimizer step N
(ModelCheckpoint has written step N's checkpoint by then: it runs at the end of step N)
does not start: the marker file SCPRINT_TEST_PAUSE_MARKER is written and the process
sleeps until it is killed. Without the variable it does nothing, so the uninterrupted run,
the killed run and the rerun all have it: the same command, the same config.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class PauseAfterStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get("SCPRINT_TEST_PAUSE_AT")
        if at is None or trainer.global_step != int(at):
            return
        marker = Path(os.environ["SCPRINT_TEST_PAUSE_MARKER"])
        marker.write_text(f"{trainer.current_epoch} {batch_idx} {trainer.global_step}\n")
        while True:  # until SIGKILL
            time.sleep(1)
