"""`scprint download`: fetch one dataset of the listing, resumable and verified.

The bytes go to ``<out>.part`` beside the output. If a ``.part`` is already there (a killed
or failed earlier run) the download resumes from its end with an HTTP Range request; a
server that ignores Range answers 200 and the download restarts from zero. Connection
errors, timeouts, 5xx/429 answers and bodies cut short are retried with exponential
backoff (``--backoff`` seconds, doubling, at most 60 s); an attempt that still moved the
download forward does not use up a retry. Then the size (``size_bytes``) and md5 are
checked when the listing knows them, and the file must be HDF5 with ``obs`` and ``var``
(an h5ad); only then is ``.part`` renamed onto ``--out``. A file that fails a check is
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
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from scprint.io import StageError, check_dataset_id

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # what a dropped connection can lose from the read buffer
MAX_WAIT_S = 60.0
MAX_ATTEMPTS = 1000  # even when every attempt makes progress


class TransientError(Exception):
    """A failure worth retrying: truncated body, resume refused, server error."""


def http_session():
    import requests

    from scprint import __version__

    session = requests.Session()
    session.headers["User-Agent"] = f"scprint-pipeline/{__version__}"
    return session


def _retryable(err: BaseException) -> bool:
    import requests

    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        return status >= 500 or status in (408, 429)
    return isinstance(
        err,
        TransientError
        | requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError,
    )


def with_retries(
    attempt: Callable,
    what: str,
    retries: int,
    backoff: float,
    fix: str = "check the network (and that this node has internet access), then rerun",
    progress: Callable[[], int] | None = None,
    refused_fix: str = "the url is wrong or no longer valid: check it",
):
    """Call ``attempt`` until it succeeds; retryable failures wait backoff * 2**k seconds.

    ``progress`` (e.g. bytes on disk): a failure after which it grew does not count as one
    of the ``retries``. Non-retryable failures (4xx) raise a StageError at once.
    """
    import requests

    failures, calls = 0, 0
    last_progress = progress() if progress else 0
    while True:
        calls += 1
        try:
            return attempt()
        except (requests.RequestException, TransientError) as err:
            if not _retryable(err):
                raise StageError(f"{what}: {_describe(err)}; {refused_fix}") from err
            now = progress() if progress else 0
            failures = 0 if now > last_progress else failures + 1
            last_progress = now
            if failures > retries or calls >= MAX_ATTEMPTS:
                raise StageError(
                    f"{what}: gave up after {calls} attempts ({retries} retries); last "
                    f"error: {_describe(err)}; {fix}"
                ) from err
            wait = min(backoff * 2 ** max(failures - 1, 0), MAX_WAIT_S)
            log.warning("%s: %s; retrying in %.1f s", what, _describe(err), wait)
            time.sleep(wait)


def _describe(err: BaseException) -> str:
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    return f"{type(err).__name__}: {err}"


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
    for path in (out, part_path(out)):
        if path.is_symlink():
            raise StageError(
                f"{path} is a symlink, so writing it would write wherever it points: remove it"
            )
    return out


def part_path(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def verify(row, path: Path, remove_on_failure: bool = True) -> None:
    """Size, md5 (when the listing knows them) and the h5ad signature, or a StageError."""
    from scprint.data.listing import file_md5

    def fail(problem: str, fix: str):
        if remove_on_failure:
            path.unlink(missing_ok=True)
            fix = f"{fix} (the downloaded file was removed, so a rerun starts over)"
        raise StageError(f"dataset {row.dataset_id}: {problem} [{row.url}]; {fix}")

    size = path.stat().st_size
    if row.size_bytes is not None and size != row.size_bytes:
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
def _progress_bar(total: int | None, initial: int, label: str):
    from scprint.progress import megabytes, progress

    return progress(total, label, unit="B", initial=initial, scale=megabytes)


def _content_range_start(header: str | None) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(header.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def fetch_http(row, part: Path, retries: int, timeout: float, backoff: float) -> None:
    """Stream ``row.url`` into ``part``, resuming from what ``part`` already holds."""
    session = http_session()
    expected = row.size_bytes

    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        if expected is not None and offset == expected:
            return  # a complete .part from an earlier run: only verification is left
        if expected is not None and offset > expected:
            log.warning("%s holds more than %d bytes; starting over", part, expected)
            part.unlink()
            offset = 0
        # identity: offsets and byte counts must refer to the file, not a compressed stream
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with session.get(row.url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 416 and offset:
                part.unlink()
                raise TransientError("the server refused to resume (HTTP 416); starting over")
            response.raise_for_status()
            if offset and response.status_code == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    part.unlink()
                    raise TransientError(f"resume answered from byte {start}, not {offset}")
                mode = "ab"
                log.info("resuming %s at byte %d", row.dataset_id, offset)
            else:
                if offset:
                    log.info("server ignored the Range request; restarting from zero")
                offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            length = int(length) if length else None
            total = offset + length if length is not None else expected
            received = 0
            with open(part, mode) as fh, _progress_bar(total, offset, row.dataset_id) as bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        short_of = length if length is not None else (expected and expected - offset)
        if short_of is not None and received < short_of:
            raise TransientError(f"body cut short: {offset + received} of {total} bytes")

    with_retries(
        attempt,
        what=f"dataset {row.dataset_id}: downloading {row.url}",
        retries=retries,
        backoff=backoff,
        fix=(
            "check the network from this node (cluster compute nodes often have none: run "
            f"downloads where there is internet), then rerun: what {part.name} holds is kept "
            "and the rerun resumes from it"
        ),
        progress=lambda: part.stat().st_size if part.exists() else 0,
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
    part = part_path(out)
    if out.exists() and (row.size_bytes is not None or row.md5):
        try:
            verify(row, out, remove_on_failure=False)
            log.info("%s is already there and verified", out)
            return out
        except StageError:
            log.info("%s exists but does not verify; downloading again", out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
