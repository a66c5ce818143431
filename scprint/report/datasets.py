"""`scprint report-datasets`: the Datasets category of the report.

- a table of every dataset (HTML, one row a dataset): cells in, kept and dropped (and why),
  genes in the file, matched to the gene registry and after padding, where the raw counts
  came from (X / raw.X / layers['counts']); datasets `scprint preprocess` refused, with
  the reason, from their refusal records (``<reports dir>/refused/<dataset>.json``);
- cells kept and dropped per dataset (bar chart; past MAX_BARS datasets, histograms of the
  cells kept and the share dropped per dataset, and the WORST largest drop shares named);
- counts per cell and expressed genes per cell per dataset (box plots, from the processed
  files' QC columns; past MAX_BOXES datasets, histograms of the per-dataset medians and
  the WORST datasets with the lowest medians named).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scprint.io import StageError, read_json
from scprint.report.common import no_data_figure, pyplot, save_figure, short_label, write_table

log = logging.getLogger(__name__)

MAX_BOXES = 60  # more datasets than this: distributions over datasets instead of a box each
MAX_BARS = 60  # more datasets than this: distributions of cells and drop share, worst named
WORST = 15  # datasets named in the figures of a large run (the table has every one)
CELLS_SAMPLED = 5000  # per dataset, for the distributions (seeded, so reruns are identical)
TABLE_ID = "datasets"
COLUMNS = [
    "dataset", "organism", "status", "counts source", "cells in", "cells kept",
    "cells dropped", "dropped because", "genes in file", "genes matched", "genes after",
]  # fmt: skip


def table_rows(reports: list[dict], refused: list[dict]) -> list[dict]:
    """One row per dataset: the numbers of its preprocess report, or its refusal reason."""
    rows = []
    for r in reports:
        dropped = {k: v for k, v in r["cells"]["dropped"].items() if v}
        rows.append(
            {
                "dataset": r["dataset"],
                "organism": r["organism"],
                "status": "preprocessed",
                "counts source": r["counts_from"],
                "cells in": r["cells"]["before"],
                "cells kept": r["cells"]["after"],
                "cells dropped": r["cells"]["before"] - r["cells"]["after"],
                "dropped because": "; ".join(f"{k}: {v}" for k, v in dropped.items()),
                "genes in file": r["genes"]["before"],
                "genes matched": r["genes"]["known_to_registry"],
                "genes after": r["genes"]["after"],
            }
        )
    done = {r["dataset"] for r in reports}
    for r in refused:
        if r["dataset"] in done:
            continue  # refused once, preprocessed since
        rows.append({"dataset": r["dataset"], "status": f"refused: {r['reason']}"})
    return sorted(rows, key=lambda row: (row["status"] != "preprocessed", row["dataset"]))


def read_refused(folder: Path | None) -> list[dict]:
    if folder is None or not folder.is_dir():
        return []
    return [read_json(p) for p in sorted(folder.glob("*.json"))]


def qc_values(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(counts per cell, expressed genes per cell) of one processed file, at most
    CELLS_SAMPLED cells: scdataloader's QC columns when there, else computed from X."""
    import anndata
    import scipy.sparse as sp

    adata = anndata.read_h5ad(path, backed="r")
    try:
        obs = adata.obs
        rng = np.random.default_rng(0)
        keep = np.sort(rng.permutation(adata.n_obs)[:CELLS_SAMPLED])
        if {"total_counts", "n_genes_by_counts"} <= set(obs.columns):
            counts = obs["total_counts"].to_numpy()[keep]
            genes = obs["n_genes_by_counts"].to_numpy()[keep]
        else:
            x = adata.X[keep]
            x = x if sp.issparse(x) else sp.csr_matrix(x)
            counts = np.asarray(x.sum(axis=1)).ravel()
            genes = np.diff(x.indptr) if sp.isspmatrix_csr(x) else x.getnnz(axis=1)
    finally:
        adata.file.close()
    return counts.astype(float), genes.astype(float)


def plot_cells(rows: list[dict], out: Path) -> None:
    done = [r for r in rows if r["status"] == "preprocessed"]
    if not done:
        no_data_figure(out, "Cells per dataset", "no dataset was preprocessed")
        return
    plt = pyplot()
    names = [short_label(r["dataset"]) for r in done]
    kept = np.array([r["cells kept"] for r in done])
    dropped = np.array([r["cells dropped"] for r in done])
    if len(done) > MAX_BARS:
        share = dropped / np.maximum(kept + dropped, 1)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        log_hist(axes[0], kept, "cells kept per dataset")
        axes[1].hist(share, bins=np.linspace(0, 1, 41), color="#e34a33")
        axes[1].set_xlabel("share of cells dropped by QC")
        axes[1].set_ylabel("datasets")
        worst_bars(axes[2], names, share, highest=True, title="largest shares dropped")
        axes[2].set_xlim(0, 1)
        fig.suptitle(
            f"Cells of {len(done):,} datasets: {kept.sum():,} kept, {dropped.sum():,} dropped"
        )
        fig.tight_layout()
        save_figure(fig, out)
        return
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(done)))
    y = np.arange(len(done))
    ax.barh(y, kept, color="#2b8cbe", label="kept")
    ax.barh(y, dropped, left=kept, color="#e34a33", label="dropped by QC")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("cells")
    ax.set_title(f"Cells per dataset: {kept.sum():,} kept, {dropped.sum():,} dropped")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, out)


def log_hist(ax, values, xlabel: str) -> None:
    """Histogram of positive ``values`` on log-spaced bins (datasets span decades)."""
    values = np.asarray(values, dtype=float)
    values = values[values > 0]
    if len(values):
        low, high = values.min(), values.max()
        ax.hist(values, bins=np.geomspace(low, max(high, low * 1.01), 41), color="#2b8cbe")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("datasets")


def worst_bars(ax, names: list[str], values, highest: bool, title: str) -> None:
    """The WORST datasets by ``values`` (highest or lowest first), named, one bar each."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(-values if highest else values, kind="stable")[:WORST]
    y = np.arange(len(order))
    ax.barh(y, values[order], color="#e34a33")
    ax.set_yticks(y, [names[i] for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)


def plot_distributions(names: list[str], values: list[tuple], out: Path) -> None:
    if not names:
        no_data_figure(out, "Counts and genes per cell", "no dataset was preprocessed")
        return
    plt = pyplot()
    titles = ("counts per cell", "expressed genes per cell")
    if len(names) <= MAX_BOXES:
        fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.3 * len(names)), sharey=True)
        for i, (ax, title) in enumerate(zip(axes, titles, strict=True)):
            ax.boxplot([v[i] for v in values], vert=False, showfliers=False)
            ax.set_xscale("log")
            ax.set_xlabel(title)
        axes[0].set_yticks(np.arange(1, len(names) + 1), [short_label(n) for n in names])
        axes[0].invert_yaxis()
    else:
        medians = np.array([[np.median(v[0]), np.median(v[1])] for v in values])
        fig, axes = plt.subplots(2, 2, figsize=(12, 4 + 0.22 * WORST))
        short = [short_label(n) for n in names]
        for i, title in enumerate(titles):
            log_hist(axes[0, i], medians[:, i], f"median {title} of each dataset")
            worst_bars(
                axes[1, i], short, medians[:, i], highest=False, title=f"lowest median {title}"
            )
            axes[1, i].set_xlabel(title)
        axes[0, 0].set_title(f"{len(names):,} datasets", fontsize=10)
        fig.suptitle("Counts and expressed genes per cell, after preprocessing")
        fig.tight_layout()
        save_figure(fig, out)
        return
    fig.suptitle("Counts and expressed genes per cell, after preprocessing")
    save_figure(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reports", nargs="+", required=True, help="results/preprocess/*.json")
    parser.add_argument("--processed", nargs="*", default=[], help="data/processed/*.h5ad")
    parser.add_argument(
        "--refused-dir",
        default=None,
        help="refusal records of `scprint preprocess` (default: <reports dir>/refused)",
    )
    parser.add_argument("--table", required=True, help="HTML table of every dataset")
    parser.add_argument("--cells", required=True, help="PNG: cells kept / dropped")
    parser.add_argument("--qc", required=True, help="PNG: counts and genes per cell")


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    try:
        reports = [read_json(p) for p in args.reports]
    except (OSError, ValueError) as err:
        raise StageError(f"cannot read a preprocess report: {err}. Fix: rerun preprocess") from err
    refused_dir = args.refused_dir or Path(args.reports[0]).parent / "refused"
    # `preprocess --on-refused record` (the workflow) writes the reason as the report
    recorded = {r["dataset"]: r for r in read_refused(Path(refused_dir))}
    recorded |= {r["dataset"]: {**r, "reason": r["refused"]} for r in reports if "refused" in r}
    reports = [r for r in reports if "refused" not in r]
    rows = table_rows(reports, list(recorded.values()))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in COLUMNS[4:7] + COLUMNS[8:]:
        frame[column] = frame[column].astype("Int64")
    write_table(args.table, frame, f"Datasets ({len(reports)} preprocessed)", TABLE_ID)
    plot_cells(rows, Path(args.cells))
    by_name = {Path(p).name.removesuffix(".h5ad"): Path(p) for p in args.processed}
    by_name = {n: p for n, p in by_name.items() if n in {r["dataset"] for r in reports}}
    names = sorted(by_name)
    plot_distributions(names, [qc_values(by_name[n]) for n in names], Path(args.qc))
    log.info("datasets report: %d rows, %d distributions", len(rows), len(names))
