"""`scprint report-collection`: the Collection category of the report.

- composition: cells by organism, assay, tissue, disease and the most frequent cell types,
  from the obs of the processed files the collection holds, named from the laminDB
  registries (the ontologies stage);
- the weighted sampler's effect: for each ``data.clss_to_weight`` column, each label's share
  of the cells against its expected share of the sampled cells. The sampler (scdataloader's
  LabelWeightedSampler) draws a label combination with weight ``s * n / (n + s)`` (``n``
  its cells, ``s`` = ``data.weight_scaler``), then a cell of it; the per-cell weights by
  expressed genes within a combination are left out here, they do not move label shares.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scprint.data.ontologies import REGISTRY_FOR_COLUMN as REGISTRY_COLUMNS
from scprint.io import StageError, read_json
from scprint.report.common import no_data_figure, pyplot, save_figure, short_label

log = logging.getLogger(__name__)

COMPOSITION = {
    "organism_ontology_term_id": "organism",
    "assay_ontology_term_id": "assay",
    "tissue_ontology_term_id": "tissue",
    "disease_ontology_term_id": "disease",
    "cell_type_ontology_term_id": "cell type",
}
TOP = 15  # labels shown per panel; the rest are summed as "other"


def read_obs(paths: list[str], columns: list[str]):
    """The given obs columns of every processed file, one frame (strings)."""
    import anndata
    import pandas as pd

    frames = []
    for path in paths:
        adata = anndata.read_h5ad(path, backed="r")
        try:
            missing = [c for c in columns if c not in adata.obs]
            if missing:
                raise StageError(
                    f"{path} has no obs columns {missing}. Fix: rerun `scprint preprocess` on it"
                )
            frames.append(adata.obs[columns].astype(str))
        finally:
            adata.file.close()
    return pd.concat(frames, ignore_index=True)


def term_names(obs, columns) -> dict[str, str]:
    """ontology id -> "name (id)" from the laminDB registries; ids they lack stay ids."""
    import bionty as bt

    from scprint.data.lamin import connect

    connect()
    names = {}
    for column in columns:
        registry = getattr(bt, REGISTRY_COLUMNS[column])
        ids = sorted(obs[column].unique())
        for term, name in registry.filter(ontology_id__in=ids).values_list("ontology_id", "name"):
            names[term] = f"{name} ({term})"
    return names


def top_counts(values, top: int = TOP):
    counts = values.value_counts()
    if len(counts) > top:
        counts = counts.iloc[:top].copy()
        counts[f"other ({values.nunique() - top} labels)"] = len(values) - counts.sum()
    return counts


def sampler_shares(obs, columns: list[str], scaler: float) -> dict[str, tuple]:
    """column -> (labels, share of cells, expected share of sampled cells)."""
    combos = obs[columns].astype(str).agg("|".join, axis=1)
    n = combos.value_counts()
    weight = scaler * n / (n + scaler)
    per_cell = (weight / n / (weight.sum())).reindex(combos).to_numpy()  # P(cell)
    shares = {}
    for column in columns:
        before = obs[column].value_counts(normalize=True)
        after = (
            obs.assign(_p=per_cell).groupby(column, observed=True)["_p"].sum().reindex(before.index)
        )
        shares[column] = (before.index.tolist(), before.to_numpy(), after.to_numpy())
    return shares


def training_data_config(paths: list[str]) -> dict:
    """The ``data`` section of the training yamls, merged in order (later files win), as
    `scprint plan` reads them."""
    from scprint.plan import load_config

    return load_config(paths).get("data") or {}


def plot_composition(obs, collection: dict, out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(COMPOSITION), 1, figsize=(8, 2.2 * len(COMPOSITION) + 1))
    for ax, (column, name) in zip(axes, COMPOSITION.items(), strict=True):
        counts = top_counts(obs[column])
        y = np.arange(len(counts))
        ax.barh(y, counts.to_numpy(), color="#3182bd")
        ax.set_yticks(y, [short_label(v, 40) for v in counts.index], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"cells by {name} ({obs[column].nunique()} labels)", fontsize=10)
    axes[-1].set_xlabel("cells")
    fig.suptitle(
        f"Collection {collection.get('key')}: {len(obs):,} cells in "
        f"{collection.get('n_datasets')} datasets"
    )
    fig.tight_layout()
    save_figure(fig, out)


def plot_sampler(shares: dict, scaler: float, out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(shares), 1, figsize=(8, 2.4 * len(shares) + 1), squeeze=False)
    for ax, (column, (labels, before, after)) in zip(axes[:, 0], shares.items(), strict=True):
        order = np.argsort(-before)[:TOP]
        y = np.arange(len(order))
        ax.barh(y - 0.2, before[order], height=0.4, label="share of cells", color="#9ecae1")
        ax.barh(y + 0.2, after[order], height=0.4, label="share sampled", color="#e6550d")
        ax.set_yticks(y, [short_label(labels[i], 40) for i in order], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(column, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Weighted sampler (weight_scaler {scaler:g}): label shares before and after")
    fig.tight_layout()
    save_figure(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", required=True, help="results/collection.json")
    parser.add_argument("--processed", nargs="+", required=True, help="data/processed/*.h5ad")
    parser.add_argument(
        "--train-config",
        action="append",
        default=[],
        help="training yaml (repeat, merged in order) for data.clss_to_weight / weight_scaler",
    )
    parser.add_argument("--composition", required=True, help="PNG: cells by label")
    parser.add_argument("--sampler", required=True, help="PNG: weighted sampler label shares")


def run(args: argparse.Namespace) -> None:
    collection = read_json(args.collection)
    data = training_data_config(args.train_config)
    weighted = list(data.get("clss_to_weight") or [])
    scaler = float(data.get("weight_scaler") or 0)
    columns = sorted(set(COMPOSITION) | set(weighted))
    obs = read_obs(args.processed, columns)
    names = term_names(obs, [c for c in columns if c in REGISTRY_COLUMNS])
    obs = obs.apply(lambda col: col.map(lambda v: names.get(v, v)))
    plot_composition(obs, collection, Path(args.composition))
    if weighted and scaler > 0:
        plot_sampler(sampler_shares(obs, weighted, scaler), scaler, Path(args.sampler))
    else:
        no_data_figure(
            args.sampler,
            "Weighted sampler",
            "no weighted sampling (data.clss_to_weight empty or data.weight_scaler 0)",
        )
    log.info("collection report: %d cells, weighted by %s", len(obs), weighted)
