"""`scprint download` against a real HTTP server on 127.0.0.1 that misbehaves on purpose:
connections dropped halfway, no Range support, corrupted bytes, persistent 500s, a slow
transfer killed mid-way. Payloads are small real h5ad files."""

from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_env, run_cli
from http_server import FileServer, write_h5ad

from scprint.data import download, http, listing
from scprint.data.listing import DatasetRow
from scprint.io import StageError

DATASET = "ds1"
PATH = f"/files/{DATASET}.h5ad"


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    path = write_h5ad(tmp_path_factory.mktemp("payload") / "p.h5ad", n_cells=400, n_genes=100)
    body = path.read_bytes()
    assert len(body) > 3 * http.CHUNK_BYTES  # a drop halfway leaves whole chunks on disk
    return body


@pytest.fixture
def server(payload):
    with FileServer() as srv:
        srv.add(PATH, payload)
        yield srv


def write_listing(tmp_path, rows: list[DatasetRow]):
    path = tmp_path / "results" / "datasets.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(listing.format_listing(rows))
    return path


def row_for(url: str, body: bytes, dataset_id: str = DATASET, with_md5: bool = True, **changes):
    fields = dict(
        dataset_id=dataset_id,
        title="t",
        organism=("NCBITaxon:9606",),
        assay=("EFO:0009922",),
        n_cells=400,
        url=url,
        size_bytes=len(body),
        md5=hashlib.md5(body).hexdigest() if with_md5 else "",
    )
    fields.update(changes)
    return DatasetRow(**fields)


def run_download(tmp_path, row: DatasetRow, *extra: str, dataset: str | None = None, out=None):
    """The stage in this process, with a listing holding ``row``; returns the output path."""
    listing_path = write_listing(tmp_path, [row])
    dataset = dataset or row.dataset_id
    out = out or tmp_path / "data" / "raw" / f"{dataset}.h5ad"
    parser = argparse.ArgumentParser()
    download.add_arguments(parser)
    args = parser.parse_args(
        [
            "--listing",
            str(listing_path),
            "--dataset",
            dataset,
            "--out",
            str(out),
            "--backoff",
            "0.01",
            "--timeout",
            "10",
            *extra,
        ]
    )
    return download.run(args)


def leftovers(tmp_path) -> list[str]:
    folder = tmp_path / "data" / "raw"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_happy_path(server, payload, tmp_path):
    out = run_download(tmp_path, row_for(server.url(PATH), payload))
    assert out.read_bytes() == payload
    assert leftovers(tmp_path) == [f"{DATASET}.h5ad"]  # no .part left behind
    assert [r.headers.get("Range") for r in server.requests] == [None]
    # a second run finds the verified file and does not download again
    run_download(tmp_path, row_for(server.url(PATH), payload))
    assert len(server.requests) == 1


def test_dropped_connection_resumes_with_range(server, payload, tmp_path):
    server.faults.drop_after_bytes = len(payload) // 2
    out = run_download(tmp_path, row_for(server.url(PATH), payload))
    assert out.read_bytes() == payload
    first, second = server.requests
    assert first.sent_bytes == len(payload) // 2 and first.headers.get("Range") is None
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(payload) // 2
    assert second.status == 206 and second.sent_bytes == len(payload) - resumed_at


def test_resume_without_md5_still_byte_identical(server, payload, tmp_path):
    """CELLxGENE publishes sizes, not checksums: the resumed file must still be exact."""
    server.faults.drop_after_bytes = len(payload) // 3
    server.faults.drop_times = 2
    out = run_download(tmp_path, row_for(server.url(PATH), payload, with_md5=False))
    assert out.read_bytes() == payload
    assert [r.status for r in server.requests] == [200, 206, 206]


def test_leftover_part_complete_or_oversized(server, payload, tmp_path):
    """A run killed between the last byte and the rename; a .part from another file."""
    part = tmp_path / "data" / "raw" / f"{DATASET}.h5ad.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload)
    out = run_download(tmp_path, row_for(server.url(PATH), payload))
    assert out.read_bytes() == payload and not part.exists()
    assert server.requests == []  # only verified, nothing fetched
    out.unlink()
    part.write_bytes(payload + b"junk")
    assert run_download(tmp_path, row_for(server.url(PATH), payload)).read_bytes() == payload
    assert [r.headers.get("Range") for r in server.requests] == [None]


def test_server_without_range_support_restarts_from_zero(server, payload, tmp_path):
    server.faults.range_support = False
    server.faults.drop_after_bytes = len(payload) // 2
    out = run_download(tmp_path, row_for(server.url(PATH), payload))
    assert out.read_bytes() == payload  # nothing appended twice
    first, second = server.requests
    assert second.headers.get("Range")  # we asked to resume ...
    assert second.status == 200 and second.sent_bytes == len(payload)  # ... and got it all


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(server, payload, tmp_path):
    server.faults.corrupt = True  # same size, one byte flipped
    row = row_for(server.url(PATH), payload)
    with pytest.raises(StageError) as err:
        run_download(tmp_path, row)
    message = str(err.value)
    corrupted = bytearray(payload)
    corrupted[len(payload) // 2] ^= 0xFF
    assert f"dataset {DATASET}: checksum mismatch" in message
    assert f"expected md5 {row.md5}, got {hashlib.md5(corrupted).hexdigest()}" in message
    assert "removed, so a rerun starts over" in message and "report it" in message
    assert leftovers(tmp_path) == []
    # the server is fixed: the rerun starts from zero (no Range) and succeeds
    server.faults.corrupt = False
    out = run_download(tmp_path, row)
    assert out.read_bytes() == payload
    assert server.requests[-1].headers.get("Range") is None


def test_wrong_size_is_a_clear_error(server, payload, tmp_path):
    row = row_for(server.url(PATH), payload, with_md5=False, size_bytes=len(payload) - 10)
    with pytest.raises(StageError, match=rf"size mismatch: expected {len(payload) - 10} bytes"):
        run_download(tmp_path, row)
    assert leftovers(tmp_path) == []


def test_server_sending_a_shorter_file_is_a_size_error(server, payload, tmp_path):
    server.faults.truncate_to = len(payload) - 1000  # consistent headers, wrong file
    with pytest.raises(StageError) as err:
        run_download(tmp_path, row_for(server.url(PATH), payload, with_md5=False))
    assert f"expected {len(payload)} bytes, got {len(payload) - 1000}" in str(err.value)
    assert "scprint list-datasets" in str(err.value)
    assert leftovers(tmp_path) == []


def test_not_an_h5ad_is_refused(server, tmp_path):
    body = b"<html>login page</html>" * 100
    server.add("/files/page.h5ad", body)
    row = row_for(server.url("/files/page.h5ad"), body, dataset_id="page")
    with pytest.raises(StageError, match="dataset page: not an HDF5 file"):
        run_download(tmp_path, row)
    assert leftovers(tmp_path) == []


def test_persistent_500_gives_up_after_the_retries(server, payload, tmp_path):
    server.faults.fail_first = 1000
    with pytest.raises(StageError) as err:
        run_download(tmp_path, row_for(server.url(PATH), payload), "--retries", "3")
    message = str(err.value)
    assert f"dataset {DATASET}: downloading {server.url(PATH)}" in message
    assert "gave up after 4 attempts (3 retries)" in message and "HTTP 500" in message
    assert len(server.requests) == 4
    assert leftovers(tmp_path) == []


def test_500_then_success(server, payload, tmp_path):
    server.faults.fail_first = 2
    out = run_download(tmp_path, row_for(server.url(PATH), payload), "--retries", "2")
    assert out.read_bytes() == payload
    assert [r.status for r in server.requests] == [500, 500, 200]


def test_404_is_not_retried(server, payload, tmp_path):
    with pytest.raises(StageError, match=r"HTTP 404.*rerun `scprint list-datasets`"):
        run_download(tmp_path, row_for(server.url("/files/gone.h5ad"), payload))
    assert len(server.requests) == 1


def test_unknown_dataset_id(server, payload, tmp_path):
    with pytest.raises(StageError, match="dataset other is not in .*datasets.tsv"):
        run_download(tmp_path, row_for(server.url(PATH), payload), dataset="other")


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "..", "/etc/passwd"])
def test_path_tricks_in_the_id_are_refused(server, payload, tmp_path, bad_id):
    with pytest.raises(StageError, match="not a safe file name"):
        run_download(
            tmp_path,
            row_for(server.url(PATH), payload),
            dataset=bad_id,
            out=tmp_path / "data" / "raw" / f"{bad_id}.h5ad",
        )
    assert server.requests == [] and not (tmp_path / "x.h5ad").exists()


def test_out_paths_outside_the_folder_are_refused(server, payload, tmp_path):
    row = row_for(server.url(PATH), payload)
    with pytest.raises(StageError, match=r"contains '\.\.'"):
        run_download(tmp_path, row, out=tmp_path / "data" / "raw" / ".." / f"{DATASET}.h5ad")
    with pytest.raises(StageError, match=f"must be named {DATASET}.h5ad"):
        run_download(tmp_path, row, out=tmp_path / "data" / "raw" / "other.h5ad")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / f"{DATASET}.h5ad").symlink_to(tmp_path / "elsewhere.h5ad")
    with pytest.raises(StageError, match="is a symlink"):
        run_download(tmp_path, row)
    assert server.requests == [] and not (tmp_path / "elsewhere.h5ad").exists()


def test_file_url_is_copied_and_verified(payload, tmp_path):
    source = tmp_path / "local" / "my data.h5ad"
    source.parent.mkdir()
    source.write_bytes(payload)
    row = row_for(source.as_uri(), payload, dataset_id="mydata")
    assert run_download(tmp_path, row).read_bytes() == payload
    bad = row_for(source.as_uri(), payload, dataset_id="mydata2", md5="0" * 32)
    with pytest.raises(StageError, match="checksum mismatch"):
        run_download(tmp_path, bad)
    assert source.read_bytes() == payload  # the source is never touched


def test_killed_download_then_rerun_is_byte_identical(server, payload, tmp_path):
    """Kill `scprint download` mid-transfer (SIGKILL, no cleanup), rerun, compare bytes."""
    listing_path = write_listing(tmp_path, [row_for(server.url(PATH), payload, with_md5=False)])
    args = [
        "download",
        "--listing",
        listing_path,
        "--dataset",
        DATASET,
        "--out",
        f"data/raw/{DATASET}.h5ad",
        "--backoff",
        "0.01",
    ]
    part = tmp_path / "data" / "raw" / f"{DATASET}.h5ad.part"
    server.faults.bytes_per_second = len(payload) / 20  # the whole file would take ~20 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "scprint.cli", *map(str, args)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= http.CHUNK_BYTES):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the download never wrote its first chunk"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    kept = part.stat().st_size
    assert 0 < kept < len(payload)
    assert not (tmp_path / "data" / "raw" / f"{DATASET}.h5ad").exists()

    server.faults.bytes_per_second = None
    run_cli(args, cwd=tmp_path)
    assert (tmp_path / "data" / "raw" / f"{DATASET}.h5ad").read_bytes() == payload
    assert not part.exists()
    assert server.requests[-1].headers["Range"] == f"bytes={kept}-"
    assert server.requests[-1].sent_bytes == len(payload) - kept


def test_cli_error_is_one_line(server, payload, tmp_path):
    listing_path = write_listing(tmp_path, [row_for(server.url(PATH), payload)])
    proc = run_cli(
        ["download", "--listing", listing_path, "--dataset", "../x", "--out", "data/raw/x.h5ad"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "scprint download: error: dataset id '../x' is not a safe file name" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- versions and unknown sizes (issue 20) -----------------------------------------------
@pytest.mark.parametrize("size", [None, -1, 0])
def test_unknown_size_is_verified_by_hdf5_integrity(server, payload, tmp_path, size):
    """`filesize: -1` (the Curation API's failed size lookup), 0 or missing: never a crash,
    a whole file passes, a cut one is refused because HDF5 itself says it is truncated."""
    row = row_for(server.url(PATH), payload, with_md5=False, size_bytes=size)
    assert run_download(tmp_path, row).read_bytes() == payload
    (tmp_path / "data" / "raw" / f"{DATASET}.h5ad").unlink()
    server.faults.truncate_to = len(payload) - 100  # consistent headers, a shorter file
    with pytest.raises(StageError, match=f"dataset {DATASET}: HDF5 file does not open .*truncated"):
        run_download(tmp_path, row)
    assert leftovers(tmp_path) == []


def etag_of(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'


def test_resume_sends_if_range_with_the_recorded_etag(server, payload, tmp_path):
    row = row_for(server.url(PATH), payload, with_md5=False, dataset_version_id="v1")
    server.faults.drop_after_bytes = len(payload) // 2
    out = run_download(tmp_path, row)
    assert out.read_bytes() == payload and leftovers(tmp_path) == [f"{DATASET}.h5ad"]
    first, resumed = server.requests
    assert first.headers.get("If-Range") is None
    assert resumed.status == 206 and resumed.headers["If-Range"] == etag_of(payload)


def test_changed_object_restarts_instead_of_splicing(server, payload, tmp_path):
    """A killed run left half of the old object (and its ETag); the object behind the URL
    changed since: If-Range no longer matches, the server sends the new object whole and
    nothing of the old is kept."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / f"{DATASET}.h5ad.v1.part").write_bytes(payload[: len(payload) // 2])
    (raw / f"{DATASET}.h5ad.v1.part.validator").write_text(etag_of(payload) + "\n")
    new = write_h5ad(tmp_path / "new.h5ad", n_cells=400, n_genes=100, seed=7).read_bytes()
    server.add(PATH, new)
    row = row_for(server.url(PATH), new, size_bytes=None, with_md5=False, dataset_version_id="v1")
    assert run_download(tmp_path, row).read_bytes() == new
    (only,) = server.requests
    assert only.headers["Range"] == f"bytes={len(payload) // 2}-"
    assert only.headers["If-Range"] == etag_of(payload)
    assert only.status == 200 and only.sent_bytes == len(new)


def test_part_of_another_version_is_never_resumed(server, payload, tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / f"{DATASET}.h5ad.old-version.part").write_bytes(payload[:1000])
    (raw / f"{DATASET}.h5ad.old-version.part.validator").write_text('"x"\n')
    (raw / f"{DATASET}.h5ad.part").write_bytes(b"unversioned junk")  # no record: restarted
    row = row_for(server.url(PATH), payload, dataset_version_id="new-version")
    assert run_download(tmp_path, row).read_bytes() == payload
    assert leftovers(tmp_path) == [f"{DATASET}.h5ad"]
    assert [r.headers.get("Range") for r in server.requests] == [None]
