"""A real HTTP server on 127.0.0.1 for tests, with faults that can be switched on.

It serves byte strings registered under URL paths, answers HTTP Range requests (206 with
Content-Range) unless told not to, and can misbehave on purpose: drop the connection part
way through a body, answer 500 for the first N requests, serve corrupted or truncated
files (a wrong checksum or size with consistent headers), or trickle bytes slowly so a test
can kill a client mid-transfer. Per path it can also answer an error status (the Curation
API's CloudFront 504s), hold an answer past the client's timeout, or redirect with 302 to
another server (as the API hands an asset off to S3). Every request is logged (path, headers, status, bytes sent)
so tests can assert what the client asked for.

    with FileServer() as server:
        server.add("/data/a.h5ad", payload)
        server.faults.drop_after_bytes = len(payload) // 2
        url = server.url("/data/a.h5ad")

Also runnable by hand: ``python tests/http_server.py DIR`` serves the files of DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclasses.dataclass
class Faults:
    """What the server does wrong; tests change these fields while the server runs."""

    fail_first: int = 0  # answer 500 to this many requests (any path), then behave
    fail_status: int = 500
    drop_after_bytes: int | None = None  # close the connection after sending this many bytes
    drop_times: int = 1  # ... on this many responses, then send whole bodies
    range_support: bool = True  # False: ignore Range and always send 200 with the whole file
    corrupt: bool = False  # flip one byte in the middle of every body (same length)
    truncate_to: int | None = None  # serve only the first N bytes as if that were the file
    bytes_per_second: float | None = None  # trickle bodies at about this rate
    fail_paths: dict[str, int] = dataclasses.field(default_factory=dict)  # path -> times
    stall_paths: dict[str, int] = dataclasses.field(default_factory=dict)  # path -> times
    stall_seconds: float = 1.0  # how long a stalled answer waits before it is sent


@dataclasses.dataclass
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent_bytes: int = 0
    received: float = dataclasses.field(default_factory=time.monotonic)  # arrival time


class FileServer:
    """Threaded HTTP server on a free loopback port; a context manager."""

    CHUNK = 4096

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self.last_modified = formatdate(time.time() - 3600, usegmt=True)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FileServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes) -> str:
        """Serve ``body`` at ``path``; returns its full URL."""
        self.files[path] = body
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        """Answer ``path`` with 302 to ``location``; returns the URL of ``path``."""
        self.redirects[path] = location
        return self.url(path)

    def requests_for(self, path: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- the handler -----------------------------------------------------------------
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(send_body=False)

            def do_GET(self):
                self._serve(send_body=True)

            def _serve(self, send_body: bool) -> None:
                record = RequestRecord(self.command, self.path.split("?")[0], dict(self.headers))
                faults = server.faults
                with server._lock:
                    server.requests.append(record)
                    failing = faults.fail_first > 0
                    if failing:
                        faults.fail_first -= 1
                    failing = failing or _take(faults.fail_paths, record.path)
                    stalling = _take(faults.stall_paths, record.path)
                if stalling:
                    time.sleep(faults.stall_seconds)
                if failing:
                    return self._send_simple(record, faults.fail_status, b"injected failure\n")
                if record.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[record.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    record.status = 302
                    return
                body = server.files.get(record.path)
                if body is None:
                    return self._send_simple(record, 404, b"not found\n")
                if faults.truncate_to is not None:
                    body = body[: faults.truncate_to]
                if faults.corrupt and body:
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]

                start, end, status = 0, len(body) - 1, 200
                etag = f'"{hashlib.md5(body).hexdigest()}"'
                match = RANGE.match(self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range not in (etag, server.last_modified):
                    match = None  # RFC 9110: the object changed, so send all of it (200)
                if match and faults.range_support:
                    start = int(match.group(1))
                    end = min(int(match.group(2) or end), len(body) - 1)
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        record.status = 416
                        return
                    status = 206
                part = body[start : end + 1]

                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Last-Modified", server.last_modified)  # S3 clients need both
                self.send_header("ETag", etag)
                if faults.range_support:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                record.status = status
                if send_body:
                    self._send_body(record, part)

            def _send_body(self, record: RequestRecord, part: bytes) -> None:
                faults = server.faults
                limit = None
                with server._lock:
                    if faults.drop_after_bytes is not None and faults.drop_times > 0:
                        faults.drop_times -= 1
                        limit = faults.drop_after_bytes
                for offset in range(0, len(part), server.CHUNK):
                    chunk = part[offset : offset + server.CHUNK]
                    if limit is not None and record.sent_bytes + len(chunk) > limit:
                        chunk = chunk[: limit - record.sent_bytes]
                        self._write(record, chunk)
                        self.close_connection = True
                        return  # the handler closes the socket: the body is cut short
                    if not self._write(record, chunk):
                        return
                    rate = faults.bytes_per_second
                    if rate:
                        time.sleep(len(chunk) / rate)

            def _write(self, record: RequestRecord, chunk: bytes) -> bool:
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return False
                record.sent_bytes += len(chunk)
                return True

            def _send_simple(self, record: RequestRecord, status: int, text: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                record.status = status

        return Handler


def _take(counts: dict[str, int], path: str) -> bool:
    """Use up one of ``path``'s remaining faults; True when there was one."""
    if counts.get(path, 0) <= 0:
        return False
    counts[path] -= 1
    return True


def write_h5ad(
    path,
    n_cells: int = 300,
    n_genes: int = 120,
    organism: str = "NCBITaxon:9606",
    assay: str = "EFO:0009922",
    organism_in_uns: bool = False,
    seed: int = 0,
):
    """A small real h5ad (random counts, CELLxGENE-style obs columns) to serve as payload.

    With ``organism_in_uns`` the organism sits in ``uns`` as in CELLxGENE schema 5+.
    About 150 KB with the defaults: several of the downloader's 64 KiB chunks.
    """
    from pathlib import Path

    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"assay_ontology_term_id": pd.Categorical([assay] * n_cells)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    uns = {"title": f"test dataset {Path(path).stem}"}
    if organism_in_uns:
        uns["organism_ontology_term_id"] = organism
    else:
        obs["organism_ontology_term_id"] = pd.Categorical([organism] * n_cells)
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)])
    counts = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    adata = ad.AnnData(X=counts, obs=obs, var=var, uns=uns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return Path(path)


def main() -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bytes-per-second", type=float, default=None)
    args = parser.parse_args()
    server = FileServer()
    server.faults.bytes_per_second = args.bytes_per_second
    for path in sorted(args.folder.iterdir()):
        if path.is_file():
            server.add(f"/{path.name}", path.read_bytes())
    server.start()
    print(server.url("/"), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
