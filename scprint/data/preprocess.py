"""`scprint preprocess`: scdataloader's Preprocessor on one dataset, with checks first.

The Preprocessor fails late and cryptically on the inputs users actually have (scPRINT #35,
#33; scDataLoader #6): normalized counts, gene symbols, missing obs columns, terms the
registries do not know. So every problem we can see is looked for before it runs, all of
them reported at once in one error that names the dataset, each problem and its fix.

By default the dataset is then processed a chunk of cells at a time in bounded memory
(``preprocess_chunked``, scprint/data/chunked.py), with the Preprocessor's result;
``--whole-file`` (and ``--do-postp``, a PCA of the whole matrix) run the Preprocessor
itself on the whole file (``preprocess``). Checks that need every cell (the cell filter's
drop amount) run during the pass; a refusal then removes the partial output.

Counts: raw integer counts are taken from ``raw.X`` when present (CELLxGENE keeps them
there whenever ``X`` is normalized), else ``X``, else ``layers["counts"]``; the chosen
matrix becomes ``X`` before the Preprocessor runs. A dataset with no raw counts anywhere
is refused.

CELLxGENE conventions that scdataloader spells differently are relabelled first, and the
report says how many cells each touched: self-reported ethnicity "na" (non-human) becomes
"unknown" and comma-joined ethnicities (multi-ethnic donors) "multiethnic"; a CL term in
``tissue_ontology_term_id`` (cell cultures) becomes "unknown", as scdataloader does.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scprint.data.checks import (
    check_h5ad_file,
    duplicated_genes_problem,
    unreadable_h5ad,
    value_problem,
)
from scprint.data.checks import examples as _examples
from scprint.data.chunked import CHUNK_CELLS
from scprint.io import StageError, atomic_path, check_dataset_id, write_json
from scprint.progress import progress

log = logging.getLogger(__name__)

REQUIRED_OBS = (
    "organism_ontology_term_id",
    "cell_type_ontology_term_id",
    "tissue_ontology_term_id",
    "disease_ontology_term_id",
    "development_stage_ontology_term_id",
    "self_reported_ethnicity_ontology_term_id",
    "assay_ontology_term_id",
    "sex_ontology_term_id",
)
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}$")
VERSIONED_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}\.\d+$")
ROWS_CHECKED = 50_000  # rows inspected for integer counts, as scdataloader does
CELL_ID = "scprint_cell_id"


@dataclass
class Params:
    """The Preprocessor's parameters we expose (config: preprocess.*)."""

    min_valid_genes_id: int = 10_000
    min_nnz_genes: int = 200
    min_dataset_size: int = 100
    maxdropamount: int = 50
    is_symbol: bool = False
    skip_validate: bool = False
    # scdataloader's post-processing: a log-normalised copy of X in layers["norm"] and a PCA
    # of it in obsm["X_pca"]. Training reads X only; it doubles the file and is most of the
    # Preprocessor's time (bench/preprocess.py), so it is off unless asked for.
    do_postp: bool = False


def read_dataset(dataset: str, path: Path):
    import anndata

    check_h5ad_file(dataset, path)
    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ValueError...
        raise unreadable_h5ad(dataset, path, err) from err


def describe_values(matrix) -> str | None:
    """None when the first rows hold non-negative integers; else what they hold instead."""
    import numpy as np
    import scipy.sparse as sp

    rows = matrix[:ROWS_CHECKED]
    return value_problem(rows.data if sp.issparse(rows) else np.asarray(rows).ravel())


def counts_places(adata) -> list[tuple[str, object, object]]:
    """Where raw counts may be in an in-memory AnnData, in the order looked at."""
    places = [("raw.X", adata.raw.X, adata.raw.var)] if adata.raw is not None else []
    places.append(("X", adata.X, adata.var))
    if "counts" in adata.layers:
        places.append(("layers['counts']", adata.layers["counts"], adata.var))
    return places


def choose_counts(places) -> tuple[str | None, object, object, list[str]]:
    """Find the raw counts among (label, matrix, var) places: (where, matrix, var, why-not
    per place looked at). Matrices may be backed: only their first rows are read."""
    looked = []
    for where, matrix, var in places:
        problem = describe_values(matrix)
        if problem is None:
            return where, matrix, var, looked
        looked.append(f"{where} has {problem}")
    return None, None, None, looked


def harmonise_obs(obs, uns) -> dict[str, int]:
    """Relabel CELLxGENE conventions to scdataloader's (see module doc); returns counts."""
    relabelled = {}
    column = "organism_ontology_term_id"  # CELLxGENE schema 5+ keeps it in uns
    if column not in obs and isinstance(uns.get(column), str):
        obs[column] = uns[column]
        relabelled[f"{column}: taken from uns"] = len(obs)
    column = "self_reported_ethnicity_ontology_term_id"
    if column in obs:
        values = obs[column].astype("string")  # keeps missing values missing
        na = (values == "na").fillna(False)
        multi = values.str.contains(",", regex=False).fillna(False)
        obs[column] = values.mask(na, "unknown").mask(multi, "multiethnic").astype(object)
        relabelled.update({f"{column}: na -> unknown": int(na.sum())})
        relabelled.update({f"{column}: comma-joined -> multiethnic": int(multi.sum())})
    column = "tissue_ontology_term_id"
    if column in obs:
        values = obs[column].astype("string")
        suffix = r" \((?:cell culture|organoid)\)$"
        suffixed = values.str.contains(suffix, regex=True).fillna(False)
        values = values.str.replace(suffix, "", regex=True)
        cell_culture = values.str.startswith("CL:").fillna(False)
        obs[column] = values.mask(cell_culture, "unknown").astype(object)
        relabelled.update(
            {f"{column}: '(cell culture)'/'(organoid)' suffix removed": int(suffixed.sum())}
        )
        relabelled.update({f"{column}: CL term (cell culture) -> unknown": int(cell_culture.sum())})
    return {k: v for k, v in relabelled.items() if v}


def check_structure(obs, var_names, places, params: Params) -> tuple[list[str], dict]:
    """Problems visible without the database, and the chosen counts (when found)."""
    problems = []
    if len(obs) == 0:
        problems.append("it has no cells. Fix: check the file is the dataset you meant")
        return problems, {}
    duplicated = obs.index[obs.index.duplicated()].unique()
    if len(duplicated):
        problems.append(
            f"{len(duplicated)} cell ids occur more than once (e.g. {_examples(duplicated, 3)}). "
            "Fix: make them unique, e.g. adata.obs_names_make_unique(), or undo the merge that "
            "duplicated cells"
        )
    missing = [c for c in REQUIRED_OBS if c not in obs.columns]
    if missing:
        problems.append(
            f"required obs columns are missing: {', '.join(missing)}. Fix: add them with "
            "ontology term ids (CELLxGENE schema), using 'unknown' where a value is not known"
        )
    if len(obs) < params.min_dataset_size:
        problems.append(
            f"it has only {len(obs)} cells, fewer than --min-dataset-size "
            f"{params.min_dataset_size}. Fix: lower --min-dataset-size or leave it out"
        )
    naming = gene_naming_problem([str(v) for v in var_names], params)
    if naming:
        problems.append(naming)
    where, counts, var, looked = choose_counts(places)
    duplicated_genes = duplicated_genes_problem(
        var_names if var is None else var.index,
        "raw.var.index" if where == "raw.X" else "var.index",
    )
    if duplicated_genes:
        problems.append(duplicated_genes)
    if where is None:
        fix = "put them in X, raw.X or layers['counts'] (CELLxGENE files keep them in raw.X)"
        if any("NaN values" in place for place in looked):
            fix = (
                "find where the NaN came from (a merge that left genes unmeasured, a failed "
                "conversion), then write the integer counts with zeros or without those "
                "genes/cells in X"
            )
        problems.append(
            f"no raw counts anywhere: {'; '.join(looked)}. scdataloader normalizes the counts "
            f"itself and needs the raw integer counts. Fix: {fix}"
        )
        return problems, {}
    return problems, {"where": where, "counts": counts, "var": var}


def check_cells_kept(n_obs: int, nnz, params: Params) -> list[str]:
    """The Preprocessor's cell filter and drop-amount check, from expressed genes per cell."""
    import numpy as np

    kept = int((nnz >= params.min_nnz_genes).sum())
    fix = (
        "Fix: lower --min-nnz-genes (targeted panels, shallow sequencing) or "
        "--min-dataset-size, or leave this dataset out"
    )
    if kept == 0:
        return [
            f"zero cells left after filtering: no cell has >= {params.min_nnz_genes} expressed "
            f"genes (median {int(np.median(nnz))}). {fix}"
        ]
    if kept < params.min_dataset_size <= n_obs:
        return [
            f"only {kept} of {n_obs} cells have >= {params.min_nnz_genes} expressed genes, "
            f"fewer than --min-dataset-size {params.min_dataset_size}. {fix}"
        ]
    if n_obs / (kept + 1) > params.maxdropamount:
        return [
            f"filtering would drop {n_obs - kept} of {n_obs} cells (fewer than "
            f"{params.min_nnz_genes} expressed genes), more than --maxdropamount "
            f"{params.maxdropamount} allows. {fix}"
        ]
    return []


def check_against_registries(obs, var_names, params: Params) -> tuple[list[str], dict]:
    """Organism, ontology terms and genes, checked against the laminDB registries."""
    import bionty as bt

    from scprint.data.ontologies import REGISTRY_FOR_COLUMN

    empty = [
        r for r in sorted(set(REGISTRY_FOR_COLUMN.values())) if not getattr(bt, r).objects.exists()
    ]
    if empty:
        return [
            f"the laminDB registries {', '.join(empty)} are empty: the ontologies were not "
            "populated. Fix: run `scprint ontologies` (the workflow's ontologies rule) first"
        ], {}
    problems = []
    organisms = obs["organism_ontology_term_id"].astype(str).unique().tolist()
    if len(organisms) != 1:
        problems.append(
            f"it mixes organisms ({_examples(organisms)}); the Preprocessor handles one per "
            "dataset. Fix: split the dataset by organism_ontology_term_id"
        )
        return problems, {}
    organism = organisms[0]
    for column, registry in REGISTRY_FOR_COLUMN.items():
        values = obs[column]
        if values.isna().any():
            problems.append(
                f"obs column {column} has {int(values.isna().sum())} empty values. Fix: use "
                "'unknown' where a value is not known"
            )
        used = set(values.dropna().astype(str).unique())
        known = set(
            getattr(bt, registry)
            .objects.filter(ontology_id__in=sorted(used))
            .values_list("ontology_id", flat=True)
        )
        unknown = sorted(used - known)
        if unknown:
            cells = int(values.astype(str).isin(unknown).sum())
            problems.append(
                f"obs column {column} has {len(unknown)} terms that the {registry} registry "
                f"does not know ({_examples(unknown)}; {cells} cells). Fix: correct them or "
                "map them to 'unknown'; if they come from a newer ontology release, update "
                "cellxgene-ontology-guide and rerun `scprint ontologies`"
            )
    if organism not in known_organisms():  # reported above; genes cannot be checked
        return problems, {"organism": organism}
    field = "symbol" if params.is_symbol else "ensembl_gene_id"
    registry_genes = set(
        bt.Gene.objects.filter(organism__ontology_id=organism).values_list(field, flat=True)
    )
    if not registry_genes:
        problems.append(
            f"the gene registry has no genes for organism {organism}. Fix: run `scprint "
            f"ontologies --organism {organism}` (config: organisms)"
        )
        return problems, {"organism": organism}
    names = [str(v) for v in var_names]
    valid = len(set(names) & registry_genes)
    if valid < params.min_valid_genes_id and not gene_naming_problem(names, params):
        problems.append(
            f"only {valid} of {len(names)} genes are known {field} values of {organism} "
            f"(--min-valid-genes-id is {params.min_valid_genes_id}). Fix: check "
            "organism_ontology_term_id matches the genes, lower --min-valid-genes-id for "
            "small gene panels, or rerun `scprint ontologies` with this organism"
        )
    return problems, {"organism": organism, "genes_in_registry": valid}


def gene_naming_problem(names: list[str], params: Params) -> str | None:
    """Gene symbols or versioned ids in var.index where Ensembl ids are expected."""
    if params.is_symbol or not names:
        return None
    ensembl = sum(bool(ENSEMBL_ID.match(n)) for n in names)
    versioned = sum(bool(VERSIONED_ENSEMBL_ID.match(n)) for n in names)
    if versioned >= len(names) / 2:
        return (
            f"Ensembl ids carry version suffixes (e.g. {_examples(names, 3)}). Fix: strip "
            "them (ENSG00000141510.17 -> ENSG00000141510)"
        )
    if ensembl < len(names) / 2:
        return (
            f"genes are not named by Ensembl ids (var index e.g. {_examples(names, 4)}: gene "
            "symbols?). Fix: put Ensembl gene ids in var.index (CELLxGENE files have them there, "
            "symbols in var['feature_name']), or pass --is-symbol to map symbols to Ensembl ids "
            "(ambiguous symbols are dropped)"
        )
    return None


def known_organisms() -> set[str]:
    import bionty as bt

    return set(bt.Organism.objects.values_list("ontology_id", flat=True))


def check(dataset: str, input_path: Path, obs, uns, var_names, places, params: Params):
    """Every check that needs no pass over the counts; raises one StageError listing all."""
    from scprint.data.lamin import connect

    relabelled = harmonise_obs(obs, uns)
    problems, counts = check_structure(obs, var_names, places, params)
    registry_info: dict = {}
    if not any(c not in obs.columns for c in REQUIRED_OBS) and len(obs):
        connect()
        more, registry_info = check_against_registries(
            obs, counts["var"].index if counts else var_names, params
        )
        problems += more
    refuse(dataset, input_path, problems)
    return relabelled, counts, registry_info


def primary_cells(dataset: str, input_path: Path, obs, primary_only: bool):
    """Mask of the cells to keep (``obs['is_primary_data']`` true), or None to keep all.

    CELLxGENE holds the same cells in several datasets (re-analyses, atlases) and marks all
    but one copy ``is_primary_data`` False; the census counts unique cells as the primary
    ones. Training on the non-primary copies too would count those cells several times.
    A file without the column (not CELLxGENE) keeps every cell."""

    if not primary_only or "is_primary_data" not in obs.columns:
        return None
    column = obs["is_primary_data"]
    if column.dtype == bool:
        mask = column.to_numpy()
    else:  # a categorical or string column: "True"/"False" (astype(bool) calls both true)
        mask = column.astype(str).str.lower().isin(["true", "1"]).to_numpy()
    if not mask.any():
        refuse(dataset, input_path, [
            f"no primary cells: is_primary_data is False for all {len(mask)} cells, so every "
            "cell is a copy of cells another CELLxGENE dataset holds. Fix: leave it out (it "
            "adds no unique cells), or pass --no-primary-only to keep duplicated cells"
        ])  # fmt: skip
    return mask


def refuse(dataset: str, input_path: Path, problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise StageError(f"dataset {dataset} ({input_path}) cannot be preprocessed:\n{listed}")


def preprocess(
    dataset: str, input_path: Path, params: Params, primary_only: bool = True
) -> tuple[object, dict]:
    """The whole file in memory through scdataloader's Preprocessor (the reference, and the
    only path for do_postp); returns the processed AnnData and the report."""
    import anndata
    import numpy as np

    started = time.perf_counter()
    adata = read_dataset(dataset, input_path)
    n_cells = adata.n_obs
    relabelled, counts, registry_info = check(
        dataset, input_path, adata.obs, adata.uns, adata.var_names, counts_places(adata), params
    )
    primary = primary_cells(dataset, input_path, adata.obs, primary_only)
    matrix, obs = counts["counts"], adata.obs
    if primary is not None:
        matrix, obs = matrix[primary], obs[primary]
    nnz = np.asarray((matrix > 0).sum(axis=1)).ravel()
    refuse(dataset, input_path, check_cells_kept(len(obs), nnz, params))

    # the chosen raw counts become X; raw and layers go, so the Preprocessor sees one matrix
    clean = anndata.AnnData(X=matrix, obs=obs, var=counts["var"], uns=adata.uns)
    del adata
    organism = registry_info["organism"]
    from scdataloader.preprocess import Preprocessor

    preprocessor = Preprocessor(
        **asdict(params), organisms=[organism], use_raw=False, force_preprocess=False
    )
    # The Preprocessor renames cells to random UUIDs; we keep "<dataset>:<cell id>" instead,
    # unique across the collection and the same on every rerun (same bytes, same artifact).
    clean.obs[CELL_ID] = [f"{dataset}:{cell}" for cell in clean.obs_names]
    try:
        processed = preprocessor(clean, dataset_id=dataset)
    except Exception as err:  # the Preprocessor raises bare Exception / ValueError
        raise StageError(
            f"dataset {dataset}: scdataloader's Preprocessor failed after our checks passed: "
            f"{type(err).__name__}: {err}. Fix: see the message; the parameters were {asdict(params)}"
        ) from err
    processed.obs_names = processed.obs.pop(CELL_ID).astype(str).to_numpy()
    if "unseen_genes" in processed.uns:  # built from a set: sort for the same bytes each run
        processed.uns["unseen_genes"] = sorted(processed.uns["unseen_genes"])
    unseen = len(processed.uns.get("unseen_genes", []))
    report = make_report(
        dataset, input_path, params, counts, registry_info, relabelled, n_cells,
        processed.obs, n_vars=processed.n_vars, n_mapped=processed.n_vars - unseen,
        unseen=unseen, started=started, n_primary=len(obs), primary_only=primary_only,
    )  # fmt: skip
    return processed, report


def validate(dataset: str, obs, var, organism: str) -> None:
    """scdataloader's validation (skip_validate=False) on the annotations: it reads no counts."""
    import anndata
    from scdataloader.utils import validate as scdataloader_validate

    try:
        scdataloader_validate(anndata.AnnData(obs=obs, var=var), organism=organism)
    except ValueError as err:
        raise StageError(
            f"dataset {dataset}: scdataloader's validation failed after our checks passed: "
            f"{err}. Fix: correct the obs column it names, or pass --skip-validate"
        ) from err


def make_report(
    dataset, input_path, params, counts, registry_info, relabelled, n_cells, obs, *,
    n_vars, n_mapped, unseen, started, n_primary, primary_only,
) -> dict:  # fmt: skip
    """The QC numbers; ``cells.primary``: the unique cells (is_primary_data), before QC."""
    return {
        "dataset": dataset,
        "input": str(input_path),
        "organism": registry_info["organism"],
        "counts_from": counts["where"],
        "cells": {
            "before": n_cells,
            "primary": n_primary,
            "after": len(obs),
            "dropped": {
                "not primary data (copies of cells another dataset holds)": n_cells - n_primary,
                f"fewer than {params.min_nnz_genes} expressed genes": n_primary - len(obs),
            },
        },
        "primary_only": primary_only,
        "genes": {
            "before": int(counts["var"].shape[0]),
            "known_to_registry": registry_info["genes_in_registry"],
            "dropped": {
                "not in the gene registry or duplicated": int(counts["var"].shape[0]) - n_mapped
            },
            "added_as_zero (registry genes absent from the dataset)": unseen,
            "after": n_vars,
        },
        "qc_flags": {
            "outlier": int(obs["outlier"].sum()) if "outlier" in obs else None,
            "mt_outlier": int(obs["mt_outlier"].sum()) if "mt_outlier" in obs else None,
        },
        "relabelled": relabelled,
        "params": asdict(params),
        "duration_s": round(time.perf_counter() - started, 2),
    }


def preprocess_chunked(
    dataset: str, input_path: Path, out: Path, params: Params, chunk: int,
    primary_only: bool = True,
):  # fmt: skip
    """The same result as ``preprocess``, read and written a chunk of cells at a time
    (scprint.data.chunked); writes ``out`` atomically and returns the report."""
    import numpy as np
    import pandas as pd
    from scdataloader.utils import load_genes

    from scprint.data import chunked

    started = time.perf_counter()
    reader = chunked.Reader(dataset, input_path)
    try:
        places = [(w, reader.matrix(key), var) for w, key, var in reader.places()]
        relabelled, counts, registry_info = check(
            dataset, input_path, reader.obs, reader.uns, reader.var.index, places, params
        )
        key = {w: k for w, k, _ in reader.places()}[counts["where"]]
        primary = primary_cells(dataset, input_path, reader.obs, primary_only)
        genemap = chunked.map_genes(
            counts["var"], load_genes(registry_info["organism"]), params.is_symbol
        )
        if genemap.n_mapped < params.min_valid_genes_id:
            refuse(dataset, input_path, [
                f"only {genemap.n_mapped} genes map to the registry, fewer than "
                f"--min-valid-genes-id {params.min_valid_genes_id}. Fix: lower it for small "
                "gene panels, or check the gene ids"
            ])  # fmt: skip
        # the Preprocessor's X: the counts' dtype padded with float32 zeros
        dtype = np.result_type(counts["counts"].dtype, np.float32)
        parts, n_genes = [], []
        cells = np.zeros(len(genemap.var), np.int64)
        totals = np.zeros(len(genemap.var), np.float64)
        with atomic_path(out) as tmp:
            writer = chunked.Writer(tmp, len(genemap.var))
            try:
                with progress(reader.n_obs, f"preprocessing {dataset}", unit="cells") as bar:
                    offset = 0
                    for rows in reader.chunks(key, chunk):
                        n_rows = rows.shape[0]
                        bar.update(n_rows)
                        if primary is not None:
                            rows = rows[primary[offset : offset + n_rows]]
                        offset += n_rows
                        part = chunked.transform(rows, genemap, params.min_nnz_genes, dtype)
                        writer.append(part.X)
                        parts.append(part.obs)
                        n_genes.append(part.n_genes)
                        cells += part.gene_cells
                        totals += part.gene_totals
                        del part
                n_genes = np.concatenate(n_genes)
                refuse(dataset, input_path, check_cells_kept(len(n_genes), n_genes, params))
                kept = reader.obs if primary is None else reader.obs[primary]
                kept = kept[n_genes >= params.min_nnz_genes]
                qc = pd.concat(parts, ignore_index=True).set_axis(kept.index)
                obs = pd.concat([kept, qc], axis=1)
                obs["outlier"], obs["mt_outlier"] = chunked.outliers(obs)
                if not params.skip_validate:
                    validate(dataset, obs, genemap.var, registry_info["organism"])
                var = chunked.gene_qc(genemap.var, cells, totals, writer.n_obs, dtype)
                obs.index = pd.Index([f"{dataset}:{c}" for c in obs.index])
                # the Preprocessor's gene padding (anndata concat) drops the input's uns
                uns = {"unseen_genes": genemap.unseen, "dataset_id": dataset}
                writer.finish(obs, var, uns)
            finally:
                writer.close()
    finally:
        reader.close()
    return make_report(
        dataset, input_path, params, counts, registry_info, relabelled, reader.n_obs, obs,
        n_vars=len(genemap.var), n_mapped=genemap.n_mapped, unseen=len(genemap.unseen),
        started=started, n_primary=len(n_genes), primary_only=primary_only,
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Params()
    parser.add_argument("--dataset", required=True, help="dataset id (names it in messages)")
    parser.add_argument("--input", required=True, help="data/raw/<dataset>.h5ad")
    parser.add_argument("--out", required=True, help="data/processed/<dataset>.h5ad")
    parser.add_argument("--report", required=True, help="results/preprocess/<dataset>.json")
    parser.add_argument("--min-valid-genes-id", type=int, default=defaults.min_valid_genes_id)
    parser.add_argument("--min-nnz-genes", type=int, default=defaults.min_nnz_genes)
    parser.add_argument("--min-dataset-size", type=int, default=defaults.min_dataset_size)
    parser.add_argument("--maxdropamount", type=int, default=defaults.maxdropamount)
    parser.add_argument(
        "--is-symbol", action=argparse.BooleanOptionalAction, default=defaults.is_symbol
    )
    parser.add_argument(
        "--skip-validate", action=argparse.BooleanOptionalAction, default=defaults.skip_validate
    )
    parser.add_argument(
        "--do-postp",
        action=argparse.BooleanOptionalAction,
        default=defaults.do_postp,
        help="also store layers['norm'] and obsm['X_pca'] (scdataloader's post-processing; "
        "reads the whole file in memory)",
    )
    parser.add_argument(
        "--chunk-cells",
        type=int,
        default=CHUNK_CELLS,
        help="cells read, processed and written at a time: memory grows with it, not with "
        "the dataset",
    )
    parser.add_argument(
        "--whole-file",
        action="store_true",
        help="load the whole dataset and run scdataloader's Preprocessor itself (the "
        "reference the chunked path equals; implied by --do-postp)",
    )
    parser.add_argument(
        "--primary-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep only cells with obs['is_primary_data'] true (CELLxGENE marks copies of "
        "cells other datasets hold false); a dataset with none is refused",
    )
    parser.add_argument(
        "--on-refused",
        choices=("fail", "record"),
        default="fail",
        help="a dataset that cannot be preprocessed: fail (exit 1), or record the reason in "
        "--report and a cell-less --out and exit 0, leaving the decision to `scprint "
        "collection --on-refused` (the workflow does this)",
    )


REFUSED_KEY = "scprint_refused"  # uns key of the record `--on-refused record` writes


def write_refused(out: str | Path, dataset: str, reason: str) -> None:
    """The processed output of a refused dataset: an h5ad with no cells and no genes whose
    ``uns`` says why. Every dataset then has its declared outputs, so one bad file does
    not stop the workflow; `scprint collection` lists it as refused and registers nothing
    of it (or stops, with ``--on-refused stop``)."""
    import anndata

    with atomic_path(out) as tmp:
        anndata.AnnData(uns={REFUSED_KEY: reason, "dataset_id": dataset}).write_h5ad(tmp)


def refusal_path(report: str, dataset: str) -> Path:
    """Where a refused dataset's reason is kept: ``refused/<dataset>.json`` beside the
    reports. Not a rule output (nothing is written for a refused dataset); the report's
    dataset table lists it."""
    return Path(report).parent / "refused" / f"{dataset}.json"


def run(args: argparse.Namespace) -> None:
    dataset = check_dataset_id(args.dataset)
    params = Params(
        min_valid_genes_id=args.min_valid_genes_id,
        min_nnz_genes=args.min_nnz_genes,
        min_dataset_size=args.min_dataset_size,
        maxdropamount=args.maxdropamount,
        is_symbol=args.is_symbol,
        skip_validate=args.skip_validate,
        do_postp=args.do_postp,
    )
    refusal = refusal_path(args.report, dataset)
    try:
        if args.whole_file or params.do_postp:
            processed, report = preprocess(dataset, Path(args.input), params, args.primary_only)
            with atomic_path(args.out) as tmp:
                processed.write_h5ad(tmp)
        else:
            report = preprocess_chunked(
                dataset, Path(args.input), args.out, params, args.chunk_cells, args.primary_only
            )
    except StageError as err:  # recorded for the report's dataset table
        write_json(refusal, {"dataset": dataset, "input": str(args.input), "reason": str(err)})
        if args.on_refused == "fail":
            raise
        write_refused(args.out, dataset, str(err))
        write_json(
            args.report,
            {"dataset": dataset, "input": str(args.input), "output": str(args.out),
             "refused": str(err)},
        )  # fmt: skip
        log.error("%s refused (recorded in %s): %s", dataset, args.report, err)
        return
    report["output"] = str(args.out)
    write_json(args.report, report)
    refusal.unlink(missing_ok=True)
    log.info(
        "%s: %d -> %d cells, %d -> %d genes in %.1fs",
        dataset,
        report["cells"]["before"],
        report["cells"]["after"],
        report["genes"]["before"],
        report["genes"]["after"],
        report["duration_s"],
    )
