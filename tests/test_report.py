"""The report's pieces one by one: progress lines in logs, the metrics history across
restarts, the sampler's label shares, the dataset table and figures from stage outputs.
The whole report, built by Snakemake and opened in Chromium, is in tests/test_workflow.py."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli

from scprint.data.preprocess import write_refused
from scprint.progress import LogProgress, progress
from scprint.report.collection import sampler_shares
from scprint.trainer.metrics import MetricsLog, merge_versions, version_files


def test_progress_in_a_log_is_one_line_per_tenth_without_carriage_returns(caplog):
    bar = progress(1000, "ESM embeddings", unit="proteins")
    assert isinstance(bar, LogProgress)  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="scprint.progress"), bar:
        for _ in range(143):
            bar.update(7)  # 1,001 in all: crosses every tenth once
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [
        str(p) for p in range(10, 110, 10)
    ]
    assert lines[0].startswith("ESM embeddings: 10% (105/1,000 proteins,")
    assert all("\r" not in line and "proteins/s" in line for line in lines)


def test_progress_of_a_resumed_download_starts_at_its_offset(caplog):
    with caplog.at_level(logging.INFO, logger="scprint.progress"):
        bar = LogProgress(100, "ds", "B", initial=45)
        bar.update(10)  # 45 -> 55: crosses 50% only
    assert [r.getMessage().split(": ")[1][:3] for r in caplog.records] == ["50%"]


def test_metrics_history_takes_redone_steps_from_the_newer_version(tmp_path):
    root = tmp_path / "metrics"
    for version, steps in ((0, range(0, 35, 5)), (1, range(20, 45, 5)), (10, [])):
        folder = root / f"version_{version}"
        folder.mkdir(parents=True)
        pd.DataFrame({"step": list(steps), "train/loss": [version] * len(steps)}).to_csv(
            folder / "metrics.csv", index=False
        )
    files = version_files(tmp_path)
    assert [f.parent.name for f in files] == ["version_0", "version_1", "version_10"]
    merged = merge_versions(files)
    assert merged["step"].tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert merged["train/loss"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_sampler_shares_follow_scdataloaders_class_weights():
    obs = pd.DataFrame({"cell_type": ["a"] * 90 + ["b"] * 10, "assay": ["x"] * 100})
    shares = sampler_shares(obs, ["cell_type"], scaler=10)
    labels, before, after = shares["cell_type"]
    assert labels == ["a", "b"]
    np.testing.assert_allclose(before, [0.9, 0.1])
    # class weight s*n/(n+s): a 10*90/100 = 9, b 10*10/20 = 5
    np.testing.assert_allclose(after, [9 / 14, 5 / 14])
    both = sampler_shares(obs, ["cell_type", "assay"], scaler=10)
    np.testing.assert_allclose(both["assay"][2], [1.0])


def test_metrics_log_writes_every_logged_value_and_throughput(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch["x"]).pow(2).mean()
            self.log("train/loss", loss, on_step=True, batch_size=len(batch["x"]))
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/mse", self.layer(batch["x"]).pow(2).mean(), batch_size=8)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cells = [{"x": torch.randn(4)} for _ in range(48)]
    data = torch.utils.data.DataLoader(cells, batch_size=8)  # batches {"x": (8, 4)}

    def fit(max_steps, ckpt=None):
        trainer = pl.Trainer(
            max_steps=max_steps, log_every_n_steps=2, val_check_interval=3,
            limit_val_batches=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[MetricsLog(dirpath=str(tmp_path / "csv"))],
        )  # fmt: skip
        trainer.fit(Module(), data, data, ckpt_path=ckpt)
        return trainer

    trainer = fit(4)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    fit(6, tmp_path / "mid.ckpt")  # a restart: a second CSV version, steps 5 and 6
    assert version_files(tmp_path) == []  # dirpath, not default_root_dir
    assert len(version_files(tmp_path / "csv")) == 2
    history = merge_versions(version_files(tmp_path / "csv"))
    train = history.dropna(subset=["train/loss"])
    assert train["step"].tolist() == [1, 3, 5]  # Lightning logs step index 1, 3, 5
    assert (history["train/cells_per_s"].dropna() > 0).all()
    assert history["val/mse"].notna().sum() == 2  # after steps 3 and 6


@pytest.fixture
def stage_outputs(tmp_path):
    """What preprocess wrote for two datasets (their JSON and h5ad) and one refusal."""
    rng = np.random.default_rng(0)
    reports = []
    for name, cells, kept in (("ds-a", 120, 100), ("ds-b", 80, 80)):
        x = sp.csr_matrix(rng.poisson(1.0, (kept, 50)).astype(np.float32))
        adata = ad.AnnData(X=x)
        adata.write_h5ad(tmp_path / f"{name}.h5ad")  # no QC columns: computed from X
        report = {
            "dataset": name, "organism": "NCBITaxon:9606", "counts_from": "raw.X",
            "cells": {"before": cells, "after": kept,
                      "dropped": {"fewer than 200 expressed genes": cells - kept}},
            "genes": {"before": 60, "known_to_registry": 50, "after": 1200},
        }  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        reports.append(report)
    refused = tmp_path / "refused"
    refused.mkdir()
    (refused / "ds-c.json").write_text(
        json.dumps({"dataset": "ds-c", "reason": "dataset ds-c: no raw counts anywhere"})
    )
    (refused / "ds-a.json").write_text(json.dumps({"dataset": "ds-a", "reason": "old"}))
    # `preprocess --on-refused record` (the workflow): the reason is the report, the
    # processed file a cell-less record
    write_refused(tmp_path / "ds-d.h5ad", "ds-d", "dataset ds-d: only 10 genes")
    (tmp_path / "ds-d.json").write_text(json.dumps({"dataset": "ds-d", "refused": "only 10 genes"}))
    return tmp_path


def test_report_datasets_table_and_figures(stage_outputs):
    out = stage_outputs / "out"
    run_cli(
        ["report-datasets", "--reports", *sorted(map(str, stage_outputs.glob("*.json"))),
         "--processed", *sorted(map(str, stage_outputs.glob("*.h5ad"))),
         "--table", out / "t.html", "--cells", out / "c.png", "--qc", out / "q.png"],
        cwd=stage_outputs,
    )  # fmt: skip
    html = (out / "t.html").read_text()
    table = pd.read_html(html, attrs={"id": "datasets"})[0] if _has_lxml() else None
    rows = html.split("<tbody>")[1].split("</tr>")
    assert "ds-a" in rows[0] and "ds-b" in rows[1] and "ds-c" in rows[2]
    assert "refused: dataset ds-c: no raw counts anywhere" in rows[2]
    assert "ds-d" in rows[3] and "refused: only 10 genes" in rows[3]
    assert "old" not in html  # ds-a was refused once, preprocessed since
    assert "<td>120</td>" in rows[0] and "<td>20</td>" in rows[0] and "raw.X" in rows[0]
    if table is not None:
        assert table["cells kept"].tolist()[:2] == [100, 80]
    import matplotlib.image

    for png in ("c.png", "q.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def _has_lxml() -> bool:
    try:
        import lxml  # noqa: F401
    except ImportError:
        return False
    return True


# -- the report at the scale of a real run -------------------------------------------------

N_DATASETS, N_STEPS = 1500, 100_000
MAX_PNG_BYTES = 800_000  # each figure; measured: ~375 KB for the training curves
MAX_TABLE_BYTES = 1_000_000  # the 1,500-row dataset table; measured: ~0.5 MB
# snakemake --report embeds every item base64-encoded (x4/3) in report.html: at most this
MAX_REPORT_BYTES = 6_000_000


def run_report(module, argv: list) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    module.run(parser.parse_args(list(map(str, argv))))


def check_figure(path) -> None:
    import matplotlib.image

    assert path.stat().st_size <= MAX_PNG_BYTES, (path.name, path.stat().st_size)
    image = matplotlib.image.imread(path)
    assert 200 < image.shape[0] < 3000 and 200 < image.shape[1] < 3000, image.shape
    assert image.std() > 0


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    """What 1,500 preprocessed datasets and 100,000 logged training steps leave behind:
    the preprocess JSONs, the metrics CSV and summary; and the counts and genes per cell of
    each dataset (what the QC figure reads from 1,500 h5ad files, kept in memory here:
    writing and reading the files would take a minute)."""
    root = tmp_path_factory.mktemp("large_run")
    rng = np.random.default_rng(0)
    qc = {}
    for i in range(N_DATASETS):
        name = f"dataset-{i:04d}-{'x' * (i % 40)}"
        cells = int(rng.integers(50, 200_000))
        kept = int(cells * rng.uniform(0.3, 1.0))
        counts = rng.lognormal(np.log(rng.uniform(500, 20_000)), 0.5, 200)
        qc[name] = (counts, counts / rng.uniform(2, 5))
        report = {
            "dataset": name, "organism": "NCBITaxon:9606", "counts_from": "X",
            "cells": {"before": cells, "after": kept, "dropped": {"too few genes": cells - kept}},
            "genes": {"before": 30_000, "known_to_registry": 29_000, "after": 60_000},
        }  # fmt: skip
        (root / f"{name}.json").write_text(json.dumps(report))
    steps = np.arange(1, N_STEPS + 1)
    terms = ["zinb", "mask", "cls", "ecs", "cce", "emb_independence", "adv_cls"]
    train = {"step": steps, "train/loss": 8 * np.exp(-steps / 3e4) + rng.normal(0, 0.3, N_STEPS)}
    train |= {f"train/{t}": np.exp(-steps / 4e4) + rng.normal(0, 0.1, N_STEPS) for t in terms}
    train |= {"train/cells_per_s": rng.normal(2000, 100, N_STEPS), "lr-AdamW": steps * 1e-9}
    at = np.arange(1000, N_STEPS + 1, 1000)
    val = {"step": at, "val/loss": 7 * np.exp(-at / 3e4), "val/acc": 1 - np.exp(-at / 2e4)}
    val["val_loss"] = val["val/loss"]  # what ModelCheckpoint monitors: the same metric
    val |= {f"val/{t}": np.exp(-at / 4e4) for t in terms}
    classes = ["cell_type", "tissue", "disease", "assay", "sex", "organism", "ethnicity", "age"]
    val |= {f"val/acc/{c}_ontology_term_id": rng.uniform(0.3, 1) * val["val/acc"] for c in classes}
    val |= {"val/knn/cell_type_ontology_term_id": val["val/acc"], "val/denoise": at / 1e6}
    frame = pd.concat([pd.DataFrame(train), pd.DataFrame(val)]).sort_values("step")
    frame.to_csv(root / "metrics.csv", index=False)
    (root / "summary.json").write_text(json.dumps({"run": "large", "steps": N_STEPS}))
    return root, qc


def test_report_of_1500_datasets_and_100000_steps_stays_legible_and_small(large_run):
    from scprint.report import datasets, training

    large_run, qc = large_run
    out = large_run / "out"
    run_report(
        datasets,
        ["--reports", *sorted(large_run.glob("dataset-*.json")),
         "--table", out / "table.html", "--cells", out / "cells.png", "--qc", out / "qc.png"],
    )  # fmt: skip
    datasets.plot_distributions(list(qc), list(qc.values()), out / "qc.png")
    run_report(
        training,
        ["--summary", large_run / "summary.json", "--metrics", large_run / "metrics.csv",
         "--curves", out / "curves.png", "--lr-throughput", out / "lr.png",
         "--table", out / "checkpoint.html"],
    )  # fmt: skip
    for png in ("cells.png", "qc.png", "curves.png", "lr.png"):
        check_figure(out / png)
    table = (out / "table.html").read_text()
    assert table.count("<tr") == N_DATASETS + 1 and "<script>" in table  # every row, sortable
    assert (out / "table.html").stat().st_size <= MAX_TABLE_BYTES
    items = sum(p.stat().st_size for p in out.iterdir())
    assert items * 4 / 3 <= MAX_REPORT_BYTES, items


def test_training_panels_group_metrics_by_name_and_show_one_name_per_metric():
    from scprint.report.training import metric_columns, panel_of

    frame = pd.DataFrame(
        columns=["step", "epoch", "train/loss", "val/loss", "val_loss", "train/emb_independence",
                 "val/acc", "val/acc/cell_type", "val/knn/cell_type", "val/denoise/reco2full",
                 "train/cells_per_s", "lr-AdamW", "train/expr"]
    )  # fmt: skip
    columns = metric_columns(frame)
    assert "val_loss" not in columns and "val/loss" in columns
    assert "train/emb_independence" in columns  # an underscore in a term is not an alias
    panels = {c: panel_of(c) for c in columns}
    assert panels["train/loss"] == panels["val/loss"] == "loss"
    assert panels["train/emb_independence"] == "loss/emb_independence"
    assert panels["train/expr"] == "loss/expr"  # a new term gets its own panel
    assert panels["val/acc"] == panels["val/acc/cell_type"] == "acc"
    assert panels["val/knn/cell_type"] == "knn" and panels["val/denoise/reco2full"] == "denoise"
    assert panels["train/cells_per_s"] is None and panels["lr-AdamW"] is None
