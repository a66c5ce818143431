"""Shared test plumbing.

Every test runs with the network guard (tests/netguard) on, in this process and in every
Python subprocess it starts: a connection to anything but loopback fails and is logged,
and the session fails if anything tried. Stages that touch laminDB run as `scprint ...`
subprocesses with their own LAMIN_SETTINGS_DIR, since lamindb_setup reads its settings
location once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETGUARD_DIR = REPO / "tests" / "netguard"
NETGUARD_LOG = Path(
    os.environ.setdefault("SCPRINT_NETGUARD", f"/tmp/scprint-netguard-{os.getpid()}.log")
)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), str(NETGUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(NETGUARD_DIR))
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)


def pytest_sessionstart(session):
    NETGUARD_LOG.unlink(missing_ok=True)


def pytest_sessionfinish(session, exitstatus):
    if NETGUARD_LOG.exists() and NETGUARD_LOG.read_text().strip():
        print(f"\nnetwork access attempted during tests:\n{NETGUARD_LOG.read_text()}")
        session.exitstatus = 1


def cli_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment for a `scprint` subprocess whose laminDB settings live in ``workdir``."""
    env = dict(os.environ)
    env["LAMIN_SETTINGS_DIR"] = str(Path(workdir) / "lamin" / "settings")
    env.update(extra)
    return env


def seed_python() -> Path:
    """Python of the upstream scPRINT 2.3.8 venv (`make bench-seed-venv`) that
    tests/test_upstream_*.py drive. Without it they skip with the reason; with
    SCPRINT_REQUIRE_UPSTREAM=1 (CI, set by .ci/run) they fail instead."""
    import pytest

    venv = Path(os.environ.get("SCPRINT_SEED_VENV", REPO / ".bench-venv-seed"))
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists() or not python.exists():
        message = f"upstream scPRINT venv {venv} is missing: build it with `make bench-seed-venv`"
        if os.environ.get("SCPRINT_REQUIRE_UPSTREAM") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return python


def run_upstream(script: Path, *args, cwd=None, env=None, timeout=900) -> None:
    """Run one of tests/upstream/*.py in the upstream venv; a failure shows its stderr."""
    # -I: our package (same import name) must not shadow upstream's
    proc = subprocess.run(
        [str(seed_python()), "-I", str(script), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"upstream {script.name} {' '.join(map(str, args))} exited {proc.returncode}:\n"
        f"{proc.stderr[-6000:]}"
    )


def run_cli(args: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout=900):
    """Run `scprint <args>` in ``cwd``; on failure the assertion shows its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "scprint.cli", *map(str, args)],
        cwd=cwd,
        env=env or cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"scprint {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc
