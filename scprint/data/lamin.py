"""The laminDB instance every stage shares, usable on compute nodes without internet.

laminDB looks the instance and its storage up on the Lamin hub even when both are local.
For a local instance (SQLite in a local folder) those look-ups have a known local answer,
so we give it instead of asking: the storage is "not on the hub", the instance too. Remote
instances (Postgres, S3) keep the hub behaviour untouched.

Settings live in ``LAMIN_SETTINGS_DIR`` (the workflow points it into the project), not in
the user's home, so jobs on every node of a cluster find the same instance.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from scprint.adapters.lamindb import answer_hub_locally, instance_exists, mark_off_hub
from scprint.io import StageError, write_json

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("s3://", "gs://", "http://", "https://", "hf://", "create-s3")


def is_local(storage: str, db: str | None) -> bool:
    return db is None and not str(storage).startswith(REMOTE_PREFIXES)


def use_settings_dir(settings_dir: str | os.PathLike | None) -> Path:
    """Point laminDB at ``settings_dir``; must run before ``lamindb_setup`` is imported."""
    if settings_dir is None:
        settings_dir = os.environ.get("LAMIN_SETTINGS_DIR", "lamin/settings")
    path = Path(settings_dir).resolve()
    current = os.environ.get("LAMIN_SETTINGS_DIR")
    import sys

    if "lamindb_setup" in sys.modules and current and Path(current).resolve() != path:
        raise StageError(
            f"lamindb_setup was already imported with LAMIN_SETTINGS_DIR={current}; "
            f"cannot switch to {path} in the same process"
        )
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LAMIN_SETTINGS_DIR"] = str(path)
    return path


def _mark_instance_off_hub() -> None:
    import lamindb_setup as ln_setup

    isettings = ln_setup.settings.instance
    if isettings.storage is not None and is_local(isettings.storage.root_as_str, None):
        if isettings.dialect == "sqlite":
            mark_off_hub(isettings)


def init_instance(
    name: str, storage: str, db: str | None = None, settings_dir: str | None = None
) -> dict:
    """Create the instance, or connect to it if it exists; returns its description."""
    settings_path = use_settings_dir(settings_dir)
    local = is_local(storage, db)
    if local:
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
        answer_hub_locally()
    import lamindb_setup as ln_setup

    try:
        ln_setup.init(storage=storage, name=name, db=db, modules="bionty")
    except Exception as err:  # lamindb raises many types; name the instance and the fix
        where = "the local folder" if local else "the hub / database"
        raise StageError(
            f"could not create or connect laminDB instance {name!r} at {storage} "
            f"(db={db or 'sqlite'}): {err}. Check {where} is reachable and writable; to start "
            f"over, delete {settings_path} and the storage folder."
        ) from err
    if local:
        _mark_instance_off_hub()
    isettings = ln_setup.settings.instance
    return {
        "name": isettings.name,
        "slug": isettings.slug,
        "storage": isettings.storage.root_as_str,
        "db": "sqlite" if isettings.dialect == "sqlite" else "postgresql",
        "modules": sorted(isettings.modules),
        "settings_dir": str(settings_path),
        "local": local,
    }


def connect(settings_dir: str | None = None):
    """Connect this process to the instance made by ``init_instance``; returns ``lamindb``."""
    use_settings_dir(settings_dir)
    answer_hub_locally()

    if not instance_exists():
        raise StageError(
            f"no laminDB instance is configured in {os.environ['LAMIN_SETTINGS_DIR']}: run "
            "`scprint lamin-init` (the workflow's lamin_instance rule) first"
        )
    import lamindb as ln

    _mark_instance_off_hub()
    return ln


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="scprint", help="instance name")
    parser.add_argument("--storage", default="lamin/storage", help="local folder or s3://...")
    parser.add_argument("--db", default=None, help="Postgres URL; default SQLite in the storage")
    parser.add_argument("--settings-dir", default=None, help="LAMIN_SETTINGS_DIR")
    parser.add_argument("--out", required=True, help="JSON description of the instance")


def run(args: argparse.Namespace) -> None:
    db = args.db if args.db not in (None, "", "null", "None") else None
    info = init_instance(args.name, args.storage, db, args.settings_dir)
    write_json(args.out, info)
    log.info("laminDB instance %s ready at %s", info["slug"], info["storage"])
