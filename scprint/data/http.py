"""HTTP for every stage that downloads: one session, one retry policy, one resumable
transfer into a ``.part`` file (`fetch_to_part`); callers verify and rename it.

Connection errors, timeouts, 5xx/429 answers and bodies cut short are retried with
exponential backoff (``backoff`` seconds, doubling, at most 60 s, each wait drawn between
half and all of that so that many jobs failing together do not retry in step); an attempt that still
moved the download forward does not use up a retry. A ``.part`` left by a killed run is
resumed with an HTTP Range request guarded by ``If-Range``: the object's ETag (or, when
it has none or a weak one, its Last-Modified) is recorded beside the ``.part`` as the
first bytes arrive, so a server whose object changed since answers 200 with the new
object and the transfer restarts from zero instead of splicing two files. A ``.part``
without that record (nothing says which object it holds) is started over; so is one when
the server ignores Range.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from scprint.io import StageError, write_text

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # what a dropped connection can lose from the read buffer
MAX_WAIT_S = 60.0
MAX_ATTEMPTS = 1000  # even when every attempt makes progress


class TransientError(Exception):
    """A failure worth retrying: truncated body, resume refused, server error."""


class RetriesExhausted(StageError):
    """Every retry of a retryable failure (5xx, timeout, dropped connection) failed: the
    server may still answer another request (the listing then asks per collection)."""


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
    of the ``retries``. Non-retryable failures (4xx) raise a StageError at once; running out
    of retries raises `RetriesExhausted`.
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
                raise RetriesExhausted(
                    f"{what}: gave up after {calls} attempts ({retries} retries); last "
                    f"error: {_describe(err)}; {fix}"
                ) from err
            wait = min(backoff * 2 ** max(failures - 1, 0), MAX_WAIT_S)
            wait *= random.uniform(0.5, 1.0)  # jitter: parallel jobs do not retry in step
            log.warning("%s: %s; retrying in %.1f s", what, _describe(err), wait)
            time.sleep(wait)


def _describe(err: BaseException) -> str:
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    return f"{type(err).__name__}: {err}"


def _progress_bar(total: int | None, initial: int, label: str):
    from scprint.progress import megabytes, progress

    return progress(total, label, unit="B", initial=initial, scale=megabytes)


def _content_range_start(header: str | None) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(header.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def validator_path(part: Path) -> Path:
    """Where the ETag / Last-Modified of the object a ``.part`` holds is kept."""
    return part.with_name(part.name + ".validator")


def _validator(headers) -> str | None:
    """The response's If-Range validator: a strong ETag, else Last-Modified, else None."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range accepts strong ETags only
        return etag
    return headers.get("Last-Modified")


def discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    validator_path(part).unlink(missing_ok=True)


def fetch_to_part(
    url: str,
    part: Path,
    *,
    what: str,
    label: str,
    expected: int | None = None,
    retries: int = 5,
    timeout: float = 120,
    backoff: float = 2.0,
    fix: str,
    refused_fix: str,
) -> None:
    """Stream ``url`` into ``part``, resuming from what ``part`` already holds (HTTP Range),
    retried as `with_retries` says; ``expected``: the size in bytes when known (None, 0
    or negative: unknown, so only the server's Content-Length can say a body was cut)."""
    session = http_session()
    if expected is not None and expected <= 0:
        expected = None
    recorded = validator_path(part)

    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        if expected is not None and offset == expected:
            return  # a complete .part from an earlier run: only verification is left
        if expected is not None and offset > expected:
            log.warning("%s holds more than %d bytes; starting over", part, expected)
            discard_part(part)
            offset = 0
        validator = recorded.read_text().strip() if recorded.is_file() else ""
        if offset and not validator:
            log.warning(
                "%s has no recorded ETag/Last-Modified, so whether it holds the server's "
                "current object cannot be checked; starting over",
                part,
            )
            discard_part(part)
            offset = 0
        # identity: offsets and byte counts must refer to the file, not a compressed stream
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 416 and offset:
                discard_part(part)
                raise TransientError("the server refused to resume (HTTP 416); starting over")
            response.raise_for_status()
            if offset and response.status_code == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    discard_part(part)
                    raise TransientError(f"resume answered from byte {start}, not {offset}")
                mode = "ab"
                log.info("resuming %s at byte %d", label, offset)
            else:
                if offset:
                    log.info(
                        "%s: the server sent the whole object (it changed since the .part was "
                        "started, or the server ignores Range); restarting from zero",
                        label,
                    )
                offset, mode = 0, "wb"
                part.unlink(missing_ok=True)  # old bytes never meet the new record
                fresh = _validator(response.headers)
                if fresh:  # recorded before any byte, so a .part never outlives its record
                    write_text(recorded, fresh + "\n")
                else:
                    recorded.unlink(missing_ok=True)
            length = response.headers.get("Content-Length")
            length = int(length) if length else None
            total = offset + length if length is not None else expected
            received = 0
            with open(part, mode) as fh, _progress_bar(total, offset, label) as bar:
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
        what=what,
        retries=retries,
        backoff=backoff,
        fix=fix,
        progress=lambda: part.stat().st_size if part.exists() else 0,
        refused_fix=refused_fix,
    )
