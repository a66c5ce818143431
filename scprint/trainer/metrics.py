"""The MetricsLog callback: every logged metric in a CSV file, and the throughput in cells/s.

W&B's offline files are not meant to be read back, so for the report (and for anyone with a
spreadsheet) this adds Lightning's CSVLogger beside the configured logger:
``<trainer.default_root_dir or dirpath>/metrics/version_N/metrics.csv``, a new version per
(re)start. `merge_versions` joins them into one history; steps a resumed run redid are
taken from the newer version. ``train/cells_per_s`` is logged over the last
``log_every_n_steps`` batches, data loading included, summed over all ranks. A log line
is also written each time another 10% of the run's steps is done (`scprint train-run` turns
the tqdm bar off when its output goes to a log file).
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

METRICS_NAME = "metrics"
log = logging.getLogger(__name__)


class MetricsLog(Callback):
    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: folder of the CSV versions (None: the trainer's default_root_dir).
        """
        self.dirpath = dirpath
        self._window: collections.deque = collections.deque()
        self._started: float | None = None
        self._tenths = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or any(isinstance(lg, CSVLogger) for lg in trainer.loggers):
            return
        root = self.dirpath or trainer.default_root_dir
        every = max(1, trainer.log_every_n_steps)  # rows reach the disk at each logging step
        csv = CSVLogger(root, name=METRICS_NAME, flush_logs_every_n_steps=every)
        trainer.loggers = [*trainer.loggers, csv]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        cells = int(batch["x"].shape[0]) * trainer.world_size
        self._window.append((self._started, cells))
        self._started = now
        while len(self._window) > max(1, trainer.log_every_n_steps):
            self._window.popleft()
        elapsed = now - self._window[0][0]
        rate = sum(c for _, c in self._window) / elapsed if elapsed > 0 else 0.0
        pl_module.log("train/cells_per_s", float(rate), on_step=True, batch_size=cells)
        self._log_tenth(trainer, rate)

    def _log_tenth(self, trainer, rate: float) -> None:
        total = trainer.estimated_stepping_batches
        if not trainer.is_global_zero or not total or total == float("inf"):
            return
        tenths = int(10 * trainer.global_step / total)
        if self._tenths < 0:
            self._tenths = tenths  # a resumed run reports from where it starts
        elif tenths > self._tenths:
            self._tenths = tenths
            log.info(
                "training: %d%% (step %d/%d, epoch %d, %.0f cells/s)",
                10 * tenths, trainer.global_step, total, trainer.current_epoch, rate,
            )  # fmt: skip


def version_files(root: str | Path) -> list[Path]:
    """metrics.csv of every version under ``root/metrics``, oldest first."""
    folder = Path(root) / METRICS_NAME
    versions = [p for p in folder.glob("version_*") if (p / "metrics.csv").is_file()]
    return [p / "metrics.csv" for p in sorted(versions, key=lambda p: int(p.name.split("_")[1]))]


def merge_versions(files: list[Path]):
    """One frame of every row; a later version replaces the rows from its first step on."""
    import pandas as pd

    frames = []
    for path in files:
        frame = pd.read_csv(path)
        if frame.empty:
            continue
        first = frame["step"].min()
        frames = [f[f["step"] < first] for f in frames] + [frame]
    if not frames:
        return pd.DataFrame({"step": []})
    return pd.concat(frames, ignore_index=True)
