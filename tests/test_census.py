"""`scprint list-datasets --source census` against a small census-shaped SOMA store built
here with tiledbsoma and opened through cellxgene_census.open_soma(uri=...), the same
path as a real release; its H5AD copies come from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import argparse

import pytest
from http_server import FileServer, write_h5ad

from scprint.data import census, download, listing
from scprint.io import StageError

HUMAN, MOUSE = "NCBITaxon:9606", "NCBITaxon:10090"
TENX_V3, SMART_SEQ2 = "EFO:0009922", "EFO:0008931"
# (dataset, organism experiment, assay, is_primary_data) per cell
CELLS = [
    ("a", "homo_sapiens", TENX_V3, True),
    ("a", "homo_sapiens", TENX_V3, False),
    ("a", "homo_sapiens", TENX_V3, True),
    ("b", "homo_sapiens", TENX_V3, True),
    ("b", "homo_sapiens", SMART_SEQ2, True),
    ("c", "mus_musculus", SMART_SEQ2, False),
]
# census_info/datasets: "d" is listed but has no cells in the release (skipped)
DATASETS = {"a": 3, "b": 2, "c": 1, "d": 7}


def write_experiment(uri: str, name: str) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import tiledbsoma.io

    cells = [c for c in CELLS if c[1] == name]
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical([c[0] for c in cells]),
            "assay_ontology_term_id": pd.Categorical([c[2] for c in cells]),
            "is_primary_data": [c[3] for c in cells],
        },
        index=[f"{name}{i}" for i in range(len(cells))],
    )
    adata = ad.AnnData(X=np.zeros((len(cells), 1), np.float32), obs=obs)
    adata.var_names = ["ENSG00000000003"]
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")


def write_store(uri: str, experiments: dict[str, str], with_versions: bool) -> str:
    """A census-shaped SOMA collection: census_info/datasets + census_data/<organism>."""
    import pyarrow as pa
    import tiledbsoma as soma

    ids = sorted(DATASETS)
    columns = {
        "soma_joinid": pa.array(range(len(ids)), pa.int64()),
        "dataset_id": pa.array(ids, pa.large_string()),
        "dataset_title": pa.array([f"Dataset {i}" for i in ids], pa.large_string()),
        "dataset_h5ad_path": pa.array([f"{i}.h5ad" for i in ids], pa.large_string()),
        "dataset_total_cell_count": pa.array([DATASETS[i] for i in ids], pa.int64()),
    }
    if with_versions:
        columns["dataset_version_id"] = pa.array([f"{i}-v1" for i in ids], pa.large_string())
    table = pa.table(columns)
    with soma.Collection.create(uri) as root:
        info = root.add_new_collection("census_info")
        schema = pa.schema([f for f in table.schema if f.name != "soma_joinid"])
        with info.add_new_dataframe("datasets", schema=schema, domain=[(0, len(ids) - 1)]) as df:
            df.write(table)
        data = root.add_new_collection("census_data")
        for name, experiment_uri in experiments.items():
            with soma.Experiment.open(experiment_uri) as experiment:
                data.set(name, experiment)
    return uri


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two releases sharing their experiments: one with dataset_version_id, one older."""
    folder = tmp_path_factory.mktemp("census")
    experiments = {}
    for name in ("homo_sapiens", "mus_musculus"):
        experiments[name] = str(folder / name)
        write_experiment(experiments[name], name)
    return {
        "new": write_store(str(folder / "release"), experiments, with_versions=True),
        "old": write_store(str(folder / "old_release"), experiments, with_versions=False),
    }


def parse(argv):
    parser = argparse.ArgumentParser()
    listing.add_arguments(parser)
    return parser.parse_args(argv)


def test_census_rows_carry_versions_counts_and_locations(stores):
    rows = {
        r.dataset_id: r
        for r in census.rows_from_census("2023-12-15", stores["new"], "http://h/h5ads")
    }
    assert sorted(rows) == ["a", "b", "c"]  # "d" has no cells in the release
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a.n_cells, a.n_primary_cells, a.dataset_version_id) == (3, 2, "a-v1")
    assert (a.organism, a.assay, a.title) == ((HUMAN,), (TENX_V3,), "Dataset a")
    assert a.url == "http://h/h5ads/a.h5ad" and a.size_bytes is None and a.md5 == ""
    assert b.assay == (SMART_SEQ2, TENX_V3) and b.n_primary_cells == 2
    assert (c.organism, c.n_primary_cells) == ((MOUSE,), 0)


def test_release_without_version_column_names_the_release(stores):
    rows = census.rows_from_census("2023-07-25", stores["old"], "http://h/h5ads/")
    assert {r.dataset_version_id for r in rows} == {"census-2023-07-25"}


def test_list_and_download_a_release(stores, tmp_path):
    """The stage end to end: filters apply, and a row's H5AD copy downloads and verifies."""
    body = write_h5ad(tmp_path / "a.h5ad", n_cells=30).read_bytes()
    with FileServer() as server:
        server.add("/release/h5ads/a.h5ad", body)
        out = tmp_path / "datasets.tsv"
        argv = ["--source", "census", "--census-uri", stores["new"], "--out", str(out)]
        argv += ["--census-h5ads", server.url("/release/h5ads"), "--organism", HUMAN]
        listing.run(parse(argv))
        rows = listing.read_listing(out)
        assert list(rows) == ["a", "b"]
        raw = tmp_path / "raw" / "a.h5ad"
        download.download(rows["a"], raw, backoff=0.001)
        assert raw.read_bytes() == body
        assert not list(raw.parent.glob("*.part*"))


def test_unopenable_store_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"cannot open .*check datasets.census_version"):
        census.rows_from_census("2023-12-15", str(tmp_path / "missing"), "http://h/")


def test_s3_locations_become_https():
    assert (
        census.https_of("s3://bucket/cell-census/2023-12-15/h5ads/", "us-west-2")
        == "https://bucket.s3.us-west-2.amazonaws.com/cell-census/2023-12-15/h5ads/"
    )
    assert census.https_of("http://127.0.0.1:9/h5ads/", None) == "http://127.0.0.1:9/h5ads/"
