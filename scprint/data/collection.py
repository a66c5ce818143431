"""`scprint collection`: register processed datasets as one laminDB Collection.

Each processed h5ad becomes an Artifact with key ``scprint/processed/<dataset>.h5ad``
(copied into the instance's storage). laminDB finds artifacts by content hash, so a file
registered before is reused, never duplicated. The Collection (``--key``) is created only
once every artifact is registered, in one transaction:

- same datasets as the latest version of the key: nothing changes, same uid;
- a different set: a new version of the Collection (the DataModule reads the latest);
  a set an older version holds makes that version the latest again (laminDB allows one
  version per key and set);
- a failure while registering: the artifacts this run created are deleted again and no
  collection is written; after a hard kill the already-registered artifacts stay and
  the rerun reuses them by hash, so it ends exactly where an uninterrupted run would.

Datasets are ordered by name, so the same set always gives the same collection.

Refused datasets (the cell-less record `scprint preprocess --on-refused record` writes)
are never registered: with ``--on-refused skip`` the collection is built from the others
and the refused ones are listed with their reasons in the summary (``refused``); with
``stop`` the stage fails naming them. ``--listing`` (the listing, or its per-dataset row
files) adds each file's ``dataset_version_id`` to the summary: which exact CELLxGENE file
the cells came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from scprint.data.preprocess import REFUSED_KEY
from scprint.io import StageError, check_dataset_id, write_json

log = logging.getLogger(__name__)

ARTIFACT_KEY = "scprint/processed/{dataset}.h5ad"
# fault injection for the tests: "kill-after:N" (SIGKILL) or "fail-after:N" (exception)
# once N artifacts are registered
FAULT_ENV = "SCPRINT_FAULT_COLLECTION"


def describe_processed(path: Path) -> dict:
    """Name, cells and organisms of one processed file; refuses anything else."""
    import anndata

    dataset = check_dataset_id(path.name.removesuffix(".h5ad"))
    if not path.exists():
        raise StageError(
            f"dataset {dataset}: processed file {path} does not exist. Fix: run `scprint "
            "preprocess` for it first"
        )
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:
        raise StageError(
            f"dataset {dataset}: cannot read {path} as h5ad ({type(err).__name__}: {err}). "
            "Fix: delete it and rerun `scprint preprocess` for it"
        ) from err
    try:
        if REFUSED_KEY in adata.uns:
            return {"dataset": dataset, "path": str(path), "refused": str(adata.uns[REFUSED_KEY])}
        if "unseen_genes" not in adata.uns or "organism_ontology_term_id" not in adata.obs:
            raise StageError(
                f"dataset {dataset}: {path} is not an output of `scprint preprocess` (no "
                "uns['unseen_genes'] / obs organism column). Fix: preprocess the raw file and "
                "pass the file from data/processed/"
            )
        organisms = sorted(adata.obs["organism_ontology_term_id"].astype(str).unique())
        return {
            "dataset": dataset,
            "path": str(path),
            "n_cells": int(adata.n_obs),
            "organisms": organisms,
        }
    finally:
        adata.file.close()


def _fault_point(n_registered: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return
    kind, _, count = fault.partition(":")
    if int(count) == n_registered:
        if kind == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "fail-after":
            raise RuntimeError(f"injected fault after {n_registered} artifacts ({FAULT_ENV})")


def _collection_for(ln, artifacts: list, key: str) -> tuple[object, str]:
    """The latest version of ``key`` holding exactly ``artifacts``, in order.

    laminDB allows one version per (key, set of artifacts): a set that an older version
    already holds makes that version the latest again instead of a new one.
    """
    wanted = [a.id for a in artifacts]
    versions = ln.Collection.objects.filter(key=key, branch_id=1).order_by("-created_at")
    latest = next((c for c in versions if c.is_latest), None)
    same = next((c for c in versions if [a.id for a in c.ordered_artifacts] == wanted), None)
    if same is not None and same.is_latest:
        return same, "unchanged"
    if same is not None:
        for version in versions:
            if version.is_latest:
                version.is_latest = False
                version.save()
        same.is_latest = True
        same.save()
        return same, "earlier version made latest again"
    collection = ln.Collection(
        artifacts,
        key=key,
        description=f"scprint pre-training collection ({len(artifacts)} datasets)",
        revises=latest,
        skip_hash_lookup=True,  # look-up by hash ignores the key: never take another key's
    ).save()
    return collection, "new version"


def register(datasets: list[dict], key: str) -> dict:
    """Artifacts, then the Collection; returns the collection summary."""
    from django.db import transaction

    from scprint.data.lamin import connect
    from scprint.progress import progress

    ln = connect()
    created = []
    artifacts = []
    current = None
    bar = progress(len(datasets), "registering datasets", unit="datasets")
    try:
        for info in datasets:
            current = info["dataset"]
            artifact = ln.Artifact(
                info["path"],
                key=ARTIFACT_KEY.format(dataset=current),
                description=f"scprint processed dataset {current}",
            )
            is_new = artifact._state.adding
            artifact.save()
            if is_new:
                created.append(artifact)
            artifacts.append(artifact)
            log.info("%s: artifact %s%s", current, artifact.uid, "" if is_new else " (existing)")
            bar.update(1)
            _fault_point(len(artifacts))
        current = None
        with transaction.atomic():
            collection, changed = _collection_for(ln, artifacts, key)
    except Exception as err:
        for artifact in created:  # leave the registry as this run found it
            artifact.delete(permanent=True, storage=True)
        where = f" while registering dataset {current}" if current else ""
        raise StageError(
            f"collection {key!r}: registration failed{where} ({type(err).__name__}: {err}). "
            f"Nothing was registered ({len(created)} new artifacts removed again). Fix the cause "
            "and rerun; already registered datasets are reused"
        ) from err
    log.info(
        "collection %s: %s (uid %s, version %s)",
        key,
        changed,
        collection.uid,
        collection.version_tag,
    )
    return {
        "key": key,
        "uid": collection.uid,
        "version": collection.version_tag,
        "n_cells": sum(d["n_cells"] for d in datasets),
        "n_datasets": len(datasets),
        "datasets": [
            {**d, "artifact_uid": a.uid, "artifact_key": a.key}
            for d, a in zip(datasets, artifacts, strict=True)
        ],
        "organisms": sorted({o for d in datasets for o in d["organisms"]}),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processed", nargs="+", required=True, help="data/processed/<dataset>.h5ad files"
    )
    parser.add_argument("--key", default="scprint-pretrain", help="the Collection's key")
    parser.add_argument("--out", required=True, help="results/collection.json")
    parser.add_argument(
        "--listing",
        nargs="*",
        default=[],
        type=Path,
        help="datasets.tsv or results/listing/<dataset>.tsv files: record each dataset's version",
    )
    parser.add_argument(
        "--on-refused",
        choices=("skip", "stop"),
        default="stop",
        help="datasets preprocess refused: skip them (listed in --out) or fail",
    )


def versions(listings: list[Path]) -> dict[str, str]:
    from scprint.data.listing import read_listing

    found = {}
    for path in listings:
        found.update({d: row.dataset_version_id for d, row in read_listing(path).items()})
    return found


def refused_error(key: str, refused: list[dict]) -> StageError:
    reasons = "\n".join(f"  - {d['dataset']}: {d['refused']}" for d in refused)
    return StageError(
        f"collection {key!r}: {len(refused)} dataset(s) were refused by `scprint preprocess`:"
        f"\n{reasons}\nFix: correct those files, drop them (datasets.exclude in the config), "
        "or set datasets.on_refused: skip to build the collection from the others"
    )


def run(args: argparse.Namespace) -> None:
    described = sorted(
        (describe_processed(Path(p)) for p in dict.fromkeys(args.processed)),
        key=lambda d: d["dataset"],
    )
    refused = [d for d in described if "refused" in d]
    datasets = [d for d in described if "refused" not in d]
    if refused and args.on_refused == "stop":
        raise refused_error(args.key, refused)
    if not datasets:
        if refused:
            raise refused_error(args.key, refused)
        raise StageError(f"collection {args.key!r}: no dataset to register")
    version_of = versions(args.listing)
    for d in datasets:
        if args.listing and d["dataset"] not in version_of:
            raise StageError(
                f"dataset {d['dataset']}: not in the listing {[str(p) for p in args.listing]}, "
                "so its version is unknown. Fix: pass the listing the file was downloaded from"
            )
        if args.listing:
            d["dataset_version_id"] = version_of[d["dataset"]]
    for d in refused:
        log.warning(
            "dataset %s refused by preprocess, not registered: %s", d["dataset"], d["refused"]
        )
    names = [d["dataset"] for d in datasets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise StageError(
            f"collection {args.key!r}: dataset names occur twice ({', '.join(duplicated)}); "
            "the dataset name is the file name. Fix: pass each dataset once"
        )
    summary = register(datasets, args.key)
    summary["refused"] = [
        {"dataset": d["dataset"], "reason": d["refused"], "path": d["path"]} for d in refused
    ]
    write_json(args.out, summary)
