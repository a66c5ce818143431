"""`scprint collection`: every processed dataset as a laminDB artifact, then one Collection.

Idempotent: an artifact whose file hash is already registered is reused (laminDB looks it
up by hash), and the Collection gets a new version only when its set of artifacts
changed; rerunning with the same files changes nothing. The Collection is saved last, in
one step, after every artifact is in place: a run killed before that leaves at most
artifacts that the rerun reuses, never a collection missing some of its datasets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scprint.io import StageError, write_json

log = logging.getLogger(__name__)

ARTIFACT_KEY = "scprint/processed/{dataset}.h5ad"


def dataset_summary(path: Path) -> dict:
    """Cells and organisms of a processed file, read from obs only."""
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:
        raise StageError(
            f"dataset {path.stem}: cannot read processed file {path} ({err}). Fix: delete it "
            "and rerun the preprocess rule for this dataset"
        ) from err
    try:
        organisms = sorted(adata.obs["organism_ontology_term_id"].astype(str).unique())
    except KeyError as err:
        raise StageError(
            f"dataset {path.stem}: {path} has no obs column organism_ontology_term_id, so it "
            "was not written by `scprint preprocess`. Fix: rerun the preprocess rule"
        ) from err
    finally:
        adata.file.close()
    return {"dataset": path.stem, "n_cells": int(adata.n_obs), "organisms": organisms}


def register_artifact(ln, path: Path):
    """The artifact for this file: the registered one with the same hash, or a new one."""
    artifact = ln.Artifact(
        path, key=ARTIFACT_KEY.format(dataset=path.stem), description=f"scPRINT {path.stem}"
    )
    if artifact._state.adding:
        artifact.save()
        log.info("registered %s as %s", path, artifact.uid)
    else:
        log.info("%s is already registered as %s", path, artifact.uid)
    return artifact


def build_collection(processed: list[Path], key: str) -> dict:
    from scprint.data.lamin import connect

    if not processed:
        raise StageError(
            f"collection {key!r}: no processed datasets were given. Fix: check the listing "
            "(results/datasets.tsv) and the preprocess logs"
        )
    summaries = [dataset_summary(path) for path in processed]  # fail before any write
    ln = connect()
    artifacts = [register_artifact(ln, path) for path in processed]
    wanted = sorted(a.uid for a in artifacts)
    latest = ln.Collection.filter(key=key, is_latest=True).first()
    if latest is not None and sorted(a.uid for a in latest.artifacts.all()) == wanted:
        collection = latest
        log.info("collection %s is up to date (%s)", key, collection.uid)
    else:
        collection = ln.Collection(
            artifacts,
            key=key,
            revises=latest,
            description=f"scPRINT pre-training collection ({len(artifacts)} datasets)",
        ).save()
        log.info("saved collection %s version %s (%s)", key, collection.version, collection.uid)
    return {
        "key": key,
        "uid": collection.uid,
        "version": collection.version,
        "n_datasets": len(artifacts),
        "n_cells": sum(s["n_cells"] for s in summaries),
        "organisms": sorted({o for s in summaries for o in s["organisms"]}),
        "datasets": [
            {**s, "artifact_uid": a.uid} for s, a in zip(summaries, artifacts, strict=True)
        ],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processed", nargs="+", required=True, help="processed h5ad files")
    parser.add_argument("--key", required=True, help="laminDB Collection key")
    parser.add_argument("--out", required=True, help="results/collection.json")


def run(args: argparse.Namespace) -> None:
    paths = sorted({Path(p) for p in args.processed}, key=lambda p: p.stem)
    write_json(args.out, build_collection(paths, args.key))
