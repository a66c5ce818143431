"""Progress of long loops: a tqdm bar on a terminal, a plain log line every 10% elsewhere.

Snakemake sends each job's stderr to ``logs/<rule>/...``; a tqdm bar there becomes one
line rewritten thousands of times with carriage returns. So when stderr is not a terminal
the same ``update(n)`` calls log ``<what>: 30% (300/1,000 proteins, 52.1 proteins/s)``
when each tenth is crossed, through the module's logger.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class LogProgress:
    """tqdm's ``update``/``close`` interface, writing a log line per 10% crossed."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, scale=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.scale = scale or (lambda v: f"{v:,.0f}")
        self.started = time.perf_counter()
        self.tenths = self._tenths()

    def _tenths(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        tenths = self._tenths()
        if tenths > self.tenths:
            self.tenths = tenths
            self._log()

    def _log(self) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        total = self.scale(self.total) if self.total else "?"
        log.info(
            "%s: %d%% (%s/%s %s, %s %s/s)",
            self.desc,
            10 * self.tenths,
            self.scale(self.n),
            total,
            self.unit,
            self.scale(rate),
            self.unit,
        )

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, scale=None):
    """A tqdm bar when stderr is a terminal, else a LogProgress (see the module docstring).
    ``scale`` formats numbers for the log lines (e.g. bytes as MB)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            unit_scale=scale is not None,
            file=sys.stderr,
        )
    return LogProgress(total, desc, unit, initial, scale)


def quiet_library_bars() -> None:
    """Turn off the progress bars of transformers / huggingface_hub when stderr is a log."""
    import os

    if sys.stderr.isatty():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def megabytes(value: float) -> str:
    return f"{value / 2**20:,.1f} M"
