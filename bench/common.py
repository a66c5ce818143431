"""What every bench section shares: one row format, peak memory, the machine's description.

A section is a module ``bench/<name>.py`` runnable as ``python -m bench.<name> --json OUT``
(``--quick`` for a smaller run). It measures our implementation and its baselines in the
same process run and writes ``rows`` with :func:`write_section`; ``python -m bench`` runs
each section in its own process (so peak RSS is that section's) and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One measured figure of one implementation.

    Rows of the same ``figure`` and ``unit`` are compared: each is printed with its ratio
    to every row of that figure marked ``baseline``.
    """

    figure: str  # what is measured, e.g. "loader, 0 workers"
    impl: str  # who is measured, e.g. "scprint", "stock scdataloader"
    value: float
    unit: str  # "cells/s", "ms/step", "MB", "s"
    baseline: bool = False
    higher_is_better: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)


def evict(paths) -> int:
    """Drop the files' pages from the page cache; returns the bytes advised. Written
    pages are flushed first: DONTNEED leaves dirty pages (a just-generated file) cached.
    Standard library only: bench/loader_annbatch.py, in annbatch's venv, uses it too."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
            total += size
        finally:
            os.close(fd)
    return total


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """Peak resident memory of the largest waited-for child process."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def machine() -> dict:
    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def section_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("SCPRINT_BENCH_DIR", "bench/.work")),
        help="where generated data is kept between runs (default bench/.work)",
    )
    return parser


def write_section(path: Path, section: str, rows: list[Row], **extra) -> None:
    """Write a section's rows (atomically: a killed bench leaves no stale result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "section": section,
                "machine": machine(),
                "rows": [asdict(r) for r in rows],
                **extra,
            },
            indent=1,
        )
    )
    os.replace(tmp, path)


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
