"""Model step on CPU: forward + backward + optimizer ms and peak RSS per batch.

Figures (16 cells x 2,200 gene tokens, fp32, 2 CPU threads by default, the seed's small
size: d_model 128, 4 layers, 2 heads, as our pretrain_small.yml since the parity work):
ours with sdpa (with config/base.yml's ``checkpoint_activations``), and flash (a row saying
it needs CUDA; bench/gpu.py measures it); baselines our ``normal`` backend and the seed's own model
(PyPI ``scprint`` 2.3.8, from its own venv ``.bench-venv-seed``, made by ``make
bench-seed-venv``), each with two objective sets:

- ``default``: what config/base.yml turns on: denoising (noise 0.6), bottleneck generation,
  classification.
- ``all``: every objective: denoising 0.6, masking 0.3, generation, classification, MVC,
  CCE, ECS.

How the seed is matched (its switches are attributes of its LightningModule): the same
gene vocabulary, genomic positions, frozen gene-embedding table (a parquet of random
1280-wide vectors; both average-pool it to d_model), the same six
classes (leaf labels only), ``transformer="normal"`` (its only CPU path; dropout 0.1 as
ours), ``depth_atinput=True`` (a depth token, as ours), ``run_full_forward=False`` (so
each view is one encoder pass, as ours). default: ``noise=[0.6], do_cls, do_generate``.
all: adds ``mask_ratio=[0.3]``, ``do_mvc`` with ``mvc_decoder="inner product"``,
``do_cce``, ``do_ecs``. Ours computes the same recipe (upstream's passes, noise model and
loss terms: scprint.model.objectives, checked term by term against the seed's own
``_full_training`` in tests/test_upstream_losses.py), so the two sides do the same work.

Every configuration runs in a fresh subprocess (so its peak RSS is its own: model, data
and the step), builds the model, runs one warm-up step (excluded from the time) and then
``--steps`` timed steps (median; default 1, a seed step takes minutes here). A process whose
RSS passes the machine's budget (MemAvailable minus 1.5 GB, or SCPRINT_BENCH_MEM_GB) is
stopped and its row says so: the seed with every objective needs more than 20 GB.
``--quick``: 2 x 256 tokens, default objectives (a smoke run). The checkpoint_activations
rows other than base.yml's (``ours-sdpa-keep``: false, ``ours-sdpa-ckpt``: true; ~45 s each
here) are left out by default to keep `make bench` under 15 minutes on 2 cores: ``python -m
bench.model --json model.json --configs ours-sdpa,ours-sdpa-keep,ours-sdpa-ckpt`` adds them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import Row, peak_rss_mb, section_parser, write_section

ROOT = Path(__file__).resolve().parent.parent
SEED_VENV = ROOT / ".bench-venv-seed"
SEED_SCRIPT = Path(__file__).resolve().parent / "seed_step.py"

# The small config (upstream's and our pretrain_small.yml: d_model 128, 4 layers, 2 heads)
# and a realistic data side
SHAPE = dict(d_model=128, nhead=2, nlayers=4, dropout=0.1)
SEED_ALL_MB = 20 * 1024  # the seed with every objective on passed this and was stopped
N_GENES, D_GENE_EMB = 20_000, 1280
CLASSES = {"organism": 2, "cell_type": 500, "tissue": 200, "disease": 100, "assay": 20, "sex": 3}
# ours runs with config/base.yml's checkpoint_activations unless the configuration says
BASE_CHECKPOINTING = yaml.safe_load((ROOT / "config" / "base.yml").read_text())["model"][
    "checkpoint_activations"
]
CHECKPOINTING = {"keep": False, "ckpt": True}  # impl suffix -> model.checkpoint_activations
IMPLS = {  # configuration -> row label; ours-normal and seed are the baselines
    "ours-sdpa": f"ours sdpa (checkpoint_activations {BASE_CHECKPOINTING})",
    "ours-sdpa-keep": "ours sdpa, checkpoint_activations false",
    "ours-sdpa-ckpt": "ours sdpa, checkpoint_activations true",
    "ours-normal": f"ours normal (checkpoint_activations {BASE_CHECKPOINTING})",
    "seed": "seed (scprint 2.3.8, normal)",
}
DEFAULT_CONFIGS = "ours-sdpa,ours-normal,seed"
OBJECTIVES = {
    "default": dict(noise=[0.6], mask_ratio=[], do_generate=True, do_cls=True),
    "all": dict(
        noise=[0.6],
        mask_ratio=[0.3],
        do_generate=True,
        do_cls=True,
        do_mvc=True,
        do_cce=True,
        do_ecs=True,
    ),
}


def make_inputs(workdir: Path, B: int, L: int) -> Path:
    """One synthetic batch, gene table and positions on disk, read by both implementations."""
    import numpy as np
    import pandas as pd
    import torch

    path = workdir / f"model_inputs_B{B}_L{L}.pt"
    emb_path = workdir / "model_gene_emb.parquet"
    if path.exists() and emb_path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    if not emb_path.exists():
        table = torch.randn(N_GENES, D_GENE_EMB, generator=g).numpy().astype(np.float32)
        df = pd.DataFrame(table, index=pd.Index(genes, name="ensembl_gene_id"))
        df.columns = [str(c) for c in df.columns]
        tmp = emb_path.with_name(f".{emb_path.name}.tmp")
        df.to_parquet(tmp)
        os.replace(tmp, emb_path)
    # each cell: L distinct genes; expressed ones first with counts, like "random expr"
    idx = torch.stack([torch.randperm(N_GENES, generator=g)[:L] for _ in range(B)])
    counts = torch.poisson(torch.rand(B, L, generator=g) ** 4 * 20)
    counts, order = counts.sort(dim=1, descending=True)
    idx = idx.gather(1, order)
    cls = torch.stack(
        [torch.randint(0, n, (B,), generator=g) for n in CLASSES.values()], dim=1
    ).int()
    inputs = {
        "batch": {
            "x": counts,
            "genes": idx.int(),
            "class": cls,
            "depth": counts.sum(1) * 3,
            "tp": torch.zeros(B),
        },
        "genes": genes,
        "positions": (torch.arange(N_GENES) // 4).tolist(),
        "classes": CLASSES,
        "gene_emb": str(emb_path),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(inputs, tmp)
    os.replace(tmp, path)
    return path


# ---- worker: one configuration of our model, in its own process -------------------------
def run_ours(
    inputs: Path, attention: str, objectives: str, steps: int, shape: dict, options: dict
) -> dict:
    import torch

    from scprint.model import losses
    from scprint.model.genes import read_gene_embeddings
    from scprint.model.model import ScPrint, ScPrintConfig
    from scprint.model.objectives import Objectives, compute_losses, set_trainable

    data = torch.load(inputs)
    table = torch.from_numpy(read_gene_embeddings(data["gene_emb"], data["genes"]))
    cfg = ScPrintConfig(
        n_genes=len(data["genes"]),
        classes=data["classes"],
        attention=attention,
        mvc_decoder="inner product" if OBJECTIVES[objectives].get("do_mvc") else "None",
        **shape,
        **options,
    )
    torch.manual_seed(0)
    net = ScPrint(cfg, table, torch.tensor(data["positions"]))
    del table
    obj = Objectives(**OBJECTIVES[objectives])
    set_trainable(net, obj)
    sets = {k: losses.label_sets(n, None) for k, n in data["classes"].items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    batch = data["batch"]

    def step():
        opt.zero_grad(set_to_none=True)
        out = compute_losses(net, batch, obj, sets)
        out["loss"].backward()
        opt.step()
        return float(out["loss"])

    return _timed(step, steps)


def _timed(step, steps: int) -> dict:
    """A warm-up step, then ``steps`` timed ones; peak RSS covers all of them."""
    rss_before = peak_rss_mb()
    times, loss = [], None
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = step()
        if i:
            times.append(time.perf_counter() - start)
    return {
        "ms": [t * 1000 for t in times],
        "rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "loss": loss,
    }


# ---- parent: runs every configuration in a subprocess -------------------------------------
def _subprocess(cmd: list[str], env: dict, timeout: float) -> tuple[dict | None, str]:
    """Run one configuration; stop it (a row note, not a crash) when its RSS passes the
    memory budget, so a baseline that needs more than the machine has cannot take the
    machine (and whoever shares it) into the OOM killer."""
    budget_mb = memory_budget_mb()
    with _tmpfile() as out, _tmpfile() as log:
        with open(log, "w") as log_file:
            proc = subprocess.Popen(
                [*cmd, "--result", str(out)], env=env, stdout=log_file, stderr=log_file
            )
            start, peak_mb, stopped = time.monotonic(), 0.0, ""
            while proc.poll() is None:
                peak_mb = max(peak_mb, _rss_mb(proc.pid))
                if peak_mb > budget_mb:
                    stopped = (
                        f"stopped at {peak_mb / 1024:.1f} GB RSS: over this machine's budget of "
                        f"{budget_mb / 1024:.1f} GB (MemAvailable minus a margin; "
                        "SCPRINT_BENCH_MEM_GB sets it)"
                    )
                elif time.monotonic() - start > timeout:
                    stopped = f"timed out after {timeout:.0f} s"
                if stopped:
                    proc.kill()
                    proc.wait()
                    return None, stopped
                time.sleep(0.1)
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            return None, f"failed (exit {proc.returncode}): {' | '.join(lines[-2:])}"
        return json.loads(out.read_text()), ""


def memory_budget_mb() -> float:
    if os.environ.get("SCPRINT_BENCH_MEM_GB"):
        return float(os.environ["SCPRINT_BENCH_MEM_GB"]) * 1024
    return max(1024.0, mem_available_gb() * 1024 - 1.5 * 1024)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _tmpfile:
    def __enter__(self) -> Path:
        import tempfile

        fd, name = tempfile.mkstemp(suffix=".json", prefix="bench-model-")
        os.close(fd)
        os.unlink(name)
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = section_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="timed steps per configuration")
    parser.add_argument("--nhead", type=int, default=SHAPE["nhead"], help="attention heads")
    parser.add_argument(
        "--configs",
        help=f"comma-separated subset of {','.join(IMPLS)} (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument(
        "--objectives", help=f"comma-separated subset of {','.join(OBJECTIVES)} (default: all)"
    )
    args = parser.parse_args(argv)
    B, L = (2, 256) if args.quick else (16, 2200)
    # one warm-up step and one timed step: a seed step takes 1-2 minutes on 2 cores
    steps = args.steps or 1
    inputs = make_inputs(args.workdir, B, L)
    shape = {**SHAPE, "nhead": args.nhead}
    figure = f"train step, small, {B}x{L} tokens"
    wanted = set((args.configs or DEFAULT_CONFIGS).split(","))

    rows: list[Row] = []
    objective_sets = args.objectives.split(",") if args.objectives else list(OBJECTIVES)
    if unknown := set(objective_sets) - set(OBJECTIVES):
        parser.error(f"--objectives {sorted(unknown)}: choose among {', '.join(OBJECTIVES)}")
    for objectives in ["default"] if args.quick else objective_sets:
        rows.append(
            Row(
                f"{figure}, {objectives} objectives, time",
                "ours flash",
                float("nan"),
                "ms/step",
                higher_is_better=False,
                note="needs CUDA (flash-attn): see bench/gpu.py",
            )
        )
        for impl, label in IMPLS.items():
            if impl not in wanted:
                continue
            baseline = impl in ("ours-normal", "seed")
            print(f"  {label}, {objectives} objectives ...", flush=True)
            if impl == "seed" and objectives == "all" and memory_budget_mb() < SEED_ALL_MB:
                result, note = (
                    None,
                    (
                        f"not run: needs more than {SEED_ALL_MB / 1024:.0f} GB (it was stopped at "
                        f"20 GB on a 24 GB machine); this machine's budget is "
                        f"{memory_budget_mb() / 1024:.1f} GB"
                    ),
                )
            else:
                result, note = _run_config(impl, inputs, objectives, steps, shape)
            extra = {"objectives": objectives, "B": B, "L": L, "steps": steps}
            if result is None:
                for unit in ("ms/step", "MB"):
                    rows.append(_row(figure, objectives, label, float("nan"), unit, baseline, note))
                print(f"    {note}", flush=True)
                continue
            ms = statistics.median(result["ms"])
            extra.update(result)
            print(f"    {ms:,.0f} ms/step, peak RSS {result['rss_mb']:,.0f} MB", flush=True)
            rows.append(_row(figure, objectives, label, ms, "ms/step", baseline, "", extra))
            rows.append(_row(figure, objectives, label, result["rss_mb"], "MB", baseline, ""))
    write_section(args.json, "model", rows, B=B, L=L, shape=shape)
    return 0


def _row(figure, objectives, impl, value, unit, baseline, note, extra=None) -> Row:
    what = "peak RSS" if unit == "MB" else "time"
    return Row(
        f"{figure}, {objectives} objectives, {what}",
        impl,
        value,
        unit,
        baseline=baseline,
        higher_is_better=False,
        note=note,
        extra=extra or {},
    )


def _run_config(
    impl: str, inputs: Path, objectives: str, steps: int, shape: dict
) -> tuple[dict | None, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    timeout = 600
    if impl == "seed":
        python = SEED_VENV / "bin" / "python"
        if not (SEED_VENV / ".installed").exists():
            return None, (
                f"skipped: the seed's venv {SEED_VENV.name} is missing; make it with "
                "`make bench-seed-venv` (PyPI scprint 2.3.8, --no-deps, pinned)"
            )
        env.pop("PYTHONPATH", None)  # our package must not shadow the seed's `scprint`
        cmd = [str(python), "-I", str(SEED_SCRIPT), "--inputs", str(inputs)]
        cmd += ["--objectives", json.dumps(OBJECTIVES[objectives]), "--steps", str(steps)]
        cmd += ["--shape", json.dumps(shape)]
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        attention = impl.split("-")[1]
        checkpointing = CHECKPOINTING.get(impl.split("-")[-1], BASE_CHECKPOINTING)
        options = {"checkpoint_activations": checkpointing}
        cmd = [sys.executable, "-m", "bench.model", "--worker", "--inputs", str(inputs)]
        cmd += ["--attention", attention, "--objectives", objectives, "--steps", str(steps)]
        cmd += ["--options", json.dumps(options), "--shape", json.dumps(shape)]
    return _subprocess(cmd, env, timeout)


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--attention", required=True)
    parser.add_argument("--objectives", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--options", default="{}", help="extra ScPrintConfig keys (JSON)")
    parser.add_argument("--shape", default=json.dumps(SHAPE), help="d_model, nhead, ... (JSON)")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run_ours(
        args.inputs,
        args.attention,
        args.objectives,
        args.steps,
        json.loads(args.shape),
        json.loads(args.options),
    )
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker(sys.argv[1:]))
    sys.exit(main())
