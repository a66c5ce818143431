"""`scprint report-training`: the Training category of the report.

Reads the metrics CSV the train stage publishes (every value Lightning logged, through the
MetricsLog callback) and its JSON summary:
- small multiples, grouped by the metric's name (so renamed or new loss terms land in the
  right panel): the total loss, one panel per loss term (train and validation together),
  per-class accuracy and the embedding's kNN accuracy on 0-1 axes, denoising; series
  longer than MAX_POINTS are drawn as binned means with their min-max band;
- learning rate (LearningRateMonitor's ``lr-*``) and throughput (``train/cells_per_s``);
- the final checkpoint's summary (HTML table): steps, epochs, collection, model shape,
  final metrics.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scprint.io import read_json
from scprint.report.common import no_data_figure, pyplot, save_figure, write_table

log = logging.getLogger(__name__)

THROUGHPUT = "train/cells_per_s"
PHASES = ("train", "val", "test")
MAX_POINTS = 1000  # a longer series is drawn as the mean of this many bins (+ min-max band)
PANEL_W, PANEL_H, COLUMNS = 4.2, 2.8, 3
# one colour per phase in every panel; within a panel of many series, colours and dashes cycle
PHASE_STYLE = {"train": dict(color="#1f77b4"), "val": dict(color="#d62728", marker=".")}
PHASE_STYLE["test"] = dict(color="#2ca02c", marker="x")
DASHES = ("-", "--", ":", "-.")


def metric_columns(frame) -> list[str]:
    """The logged metrics, one name each: ``val_loss`` (the name ModelCheckpoint monitors)
    is ``val/loss`` again, so a ``<phase>_<name>`` beside a ``<phase>/<name>`` is left out."""
    columns = [c for c in frame.columns if c not in ("step", "epoch")]
    return [
        c for c in columns if not ("/" not in c and "_" in c and c.replace("_", "/", 1) in columns)
    ]


def panel_of(column: str) -> str | None:
    """Which panel a metric goes to, from its name alone, so new loss terms find theirs:
    ``<phase>/loss`` -> total loss; ``<phase>/acc*`` -> accuracy; ``<phase>/knn*`` -> kNN;
    ``<phase>/denoise*`` -> denoising; any other ``<phase>/<term>`` -> that term's loss
    panel (train and val together); learning rates and throughput go to the other figure."""
    phase, _, name = column.partition("/")
    if phase not in PHASES or not name or column == THROUGHPUT:
        return None
    for family in ("acc", "knn", "denoise"):
        if name == family or name.startswith(family + "/"):
            return family
    return "loss" if name == "loss" else f"loss/{name}"


def series(frame, column: str):
    rows = frame[["step", column]].dropna()
    return rows["step"].to_numpy(), rows[column].to_numpy()


def binned(x, y, bins: int = MAX_POINTS):
    """(x, mean, min, max) over ``bins`` equal runs of points; the series itself when short."""
    import numpy as np

    if len(x) <= bins:
        return x, y, None, None
    edges = np.linspace(0, len(x), bins + 1).astype(int)
    starts = edges[:-1]
    counts = np.diff(edges)
    mean = np.add.reduceat(y, starts) / counts
    return (
        np.add.reduceat(x, starts) / counts,
        mean,
        np.minimum.reduceat(y, starts),
        np.maximum.reduceat(y, starts),
    )


def short_metric(name: str, panel: str) -> str:
    """acc/cell_type_ontology_term_id -> cell_type: the legend of a panel of many series."""
    return name.removeprefix(panel + "/").removesuffix("_ontology_term_id")


def draw(ax, frame, column: str, label: str, **style) -> None:
    x, y = series(frame, column)
    x, y, low, high = binned(x, y)
    if low is not None:
        ax.fill_between(x, low, high, color=style.get("color"), alpha=0.15, linewidth=0)
        style = {k: v for k, v in style.items() if k != "marker"}
    elif len(x) >= 30:
        style = {k: v for k, v in style.items() if k != "marker"}
    ax.plot(x, y, label=label, **{"linewidth": 1.1, "markersize": 4, **style})


def plot_curves(frame, out: Path) -> None:
    """Small multiples: total loss, one panel per loss term, accuracy per class (0-1), kNN
    accuracy of the cell embedding (0-1), denoising; train and validation in each."""
    panels: dict[str, list[str]] = {}
    for column in metric_columns(frame):
        if (panel := panel_of(column)) is not None:
            panels.setdefault(panel, []).append(column)
    if not panels:
        no_data_figure(out, "Losses and validation metrics", "no metric was logged")
        return
    order = sorted(panels, key=lambda p: (p != "loss", p in ("acc", "knn", "denoise"), p))
    plt = pyplot()
    rows = -(-len(order) // COLUMNS)
    cols = min(COLUMNS, len(order))
    fig, axes = plt.subplots(
        rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False, sharex=True
    )
    for ax, panel in zip(axes.flat, order, strict=False):
        columns = sorted(panels[panel])
        if panel in ("acc", "knn", "denoise"):
            titles = {"acc": "accuracy per class", "knn": "kNN accuracy of the cell embedding"}
            ax.set_title(titles.get(panel, "denoising (Spearman)"), fontsize=10)
            for i, column in enumerate(columns):
                phase, _, name = column.partition("/")
                mean = name == panel  # val/acc: the mean over classes; val/denoise: the score
                style = dict(color="black", linewidth=2) if mean else {}
                style.setdefault("linestyle", DASHES[(i // 10) % len(DASHES)])
                label = {"acc": "mean of classes", "denoise": "score"}[panel] if mean else None
                label = label or short_metric(name, panel)
                if phase != "val":
                    label = f"{phase} {label}"
                draw(ax, frame, column, label, marker=".", **style)
            if panel in ("acc", "knn"):
                ax.set_ylim(0, 1)
        else:
            ax.set_title(
                "total loss" if panel == "loss" else panel.removeprefix("loss/"), fontsize=10
            )
            for column in columns:
                phase = column.partition("/")[0]
                draw(ax, frame, column, phase, **PHASE_STYLE[phase])
        ax.legend(fontsize=7, loc="best", ncol=2 if len(columns) > 6 else 1)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(order) :]:
        ax.set_axis_off()
    for ax in axes[-1, :]:
        ax.set_xlabel("step", fontsize=9)
    fig.suptitle("Losses per objective and validation metrics (train: blue, validation: red)")
    fig.tight_layout()
    save_figure(fig, out)


def plot_lr_throughput(frame, out: Path) -> None:
    lrs = sorted(c for c in frame.columns if c.startswith("lr-"))
    if not lrs and THROUGHPUT not in frame.columns:
        no_data_figure(out, "Learning rate and throughput", "neither was logged")
        return
    plt = pyplot()
    fig, (ax_lr, ax_tp) = plt.subplots(1, 2, figsize=(2 * PANEL_W, PANEL_H), sharex=True)
    for i, column in enumerate(lrs):
        draw(ax_lr, frame, column, column.removeprefix("lr-"), linestyle=DASHES[i % len(DASHES)])
    ax_lr.set_title("learning rate", fontsize=10)
    if lrs:
        ax_lr.legend(fontsize=7, loc="best")
    if THROUGHPUT in frame.columns:
        x, y = series(frame, THROUGHPUT)
        draw(ax_tp, frame, THROUGHPUT, "cells/s", color="#636363")
        ax_tp.set_title(f"throughput: median {float(_median(y)):,.0f} cells/s", fontsize=10)
    else:
        ax_tp.set_title("throughput: not logged", fontsize=10)
    ax_tp.set_ylabel("cells / s")
    for ax in (ax_lr, ax_tp):
        ax.set_xlabel("step")
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def _median(values):
    import numpy as np

    return np.median(values) if len(values) else float("nan")


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    config = summary.get("config") or {}
    model = config.get("model") or {}
    rows = [
        ("run", summary.get("run")),
        ("checkpoint", summary.get("checkpoint")),
        ("steps", summary.get("steps")),
        ("epochs", summary.get("epochs")),
        ("resumed from", summary.get("resumed_from") or "-"),
    ]
    rows += [(f"collection {k}", v) for k, v in (summary.get("collection") or {}).items()]
    rows += [(f"model.{k}", model.get(k)) for k in ("d_model", "nlayers", "nhead", "attention")]
    rows += [(f"final {k}", f"{v:.4g}") for k, v in sorted(summary.get("final_losses", {}).items())]
    return [(k, "" if v is None else str(v)) for k, v in rows]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", required=True, help="results/train/<run>.json")
    parser.add_argument("--metrics", required=True, help="results/train/<run>_metrics.csv")
    parser.add_argument("--curves", required=True, help="PNG: losses and validation metrics")
    parser.add_argument("--lr-throughput", required=True, help="PNG: learning rate, cells/s")
    parser.add_argument("--table", required=True, help="HTML: the final checkpoint's summary")


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    summary = read_json(args.summary)
    try:
        frame = pd.read_csv(args.metrics)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({"step": []})
    plot_curves(frame, Path(args.curves))
    plot_lr_throughput(frame, Path(args.lr_throughput))
    table = pd.DataFrame(summary_rows(summary), columns=["", "value"])
    write_table(args.table, table, f"Checkpoint of run {summary.get('run')}", "checkpoint")
    log.info("training report: %d metric rows, %d columns", len(frame), frame.shape[1])
