"""`scprint download`: fetch one dataset of the listing, resumable and verified.

The bytes go to ``<out>.<dataset_version_id>.part`` beside the output (``<out>.part``
when the listing has no version), so bytes of one version are never resumed against
another's URL; ``.part`` files of other versions of the dataset are deleted. If the
version's ``.part`` is already there (a killed or failed earlier run) the download resumes
from its end with an HTTP Range request guarded by If-Range (scprint/data/http.py): a
changed object, or a server that ignores Range, answers 200 and the download restarts from
zero. Connection errors, timeouts, 5xx/429 answers and bodies cut short are retried with
exponential backoff (``--backoff`` seconds, doubling, at most 60 s); an attempt that still
moved the download forward does not use up a retry. Then the size (``size_bytes``) and
md5 are checked when the listing knows them, and the file must be whole HDF5 with ``obs``
and ``var`` (an h5ad; HDF5 refuses a file shorter than its superblock says, which is the
check left when the size is unknown); only then is ``.part`` renamed onto ``--out``. A file that fails a check is
deleted, so the rerun starts over. ``file://`` urls (a local listing) are copied and
checked the same way.

``--out`` must be ``<folder>/<dataset_id>.h5ad`` with no ``..`` and no symlink in the last
step, and the dataset id must be a safe file name, so nothing is written outside the
folder whatever the listing says.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from scprint.data.http import discard_part, fetch_to_part
from scprint.io import StageError, check_dataset_id

log = logging.getLogger(__name__)


# -- checks -----------------------------------------------------------------------------
def check_out_path(dataset_id: str, out: Path) -> Path:
    """Refuse output paths that could write somewhere other than ``<folder>/<id>.h5ad``."""
    check_dataset_id(dataset_id)
    if ".." in out.parts:
        raise StageError(f"--out {out} contains '..': give the data folder path directly")
    if out.name != f"{dataset_id}.h5ad":
        raise StageError(
            f"--out {out} must be named {dataset_id}.h5ad (the dataset id) so that no two "
            "datasets can share a file"
        )
    for path in (out, *out.parent.glob(f"{out.name}*.part")):
        if path.is_symlink():
            raise StageError(
                f"{path} is a symlink, so writing it would write wherever it points: remove it"
            )
    return out


def part_path(out: Path, version: str = "") -> Path:
    """``<out>.<version>.part``: a partial download names the dataset version it holds."""
    return out.with_name(
        f"{out.name}.{check_dataset_id(version)}.part" if version else f"{out.name}.part"
    )


def remove_other_versions(out: Path, keep: Path) -> None:
    """Partial downloads of other versions of this dataset can never be resumed: delete."""
    for stale in out.parent.glob(f"{out.name}*.part"):
        if stale != keep:
            log.info("removing %s: a partial download of another version", stale)
            discard_part(stale)


def verify(row, path: Path, remove_on_failure: bool = True) -> None:
    """Size, md5 (when the listing knows them) and the h5ad signature, or a StageError."""
    from scprint.data.listing import file_md5

    def fail(problem: str, fix: str):
        if remove_on_failure:
            discard_part(path)
            fix = f"{fix} (the downloaded file was removed, so a rerun starts over)"
        raise StageError(f"dataset {row.dataset_id}: {problem} [{row.url}]; {fix}")

    size = path.stat().st_size
    if row.size_bytes is not None and row.size_bytes > 0 and size != row.size_bytes:
        fail(
            f"size mismatch: expected {row.size_bytes} bytes, got {size}",
            "rerun the download; if it fails again the file changed upstream: rerun "
            "`scprint list-datasets` to refresh the listing, or report it to the data provider",
        )
    if row.md5:
        got = file_md5(path)
        if got != row.md5.lower():
            fail(
                f"checksum mismatch: expected md5 {row.md5}, got {got}",
                "rerun the download; if it fails again the file is corrupt or changed "
                "upstream: refresh the listing with `scprint list-datasets` or report it to "
                "the data provider",
            )
    problem = _h5ad_problem(path)
    if problem:
        fail(problem, "the server did not send an h5ad file: check the url in the listing")


def _h5ad_problem(path: Path) -> str | None:
    import h5py

    if not h5py.is_hdf5(path):
        return "not an HDF5 file (no HDF5 signature), so not an h5ad"
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("obs", "var") if key not in f]
    except OSError as err:
        return f"HDF5 file does not open ({err})"
    return f"HDF5 file without {missing}, so not an h5ad" if missing else None


# -- transfer ---------------------------------------------------------------------------
def fetch_http(row, part: Path, retries: int, timeout: float, backoff: float) -> None:
    """Stream ``row.url`` into ``part``, resuming from what ``part`` already holds."""
    fetch_to_part(
        row.url,
        part,
        what=f"dataset {row.dataset_id}: downloading {row.url}",
        label=row.dataset_id,
        expected=row.size_bytes,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        fix=(
            "check the network from this node (cluster compute nodes often have none: run "
            f"downloads where there is internet), then rerun: what {part.name} holds is kept "
            "and the rerun resumes from it"
        ),
        refused_fix="the url is stale or not public: rerun `scprint list-datasets` to refresh it",
    )


def copy_local(row, part: Path) -> None:
    source = Path(unquote(urlparse(row.url).path))
    if not source.is_file():
        raise StageError(
            f"dataset {row.dataset_id}: {source} does not exist; rerun `scprint list-datasets` "
            "if the folder changed"
        )
    shutil.copyfile(source, part)


def download(row, out: Path, retries: int = 5, timeout: float = 120, backoff: float = 2.0):
    """Download ``row`` (a listing.DatasetRow) onto ``out``, verified; returns ``out``."""
    out = check_out_path(row.dataset_id, Path(out))
    part = part_path(out, row.dataset_version_id)
    if out.exists():
        try:
            verify(row, out, remove_on_failure=False)
            log.info("%s is already there and verified", out)
            return out
        except StageError:
            log.info("%s exists but does not verify; downloading again", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_other_versions(out, keep=part)
    scheme = urlparse(row.url).scheme
    if scheme in ("http", "https"):
        fetch_http(row, part, retries=retries, timeout=timeout, backoff=backoff)
    elif scheme == "file":
        copy_local(row, part)
    else:
        raise StageError(
            f"dataset {row.dataset_id}: url {row.url!r} is neither http(s):// nor file://; "
            "fix the listing"
        )
    verify(row, part)
    os.replace(part, out)
    discard_part(part)  # the If-Range record
    log.info("downloaded %s (%d bytes)", out, out.stat().st_size)
    return out


# -- the stage --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listing", required=True, type=Path, help="datasets.tsv")
    parser.add_argument("--dataset", required=True, help="dataset id (a row of the listing)")
    parser.add_argument("--out", required=True, type=Path, help="<folder>/<dataset>.h5ad")
    parser.add_argument("--retries", type=int, default=5, help="retries without progress")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per network read")
    parser.add_argument(
        "--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)"
    )


def run(args: argparse.Namespace) -> Path:
    from scprint.data.listing import read_listing

    check_dataset_id(args.dataset)
    check_out_path(args.dataset, args.out)
    rows = read_listing(args.listing)
    if args.dataset not in rows:
        raise StageError(
            f"dataset {args.dataset} is not in {args.listing}: check the id, or rerun "
            "`scprint list-datasets` if the listing is stale"
        )
    return download(
        rows[args.dataset],
        args.out,
        retries=args.retries,
        timeout=args.timeout,
        backoff=args.backoff,
    )
