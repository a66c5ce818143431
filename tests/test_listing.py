"""`scprint list-datasets` against a fake Curation API served by a real HTTP server on
127.0.0.1, and against a local folder of real h5ad files."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import pytest
from conftest import run_cli
from http_server import FileServer, write_h5ad

from scprint.data import listing
from scprint.io import StageError

HUMAN, MOUSE = "NCBITaxon:9606", "NCBITaxon:10090"
TENX_V3, SMART_SEQ2 = "EFO:0009922", "EFO:0008931"


def term(term_id: str, label: str = "x") -> dict:
    return {"label": label, "ontology_term_id": term_id}


def api_dataset(
    dataset_id, organisms, assays, cells, size=1000, assets=None, title=None, primary=None
):
    """One entry shaped like GET /curation/v1/datasets (fields we do not read included)."""
    if assets is None:
        assets = [
            {"filetype": "RDS", "filesize": 1, "url": f"https://example.org/{dataset_id}.rds"},
            {"filetype": "H5AD", "filesize": size, "url": f"https://example.org/{dataset_id}.h5ad"},
        ]
    return {
        "dataset_id": dataset_id,
        "dataset_version_id": f"v-{dataset_id}",
        "collection_id": "c1",
        "title": title or f"Dataset {dataset_id}",
        "organism": [term(o) for o in organisms],
        "assay": [term(a) for a in assays],
        "tissue": [term("UBERON:0002048", "lung")],
        "cell_count": cells,
        "primary_cell_count": cells if primary is None else primary,
        "assets": assets,
        "schema_version": "5.2.0",
    }


CATALOG = [
    api_dataset("d-human-10x", [HUMAN], [TENX_V3], 5000, size=123),
    api_dataset("b-mouse-smartseq", [MOUSE], [SMART_SEQ2], 200),
    api_dataset("a-both", [MOUSE, HUMAN], [SMART_SEQ2, TENX_V3], 3000, title="two\torganisms\n"),
    api_dataset("c-human-big", [HUMAN], [SMART_SEQ2], 90000),
    api_dataset("e-rds-only", [HUMAN], [TENX_V3], 5000, assets=[{"filetype": "RDS", "url": "u"}]),
    api_dataset("f-no-count", [HUMAN], [TENX_V3], None),
]


@pytest.fixture
def api():
    """A running server whose /curation/v1/datasets answers CATALOG; yields (server, base)."""
    with FileServer() as server:
        server.add("/curation/v1/datasets", json.dumps(CATALOG).encode())
        yield server, server.url("/curation/v1")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    listing.add_arguments(parser)
    return parser.parse_args(argv)


def run_listing(base: str, out, *extra: str) -> list[str]:
    """Run the stage in this process on the API at ``base``; the TSV's lines."""
    argv = ["--source", "cellxgene", "--api", base, "--out", str(out), "--backoff", "0.001"]
    argv += ["--rate", "1000"]
    listing.run(parse([*argv, *extra]))
    return out.read_text().splitlines()


def ids_of(lines: list[str]) -> list[str]:
    return [line.split("\t")[0] for line in lines[1:]]


def test_curation_api_listing_rows_and_columns(api, tmp_path):
    server, base = api
    lines = run_listing(base, tmp_path / "datasets.tsv")
    assert lines[0].split("\t") == list(listing.COLUMNS)
    # sorted by id; the RDS-only dataset has nothing to download
    assert ids_of(lines) == [
        "a-both",
        "b-mouse-smartseq",
        "c-human-big",
        "d-human-10x",
        "f-no-count",
    ]
    both = dict(zip(listing.COLUMNS, lines[1].split("\t"), strict=True))
    assert both == {
        "dataset_id": "a-both",
        "dataset_version_id": "v-a-both",
        "title": "two organisms",  # tabs and newlines cannot break the TSV
        "organism": f"{MOUSE};{HUMAN}",  # sorted ids, ';'-joined
        "assay": f"{SMART_SEQ2};{TENX_V3}",
        "n_cells": "3000",
        "n_primary_cells": "3000",
        "url": "https://example.org/a-both.h5ad",
        "size_bytes": "1000",
        "md5": "",  # the API publishes no checksum
    }
    human = dict(zip(listing.COLUMNS, lines[4].split("\t"), strict=True))
    assert (human["dataset_id"], human["size_bytes"], human["n_cells"]) == (
        "d-human-10x",
        "123",
        "5000",
    )
    no_count = dict(zip(listing.COLUMNS, lines[5].split("\t"), strict=True))
    assert (no_count["n_cells"], no_count["n_primary_cells"]) == ("", "")  # null: unknown
    assert [r.path for r in server.requests] == ["/curation/v1/datasets"]


@pytest.mark.parametrize("size", [-1, 0, None, "12", True])
def test_unknown_sizes_and_counts_are_unknown_not_numbers(size):
    """`filesize: -1` is what the Curation API sends when its S3 size lookup failed."""
    entry = api_dataset("g", [HUMAN], [TENX_V3], None, size=size, primary=None)
    entry["primary_cell_count"] = None
    (row,) = listing.rows_from_curation_api([entry])
    assert (row.size_bytes, row.n_cells, row.n_primary_cells) == (None, None, None)
    assert row.dataset_version_id == "v-g"
    assert (
        listing.DatasetRow.from_fields(dict(zip(listing.COLUMNS, row.to_fields(), strict=True)))
        == row
    )


def test_listing_is_deterministic(api, tmp_path):
    _, base = api
    first = (tmp_path / "1.tsv", tmp_path / "2.tsv")
    for out in first:
        run_listing(base, out, "--organism", HUMAN)
    assert first[0].read_bytes() == first[1].read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


@pytest.mark.parametrize(
    "filters, expected",
    [
        (["--organism", MOUSE], ["a-both", "b-mouse-smartseq"]),
        (
            ["--organism", MOUSE, HUMAN],
            ["a-both", "b-mouse-smartseq", "c-human-big", "d-human-10x", "f-no-count"],
        ),
        (["--assay", TENX_V3], ["a-both", "d-human-10x", "f-no-count"]),
        (["--organism", HUMAN, "--assay", SMART_SEQ2], ["a-both", "c-human-big"]),
        (
            ["--min-cells", "3000"],
            ["a-both", "c-human-big", "d-human-10x"],
        ),  # unknown count dropped
        (["--include", "c-human-big", "b-mouse-smartseq"], ["b-mouse-smartseq", "c-human-big"]),
        (
            ["--include", "c-human-big", "--include", "d-human-10x", "--min-cells", "10000"],
            ["c-human-big"],
        ),
        (["--exclude", "a-both", "c-human-big"], ["b-mouse-smartseq", "d-human-10x", "f-no-count"]),
        (["--organism", HUMAN, "--limit", "2"], ["a-both", "c-human-big"]),
        (["--limit", "0"], []),
        (
            ["--organism"],
            ["a-both", "b-mouse-smartseq", "c-human-big", "d-human-10x", "f-no-count"],
        ),
    ],
)
def test_filters(api, tmp_path, filters, expected):
    _, base = api
    assert ids_of(run_listing(base, tmp_path / "datasets.tsv", *filters)) == expected


def test_include_of_an_unknown_id_is_an_error(api, tmp_path):
    _, base = api
    with pytest.raises(
        StageError, match=r"--include names datasets the source does not have: \['typo'\]"
    ):
        run_listing(base, tmp_path / "datasets.tsv", "--include", "typo", "a-both")
    assert not (tmp_path / "datasets.tsv").exists()


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "/abs", ".hidden", "x" * 201])
def test_unsafe_dataset_id_is_refused(tmp_path, bad_id):
    with FileServer() as server:
        catalog = [*CATALOG, api_dataset(bad_id, [HUMAN], [TENX_V3], 5000)]
        server.add("/api/datasets", json.dumps(catalog).encode())
        out = tmp_path / "datasets.tsv"
        with pytest.raises(StageError, match="not safe file names") as err:
            run_listing(server.url("/api"), out)
        assert repr(bad_id) in str(err.value) and "--exclude" in str(err.value)
        assert not out.exists()
        # the way around it: exclude the dataset (or filter it out)
        assert "a-both" in ids_of(run_listing(server.url("/api"), out, "--exclude", bad_id))


def test_listing_retries_server_errors_then_succeeds(api, tmp_path):
    server, base = api
    server.faults.fail_first = 2
    lines = run_listing(base, tmp_path / "datasets.tsv", "--retries", "3")
    assert len(lines) == 6
    assert [r.status for r in server.requests] == [500, 500, 200]


def test_listing_gives_up_with_a_clear_error(api, tmp_path):
    server, base = api
    server.faults.fail_first = 100
    with pytest.raises(
        StageError, match=r"/collections: gave up after 3 attempts \(2 retries\).*HTTP 500"
    ):
        run_listing(base, tmp_path / "datasets.tsv", "--retries", "2")
    assert [r.path for r in server.requests] == ["/curation/v1/datasets"] * 3 + [
        "/curation/v1/collections"
    ] * 3
    assert not (tmp_path / "datasets.tsv").exists()


def test_listing_404_is_not_retried(api, tmp_path):
    server, _ = api
    with pytest.raises(StageError, match=r"HTTP 404.*check --api"):
        run_listing(server.url("/wrong"), tmp_path / "datasets.tsv")
    assert len(server.requests) == 1


def test_listing_refuses_non_list_json(tmp_path):
    with FileServer() as server:
        server.add("/api/datasets", b'{"detail": "maintenance"}')
        with pytest.raises(StageError, match="answered a dict, not a list"):
            run_listing(server.url("/api"), tmp_path / "datasets.tsv")


# -- the real API's ways of failing (issue 20, item 4) -----------------------------------
def serve_collections(server, catalog) -> None:
    """The per-collection view of ``catalog``: /collections (previews), /collections/{id}."""
    by_collection: dict[str, list] = {}
    for dataset in catalog:
        by_collection.setdefault(dataset["collection_id"], []).append(dataset)
    previews = [{"collection_id": c, "name": c, "datasets": []} for c in by_collection]
    server.add("/curation/v1/collections", json.dumps(previews).encode())
    for collection_id, datasets in by_collection.items():
        detail = {"collection_id": collection_id, "datasets": datasets}
        server.add(f"/curation/v1/collections/{collection_id}", json.dumps(detail).encode())


def test_504s_and_timeouts_fall_back_to_per_collection_requests(api, tmp_path):
    """/datasets answers 504 every time (CloudFront); /collections stalls past the timeout
    once and one collection answers 504 once: the listing is the same as the whole list's."""
    server, base = api
    expected = run_listing(base, tmp_path / "whole.tsv")
    catalog = [{**d, "collection_id": f"c{i % 2}"} for i, d in enumerate(CATALOG)]
    serve_collections(server, catalog)
    server.requests.clear()
    server.faults.fail_status = 504
    server.faults.fail_paths = {"/curation/v1/datasets": 1000, "/curation/v1/collections/c1": 1}
    server.faults.stall_paths = {"/curation/v1/collections": 1}
    server.faults.stall_seconds = 0.5
    lines = run_listing(base, tmp_path / "datasets.tsv", "--timeout", "0.2")
    assert lines == expected
    paths = [(r.path.rsplit("/", 1)[-1], r.status) for r in server.requests]
    assert paths[:3] == [("datasets", 504)] * 3  # --whole-list-retries 2
    assert paths.count(("c1", 504)) == 1 and paths.count(("c1", 200)) == 1
    assert [name for name, _ in paths].count("collections") == 2  # the first one stalled
    assert paths[4] == ("collections", 200)


def test_requests_are_rate_limited_retries_included(api, tmp_path):
    """--rate 8: the per-collection fallback (1 + 2 collections) and a retried 504 arrive at
    the server at least 1/8 s apart, however fast the server answers."""
    server, base = api
    catalog = [{**d, "collection_id": f"c{i % 2}"} for i, d in enumerate(CATALOG)]
    serve_collections(server, catalog)
    server.requests.clear()
    server.faults.fail_status = 504
    server.faults.fail_paths = {"/curation/v1/datasets": 1000, "/curation/v1/collections/c0": 1}
    argv = ["--source", "cellxgene", "--api", base, "--out", str(tmp_path / "datasets.tsv")]
    listing.run(parse([*argv, "--backoff", "0.001", "--rate", "8"]))
    arrivals = [r.received for r in server.requests]
    assert len(arrivals) == 3 + 1 + 3  # whole list x3, /collections, c0 twice, c1
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # 1/8 s apart, less a margin for the loopback's own jitter between two requests
    assert min(gaps) >= 0.8 / 8, gaps


def test_version_change_unknown_sizes_and_an_s3_redirect(tmp_path):
    """The API lists a dataset with ``filesize: -1`` and ``cell_count: null`` whose asset
    URL answers 302 to a second server (S3); a later listing names a new version: only that
    dataset's row changes, and its download fetches the new version's file."""
    from scprint.data import download

    old = write_h5ad(tmp_path / "old.h5ad", n_cells=30, seed=1).read_bytes()
    new = write_h5ad(tmp_path / "new.h5ad", n_cells=40, seed=2).read_bytes()
    with FileServer() as api_server, FileServer() as s3:
        s3.add("/bucket/v1.h5ad", old)
        s3.add("/bucket/v2.h5ad", new)

        def publish(version: str) -> None:
            asset = api_server.redirect(
                f"/assets/{version}.h5ad", s3.url(f"/bucket/{version}.h5ad")
            )
            entry = api_dataset("x", [HUMAN], [TENX_V3], None, size=-1)
            entry["assets"][1]["url"] = asset
            entry["dataset_version_id"] = version
            other = api_dataset("y", [HUMAN], [TENX_V3], 100)
            api_server.add("/curation/v1/datasets", json.dumps([entry, other]).encode())

        rows_dir, out = tmp_path / "listing", tmp_path / "raw" / "x.h5ad"
        publish("v1")
        run_listing(api_server.url("/curation/v1"), tmp_path / "1.tsv", "--rows-dir", str(rows_dir))
        row = listing.read_listing(rows_dir / "x.tsv")["x"]
        assert (row.size_bytes, row.n_cells, row.dataset_version_id) == (None, None, "v1")
        download.download(row, out, backoff=0.001)
        assert out.read_bytes() == old
        assert [r.status for r in api_server.requests_for("/assets/v1.h5ad")] == [302]
        assert [r.status for r in s3.requests_for("/bucket/v1.h5ad")] == [200]

        mtimes = {p.name: p.stat().st_mtime_ns for p in rows_dir.iterdir()}
        publish("v2")
        run_listing(api_server.url("/curation/v1"), tmp_path / "2.tsv", "--rows-dir", str(rows_dir))
        assert (rows_dir / "y.tsv").stat().st_mtime_ns == mtimes["y.tsv"]
        row = listing.read_listing(rows_dir / "x.tsv")["x"]
        assert row.dataset_version_id == "v2"
        out.unlink()  # Snakemake removes a job's old output before rerunning it
        download.download(row, out, backoff=0.001)
        assert out.read_bytes() == new


# -- local folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    write_h5ad(folder / "human_pbmc.h5ad", n_cells=150, organism=HUMAN, assay=TENX_V3)
    write_h5ad(
        folder / "mouse_lung.h5ad",
        n_cells=40,
        organism=MOUSE,
        assay=SMART_SEQ2,
        organism_in_uns=True,
    )
    (folder / "notes.txt").write_text("not a dataset")
    return folder


def test_local_folder_listing(local_folder, tmp_path):
    out = tmp_path / "datasets.tsv"
    listing.run(parse(["--source", "local", "--local-dir", str(local_folder), "--out", str(out)]))
    rows = listing.read_listing(out)
    assert list(rows) == ["human_pbmc", "mouse_lung"]
    human, mouse = rows["human_pbmc"], rows["mouse_lung"]
    path = local_folder / "human_pbmc.h5ad"
    assert human.organism == (HUMAN,) and human.assay == (TENX_V3,) and human.n_cells == 150
    assert human.url == path.resolve().as_uri()
    assert human.size_bytes == path.stat().st_size
    assert human.md5 == hashlib.md5(path.read_bytes()).hexdigest()
    assert human.title == "test dataset human_pbmc"
    assert mouse.organism == (MOUSE,) and mouse.n_cells == 40  # organism read from uns

    out2 = tmp_path / "mouse.tsv"
    argv = ["--source", "local", "--local-dir", str(local_folder), "--out", str(out2)]
    listing.run(parse([*argv, "--organism", MOUSE, "--min-cells", "10"]))
    assert list(listing.read_listing(out2)) == ["mouse_lung"]


def test_local_folder_errors(tmp_path):
    out = tmp_path / "datasets.tsv"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StageError, match=r"no \*\.h5ad files"):
        listing.run(parse(["--source", "local", "--local-dir", str(empty), "--out", str(out)]))
    with pytest.raises(StageError, match="needs --local-dir"):
        listing.run(parse(["--source", "local", "--out", str(out)]))
    (empty / "broken.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(StageError, match=r"broken\.h5ad is not a readable h5ad file"):
        listing.run(parse(["--source", "local", "--local-dir", str(empty), "--out", str(out)]))
    assert not out.exists()


def test_cli_list_datasets(api, local_folder, tmp_path):
    """Through the `scprint` dispatcher: exit codes and a one-line error, no traceback."""
    _, base = api
    proc = run_cli(
        [
            "list-datasets",
            "--source",
            "cellxgene",
            "--api",
            base,
            "--out",
            "results/datasets.tsv",
            "--organism",
            HUMAN,
            "--assay",
            TENX_V3,
            "--min-cells",
            "1000",
        ],
        cwd=tmp_path,
    )
    assert ids_of((tmp_path / "results/datasets.tsv").read_text().splitlines()) == [
        "a-both",
        "d-human-10x",
    ]
    proc = run_cli(
        ["list-datasets", "--source", "local", "--local-dir", str(tmp_path), "--out", "x.tsv"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "scprint list-datasets: error: no *.h5ad files" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_row_files_change_only_with_their_row(tmp_path):
    rows = [
        listing.DatasetRow(f"d{i}", "t", ("NCBITaxon:9606",), ("EFO:0009922",), 300, f"u{i}", 9)
        for i in range(3)
    ]
    assert listing.write_rows(rows[:2], tmp_path) == ["d0", "d1"]
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    changed = [rows[0], rows[1].__class__(**{**rows[1].__dict__, "url": "new"}), rows[2]]
    assert listing.write_rows(changed, tmp_path) == ["d1", "d2"]
    assert (tmp_path / "d0.tsv").stat().st_mtime_ns == before["d0.tsv"]
    assert listing.read_listing(tmp_path / "d1.tsv")["d1"].url == "new"
    # a new CELLxGENE version of d0 (same url shape, same size): its row alone is rewritten
    newer = dataclasses.replace(rows[0], dataset_version_id="v2")
    assert listing.write_rows([newer, changed[1], rows[2]], tmp_path) == ["d0"]
