"""`scprint report-training`: the Training category of the report.

Reads the metrics CSV the train stage publishes (every value Lightning logged, through the
MetricsLog callback) and its JSON summary:
- losses: ``train/*`` per objective over steps, and every ``val/*`` metric (whatever the
  LightningModule logs under ``val/``), one line each;
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


def series(frame, column: str):
    rows = frame[["step", column]].dropna()
    return rows["step"].to_numpy(), rows[column].to_numpy()


def plot_curves(frame, out: Path) -> None:
    train = [c for c in frame.columns if c.startswith("train/") and c != THROUGHPUT]
    val = sorted(c for c in frame.columns if c.startswith("val/") or c == "val_loss")
    if not train and not val:
        no_data_figure(out, "Losses and validation metrics", "no metric was logged")
        return
    plt = pyplot()
    panels = [("training losses", sorted(train)), ("validation", val)]
    panels = [(t, cols) for t, cols in panels if cols]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False)
    for ax, (title, columns) in zip(axes[:, 0], panels, strict=True):
        for column in columns:
            x, y = series(frame, column)
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=column)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, out)


def plot_lr_throughput(frame, out: Path) -> None:
    lrs = [c for c in frame.columns if c.startswith("lr-")]
    if not lrs and THROUGHPUT not in frame.columns:
        no_data_figure(out, "Learning rate and throughput", "neither was logged")
        return
    plt = pyplot()
    fig, (ax_lr, ax_tp) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for column in lrs:
        ax_lr.plot(*series(frame, column), label=column)
    ax_lr.set_ylabel("learning rate")
    if lrs:
        ax_lr.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if THROUGHPUT in frame.columns:
        x, y = series(frame, THROUGHPUT)
        ax_tp.plot(x, y, color="#636363")
        ax_tp.set_title(f"throughput: median {float(_median(y)):,.0f} cells/s", fontsize=10)
    ax_tp.set_ylabel("cells / s")
    ax_tp.set_xlabel("step")
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
