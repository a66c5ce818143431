"""Atomic file output: every stage writes to a temporary sibling and renames it into place,
so a killed job never leaves a file that looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class StageError(RuntimeError):
    """An error a user can act on: the message names what failed, why, and the fix."""


def check_dataset_id(dataset_id: str) -> str:
    """Refuse ids that could escape the data folder (``../x``, ``a/b``, absolute paths)."""
    if not SAFE_ID.match(dataset_id) or ".." in dataset_id:
        raise StageError(
            f"dataset id {dataset_id!r} is not a safe file name: use letters, digits, '.', "
            "'_' and '-' only (no path separators or '..')"
        )
    return dataset_id


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: Path, suffix: str) -> list[Path]:
    """Delete temporaries of ``path`` left by killed writers (SIGKILL, OOM, node failure).

    A temporary is named ``.<name>.<host>.<pid>.<random>.tmp<suffix>``; one whose process is
    gone from this host is stale. One from another host is left alone (its writer may
    still run there; it is a hidden file no stage reads).
    """
    host, removed = socket.gethostname().replace(".", "_"), []
    for tmp in path.parent.glob(f"{_temp_prefix(path)}*.tmp{suffix}"):
        fields = tmp.name[len(_temp_prefix(path)) :].split(".")
        if len(fields) < 4 or fields[0] != host or not fields[1].isdigit():
            continue
        try:
            os.kill(int(fields[1]), 0)
            continue  # alive (or pid reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Temporaries that killed runs left for the same ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    remove_stale_temps(path, suffix)
    host = socket.gethostname().replace(".", "_")
    fd, tmp = tempfile.mkstemp(
        dir=path.parent,
        prefix=f"{_temp_prefix(path)}{host}.{os.getpid()}.",
        suffix=f".tmp{suffix}",
    )
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; finished files get the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())
