"""The datasets of one CELLxGENE census release, as listing rows (``--source census``).

A census release is frozen: the same ``census_version`` names the same dataset versions
and the same H5AD copies on any date, which is what makes a corpus reproducible (the
Curation API lists whatever is published today). Everything is read through
``cellxgene_census`` / ``tiledbsoma``:

- ``census_info/datasets``: dataset id, title, ``dataset_version_id`` (releases before
  that column existed get ``census-<version>``: the release's own copy is one fixed file),
  ``dataset_total_cell_count`` and ``dataset_h5ad_path``;
- ``census_data/<organism>/obs``: per dataset its organism, assays and primary cells
  (``is_primary_data``), read as three columns in batches, never the matrix;
- the release directory (``get_census_version_description``): where the release keeps its
  H5AD copies (``h5ads``, an S3 folder read over HTTPS), unless ``h5ads_base`` is given.

``uri`` opens a SOMA store directly (a mirror, a local copy, the tests' store); otherwise
``open_soma(census_version=...)`` goes to the network. The census publishes no file size
or checksum, so downloads are verified by HDF5 integrity.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

from scprint.data.listing_rows import DatasetRow
from scprint.io import StageError

log = logging.getLogger(__name__)

# scdataloader's corpus builder names this release (`scdataloader/__main__.py`'s example:
# --name="cellxgene-census" --version="2023-12-15"); scPRINT's corpus was built from it.
DEFAULT_CENSUS_VERSION = "2023-12-15"
OBS_COLUMNS = ["dataset_id", "assay_ontology_term_id", "is_primary_data"]


def organism_ids() -> dict[str, str]:
    """Census experiment name ('homo_sapiens') -> NCBITaxon id."""
    from scprint.data.organisms import ORGANISMS

    return {o.scientific_name.lower().replace(" ", "_"): i for i, o in ORGANISMS.items()}


def open_census(census_version: str, uri: str | None = None):
    import cellxgene_census

    try:
        if uri is not None:
            return cellxgene_census.open_soma(uri=uri)
        return cellxgene_census.open_soma(census_version=census_version)
    except Exception as err:  # tiledbsoma and the release directory raise many kinds
        where = uri or f"census release {census_version}"
        raise StageError(
            f"cannot open {where} ({type(err).__name__}: {err}): check datasets.census_version "
            "(a release date such as 2023-12-15; `cellxgene_census.get_census_version_directory()` "
            "lists them) or datasets.census_uri, and that this node has internet access"
        ) from err


def h5ads_location(census_version: str) -> str:
    """The release's H5AD folder as an HTTPS URL (the release directory gives s3://)."""
    import cellxgene_census

    try:
        locator = cellxgene_census.get_census_version_description(census_version)["h5ads"]
    except (KeyError, ValueError) as err:
        raise StageError(
            f"census release {census_version} is unknown or lists no H5AD copies ({err}): check "
            "datasets.census_version"
        ) from err
    return https_of(locator["uri"], locator.get("s3_region"))


def https_of(uri: str, region: str | None) -> str:
    """``s3://bucket/key`` of a public bucket as the HTTPS URL our downloader can resume."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return uri
    host = (
        f"{parsed.netloc}.s3.{region}.amazonaws.com"
        if region
        else f"{parsed.netloc}.s3.amazonaws.com"
    )
    return f"https://{host}{parsed.path}"


def _datasets_table(census):
    table = census["census_info"]["datasets"].read().concat().to_pandas()
    missing = {"dataset_id", "dataset_title", "dataset_h5ad_path"} - set(table.columns)
    if missing:
        raise StageError(
            f"the census' census_info/datasets table has no {sorted(missing)}: this is not a "
            "CELLxGENE census release (check datasets.census_uri)"
        )
    return table


def _obs_summary(census) -> dict[str, dict]:
    """dataset_id -> {organism, assays, primary}: one pass over three obs columns."""
    names = organism_ids()
    summary: dict[str, dict] = {}
    for name, experiment in census["census_data"].items():
        organism = names.get(name)
        if organism is None:
            log.warning(
                "census organism %s is not one scprint knows; its datasets are skipped", name
            )
            continue
        for batch in experiment.obs.read(column_names=OBS_COLUMNS):
            frame = batch.to_pandas()
            frame["is_primary_data"] = frame["is_primary_data"].astype(bool)
            grouped = frame.groupby(["dataset_id", "assay_ontology_term_id"], observed=True)
            counts = grouped["is_primary_data"].sum()
            for (dataset_id, assay), primary in counts.items():
                entry = summary.setdefault(
                    str(dataset_id), {"organism": set(), "assays": set(), "primary": 0}
                )
                entry["organism"].add(organism)
                entry["assays"].add(str(assay))
                entry["primary"] += int(primary)
    return summary


def rows_from_census(
    census_version: str, uri: str | None = None, h5ads_base: str | None = None
) -> list[DatasetRow]:
    """One row per dataset of the release that has cells in a known organism."""
    with open_census(census_version, uri) as census:
        table = _datasets_table(census)
        summary = _obs_summary(census)
    base = (h5ads_base or h5ads_location(census_version)).rstrip("/") + "/"
    has_version = "dataset_version_id" in table.columns
    rows = []
    for record in table.to_dict("records"):
        dataset_id = str(record["dataset_id"])
        cells = summary.get(dataset_id)
        if cells is None:
            log.warning("census dataset %s has no cells in a known organism; skipped", dataset_id)
            continue
        total = record.get("dataset_total_cell_count")
        rows.append(
            DatasetRow(
                dataset_id=dataset_id,
                title=str(record["dataset_title"]),
                organism=tuple(sorted(cells["organism"])),
                assay=tuple(sorted(cells["assays"])),
                n_cells=int(total) if total is not None else None,
                url=base + str(record["dataset_h5ad_path"]).lstrip("/"),
                size_bytes=None,  # the census publishes none: HDF5 integrity checks the file
                dataset_version_id=(
                    str(record["dataset_version_id"]) if has_version else f"census-{census_version}"
                ),
                n_primary_cells=cells["primary"],
            )
        )
    log.info("census %s: %d datasets", uri or census_version, len(rows))
    return rows
