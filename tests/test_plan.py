"""`scprint plan`: the bill before the run, on the demo listing and a 1,500-dataset listing."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from scprint import plan
from scprint.data import listing

CONFIGS = [REPO / "config" / "base.yml", REPO / "config" / "pretrain_large.yml"]


def big_listing(path, n=1500):
    rows = [
        listing.DatasetRow(
            f"ds-{i:04d}", "t", ("NCBITaxon:10090",) if i % 3 == 0 else ("NCBITaxon:9606",),
            ("EFO:0009922",), 1_000 * (i + 1), f"http://127.0.0.1:9/{i}",
            None if i == 7 else 10**8, n_primary_cells=None if i == 7 else 500 * (i + 1),
        )
        for i in range(n)
    ]  # fmt: skip
    path.write_text(listing.format_listing(rows))
    return rows


def test_plan_of_a_1500_dataset_listing(tmp_path):
    rows = big_listing(tmp_path / "datasets.tsv")
    proc = run_cli(
        ["plan", "--listing", "datasets.tsv", *[f"--config={c}" for c in CONFIGS],
         "--out", "results/plan.json"],
        cwd=tmp_path,
    )  # fmt: skip
    bill = json.loads((tmp_path / "results" / "plan.json").read_text())
    cells = sum(r.n_cells for r in rows)
    assert bill["datasets"] == 1500 and bill["cells"] == cells
    assert bill["primary_cells"] == sum(r.n_primary_cells or 0 for r in rows) < cells / 2
    assert bill["datasets_without_primary_count"] == 1
    assert (
        "unique (primary) cells:" in proc.stdout and "+ 1 datasets that do not say" in proc.stdout
    )
    mouse = sum(r.n_cells for r in rows if r.organism == ("NCBITaxon:10090",))
    assert bill["cells_per_organism"] == {"NCBITaxon:10090": mouse, "NCBITaxon:9606": cells - mouse}
    # one row has no size: estimated from its cells (2,000 non-zeros, X and raw.X)
    expected = 1499 * 10**8 + 8_000 * 2_000 * 8 * 2
    assert bill["download_gb"] == pytest.approx(expected / 1e9, abs=0.01)
    assert bill["processed_gb"] == pytest.approx(expected / 2e9, abs=0.01)
    rate = bill["preprocess_rate"]
    assert "bench/results" in rate["from"]
    assert bill["preprocess_cpu_hours"] == pytest.approx(cells / rate["cells_per_s"] / 3600, 0.01)
    # pretrain_large: 30 epochs of 1M cells; the large model's measured GPU rate
    assert bill["train_cells"] == 30_000_000 and "large" in bill["train_rate"]["from"]
    assert bill["train_gpu_hours"] == pytest.approx(
        3e7 * bill["train_rate"]["ms_per_cell"] / 3.6e6, 0.01
    )
    big = bill["largest_dataset"]
    assert big["dataset"] == "ds-1499" and big["preprocess_mem_gb"] == pytest.approx(
        plan.preprocess_mem_mb(1_500_000) / 1000, abs=0.1
    )
    assert "GPU-hours" in proc.stdout and "ds-1499" in proc.stdout


def test_plan_of_the_demo_listing_and_max_steps(tmp_path):
    from scprint.data import demo

    demo.write_demo(tmp_path / "demo", n_genes=300, seed=0)
    rows = listing.rows_from_folder(tmp_path / "demo" / "datasets")
    (tmp_path / "datasets.tsv").write_text(listing.format_listing(rows))
    (tmp_path / "steps.yml").write_text("trainer:\n  max_steps: 1000\ndata:\n  batch_size: 16\n")
    bill = plan.plan(tmp_path / "datasets.tsv", [CONFIGS[0], tmp_path / "steps.yml"])
    assert bill["datasets"] == 4 and bill["cells"] == sum(r.n_cells for r in rows)
    assert set(bill["cells_per_organism"]) == {"NCBITaxon:9606", "NCBITaxon:10090"}
    assert bill["download_gb"] == pytest.approx(sum(r.size_bytes for r in rows) / 1e9, abs=0.01)
    assert bill["train_cells"] == 16_000 and "small" in bill["train_rate"]["from"]


def test_the_bill_counts_every_gpu_of_a_multi_node_train_job(tmp_path):
    """2 nodes x 4 GPUs: max_steps runs data.batch_size on each of the 8 ranks (8x the cells,
    8x the GPU-hours, the same wall time); an epoch's samples are split across the ranks
    (the same GPU-hours, an eighth of the wall time)."""
    big_listing(tmp_path / "datasets.tsv", n=3)
    (tmp_path / "steps.yml").write_text("trainer:\n  max_steps: 1000000\ndata:\n  batch_size: 16\n")
    steps = [CONFIGS[0], tmp_path / "steps.yml"]
    one = plan.plan(tmp_path / "datasets.tsv", steps)
    eight = plan.plan(tmp_path / "datasets.tsv", steps, nodes=2, gpus_per_node=4)
    assert (one["train_cells"], eight["train_cells"]) == (16_000_000, 128_000_000)
    assert eight["train_shape"] == {"nodes": 2, "gpus_per_node": 4, "gpus": 8}
    assert eight["train_wall_hours"] == one["train_wall_hours"] == one["train_gpu_hours"] > 0
    assert eight["train_gpu_hours"] == pytest.approx(8 * one["train_gpu_hours"], rel=1e-3)
    assert "x 8 GPUs" in eight["train_cells_how"]
    text = plan.render(eight)
    assert "on 2 node(s) x 4 GPU(s) = 8 GPUs" in text and "each GPU held throughout" in text

    epochs = plan.plan(tmp_path / "datasets.tsv", CONFIGS, nodes=2, gpus_per_node=4)
    alone = plan.plan(tmp_path / "datasets.tsv", CONFIGS)
    assert epochs["train_cells"] == alone["train_cells"] == 30_000_000
    assert epochs["train_gpu_hours"] == pytest.approx(alone["train_gpu_hours"], rel=1e-3)
    assert epochs["train_wall_hours"] == pytest.approx(alone["train_wall_hours"] / 8, rel=1e-3)


def test_plan_needs_the_training_config(tmp_path):
    big_listing(tmp_path / "datasets.tsv", n=3)
    proc = run_cli(["plan", "--listing", "datasets.tsv"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--config" in proc.stderr


def test_resources_grow_with_each_attempt():
    assert plan.preprocess_mem_mb(10**6, 2) == int(1.5 * plan.preprocess_mem_mb(10**6, 1))
    assert plan.preprocess_mem_mb(2 * 10**6) > plan.preprocess_mem_mb(10**5)
    assert plan.download_runtime_min(4 * 10**10, None, 2) == 2 * plan.download_runtime_min(
        4 * 10**10, None
    )
