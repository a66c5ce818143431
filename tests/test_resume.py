"""A training run killed with SIGKILL in the middle of an epoch and rerun ends with the
weights of the run that was never interrupted: bitwise, on CPU with deterministic
settings (issue 21 item 4; scprint/trainer/resume.py, scprint/trainer/checkpointing.py).

Every run is the workflow's train rule command, `scprint train-run`, on the tiny
collection. The kill point is a fact, not a race: tests/resume_probe.py's callback (in
every run, so the commands are the same) holds the killed run at the first batch after
step K, when step K's checkpoint is on disk, and the test kills it there. The same
callback records a digest of every batch each run trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO, cli_env
from resume_probe import batches
from test_fit import THREADS
from test_fit import workdir as tiny_collection  # noqa: F401  (test_fit's fixture)

TESTS = Path(__file__).resolve().parent
STEPS, EVERY, PER_EPOCH = 10, 4, 8  # 64 cells an epoch in batches of 8: the kill is mid-epoch


def train_run(name: str, *extra: str) -> list[str]:
    """The train rule's command for run ``name``: weighted sampling with replacement
    (scdataloader's sampler), random expressed genes, dropout, validation every 4 steps
    (ReduceLROnPlateau on it), a checkpoint every 4 steps, 10 steps: into the second epoch.
    ``extra``: more `scprint fit` arguments (the Lightning shape of a multi-node run)."""
    return [
        sys.executable, "-m", "scprint.cli", "train-run", "--run", name,
        "--collection", "results/collection.json",
        "--gene-embeddings", "data/main/gene_embeddings.parquet",
        "--gene-positions", "data/main/gene_positions.parquet",
        "--checkpoint-dir", f"checkpoints/{name}", "--summary", f"results/train/{name}.json",
        "--config", str(REPO / "config/base.yml"),
        "--config", str(REPO / "config/pretrain_small.yml"),
        "--", "--data.max_len", "48", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.sampler_workers", "1", "--data.n_samples_per_epoch", str(8 * PER_EPOCH),
        "--data.validation_split", "0.2", "--data.how", "random expr",
        "--model.d_model", "32", "--model.nlayers", "2", "--model.layers_cls", "[16]",
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", "logs/csv", "--wandblog", "null",
        "--scprint_training.warmup_duration", "2",
        "--trainer.deterministic", "true", "--trainer.max_steps", str(STEPS),
        "--checkpoint.every_n_train_steps", str(EVERY),
        "--trainer.callbacks+", "resume_probe.ResumeProbe", *extra,
    ]  # fmt: skip


def env_for(workdir: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]])  # resume_probe
    return cli_env(workdir, **THREADS, PYTHONPATH=path, **extra)


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-6000:]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def differing(a: dict, b: dict) -> list[str]:
    """Names of the weights and optimizer-state entries of two checkpoints that are not
    bitwise equal (torch.equal; a missing entry counts as differing)."""
    out = [k for k in a["state_dict"].keys() | b["state_dict"].keys()
           if k not in a["state_dict"] or k not in b["state_dict"]
           or not torch.equal(a["state_dict"][k], b["state_dict"][k])]  # fmt: skip
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["param_groups"] == ob["param_groups"]  # lr, betas, weight decay
    for p in oa["state"].keys() | ob["state"].keys():
        sa, sb = oa["state"].get(p, {}), ob["state"].get(p, {})
        for key in sa.keys() | sb.keys():
            if (
                key not in sa
                or key not in sb
                or not torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))
            ):
                out.append(f"optimizer[{p}].{key}")
    return sorted(out)


def test_killed_mid_epoch_and_rerun_ends_with_the_uninterrupted_weights(
    tiny_collection,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    workdir = tiny_collection
    # the uninterrupted run and the run to kill, side by side (one thread each)
    marker, record = tmp_path / "paused", {}
    for run in ("full", "killed", "control"):
        record[run] = tmp_path / f"batches-{run}"
        record[run].mkdir()
    full_env = env_for(workdir, SCPRINT_TEST_BATCHES=str(record["full"]))
    full = start(train_run("full"), workdir, full_env, tmp_path / "full.log")
    pausing = env_for(
        workdir, SCPRINT_TEST_PAUSE_AT=str(EVERY), SCPRINT_TEST_PAUSE_MARKER=str(marker),
        SCPRINT_TEST_BATCHES=str(record["killed"]),
    )  # fmt: skip
    killed = start(train_run("killed"), workdir, pausing, tmp_path / "killed.log")
    state, marker = workdir / "checkpoints/killed/state", marker.with_suffix(".rank0")
    deadline = time.monotonic() + 300
    while not (marker.exists() and (state / f"epoch=0-step={EVERY}.ckpt").exists()):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-6000:]
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    epoch, batch_idx, step = map(int, marker.read_text().split())
    assert (epoch, batch_idx, step) == (0, EVERY, EVERY)  # held before epoch 0's 5th batch
    assert EVERY < PER_EPOCH  # ... of 8: mid-epoch
    assert not (workdir / "checkpoints/killed/last.ckpt").exists()  # nothing published
    assert not (workdir / "results/train/killed.json").exists()
    resume_point = load(state / "last.ckpt")
    assert resume_point["global_step"] == EVERY
    (position,) = resume_point["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (position["epoch"], position["batches"]) == (0, EVERY)
    # the step-4 checkpoint was written after step 4's validation (ResumableCheckpoint):
    # the plateau scheduler has counted it
    assert resume_point["lr_schedulers"][0]["last_epoch"] == 1

    # the control: the same resume point, its epoch restarted at the first batch (what
    # Lightning does with a plain DataLoader), in a copy of the project (same paths)
    control = tmp_path / "control"
    (control / "results").mkdir(parents=True)
    shutil.copy(workdir / "results/collection.json", control / "results")
    shutil.copytree(workdir / "data", control / "data")
    shutil.copytree(workdir / "checkpoints/killed", control / "checkpoints/killed")
    off = env_for(workdir, SCPRINT_RESUME_POSITION="0", SCPRINT_TEST_BATCHES=str(record["control"]))
    restarted = start(train_run("killed"), control, off, tmp_path / "control.log")
    again = env_for(workdir, SCPRINT_TEST_BATCHES=str(record["killed"]))
    rerun = start(train_run("killed"), workdir, again, tmp_path / "rerun.log")
    for proc, log in ((full, "full"), (rerun, "rerun"), (restarted, "control")):
        finish(proc, tmp_path / f"{log}.log")

    summary = json.loads((workdir / "results/train/killed.json").read_text())
    assert summary["resumed_from"].endswith("checkpoints/killed/state/last.ckpt")
    uninterrupted = load(workdir / "checkpoints/full/last.ckpt")
    resumed = load(workdir / "checkpoints/killed/last.ckpt")
    assert uninterrupted["global_step"] == resumed["global_step"] == summary["steps"] == STEPS
    (position,) = resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (position["epoch"], position["batches"]) == (1, STEPS - PER_EPOCH)  # into epoch 1
    assert differing(uninterrupted, resumed) == []  # every weight and optimizer entry
    assert uninterrupted["lr_schedulers"] == resumed["lr_schedulers"]
    full_summary = json.loads((workdir / "results/train/full.json").read_text())
    assert summary["validation"] == full_summary["validation"]  # every loop, every value
    assert [row["step"] for row in summary["validation"]] == [4, 8]
    # the batches themselves: the killed run's and the rerun's together are the
    # uninterrupted run's, batch for batch (epoch, index in it, counts and genes)
    trained = batches(record["full"])
    assert sorted(trained) == list(range(STEPS))
    assert batches(record["killed"]) == trained

    # without the position the resumed run trains on other batches: the weights part
    assert "SCPRINT_RESUME_POSITION=0" in (tmp_path / "control.log").read_text()
    restarted_at = batches(record["control"])[EVERY]
    assert restarted_at["batch_idx"] == EVERY  # Lightning's count went on ...
    assert restarted_at["digest"] == trained[0]["digest"]  # ... over the epoch's 1st batch
    other = load(control / "checkpoints/killed/last.ckpt")
    assert other["global_step"] == STEPS
    assert len(differing(uninterrupted, other)) > len(uninterrupted["state_dict"]) // 2
