"""The whole training recipe side by side: upstream scPRINT 2.3.8's ``scprint fit`` and ours.

``python -m bench --only recipe`` (or ``python -m bench.recipe --json OUT``):
1. the demo collection and gene files with the pipeline itself (``snakemake --configfile
   config/demo.yaml`` up to results/collection.json and data/main/*, in the work dir);
2. one set of initial weights: our model built by ``scprint fit``'s own CLI from the run's
   config (base.yml + pretrain_small.yml + demo_train.yml + the recipe keys below), saved,
   and exported with ``scprint convert export`` for upstream;
3. ours: ``scprint fit`` with ``--init_from`` those weights, ``--seeds`` seeds (default 3:
   the noise band); upstream: bench/upstream_recipe.py in its venv, ``--upstream-seeds``
   seeds (default 2), the exported weights loaded into a
   fresh upstream model under upstream's TrainingMode, scdataloader's DataModule on the same
   laminDB collection, the same Trainer settings;
4. every run validates on the same cells (the split is written once to a shared
   ``data.store_location`` and read by the others) every ``VAL_EVERY`` steps; the curves go
   to bench/results/recipe.json and recipe.png.

The recipe (same on both sides): upstream's TrainingMode defaults (denoising at 0.6,
bottleneck generation, classification, cell-token independence, AdamW with weight decay
0.01 on every parameter, linear warm-up) with lr 1e-3 and 50 warm-up steps (upstream's
1e-4 / 500 barely moves a d_model 32 model in a few hundred steps); ReduceLROnPlateau and
EarlyStopping left in place but with a patience longer than the run (upstream steps its
plateau scheduler twice per validation, a quirk ours fixes: kept out of the comparison).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import Row, section_parser, write_section

REPO = Path(__file__).resolve().parents[1]
SEED_VENV = Path(os.environ.get("SCPRINT_SEED_VENV", REPO / ".bench-venv-seed"))
CONFIGS = ["config/base.yml", "config/pretrain_small.yml", "config/demo_train.yml"]
TARGETS = ["results/collection.json", "data/main/gene_embeddings.parquet",
           "data/main/gene_positions.parquet"]  # fmt: skip
LR, WARMUP = 1e-3, 50


def recipe_overlay(steps: int, val_every: int, batch_size: int, split_dir: Path) -> dict:
    """The keys this bench sets on top of the demo's training config (both sides)."""
    return {
        "trainer": {
            "max_steps": steps,
            "max_epochs": 1,
            "val_check_interval": val_every,
            "limit_val_batches": 1.0,  # every validation cell
            "precision": "32-true",
            "logger": False,  # MetricsLog's CSV only
        },
        "checkpoint": {"every_n_train_steps": 10 * steps, "save_last": False},
        "wandblog": None,
        "model": {"transformer": "normal"},
        "data": {
            "collection_name": "scprint-demo",  # config/demo.yaml's collection.key
            "batch_size": batch_size,
            "n_samples_per_epoch": steps * batch_size,  # one epoch of exactly `steps`
            "num_workers": 0,
            "store_location": str(split_dir),  # the same validation cells for every run
        },
        "scprint_training": {
            "lr": LR,
            "warmup_duration": WARMUP,
            "lr_reduce_patience": 10 * steps,
            "test_every": 10 * steps,
        },
        "scprint_early_stopping": {"patience": 10 * steps},
    }


def merged_config(workdir: Path, overlay: dict) -> dict:
    config: dict = {}
    for path in CONFIGS:
        _merge(config, yaml.safe_load((REPO / path).read_text()))
    return _merge(config, overlay)


def _merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def env_for(workdir: Path) -> dict:
    env = dict(os.environ)
    env["LAMIN_SETTINGS_DIR"] = str(workdir / "lamin" / "settings")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "offline")
    return env


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    """Run a command, its output to ``log``; returns its wall time (raises on failure)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return time.perf_counter() - start


def demo_collection(workdir: Path) -> None:
    """The pipeline's own stages up to the collection and the gene files (cached)."""
    if all((workdir / t).exists() for t in TARGETS):
        return
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(REPO / "config"), str(workdir)], check=True)
    print("  the demo collection with the pipeline (a few minutes, once)", flush=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
           "-d", str(workdir), "--profile", str(REPO / "profiles" / "local"),
           "--configfile=config/demo.yaml", "--cores", "2", *TARGETS]  # fmt: skip
    env = env_for(workdir)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    run(cmd, workdir, env, workdir / "snakemake.log")


def build_initial_checkpoint(argv: list[str], out: str) -> None:
    """Our model as ``scprint fit`` builds it from ``argv``'s config, saved unfitted.
    Runs in a subprocess (``python -c ...``): laminDB's settings dir is read at import."""
    import lightning as L

    from scprint.trainer.cli import ScprintCLI, build_cli

    class SaveInsteadOfFit(ScprintCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
            trainer.strategy.connect(self.model)
            trainer.save_checkpoint(out)

    build_cli(["fit", *argv], cli_class=SaveInsteadOfFit)


def ours(workdir: Path, config: Path, init: Path, seed: int, name: str) -> dict:
    root = workdir / "runs" / name
    cmd = [sys.executable, "-m", "scprint", "fit", *_config_args(config),
           "--init_from", str(init), "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(root),
           "--checkpoint.dirpath", str(root / "checkpoints")]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    seconds = run(cmd, workdir, env_for(workdir), root / "fit.log")
    return {"curve": _csv_curve(root), "seconds": seconds, "seed": seed}


def _config_args(config: Path) -> list[str]:
    """The repository's configs (not the work dir's copy, made with the collection)."""
    return [
        a for path in [*(str(REPO / c) for c in CONFIGS), str(config)] for a in ("--config", path)
    ]


def _csv_curve(root: Path) -> list[dict]:
    """val_loss per validation from MetricsLog's CSV (the last version of the run)."""
    files = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no metrics.csv under {root}")
    curve = []
    with files[-1].open() as f:
        for row in csv.DictReader(f):
            if row.get("val_loss"):
                curve.append({"step": int(row["step"]) + 1, "val_loss": float(row["val_loss"])})
    return curve


def upstream(workdir: Path, config: dict, ckpt: Path, seed: int, name: str) -> dict:
    python = SEED_VENV / "bin" / "python"
    if not (SEED_VENV / ".installed").exists():
        raise SystemExit(f"no upstream venv at {SEED_VENV}: build it with `make bench-seed-venv`")
    root = workdir / "runs" / name
    root.mkdir(parents=True, exist_ok=True)
    data, trainer = config["data"], config["trainer"]
    clss = list(data["clss_to_predict"])
    if "organism_ontology_term_id" not in clss:
        clss.insert(0, "organism_ontology_term_id")
    spec = {
        "seed": seed,
        "checkpoint": str(ckpt),
        "dropout": config["model"]["dropout"],
        # upstream freezes the table only when built from embeddings (precpt_gene_emb), which
        # an exported checkpoint is not: told here, as its own `scprint fit` would have it
        "freeze_embeddings": bool(config["model"].get("freeze_embeddings", True)),
        "result": str(root / "curve.json"),
        "scprint_training": config["scprint_training"],
        "early_stopping": config["scprint_early_stopping"],
        "data": {  # what ScprintDataModule hands scdataloader's DataModule
            "collection_name": data["collection_name"],
            "organisms": data["organisms"],
            "clss_to_predict": clss,
            "hierarchical_clss": data["hierarchical_clss"],
            "clss_to_weight": data["clss_to_weight"],
            "weight_scaler": data["weight_scaler"],
            "n_samples_per_epoch": data["n_samples_per_epoch"],
            "validation_split": data["validation_split"],
            "test_split": data["test_split"],
            "how": data["how"],
            "max_len": data["max_len"],
            "assays_to_drop": ["EFO:0030007"],
            "replacement": True,
            "store_location": data["store_location"],
            "batch_size": data["batch_size"],
            "num_workers": data["num_workers"],
        },
        "trainer": {
            k: trainer[k]
            for k in (
                "max_steps",
                "max_epochs",
                "val_check_interval",
                "limit_val_batches",
                "gradient_clip_val",
                "log_every_n_steps",
            )  # fmt: skip
        },
    }
    (root / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [str(python), "-I", str(REPO / "bench" / "upstream_recipe.py"), str(root / "spec.json")]
    seconds = run(cmd, root, env_for(workdir), root / "fit.log")
    result = json.loads((root / "curve.json").read_text())
    return {"curve": result["curve"], "seconds": seconds, "seed": seed,
            "valid_idx": result["valid_idx"], "steps": result["steps"]}  # fmt: skip


def compare(curves: dict, last: int) -> dict:
    """Final val_loss of each run (mean of its last ``last`` validations) and the test: the
    difference of the two sides' means within the seed-to-seed band of ours (the range of
    our seeds' finals), and each upstream seed's final inside that range."""
    final = {k: _tail_mean(v["curve"], last) for k, v in curves.items()}
    ours_ = [v for k, v in final.items() if k.startswith("ours")]
    upstream_ = [v for k, v in final.items() if k.startswith("upstream")]
    band = max(ours_) - min(ours_)
    diff = sum(upstream_) / len(upstream_) - sum(ours_) / len(ours_)
    return {
        "final_val_loss": final,
        "seed_band": band,
        "upstream_minus_ours_mean": diff,
        "within_band": abs(diff) <= band,
        "upstream_seeds_inside_ours_range": all(min(ours_) <= u <= max(ours_) for u in upstream_),
        "final_is_mean_of_last_validations": last,
    }


def _tail_mean(curve: list[dict], last: int) -> float:
    values = [p["val_loss"] for p in curve[-last:]]
    return sum(values) / len(values)


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dashes = ["-", "--", ":", "-."]
    for name, run_ in curves.items():
        color = "k" if name.startswith("upstream") else "tab:blue"
        ls = dashes[int(name.rsplit("seed", 1)[1]) % len(dashes)]
        xs = [p["step"] for p in run_["curve"]]
        ax.plot(xs, [p["val_loss"] for p in run_["curve"]], ls, color=color, marker=".",
                label=name.replace("_", ", "))  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (same cells)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = section_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="runs of ours (seeds 0..N-1)")
    parser.add_argument("--upstream-seeds", type=int, default=2, help="runs of upstream's")
    args = parser.parse_args()
    steps = args.steps or (40 if args.quick else 300)
    val_every, batch_size = (10 if args.quick else 25), 16
    work = (args.workdir / "recipe").resolve()
    demo_collection(work)

    split = work / "split"  # written by the first run, read by the others
    if split.exists():
        subprocess.run(["rm", "-rf", str(split)], check=True)
    overlay = recipe_overlay(steps, val_every, batch_size, split)
    config = merged_config(work, overlay)
    config_path = work / "recipe.yml"
    config_path.write_text(yaml.safe_dump(overlay, sort_keys=False))

    env = env_for(work)
    init = work / "init.ckpt"
    init_upstream = work / "init-upstream.ckpt"
    init_code = (
        "import sys; from bench.recipe import build_initial_checkpoint; "
        "build_initial_checkpoint(sys.argv[2:], sys.argv[1])"
    )
    run([sys.executable, "-c", init_code, str(init), *_config_args(config_path)],
        work, env, work / "init.log")  # fmt: skip
    run([sys.executable, "-m", "scprint", "convert", "export", str(init), str(init_upstream)],
        work, env, work / "convert.log")  # fmt: skip

    curves = {}
    for seed in range(max(args.seeds, args.upstream_seeds)):  # alternate the two sides
        if seed < args.seeds:
            print(f"  ours, seed {seed} ({steps} steps)", flush=True)
            curves[f"ours_seed{seed}"] = ours(work, config_path, init, seed, f"ours-seed{seed}")
        if seed < args.upstream_seeds:
            print(f"  upstream 2.3.8, seed {seed}", flush=True)
            curves[f"upstream_seed{seed}"] = upstream(
                work, config, init_upstream, seed, f"upstream-seed{seed}"
            )

    import numpy as np

    stored = np.load(split / "valid_idx.npy").tolist()
    same_cells = all(
        run_.pop("valid_idx") == stored for k, run_ in curves.items() if k.startswith("upstream")
    )
    result = compare(curves, last=3 if not args.quick else 1)
    result.update(same_validation_cells=same_cells, n_validation_cells=len(stored))
    for name, run_ in curves.items():
        print(f"  {name}: " + " ".join(f"{p['step']}:{p['val_loss']:.4f}" for p in run_["curve"]))
    print(f"  {json.dumps(result)}")

    title = (f"demo collection, d_model {config['model']['d_model']}, {steps} steps, lr {LR}, "
             f"{len(stored)} validation cells")  # fmt: skip
    out_dir = args.json.parent
    plot(curves, out_dir / "recipe.png", title)
    rows = [
        Row(
            "final val_loss (mean of last validations)",
            name,
            value,
            "loss",
            baseline=name == "upstream_seed0",
            higher_is_better=False,
        )  # fmt: skip
        for name, value in result["final_val_loss"].items()
    ] + [
        Row(
            "training run wall time",
            name,
            run_["seconds"],
            "s",
            baseline=name == "upstream_seed0",
            higher_is_better=False,
        )  # fmt: skip
        for name, run_ in curves.items()
    ]
    write_section(args.json, "recipe", rows, config=overlay, curves=curves, comparison=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
