"""`scprint list-datasets`: which datasets the pipeline downloads, as one TSV.

Sources:
- ``cellxgene``: CELLxGENE Discover's public Curation API, ``GET {api}/datasets`` (no key
  needed), or, when that keeps failing (CloudFront 504s on its one large answer),
  ``/collections`` and then each collection's datasets (`fetch_curation_api`). Each dataset gives its id and version id, title, organism and assay terms,
  cell counts (all and primary) and an H5AD asset (url, filesize). The API publishes no
  checksum, so ``md5`` stays empty and the download verifies the size when it is known
  (``filesize: -1``, its failed size lookup, is unknown) and the HDF5 structure always.
- ``census``: the datasets of one frozen CELLxGENE census release, through
  ``cellxgene_census`` (scprint/data/census.py): reproducible on any date.
- ``local``: every ``*.h5ad`` in a folder (not recursive). The dataset id is the file stem;
  organism, assay and cell count are read from the file's obs (organism falls back to
  ``uns['organism_ontology_term_id']``, where CELLxGENE schema 5+ keeps it); the url is
  ``file://`` + the absolute path; the md5 is computed; primary cells are counted from
  ``obs['is_primary_data']`` when the column is there.

Filters, applied in this order: include (keep only these ids; an id missing from the
source is an error, it is usually a typo), exclude, organism (any of the dataset's
organisms matches), assay (any match), min cells (a dataset with an unknown count is
dropped). Then rows are sorted by dataset id and ``--limit`` keeps the first N. Ids that
are not safe file names are refused after filtering, so ``--exclude`` is the way around
one. The same input always gives a byte-identical TSV.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import time
from pathlib import Path

from scprint.data.listing_rows import COLUMNS, DatasetRow
from scprint.io import StageError, check_dataset_id, write_text

log = logging.getLogger(__name__)

DEFAULT_API = "https://api.cellxgene.cziscience.com/curation/v1"


def known_count(value) -> int | None:
    """A size or cell count from a remote listing, or None when unknown.

    The Curation API answers ``filesize: -1`` when its S3 size lookup failed, and ``null``
    counts are allowed by its spec; anything not a positive integer (0 for a size, negative,
    null, a string) is unknown rather than a number to check a download against."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 and number == value else None


def known_size(value) -> int | None:
    """A file size: like `known_count`, and 0 bytes is unknown too (no h5ad is empty)."""
    number = known_count(value)
    return number if number else None


# -- reading and writing the TSV --------------------------------------------------------
def format_listing(rows: list[DatasetRow]) -> str:
    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join(row.to_fields()) for row in sorted(rows, key=lambda r: r.dataset_id)]
    return "\n".join(lines) + "\n"


def read_listing(path: str | Path) -> dict[str, DatasetRow]:
    """datasets.tsv as {dataset_id: row}; a missing file or wrong header is a StageError."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"listing {path} does not exist: run `scprint list-datasets` first")
    lines = path.read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != COLUMNS:
        raise StageError(
            f"listing {path} does not start with the header {' '.join(COLUMNS)}: "
            "it was not written by `scprint list-datasets`; rerun that stage"
        )
    rows = {}
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(COLUMNS):
            raise StageError(
                f"listing {path} line {number} has {len(values)} columns, expected "
                f"{len(COLUMNS)}: rerun `scprint list-datasets`"
            )
        row = DatasetRow.from_fields(dict(zip(COLUMNS, values, strict=True)))
        rows[row.dataset_id] = row
    return rows


# -- sources ----------------------------------------------------------------------------
def _term_ids(terms) -> tuple[str, ...]:
    """Sorted unique ontology ids from the API's [{label, ontology_term_id}, ...]."""
    return tuple(sorted({t["ontology_term_id"] for t in terms or [] if t.get("ontology_term_id")}))


def rows_from_curation_api(datasets: list[dict]) -> list[DatasetRow]:
    """Turn the Curation API's dataset list into rows; datasets without an H5AD are skipped."""
    rows = []
    for dataset in datasets:
        dataset_id = str(dataset.get("dataset_id") or "")
        h5ad = [a for a in dataset.get("assets") or [] if a.get("filetype") == "H5AD"]
        url = (h5ad[0].get("url") or h5ad[0].get("presigned_url")) if h5ad else None
        if not url:
            log.warning("dataset %s has no H5AD asset; skipped", dataset_id)
            continue
        rows.append(
            DatasetRow(
                dataset_id=dataset_id,
                title=dataset.get("title") or "",
                organism=_term_ids(dataset.get("organism")),
                assay=_term_ids(dataset.get("assay")),
                n_cells=known_count(dataset.get("cell_count")),
                url=url,
                size_bytes=known_size(h5ad[0].get("filesize")),
                dataset_version_id=str(dataset.get("dataset_version_id") or ""),
                n_primary_cells=known_count(dataset.get("primary_cell_count")),
            )
        )
    return rows


class CurationClient:
    """GETs of JSON from the Curation API: retried (backoff with jitter on 5xx, timeouts and
    dropped connections; 4xx at once) and rate-limited to ``rate`` requests a second, so
    that hundreds of per-collection requests stay polite."""

    def __init__(self, api: str, retries: int, timeout: float, backoff: float, rate: float):
        from scprint.data.http import http_session

        self.api, self.retries, self.timeout, self.backoff = (
            api.rstrip("/"),
            retries,
            timeout,
            backoff,
        )
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.session = http_session()
        self._last = float("-inf")

    def get(self, path: str, expect: type, retries: int | None = None):
        """The JSON answer of ``GET {api}{path}``, which must be an ``expect`` (list or dict)."""
        from scprint.data.http import with_retries

        url = self.api + path

        def attempt():
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            response = self.session.get(url, timeout=self.timeout)
            response.raise_for_status()
            return response

        response = with_retries(
            attempt,
            what=f"listing {url}",
            retries=self.retries if retries is None else retries,
            backoff=self.backoff,
            refused_fix="check --api (the Curation API base, ending in /curation/v1)",
        )
        try:
            answer = response.json()
        except ValueError as err:
            raise StageError(f"{url} did not answer JSON ({err}): check --api") from err
        if not isinstance(answer, expect):
            raise StageError(
                f"{url} answered a {type(answer).__name__}, not a {expect.__name__}: check --api"
            )
        return answer


def fetch_curation_api(
    api: str,
    retries: int,
    timeout: float,
    backoff: float,
    rate: float = 4.0,
    whole_list_retries: int = 2,
) -> list[dict]:
    """Every public dataset: ``GET {api}/datasets``, else one request per collection.

    ``/datasets`` is one large answer that CloudFront often cuts with a 504; after
    ``whole_list_retries`` retries the listing asks ``/collections`` and then each
    ``/collections/{id}`` (which carries its datasets' full metadata), each of those
    retried ``retries`` times. Both ways give the same dataset entries."""
    from scprint.data.http import RetriesExhausted

    client = CurationClient(api, retries, timeout, backoff, rate)
    try:
        datasets = client.get("/datasets", list, retries=min(whole_list_retries, retries))
        log.info("%s/datasets: %d datasets", client.api, len(datasets))
        return datasets
    except RetriesExhausted as err:
        log.warning("%s; asking collection by collection instead", err)
    collections = client.get("/collections", list)
    datasets = []
    for number, collection in enumerate(collections, start=1):
        collection_id = str(collection.get("collection_id") or "")
        if not collection_id:
            raise StageError(f"{client.api}/collections lists a collection without collection_id")
        detail = client.get(f"/collections/{collection_id}", dict)
        for dataset in detail.get("datasets") or []:
            datasets.append({"collection_id": collection_id, **dataset})
        if number % 100 == 0:
            log.info("%d of %d collections listed", number, len(collections))
    log.info("%s: %d datasets in %d collections", client.api, len(datasets), len(collections))
    return datasets


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _obs_terms(obs, uns, column: str) -> tuple[str, ...]:
    """Unique values of an obs column (categorical or plain), else of uns[column]."""
    import numpy as np
    import pandas as pd
    from anndata.io import read_elem

    if column in obs:
        values = read_elem(obs[column])
        if isinstance(values, pd.Categorical):  # only the terms some cell actually has
            terms = values.remove_unused_categories().categories
        else:
            terms = pd.unique(np.asarray(values))
        return tuple(sorted({str(t) for t in terms}))
    if uns is not None and column in uns:
        value = read_elem(uns[column])
        return (str(value),) if isinstance(value, str) else tuple(sorted(map(str, value)))
    return ()


def describe_h5ad(path: Path) -> DatasetRow:
    """A row for a local h5ad, reading only obs columns (not X): cheap for big files."""
    import h5py
    import numpy as np
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            n_cells = obs[obs.attrs["_index"]].shape[0]
            uns = f.get("uns")
            organism = _obs_terms(obs, uns, "organism_ontology_term_id")
            assay = _obs_terms(obs, uns, "assay_ontology_term_id")
            title = read_elem(uns["title"]) if uns is not None and "title" in uns else ""
            primary = (
                int(np.count_nonzero(read_elem(obs["is_primary_data"])))
                if "is_primary_data" in obs
                else None
            )
    except (OSError, KeyError) as err:
        raise StageError(
            f"{path} is not a readable h5ad file ({err}): remove it from the folder or "
            "replace it with a complete copy"
        ) from err
    return DatasetRow(
        dataset_id=path.stem,
        title=str(title),
        organism=organism,
        assay=assay,
        n_cells=int(n_cells),
        n_primary_cells=primary,
        url=path.resolve().as_uri(),
        size_bytes=path.stat().st_size,
        md5=file_md5(path),
    )


def rows_from_folder(folder: Path) -> list[DatasetRow]:
    if not folder.is_dir():
        raise StageError(f"local dataset folder {folder} does not exist: check --local-dir")
    paths = sorted(folder.glob("*.h5ad"))
    if not paths:
        raise StageError(f"no *.h5ad files in {folder}: check --local-dir")
    return [describe_h5ad(path) for path in paths]


# -- filtering --------------------------------------------------------------------------
def select(
    rows: list[DatasetRow],
    organisms=(),
    assays=(),
    min_cells: int = 0,
    include=(),
    exclude=(),
    limit: int | None = None,
) -> list[DatasetRow]:
    """Apply the filters (see the module docstring), sort by id, keep the first ``limit``."""
    ids = [row.dataset_id for row in rows]
    duplicated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if duplicated:
        raise StageError(f"the source lists these dataset ids more than once: {duplicated}")
    if include:
        missing = sorted(set(include) - set(ids))
        if missing:
            raise StageError(
                f"--include names datasets the source does not have: {missing}; check the ids"
            )
        rows = [r for r in rows if r.dataset_id in set(include)]
    rows = [r for r in rows if r.dataset_id not in set(exclude)]
    if organisms:
        rows = [r for r in rows if set(r.organism) & set(organisms)]
    if assays:
        rows = [r for r in rows if set(r.assay) & set(assays)]
    if min_cells:
        rows = [r for r in rows if r.n_cells is not None and r.n_cells >= min_cells]
    rows = sorted(rows, key=lambda r: r.dataset_id)
    if limit is not None:
        rows = rows[:limit]
    unsafe = []
    for row in rows:
        for name in filter(None, (row.dataset_id, row.dataset_version_id)):
            try:
                check_dataset_id(name)  # the version names the download's .part file
            except StageError:
                unsafe.append(name)
    if unsafe:
        raise StageError(
            f"dataset (or version) ids {unsafe} are not safe file names (only letters, digits, '.', '_' "
            "and '-'; no '/' or '..'): they could write outside the data folder. Drop them "
            "with --exclude, or rename the files for a local source"
        )
    return rows


# -- the stage --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("cellxgene", "census", "local"), required=True)
    parser.add_argument("--out", required=True, type=Path, help="the TSV to write")
    parser.add_argument(
        "--rows-dir",
        type=Path,
        help="also write one <dataset>.tsv per row here, rewritten only when its row changed",
    )
    parser.add_argument("--api", default=DEFAULT_API, help="Curation API base URL")
    parser.add_argument("--local-dir", type=Path, help="folder of .h5ad files (source local)")
    parser.add_argument(
        "--census-version",
        default=None,
        help="census release (source census; default: 2023-12-15, scPRINT's corpus)",
    )
    parser.add_argument(
        "--census-uri", help="open this SOMA store instead of the release on the network"
    )
    parser.add_argument(
        "--census-h5ads",
        help="base URL of the release's H5AD copies (default: the release directory's)",
    )
    many = dict(nargs="*", action="extend", default=[])
    parser.add_argument("--organism", **many, help="NCBITaxon ids to keep (any match)")
    parser.add_argument("--assay", **many, help="EFO ids to keep (any match)")
    parser.add_argument("--min-cells", type=int, default=0)
    parser.add_argument("--include", **many, help="keep only these dataset ids")
    parser.add_argument("--exclude", **many, help="drop these dataset ids")
    parser.add_argument("--limit", type=int, help="keep the first N datasets by id")
    parser.add_argument("--retries", type=int, default=5, help="retries of each API request")
    parser.add_argument(
        "--whole-list-retries",
        type=int,
        default=2,
        help="retries of GET /datasets before asking collection by collection",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds per API request")
    parser.add_argument(
        "--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)"
    )
    parser.add_argument(
        "--rate", type=float, default=4.0, help="at most this many API requests a second"
    )


def run(args: argparse.Namespace) -> list[DatasetRow]:
    if args.limit is not None and args.limit < 0:
        raise StageError(f"--limit must be >= 0, got {args.limit}")
    if args.source == "cellxgene":
        rows = rows_from_curation_api(
            fetch_curation_api(
                args.api,
                args.retries,
                args.timeout,
                args.backoff,
                rate=args.rate,
                whole_list_retries=args.whole_list_retries,
            )
        )
    elif args.source == "census":
        from scprint.data.census import DEFAULT_CENSUS_VERSION, rows_from_census

        rows = rows_from_census(
            args.census_version or DEFAULT_CENSUS_VERSION, args.census_uri, args.census_h5ads
        )
    else:
        if args.local_dir is None:
            raise StageError("--source local needs --local-dir (a folder of .h5ad files)")
        rows = rows_from_folder(args.local_dir)
    rows = select(
        rows,
        organisms=args.organism,
        assays=args.assay,
        min_cells=args.min_cells,
        include=args.include,
        exclude=args.exclude,
        limit=args.limit,
    )
    if not rows:
        log.warning("no dataset passed the filters; %s lists none", args.out)
    write_text(args.out, format_listing(rows))
    log.info("wrote %s: %d datasets", args.out, len(rows))
    if args.rows_dir is not None:
        changed = write_rows(rows, args.rows_dir)
        log.info("%s: %d of %d rows new or changed", args.rows_dir, len(changed), len(rows))
    return rows


def write_rows(rows: list[DatasetRow], folder: Path) -> list[str]:
    """One small listing per dataset, rewritten only when its content differs.

    The workflow's per-dataset jobs take these as input instead of the whole listing, so
    growing the listing (a higher limit, another include) leaves the files, their mtimes
    and so the jobs of datasets already listed untouched; a row whose version, url or size
    changed is rewritten and only that dataset is redone. Returns the ids rewritten."""
    changed = []
    for row in rows:
        path = folder / f"{check_dataset_id(row.dataset_id)}.tsv"
        text = format_listing([row])
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
            changed.append(row.dataset_id)
    return changed
