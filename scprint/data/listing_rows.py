"""One row of a dataset listing (results/datasets.tsv and results/listing/<id>.tsv): its
columns and how a row becomes TSV fields and back. Apart from scprint.data.listing so
that every source of rows (the Curation API, a census release, a local folder) can build
rows without importing the listing stage."""

from __future__ import annotations

import dataclasses
import re

COLUMNS = (
    "dataset_id",
    "dataset_version_id",
    "title",
    "organism",
    "assay",
    "n_cells",
    "n_primary_cells",
    "url",
    "size_bytes",
    "md5",
)
MULTI_SEP = ";"  # joins several organism / assay ids in one cell


@dataclasses.dataclass(frozen=True)
class DatasetRow:
    """One row of datasets.tsv; ``organism``/``assay`` are sorted tuples of ontology ids.

    ``None`` counts and sizes mean unknown (the Curation API sends ``filesize: -1`` when its
    own size lookup failed, and may send ``cell_count: null``). ``dataset_version_id``
    names the exact file: CELLxGENE publishes one H5AD per version, so a new version is a
    changed row and redoes that dataset only; empty for a local folder (``md5`` is set).
    """

    dataset_id: str
    title: str
    organism: tuple[str, ...]
    assay: tuple[str, ...]
    n_cells: int | None
    url: str
    size_bytes: int | None
    md5: str = ""
    dataset_version_id: str = ""
    n_primary_cells: int | None = None

    def to_fields(self) -> list[str]:
        fields = {
            "dataset_id": self.dataset_id,
            "dataset_version_id": self.dataset_version_id,
            "title": _one_line(self.title),
            "organism": MULTI_SEP.join(self.organism),
            "assay": MULTI_SEP.join(self.assay),
            "n_cells": _optional(self.n_cells),
            "n_primary_cells": _optional(self.n_primary_cells),
            "url": self.url,
            "size_bytes": _optional(self.size_bytes),
            "md5": self.md5,
        }
        return [fields[column] for column in COLUMNS]

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> DatasetRow:
        def ids(text: str) -> tuple[str, ...]:
            return tuple(x for x in text.split(MULTI_SEP) if x)

        def integer(text: str) -> int | None:
            return int(text) if text else None

        return cls(
            dataset_id=fields["dataset_id"],
            title=fields["title"],
            organism=ids(fields["organism"]),
            assay=ids(fields["assay"]),
            n_cells=integer(fields["n_cells"]),
            url=fields["url"],
            size_bytes=integer(fields["size_bytes"]),
            md5=fields["md5"],
            dataset_version_id=fields["dataset_version_id"],
            n_primary_cells=integer(fields["n_primary_cells"]),
        )


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _one_line(text: str) -> str:
    """Titles go into a TSV cell: no tabs or newlines."""
    return re.sub(r"\s+", " ", text or "").strip()
