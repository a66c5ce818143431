"""Validation metrics (scprint.model.metrics) and the ValidationMetrics callback under a
real Lightning Trainer, on in-memory batches whose cell types have distinct profiles."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader

from scprint.model import metrics
from scprint.model.lightning import ScPrintModule
from scprint.model.losses import label_sets
from scprint.trainer.trainer import TrainingMode
from scprint.trainer.validation import ValidationMetrics

torch.set_num_threads(1)
N_GENES = 40
CLASSES = {"organism": 1, "cell_type": 3}
HIERARCHY = {"cell_type": {3: [0, 1]}}  # code 3 ("T cell") stands for leaves 0 and 1
DECODERS = {
    "organism": {-1: "unknown", 0: "NCBITaxon:9606"},
    "cell_type": {
        -1: "unknown",
        0: "CL:0000624",
        1: "CL:0000625",
        2: "CL:0000236",
        3: "CL:0000084",
    },
}


# ---- the metrics alone ----------------------------------------------------------------
def test_hierarchical_accuracy_counts_leaves_under_a_true_parent_and_is_macro():
    sets = label_sets(3, {3: [0, 1]})
    true = torch.tensor([0, 0, 0, 0, 2, 3, 3, -1])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])
    # label 0: 4/4, label 2: 0/1, label 3 (parent of 0, 1): 1/2; unknown not counted
    assert metrics.hierarchical_accuracy(pred, true, sets) == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics.hierarchical_accuracy(torch.tensor([0, 0, 0, 0, 2, 1, 0, 2]), true, sets) == 1.0
    assert math.isnan(metrics.hierarchical_accuracy(pred[:1], torch.tensor([-1]), sets))


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.poisson(torch.full((500,), 1.5), generator=g)  # many ties
    b = a + torch.poisson(torch.full((500,), 1.0), generator=g)
    expected = spearmanr(a.numpy(), b.numpy()).statistic
    assert metrics.spearman(a, b) == pytest.approx(expected, abs=1e-9)


def test_denoise_score_rewards_a_reconstruction_closer_to_the_full_counts():
    g = torch.Generator().manual_seed(0)
    full = torch.poisson(torch.rand(20, 30, generator=g) * 8, generator=g)
    noisy = torch.binomial(full, torch.full_like(full, 0.4), generator=g)
    perfect = metrics.denoise_score(full * 2.0, noisy, full)
    assert perfect["reco2full"] == pytest.approx(1.0)
    assert 0 < perfect["noisy2full"] < 1 and perfect["score"] > 0
    useless = metrics.denoise_score(torch.rand(20, 30, generator=g), noisy, full)
    assert useless["score"] < 0 < perfect["score"]


def test_knn_accuracy_separated_clusters_vs_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(30)
    centers = torch.randn(3, 8, generator=g) * 5
    emb = centers[labels] + torch.randn(90, 8, generator=g)
    assert metrics.knn_accuracy(emb, labels, k=5, chunk=7) == 1.0
    shuffled = labels[torch.randperm(90, generator=g)]
    assert metrics.knn_accuracy(emb, shuffled, k=5) < 0.6
    assert math.isnan(metrics.knn_accuracy(emb[:1], labels[:1]))


# ---- the callback under a Trainer -------------------------------------------------------
def batches(n=3, B=8, L_=20, seed=0) -> list[dict]:
    """Cell type t expresses its own genes; ~1/5 of cells carry the parent label (3)."""
    g = torch.Generator().manual_seed(seed)
    profiles = torch.rand(3, N_GENES, generator=g) ** 4 * 20
    out = []
    for _ in range(n):
        types = torch.randint(0, 3, (B,), generator=g)
        genes = torch.stack([torch.randperm(N_GENES, generator=g)[:L_] for _ in range(B)])
        x = torch.poisson(profiles[types[:, None], genes], generator=g)
        label = torch.where(torch.rand(B, generator=g) < 0.2, torch.where(types < 2, 3, 2), types)
        cls = torch.stack([torch.zeros(B, dtype=torch.long), label], 1)
        out.append({"x": x, "genes": genes.int(), "class": cls, "depth": x.sum(1)})
    return out


def module(seed=0, **kw) -> ScPrintModule:
    """A tiny model whose cell tokens depend on the cell. At upstream's init (Linear weights
    N(0, 0.02)) the class tokens stay their start vectors: every cell gets the same
    embedding up to float rounding (cosine distances ~1e-7, exact ties), and kNN would
    measure the rounding. Wider trunk weights (N(0, 0.2)) make it measure the cells."""
    torch.manual_seed(seed)
    model = ScPrintModule(
        genes=[f"G{i}" for i in range(N_GENES)], classes=CLASSES, labels_hierarchy=HIERARCHY,
        label_decoders=DECODERS, gene_positions=list(range(1, N_GENES + 1)), d_model=16,
        nhead=2, nlayers=1, dropout=0.0, **kw,
    )  # fmt: skip
    with torch.no_grad():
        for lin in model.net.transformer.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.normal_(0.0, 0.2)
    return model


def validate(model, cb: ValidationMetrics, data=None) -> dict:
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainingMode(), cb],
    )  # fmt: skip
    trainer.validate(model, DataLoader(data or batches(), batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def force_cell_type(model: ScPrintModule, leaf: int) -> None:
    """The cell-type head answers ``leaf`` for every cell (last Linear: 0 weights, bias)."""
    head = model.net.cls_decoders["cell_type"]
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-5.0)
        last.bias[leaf] = 5.0


def test_validation_logs_every_metric_in_range_and_keeps_history():
    cb = ValidationMetrics(knn_k=3, knn_class="cell_type")
    logged = validate(module(), cb)
    for key in ["val/acc/organism", "val/acc/cell_type", "val/acc", "val/knn/cell_type"]:
        assert 0.0 <= logged[key] <= 1.0, key
    assert logged["val/acc/organism"] == 1.0  # one organism: a single leaf is always right
    assert -2.0 <= logged["val/denoise"] <= 2.0
    assert logged["val/denoise"] == pytest.approx(
        logged["val/denoise/reco2full"] - logged["val/denoise/noisy2full"]
    )
    assert 0 < logged["val/denoise/noisy2full"] < 1  # downsampled counts still rank-correlate
    (row,) = cb.history
    assert row["n_cells"] == 24 and row["step"] == 0
    assert row["acc/cell_type"] == pytest.approx(logged["val/acc/cell_type"])


def test_accuracy_responds_to_the_classifier():
    data = batches()
    labels = torch.cat([b["class"][:, 1] for b in data])
    right = [
        {**b, "class": torch.stack([b["class"][:, 0], torch.where(b["class"][:, 1] == 2, 2, 3)], 1)}
        for b in data
    ]  # every label is B cell (2) or "T cell" (3, a parent of leaves 0 and 1)
    model = module()
    force_cell_type(model, 0)  # always CD4 T: right for every "T cell", wrong for B cells
    acc = validate(model, ValidationMetrics(denoise_cells=0), right)["val/acc/cell_type"]
    assert acc == pytest.approx(0.5)  # macro over the two labels: 1.0 and 0.0
    only_t = [
        {**b, "class": torch.stack([b["class"][:, 0], torch.full_like(b["class"][:, 1], 3)], 1)}
        for b in data
    ]
    assert validate(model, ValidationMetrics(denoise_cells=0), only_t)["val/acc/cell_type"] == 1.0
    force_cell_type(model, 2)
    assert validate(model, ValidationMetrics(denoise_cells=0), only_t)["val/acc/cell_type"] == 0.0
    random = validate(module(), ValidationMetrics(denoise_cells=0), data)["val/acc/cell_type"]
    assert 0.0 <= random < 1.0 and labels.unique().numel() == 4


def test_knn_reads_the_modules_cell_embedding_as_upstream_predictions():
    """kNN runs on ScPrintModule.cell_embedding (the mean of the pred_embedding classes'
    tokens, upstream's validation embedding), not on the network's mean of all tokens."""
    data = batches(n=4, B=6)
    for chosen in (None, ["cell_type"]):
        model = module(pred_embedding=chosen)
        logged = validate(model, ValidationMetrics(knn_k=3, knn_class="cell_type"), data)
        with torch.no_grad():
            states = [model.net.encode(b["genes"].long(), b["x"], b["depth"])[0] for b in data]
        labels = torch.cat([b["class"][:, 1] for b in data])
        labels = labels.masked_fill(labels >= 3, -1)  # leaves only: the parent code 3 is out
        expected = {
            name: metrics.knn_accuracy(torch.cat([f(s) for s in states]), labels, k=3)
            for name, f in [("module", model.cell_embedding), ("net", model.net.cell_embedding)]
        }
        assert expected["module"] != expected["net"]  # the two embeddings tell apart
        assert logged["val/knn/cell_type"] == pytest.approx(expected["module"])


def test_denoise_noise_is_seeded_and_reconstruction_depends_on_the_model():
    a = validate(module(0), ValidationMetrics(max_cells=0, denoise_cells=16))
    b = validate(module(1), ValidationMetrics(max_cells=0, denoise_cells=16))
    assert "val/acc" not in a  # max_cells=0: accuracy and kNN off, denoising still on
    assert a["val/denoise/noisy2full"] == b["val/denoise/noisy2full"]  # same noise
    assert a["val/denoise/reco2full"] != b["val/denoise/reco2full"]


def test_max_cells_bounds_what_is_kept():
    cb = ValidationMetrics(max_cells=10, denoise_cells=3)
    validate(module(), cb)
    assert cb.history[0]["n_cells"] == 10
    assert 0 < cb.history[0]["n_denoise_entries"] <= 3 * 20


def test_predictions_carry_label_names_and_checkpoint_keeps_them(tmp_path):
    model = module()
    force_cell_type(model, 2)
    out = model.predict_step(batches(n=1)[0], 0)
    assert out["pred/cell_type/name"] == ["CL:0000236"] * 8
    assert out["pred/organism/name"] == ["NCBITaxon:9606"] * 8
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = ScPrintModule.load(tmp_path / "m.ckpt")
    assert reloaded.hparams.label_decoders == DECODERS
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["scprint"]["label_decoders"]["cell_type"][3] == "CL:0000084"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="noise"):
        ValidationMetrics(noise=1.5)
    with pytest.raises(ValueError, match="max_cells"):
        ValidationMetrics(max_cells=-1)


def test_ddp_ranks_gather_all_cells_and_agree_with_one_process(tmp_path):
    """2 CPU processes (DDP, gloo) each validate half of the batches: after the gather both
    ranks hold every cell and log the values a single process logs."""
    probe = Path(__file__).with_name("validation_ddp_probe.py")
    for devices in (1, 2):
        out = tmp_path / str(devices)
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, str(probe), str(out), str(devices)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp_path / "1" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]
    (row,) = single["history"]
    (ddp_row,) = ranks[0]["history"]
    assert ddp_row["n_cells"] == row["n_cells"] == 24  # every rank sees all 4 x 6 cells
    assert ddp_row["n_denoise_entries"] == row["n_denoise_entries"]
    for key, value in row.items():
        assert ddp_row[key] == pytest.approx(value, abs=1e-6), key
    for key in ["val/acc/cell_type", "val/knn/cell_type", "val/denoise"]:
        assert ranks[1]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)


# key -> changed value: each changes what a validation loop reports
VALIDATION_KEYS = {
    "max_cells": 12,
    "denoise_cells": 5,
    "noise": 0.3,
    "knn_k": 1,
    "knn_class": "organism",
    "before_training": True,  # test_before_training_validates_the_untrained_model_once
}


def test_every_validation_key_is_covered():
    import inspect

    assert set(inspect.signature(ValidationMetrics).parameters) == set(VALIDATION_KEYS)


@pytest.mark.parametrize("key", [k for k in VALIDATION_KEYS if k != "before_training"])
def test_validation_key_changes_the_report(key):
    base = dict(knn_class="cell_type", knn_k=5)
    default, changed = (
        ValidationMetrics(**base),
        ValidationMetrics(**{**base, key: VALIDATION_KEYS[key]}),
    )
    validate(module(), default)
    validate(module(), changed)
    assert default.history[0] != changed.history[0]


def fit_validated(steps, before_training=False, ckpt_path=None):
    """A short fit that validates after every step: (trainer, its ValidationMetrics, model)."""
    cb = ValidationMetrics(knn_class="cell_type", knn_k=3, before_training=before_training)
    trainer = L.Trainer(
        max_steps=steps, val_check_interval=1, num_sanity_val_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TrainingMode(lr_reduce_monitor=None), cb],
    )  # fmt: skip
    data = DataLoader(batches(n=2), batch_size=None)
    model = module()
    trainer.fit(model, data, data, ckpt_path=ckpt_path)
    return trainer, cb, model


def test_before_training_validates_the_untrained_model_once(tmp_path):
    """before_training: one loop at step 0 on the untrained weights (the values a
    validation of the fresh module gives), logged like the scheduled ones; a resumed run
    does not repeat it, and training goes on as without it."""
    untrained = ValidationMetrics(knn_class="cell_type", knn_k=3)
    validate(module(), untrained, batches(n=2))
    trainer, cb, model = fit_validated(2, True)
    assert [row["step"] for row in cb.history] == [0, 1, 2]
    assert {**cb.history[0], "epoch": 0} == {**untrained.history[0], "epoch": 0}
    assert model.training  # handed back in train mode
    _, plain, plain_model = fit_validated(2, False)
    assert [row["step"] for row in plain.history] == [1, 2]
    assert cb.history[1:] == plain.history  # the same training after the extra loop
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    _, resumed, _ = fit_validated(3, True, tmp_path / "state.ckpt")
    assert [row["step"] for row in resumed.history] == [0, 1, 2, 3]


def test_history_survives_a_resume(tmp_path):
    """A resumed run (ckpt_path) keeps the metrics of the loops before the interruption."""
    trainer, first, _ = fit_validated(2)
    assert [row["step"] for row in first.history] == [1, 2]  # sanity check not measured
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    _, resumed, _ = fit_validated(3, ckpt_path=tmp_path / "state.ckpt")
    assert [row["step"] for row in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history
