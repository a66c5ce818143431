"""Every use of a dependency's private API, one module per library (lamindb, scdataloader,
wandb), each checking on import that the installed version is one we tested: private
names change without notice, and an untested version should fail here, clearly, rather
than deep inside a run. ``SCPRINT_ALLOW_UNTESTED=1`` turns the failure into a warning.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from scprint.io import StageError

log = logging.getLogger(__name__)


def check_version(dist: str, tested: str, installed: str | None = None) -> str:
    """``installed`` (default: the installed version of ``dist``) must satisfy the
    specifier ``tested`` (e.g. ">=2.1,<2.2"); returns it, or raises a StageError."""
    from packaging.specifiers import SpecifierSet

    if installed is None:
        try:
            installed = version(dist)
        except PackageNotFoundError:
            raise StageError(
                f"{dist} is not installed; install the pinned set: "
                "pip install -c constraints.txt -e ."
            ) from None
    if installed in SpecifierSet(tested):
        return installed
    message = (
        f"{dist} {installed} is installed, but scprint uses its private API and was tested "
        f"with {dist}{tested} only (scprint/adapters/). Fix: pip install -c constraints.txt "
        f"'{dist}{tested}', or set SCPRINT_ALLOW_UNTESTED=1 to try anyway"
    )
    if os.environ.get("SCPRINT_ALLOW_UNTESTED") == "1":
        log.warning(message)
        return installed
    raise StageError(message)
