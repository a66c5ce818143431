"""lamindb / lamindb_setup private API that scprint relies on (tested: lamindb 2.1.1,
lamindb_setup 1.19).

- offline local instances: lamindb_setup asks the Lamin hub at init
  (``_hub_core.init_storage_hub``) and when an Artifact is made
  (``InstanceSettings._is_on_hub``); both are answered locally for local storage;
- ``settings._instance_exists`` and ``InstanceSettings._sqlite_file_local``;
- ``MappedCollection`` internals read by the batch reader (scprint.trainer.batches):
  ``_get_labels``, ``path_list``, ``indices_list``, ``storage_idx``, ``indices``.

Nothing here imports lamindb at import time: the settings folder must be chosen first.
"""

from __future__ import annotations

from scprint.adapters import check_version

check_version("lamindb", "==2.1.1")
check_version("lamindb_setup", ">=1.19,<1.20")


def answer_hub_locally() -> None:
    """Answer lamindb_setup's hub look-up at init for local storage without the network."""
    from lamindb_setup.core import _hub_core

    if getattr(_hub_core.init_storage_hub, "_scprint_local", False):
        return
    online = _hub_core.init_storage_hub

    def init_storage_hub(ssettings, *args, **kwargs):
        if ssettings.type_is_cloud:
            return online(ssettings, *args, **kwargs)
        return "hub-record-not-created"

    init_storage_hub._scprint_local = True
    _hub_core.init_storage_hub = init_storage_hub


def mark_off_hub(isettings) -> None:
    """Tell lamindb_setup the instance is not on the hub, so saving asks no one."""
    isettings._is_on_hub = False


def instance_exists() -> bool:
    import lamindb_setup as ln_setup

    return ln_setup.settings._instance_exists


def sqlite_file(isettings):
    """The local SQLite file of an instance, or None when lamindb_setup does not say."""
    return getattr(isettings, "_sqlite_file_local", None)


def mapped_labels(mapped, store, column: str, storage_idx: int):
    """Labels of ``column`` for every cell of file ``storage_idx`` (a pd.Categorical)."""
    return mapped._get_labels(store, column, storage_idx=storage_idx)


def mapped_layout(mapped) -> tuple[list, list, object, object]:
    """(file paths, cells kept per file, file of each cell, row of each cell in its file)."""
    return mapped.path_list, mapped.indices_list, mapped.storage_idx, mapped.indices
