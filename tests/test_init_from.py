"""init_from: a run starts from a checkpoint's weights, genes and classes reconciled with
its own data; then pre-training continues with a fresh optimizer and step.

In-process tests build both models by hand (real checkpoints, real parquet, real
Trainer); the last test goes through `scprint train-run` on the tiny laminDB collection
of test_fit, with a second gene-embeddings parquet that drops 20 of the checkpoint's
genes and adds 20 new ones.
"""

from __future__ import annotations

import json
import logging
import tempfile

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, cli_env, run_cli
from test_fit import THREADS, build_tiny_collection, load, write_gene_files
from torch.utils.data import DataLoader

from scprint.io import StageError
from scprint.model.init_from import init_from_checkpoint
from scprint.model.lightning import ScPrintModule
from scprint.trainer.trainer import TrainingMode

torch.set_num_threads(1)
SRC_GENES = [f"G{i}" for i in range(30)]
DST_GENES = [f"G{i}" for i in range(10, 40)]  # G0-G9 dropped, G30-G39 new
SRC_DECODERS = {"organism": {0: "NCBITaxon:9606"}, "cell_type": {0: "CL:1", 1: "CL:2", 2: "CL:3"}}


def build(genes, classes, decoders, parquet=None, seed=0, **kw) -> ScPrintModule:
    torch.manual_seed(seed)
    args = dict(
        genes=genes, classes=classes, label_decoders=decoders, gene_embeddings=parquet,
        gene_positions=list(range(1, len(genes) + 1)), d_model=16, nhead=2, nlayers=2,
        dropout=0.0,
    )  # fmt: skip
    return ScPrintModule(**{**args, **kw})


def save(model: ScPrintModule, path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def batches(genes: int, n=3, B=6, L_=12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.stack([torch.randperm(genes, generator=g)[:L_] for _ in range(B)]).int()
        x = torch.poisson(torch.rand(B, L_, generator=g) * 5)
        cls = torch.stack(
            [torch.zeros(B, dtype=torch.long), torch.randint(0, 3, (B,), generator=g)], 1
        )
        out.append({"x": x, "genes": idx, "class": cls, "depth": x.sum(1) + 1})
    return out


@pytest.fixture
def source_ckpt(tmp_path):
    src = build(SRC_GENES, {"organism": 1, "cell_type": 3}, SRC_DECODERS, seed=1)
    save(src, tmp_path / "src.ckpt")
    return src, tmp_path / "src.ckpt"


def parquet(tmp_path, genes) -> str:
    emb = np.random.default_rng(5).normal(size=(len(genes), 8)).astype(np.float32)
    path = tmp_path / "emb.parquet"
    pd.DataFrame(emb, index=pd.Index(genes), columns=[str(i) for i in range(8)]).to_parquet(path)
    return str(path)


def test_shared_genes_and_trunk_come_from_the_checkpoint_new_genes_from_the_parquet(
    source_ckpt, tmp_path, caplog
):
    src, path = source_ckpt
    decoders = {"organism": {0: "NCBITaxon:9606"}, "cell_type": {0: "CL:1", 1: "CL:2", 2: "CL:9"}}
    classes = {"organism": 1, "cell_type": 3, "tissue": 2}
    positions = list(range(40, 10, -1))  # other genomic ranks than the checkpoint's
    dst = build(
        DST_GENES, classes, decoders, parquet(tmp_path, DST_GENES), seed=2, gene_positions=positions
    )
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with caplog.at_level(logging.INFO):
        report = init_from_checkpoint(dst, path)
    s, d = src.state_dict(), dst.state_dict()
    # G10..G29: rows 10..29 in the checkpoint, rows 0..19 here; G30..G39 keep the rows this
    # run built from its parquet (pooled to d_model)
    table = "net.gene_encoder.embeddings.weight"
    assert d[table].shape == (30, 16)
    torch.testing.assert_close(d[table][:20], s[table][10:])
    torch.testing.assert_close(d[table][20:], before[table][20:])
    assert not torch.equal(before[table][:20], d[table][:20])
    trunk = [
        k for k in s
        if k.startswith(("net.transformer.", "net.expr_", "net.depth_encoder.", "net.mvc"))
    ]  # fmt: skip
    assert len(trunk) > 10 and any(".mixer.Wqkv." in k for k in trunk)
    for key in trunk:
        torch.testing.assert_close(d[key], s[key], msg=key)
    # genomic positions: this collection's ranks, not the checkpoint's
    pe = "net.pos_encoder.pe"
    assert not torch.equal(before[pe], s[pe][10:])
    torch.testing.assert_close(d[pe], before[pe])
    # organism: same labels -> head kept; cell_type: CL:3 became CL:9 -> fresh; tissue: new
    for key in [k for k in s if k.startswith("net.cls_decoders.organism.")]:
        torch.testing.assert_close(d[key], s[key])
    fresh = [
        k for k in d if k.startswith(("net.cls_decoders.cell_type.", "net.cls_decoders.tissue."))
    ]
    assert len(fresh) >= 4
    for key in fresh:
        torch.testing.assert_close(d[key], before[key])
    # start tokens [cell, organism, cell_type, tissue] (depth has its own encoder): the
    # tissue token is new, the others the checkpoint's
    tokens = "net.class_encoder.embedding.weight"
    src_tok, tok = s[tokens], d[tokens]
    assert src_tok.shape == (3, 16) and tok.shape == (4, 16)
    torch.testing.assert_close(tok[:3], src_tok)
    torch.testing.assert_close(tok[3], before[tokens][3])
    assert report["genes"] == {
        "shared": 20, "new": 10, "dropped": 10, "dropped_first": [f"G{i}" for i in range(10)],
    }  # fmt: skip
    assert report["classes"]["kept"] == ["organism"]
    assert set(report["classes"]["reinitialised"]) == {"cell_type", "tissue"}
    text = caplog.text
    assert "10 of the checkpoint's genes are not in this collection (first: G0, G1" in text
    assert "class head cell_type re-initialised: other leaf labels" in text
    assert "class head tissue re-initialised: not in the checkpoint" in text


def test_training_continues_with_a_fresh_optimizer_and_step(source_ckpt, tmp_path):
    _, path = source_ckpt
    dst = build(
        DST_GENES, {"organism": 1, "cell_type": 3}, SRC_DECODERS, parquet(tmp_path, DST_GENES)
    )
    init_from_checkpoint(dst, path)
    start = dst.net.transformer.blocks[0].mixer.Wqkv.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainingMode(lr=1e-2, warmup_duration=0)],
    )  # fmt: skip
    trainer.fit(dst, DataLoader(batches(len(DST_GENES)), batch_size=None))
    assert trainer.global_step == 3
    assert not torch.equal(start, dst.net.transformer.blocks[0].mixer.Wqkv.weight)  # trained
    adam = trainer.optimizers[0].state_dict()["state"]
    assert {int(v["step"]) for v in adam.values()} == {3}  # a new optimizer, from step 0


def test_a_checkpoint_of_another_size_or_vocabulary_is_refused(source_ckpt, tmp_path):
    _, path = source_ckpt
    wide = build(DST_GENES, {"organism": 1, "cell_type": 3}, SRC_DECODERS, d_model=32)
    with pytest.raises(StageError, match=r"net\..* is \(.*\) in the checkpoint.*d_model"):
        init_from_checkpoint(wide, path)
    deeper = build(DST_GENES, {"organism": 1, "cell_type": 3}, SRC_DECODERS, nlayers=3)
    with pytest.raises(
        StageError, match=r"net\.transformer\.blocks\.2\..* only in this model.*nlayers"
    ):
        init_from_checkpoint(deeper, path)
    heads = build(DST_GENES, {"organism": 1, "cell_type": 3}, SRC_DECODERS, nhead=4)
    with pytest.raises(StageError, match="nhead=2, this model 4"):
        init_from_checkpoint(heads, path)  # same shapes, other attention: refused by name
    other = build([f"X{i}" for i in range(30)], {"organism": 1}, {})
    with pytest.raises(StageError, match="shares no gene"):
        init_from_checkpoint(other, path)
    with pytest.raises(StageError, match="no such checkpoint"):
        init_from_checkpoint(other, tmp_path / "nope.ckpt")


def test_an_upstream_checkpoint_goes_through_the_importer_in_a_temp_file(tmp_path, monkeypatch):
    """An upstream-style .ckpt is read by scprint convert's importer (not ours), which
    writes into a temporary directory that is gone afterwards, even when it refuses."""
    ckpt = {
        "state_dict": {"transformer.blocks.0.x": torch.zeros(1)},
        "hyper_parameters": {"genes": ["G1"]},
    }
    torch.save(ckpt, tmp_path / "upstream.ckpt")
    model = build(DST_GENES, {"organism": 1}, {})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(StageError, match="does not map onto this network"):
        init_from_checkpoint(model, tmp_path / "upstream.ckpt")
    assert list(tmp.iterdir()) == []


# ---- through `scprint train-run` on a laminDB collection --------------------------------
def test_train_run_init_from_reconciles_genes_and_trains(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("init_from")
    info = build_tiny_collection(workdir)
    write_gene_files(workdir, info["genes"])  # embeddings for genes[:180]
    env = cli_env(workdir, **THREADS)
    common = [
        "--collection", "results/collection.json",
        "--gene-positions", "data/main/gene_positions.parquet",
        "--config", REPO / "config/base.yml", "--config", REPO / "config/pretrain_small.yml",
        "--", "--data.max_len", "32", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.weight_scaler", "0", "--data.validation_split", "0.3",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", "logs/csv", "--wandblog", "null",
        "--model.d_model", "32", "--model.nlayers", "1", "--model.nhead", "2",
        "--trainer.max_steps", "2",
    ]  # fmt: skip
    run_cli(
        ["train-run", "--run", "src", "--gene-embeddings", "data/main/gene_embeddings.parquet",
         "--checkpoint-dir", "checkpoints/src", "--summary", "results/train/src.json", *common],
        cwd=workdir, env=env,
    )  # fmt: skip
    # a second parquet: genes[20:200] with other vectors: 20 dropped, 20 new, 160 shared
    genes = info["genes"][20:]
    emb = np.random.default_rng(9).normal(size=(len(genes), 16)).astype(np.float32)
    pd.DataFrame(emb, index=pd.Index(genes), columns=[str(i) for i in range(16)]).to_parquet(
        workdir / "data/main/emb2.parquet"
    )
    run_cli(
        ["train-run", "--run", "dst", "--gene-embeddings", "data/main/emb2.parquet",
         "--checkpoint-dir", "checkpoints/dst", "--summary", "results/train/dst.json",
         "--init-from", "checkpoints/src/last.ckpt", *common],
        cwd=workdir, env=env,
    )  # fmt: skip
    summary = json.loads((workdir / "results/train/dst.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    report = summary["init_from"]
    assert report["genes"] == {
        "shared": 160, "new": 20, "dropped": 20, "dropped_first": info["genes"][:10],
    }  # fmt: skip
    assert report["classes"]["reinitialised"] == {}  # same collection, same labels
    src, dst = (
        load(workdir / "checkpoints/src/last.ckpt"),
        load(workdir / "checkpoints/dst/last.ckpt"),
    )
    table_src, table_dst = (
        src["state_dict"]["net.gene_encoder.embeddings.weight"],
        dst["state_dict"]["net.gene_encoder.embeddings.weight"],
    )
    # frozen table: after training, shared genes still hold the checkpoint's rows, new ones
    # the parquet's, pooled to d_model (32) as the network does at build
    torch.testing.assert_close(table_dst[:160], table_src[20:180])
    pooled = torch.nn.AdaptiveAvgPool1d(32)(torch.from_numpy(emb[160:]))
    torch.testing.assert_close(table_dst[160:], pooled)
    assert dst["optimizer_states"][0]["state"]  # trained, from a fresh optimizer
    assert {int(s["step"]) for s in dst["optimizer_states"][0]["state"].values()} == {2}
    # validation metrics of each loop are in the summary, and label names in the checkpoint
    (loop,) = summary["validation"]
    assert loop["step"] == 2 and loop["n_cells"] > 0
    for key in ["acc/cell_type_ontology_term_id", "knn/cell_type_ontology_term_id", "denoise"]:
        assert loop[key] is not None, key
        assert -1.0 <= loop[key] <= 1.0
    assert "val/acc" in summary["final_losses"]
    names = dst["scprint"]["label_decoders"]["cell_type_ontology_term_id"]
    assert set(names.values()) >= {"CL:0000624", "CL:0000625", "CL:0000236", "CL:0000084"}


def test_workflow_train_init_from_reaches_train_run(tmp_path):
    """train.init_from in the workflow config: an input of the train rule (a missing file
    is named before anything runs) and `--init-from` on its command line."""
    import yaml
    from test_workflow import make_workdir, snakemake

    workdir = make_workdir(tmp_path)
    config = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    config["train"]["init_from"] = "published/start.ckpt"
    (workdir / "config" / "init.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "-n", "--configfile=config/init.yaml", "all", check=False)
    assert proc.returncode != 0 and "published/start.ckpt" in proc.stdout + proc.stderr
    (workdir / "published").mkdir()
    (workdir / "published" / "start.ckpt").write_bytes(b"x")
    proc = snakemake(workdir, "-n", "-p", "--configfile=config/init.yaml", "all")
    assert "--init-from published/start.ckpt" in proc.stdout


# ---- from an upstream scPRINT 2.3.8 .ckpt (the real PyPI package, in its own venv) ------
def test_init_from_an_upstream_checkpoint_end_to_end(tmp_path_factory, tmp_path, monkeypatch):
    """A tiny upstream model saved by upstream's own code (tests/upstream, the seed venv;
    skips without it unless SCPRINT_REQUIRE_UPSTREAM=1) starts a run whose collection
    shares 40 of its 60 genes, lists its classes in the other order and names the
    organisms differently: imported through scprint convert in a temporary directory
    that is removed, then reconciled as a checkpoint of ours. ~30 s (one upstream process)."""
    from test_upstream_convert import build as build_upstream

    up = build_upstream(tmp_path_factory, "docs")
    ref = torch.load(up / "upstream.ckpt", weights_only=True)["state_dict"]
    genes = [f"ENSG{i:011d}" for i in range(20, 80)]  # upstream's 20..59 + 20 new
    cell_type, organism = "cell_type_ontology_term_id", "organism_ontology_term_id"
    classes = {organism: 2, cell_type: 5}  # upstream: [cell_type, organism]
    decoders = {
        cell_type: {i: f"{cell_type}:{i}" for i in range(5)},  # upstream's names
        organism: {0: "NCBITaxon:9606", 1: "NCBITaxon:10090"},  # upstream's are "...:0/1"
    }
    model = build(
        genes, classes, decoders, parquet(tmp_path, genes), d_model=32, nhead=4, nlayers=2,
        layers_cls=[16], mvc_decoder="inner product", dropout=0.1,
        labels_hierarchy={cell_type: {5: [0, 1], 6: [2, 3, 4]}},
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    report = init_from_checkpoint(model, up / "upstream.ckpt")
    assert list(tmp.iterdir()) == []  # the imported copy is gone
    d = {k[4:]: v for k, v in model.state_dict().items()}
    assert report["format"] == "upstream scPRINT"
    assert report["genes"] == {
        "shared": 40, "new": 20, "dropped": 20,
        "dropped_first": [f"ENSG{i:011d}" for i in range(10)],
    }  # fmt: skip
    table = "gene_encoder.embeddings.weight"
    torch.testing.assert_close(d[table][:40], ref[table][20:])
    torch.testing.assert_close(d[table][40:], before["net." + table][40:])
    blocks = [k for k in ref if k.startswith(("transformer.", "mvc_decoder.", "expr_"))]
    assert any(".mixer.Wqkv." in k for k in blocks)
    for key in blocks:
        torch.testing.assert_close(d[key], ref[key], msg=key)
    torch.testing.assert_close(d["pos_encoder.pe"], before["net.pos_encoder.pe"])
    assert report["classes"]["kept"] == [cell_type]
    assert list(report["classes"]["reinitialised"]) == [organism]
    for key in [k for k in ref if k.startswith(f"cls_decoders.{cell_type}.")]:
        torch.testing.assert_close(d[key], ref[key], msg=key)
    # start tokens: upstream [cell, cell_type, organism] -> here [cell, organism, cell_type]
    tokens = "class_encoder.embedding.weight"
    torch.testing.assert_close(d[tokens], ref[tokens][[0, 2, 1]])
    with torch.no_grad():  # and it runs
        out = model.net(torch.arange(12).reshape(2, 6), torch.rand(2, 6) * 5)
    assert torch.isfinite(out["mean"]).all()
