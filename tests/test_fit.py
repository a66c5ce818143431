"""`scprint fit` and `scprint train-run` end to end on a real tiny laminDB collection.

Every training run is a subprocess (laminDB settings are read once per process). The
collection comes from ``build_tiny_collection``; swap that function for the real
ontologies/preprocess/collection stages once they exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, cli_env, run_cli

from scprint.embeddings.positions import rank_genes

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent
N_GENES = 200
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores: no contention


def build_tiny_collection(workdir: Path, key: str = "tiny") -> dict:
    """laminDB instance + bionty records + two tiny preprocessed h5ad + one collection.

    Returns the collection description (results/collection.json format, plus "genes").
    """
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=workdir)
    proc = subprocess.run(
        [
            sys.executable,
            str(TESTS / "tiny_collection.py"),
            str(workdir),
            key,
            str(N_GENES),
        ],
        cwd=workdir,
        env=cli_env(workdir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    (workdir / "results").mkdir(exist_ok=True)
    (workdir / "results" / "collection.json").write_text(
        json.dumps({k: v for k, v in info.items() if k != "genes"})
    )
    return info


def write_gene_files(workdir: Path, genes: list[str]) -> tuple[Path, Path]:
    """Embeddings for 180 of the 200 genes (the model's vocabulary is their intersection)
    and positions on 4 chromosomes, 8 kb apart."""
    main = workdir / "data" / "main"
    main.mkdir(parents=True, exist_ok=True)
    index = pd.Index(genes[:180], name="ensembl_gene_id")
    emb = np.random.default_rng(0).normal(size=(180, 16)).astype(np.float32)
    pd.DataFrame(emb, index=index, columns=[str(i) for i in range(16)]).to_parquet(
        main / "gene_embeddings.parquet"
    )
    coords = pd.DataFrame(
        {
            "ensembl_gene_id": genes,
            "chrom": [str(1 + i // 50) for i in range(len(genes))],
            "start": [(i % 50) * 8000 for i in range(len(genes))],
            "end": [(i % 50) * 8000 + 500 for i in range(len(genes))],
        }
    )
    pos = rank_genes(coords, tolerance=10_000).set_index("ensembl_gene_id")  # one rank a chrom
    pos.insert(0, "organism", "NCBITaxon:9606")
    pos.to_parquet(main / "gene_positions.parquet")
    return main / "gene_embeddings.parquet", main / "gene_positions.parquet"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fit")
    info = build_tiny_collection(path)
    write_gene_files(path, info["genes"])
    return path


def small_run_args(ckpt_dir: str) -> list[str]:
    """What makes the seed's configs fit a 110-cell collection in seconds."""
    return [
        "--data.collection_name", "tiny",
        "--data.gene_embeddings", "data/main/gene_embeddings.parquet",
        "--data.gene_positions", "data/main/gene_positions.parquet",
        "--data.max_len", "48",
        "--data.batch_size", "8",
        "--data.num_workers", "0",
        "--data.sampler_workers", "1",
        "--data.n_samples_per_epoch", "200",
        "--data.validation_split", "0.2",
        "--trainer.val_check_interval", "4",
        "--trainer.limit_val_batches", "2",
        "--checkpoint.dirpath", ckpt_dir,
    ]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fit_with_the_seed_configs_on_a_tiny_collection(workdir, tmp_path):
    """The seed's command shape: base + size yaml, overrides, W&B offline by default. The
    pre-training docs' SWA callback (swa_lrs 0.03) is kept but warned about: it would raise
    the lr 300x at swa_epoch_start."""
    docs_swa = tmp_path / "swa.yml"
    docs_swa.write_text(
        "trainer:\n  callbacks+:\n"
        "    - class_path: lightning.pytorch.callbacks.StochasticWeightAveraging\n"
        "      init_args:\n        swa_lrs: 0.03\n"
    )
    proc = run_cli(
        [
            "fit",
            "--config",
            REPO / "config/base.yml",
            "--config",
            REPO / "config/pretrain_small.yml",
            "--config",
            docs_swa,
            "--trainer.max_steps",
            "5",
            "--model.nhead",
            "8",
            "--scprint_training.name",
            "o2uniqsx",
            "--trainer.strategy",
            "auto",
            *small_run_args("ckpt_fit"),
        ],  # fmt: skip
        cwd=workdir,
        env=cli_env(workdir, **THREADS),
    )
    ckpt = load(workdir / "ckpt_fit" / "last.ckpt")
    assert ckpt["global_step"] == 5
    hp = ckpt["hyper_parameters"]
    assert (hp["d_model"], hp["nlayers"], hp["nhead"]) == (128, 4, 8)  # small yaml + override
    genes = pd.read_parquet(workdir / "data/main/gene_embeddings.parquet").index.tolist()
    assert ckpt["scprint"]["genes"] == genes  # vocabulary = embedded genes, gene-table order
    assert ckpt["scprint"]["classes"]["cell_type_ontology_term_id"] == 3
    # parents get codes after the 3 leaves: "T cell" covers CD4/CD8 T, "cell" all three
    tree = ckpt["scprint"]["labels_hierarchy"]["cell_type_ontology_term_id"]
    assert set(tree) == {3, 4} and sorted(len(v) for v in tree.values()) == [2, 3]
    # tolerance 10 kb: genes 8 kb apart on one chromosome share a rank; 4 chromosomes -> 4 ranks
    assert sorted(set(hp["gene_positions"])) == [0, 1, 2, 3]
    assert ckpt["scprint"]["config"]["scprint_training"]["name"] == "o2uniqsx"
    assert ckpt["scprint"]["config"]["data"]["collection_name"] == "tiny"
    runs = list((workdir / "logs/wandb/wandb").glob("offline-run-*"))
    assert runs, "W&B should have logged offline"
    assert "TrainingMode" in ckpt["callbacks"]
    assert "StochasticWeightAveraging" in ckpt["callbacks"]  # the docs' callback acts
    assert "StochasticWeightAveraging(swa_lrs=0.03)" in proc.stderr
    assert "(300x scprint_training.lr=0.0001)" in proc.stderr


TRAIN_RUN_ARGS = [
    "train-run", "--run", "tinyrun", "--collection", "results/collection.json",
    "--gene-embeddings", "data/main/gene_embeddings.parquet",
    "--gene-positions", "data/main/gene_positions.parquet",
    "--checkpoint-dir", "checkpoints/tinyrun", "--summary", "results/train/tinyrun.json",
    "--config", REPO / "config/base.yml", "--config", REPO / "config/pretrain_small.yml",
    "--", "--data.max_len", "48", "--data.batch_size", "8", "--data.num_workers", "0",
    "--data.weight_scaler", "0", "--data.validation_split", "0.2",
    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.save_dir", "logs/csv", "--wandblog", "null",
    "--scprint_training.warmup_duration", "2",
]  # fmt: skip


def test_train_run_writes_summary_and_resumes(workdir):
    args = TRAIN_RUN_ARGS
    env = cli_env(workdir, **THREADS)
    run_cli([*args, "--trainer.max_steps", "3"], cwd=workdir, env=env)
    first = json.loads((workdir / "results/train/tinyrun.json").read_text())
    assert first["steps"] == 3 and first["resumed_from"] is None
    assert Path(first["checkpoint"]).name == "last.ckpt"
    assert "train/loss" in first["final_losses"] and "val_loss" in first["final_losses"]
    assert first["config"]["data"]["collection_name"] == "tiny"
    assert (workdir / "logs/csv/tinyrun").is_dir()  # run name -> logger run name
    state = load(workdir / "checkpoints/tinyrun/last.ckpt")
    assert state["lr_schedulers"][0]["last_epoch"] == 1  # ReduceLROnPlateau: one validation

    # Snakemake deletes a job's outputs before rerunning it: the resume point must survive
    (workdir / "checkpoints/tinyrun/last.ckpt").unlink()
    (workdir / "results/train/tinyrun.json").unlink()
    run_cli([*args, "--trainer.max_steps", "6"], cwd=workdir, env=env)
    second = json.loads((workdir / "results/train/tinyrun.json").read_text())
    assert second["steps"] == 6
    assert second["resumed_from"].endswith("checkpoints/tinyrun/state/last.ckpt")
    state = load(workdir / "checkpoints/tinyrun/last.ckpt")
    assert state["global_step"] == 6
    assert state["lr_schedulers"][0]["last_epoch"] == 2  # once per validation, continued
    adam_steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6}  # optimizer state carried over, not restarted


def test_train_run_refuses_to_resume_under_a_changed_config(workdir):
    """After the 6-step run above: a new learning rate is refused (keys listed, how to start
    afresh, nothing written); named with --resume-anyway it resumes. max_steps alone
    (above: 3 -> 6) is safe to change."""
    state = workdir / "checkpoints/tinyrun/state/last.ckpt"
    if not state.exists():
        pytest.fail("run test_train_run_writes_summary_and_resumes first")
    summary = workdir / "results/train/tinyrun.json"
    summary.unlink()
    before = state.read_bytes()
    env = cli_env(workdir, **THREADS)
    changed = [*TRAIN_RUN_ARGS, "--trainer.max_steps", "7", "--scprint_training.lr", "0.01"]
    changed += ["--model.nlayers", "1"]
    proc = run_cli(changed, cwd=workdir, env=env, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr[proc.stderr.index("error: cannot resume from") :]
    listed = error.split("Fix:")[0]
    assert "the config changed" in listed
    assert "scprint_training.lr: 0.0001 -> 0.01" in listed  # base.yml's lr
    assert "model.nlayers: 4 -> 1" in listed  # Lightning would load the old shape silently
    assert "trainer.max_steps" not in listed  # safe to change: not listed
    assert "delete checkpoints/tinyrun/state" in proc.stderr and "--resume-anyway" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert state.read_bytes() == before and not summary.exists()

    split = TRAIN_RUN_ARGS.index("--")
    anyway = [*TRAIN_RUN_ARGS[:split], "--resume-anyway", "scprint_training.lr"]
    anyway += [*TRAIN_RUN_ARGS[split:], "--trainer.max_steps", "7", "--scprint_training.lr", "0.01"]
    run_cli(anyway, cwd=workdir, env=env)
    resumed = json.loads(summary.read_text())
    assert resumed["steps"] == 7 and resumed["resumed_from"].endswith("state/last.ckpt")
    assert resumed["config"]["scprint_training"]["lr"] == 0.01


def test_checkpoint_reloads_without_collection_or_parquet(workdir, tmp_path):
    """Needs the first test's checkpoint; loads in this process (no laminDB here)."""
    from scprint.model.lightning import ScPrintModule

    src = workdir / "ckpt_fit" / "last.ckpt"
    if not src.exists():
        pytest.fail("run test_fit_with_the_seed_configs_on_a_tiny_collection first")
    module = ScPrintModule.load(src)
    genes = module.hparams.genes
    assert len(genes) == 180
    # what an upstream export needs rides along: label names and organisms
    names = module.hparams.label_decoders["organism_ontology_term_id"]
    assert "NCBITaxon:9606" in names.values()
    assert "NCBITaxon:9606" in module.hparams.organisms
    ref = load(src)["state_dict"]["net.gene_encoder.embeddings.weight"]
    torch.testing.assert_close(module.net.gene_encoder.embeddings.weight, ref)
    batch = {
        "x": torch.poisson(torch.full((3, 20), 2.0)),
        "genes": torch.arange(20).repeat(3, 1).int(),
        "depth": torch.full((3,), 100.0),
    }
    out = module.predict_step(batch, 0)
    assert out["cell_emb"].shape == (3, 128)
    assert set(out) >= {"pred/cell_type_ontology_term_id", "pred/organism_ontology_term_id"}


def test_print_config_merges_configs_in_order(workdir):
    proc = run_cli(
        [
            "fit",
            "--config",
            REPO / "config/base.yml",
            "--config",
            REPO / "config/pretrain_large.yml",
            "--model.nhead",
            "16",
            "--print_config",
        ],  # fmt: skip
        cwd=workdir,
    )
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["d_model"] == 512 and cfg["model"]["nlayers"] == 16
    assert cfg["model"]["nhead"] == 16  # command line beats the yaml
    assert cfg["data"]["batch_size"] == 32  # large yaml beats base
    assert cfg["trainer"]["gradient_clip_val"] == 100  # base survives


def test_upstream_docs_command_line_and_size_files(workdir, tmp_path):
    """The pre-training docs' command line, and an upstream-style size file (its keys
    written here), parse over our base.yml with upstream's meaning."""
    upstream_small = tmp_path / "pretrain_small.yml"
    upstream_small.write_text(
        "model:\n  nhead: 2\n  nlayers: 4\n  layers_cls: [128]\n  d_model: 128\n"
        "data:\n  collection_name: all no zhang13M\n"
    )
    for size_file, nhead in ((REPO / "config/pretrain_small.yml", 8), (upstream_small, 8)):
        proc = run_cli(
            [
                "fit",
                "--config",
                REPO / "config/base.yml",
                "--config",
                size_file,
                "--model.transformer",
                "flash",
                "--model.mvc_decoder",
                "inner product",
                "--model.residual_in_fp32",
                "true",
                "--model.nhead",
                str(nhead),
                "--scprint_training.name",
                "o2uniqsx",
                "--trainer.strategy",
                "auto",
                "--print_config",
            ],  # fmt: skip
            cwd=workdir,
        )
        import yaml

        cfg = yaml.safe_load(proc.stdout)
        model = cfg["model"]
        assert (model["d_model"], model["nlayers"], model["layers_cls"]) == (128, 4, [128])
        assert model["nhead"] == nhead and model["transformer"] == "flash"
        assert model["mvc_decoder"] == "inner product" and model["residual_in_fp32"] is True
        assert cfg["scprint_training"]["name"] == "o2uniqsx"
    small = yaml.safe_load((REPO / "config/pretrain_small.yml").read_text())["model"]
    assert (small["nhead"], small["layers_cls"]) == (2, [128])  # upstream's small


def test_unknown_collection_is_a_clear_error(workdir):
    proc = run_cli(
        [
            "fit",
            "--config",
            REPO / "config/base.yml",
            *small_run_args("x"),
            "--data.collection_name",
            "nope",
            "--trainer.max_steps",
            "1",
        ],  # fmt: skip
        cwd=workdir,
        check=False,
    )
    assert proc.returncode == 1
    assert "no collection 'nope'" in proc.stderr and "tiny" in proc.stderr
    assert "Traceback" not in proc.stderr


# upstream 2.3.8's TrainingMode, every key, as a user writes it for upstream's `scprint fit`
UPSTREAM_TRAINING = """
scprint_training:
  do_denoise: true
  noise: [0.6]
  do_cce: false
  cce_temp: 0.2
  cce_scale: 0.1
  do_ecs: false
  ecs_threshold: 0.4
  class_embd_diss_scale: 0.1
  ecs_scale: 0.1
  do_mvc: false
  mvc_scale: 1.0
  do_adv_cls: false
  do_next_tp: false
  do_generate: true
  class_scale: 1.5
  mask_ratio: ["TF"]
  test_every: 20
  warmup_duration: 100
  fused_adam: false
  adv_class_scale: 0.1
  lr_reduce_patience: 2
  lr_reduce_factor: 0.6
  lr_reduce_monitor: val_loss
  do_cls: true
  do_adv_batch: false
  run_full_forward: false
  lr: 0.0002
  dropout: 0.1
  optim: adamW
  weight_decay: 0.01
  zinb_and_mse: false
  var_context_length: false
  name: o2uniqsx
  set_step: null
data:
  gene_position_tolerance: 10000
"""


def test_an_upstream_scprint_training_section_parses_with_its_meaning(workdir, tmp_path):
    """Every key of upstream's TrainingMode, upstream's early-stopping group on the command
    line and the docs' data.gene_position_tolerance: accepted, with their values."""
    import yaml

    (tmp_path / "upstream.yml").write_text(UPSTREAM_TRAINING)
    proc = run_cli(
        ["fit", "--config", REPO / "config/base.yml", "--config", tmp_path / "upstream.yml",
         "--scprint_early_stopping.patience", "5", "--print_config"],
        cwd=workdir,
    )  # fmt: skip
    cfg = yaml.safe_load(proc.stdout)
    training = cfg["scprint_training"]
    assert training["mask_ratio"] == ["TF"] and training["class_scale"] == 1.5
    assert training["warmup_duration"] == 100 and training["lr"] == 0.0002
    assert cfg["scprint_early_stopping"]["patience"] == 5
    assert cfg["scprint_early_stopping"]["monitor"] == "val_loss"
    assert cfg["scprint_learning_rate_monitor"]["logging_interval"] == "step"  # base.yml's
    assert cfg["data"]["gene_position_tolerance"] == 10000


def test_old_training_keys_are_refused_with_the_new_name(workdir):
    proc = run_cli(
        ["fit", "--config", REPO / "config/base.yml", "--scprint_training.warmup_steps", "5",
         "--scprint_training.cls_scale", "2", "--print_config"],
        cwd=workdir,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "warmup_steps -> warmup_duration" in proc.stderr
    assert "cls_scale -> class_scale" in proc.stderr
    assert "Traceback" not in proc.stderr
