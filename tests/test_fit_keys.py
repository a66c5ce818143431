"""The top-level keys of `scprint fit` and the `checkpoint:` section each change what a run
does (issue 5: no key may be silently ignored).

Three real `scprint fit` runs on the tiny collection of test_fit, each with its own W&B
offline folder and checkpoint folder; what every key did is read back from the real
outputs: the W&B run file, the checkpoint files, and a probe callback (tests/fit_probe.py)
that records torch's global state when training starts.

    A: seed 7, project/name set, wandblog all every 2 steps + graph, matmul "high",
       a checkpoint every step, all kept, last.ckpt
    B: seed 7, wandblog parameters every step, no graph, matmul untouched,
       a checkpoint every 2 steps, top 1 kept, no last.ckpt
    C: seed 8, resumes from A's step-2 checkpoint (ckpt_path), no watching
`scprint_training:` keys are covered in test_trainer.py (name: here, the W&B run name);
ckpt_path through train-run also in test_fit.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, run_cli
from test_fit import THREADS, build_tiny_collection, load, small_run_args, write_gene_files
from wandb_records import read_run

TESTS = Path(__file__).resolve().parent
STEPS = 4


def fit(workdir: Path, run: str, *args: str) -> None:
    probe = json.dumps(
        {"class_path": "fit_probe.RunStateProbe", "init_args": {"path": f"probe_{run}.json"}}
    )
    run_cli(
        [
            "fit",
            "--config",
            REPO / "config/base.yml",
            *small_run_args(f"ck{run}"),
            "--model.d_model",
            "32",
            "--model.nlayers",
            "1",
            "--model.nhead",
            "2",
            "--trainer.max_steps",
            str(STEPS),
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.logger.init_args.save_dir",
            f"logs/{run}",
            f"--trainer.callbacks+={probe}",
            *args,
        ],  # fmt: skip
        cwd=workdir,
        env=cli_env(
            workdir, **THREADS, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]])
        ),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("fitkeys")
    info = build_tiny_collection(workdir)
    write_gene_files(workdir, info["genes"])
    fit(
        workdir, "A",
        "--seed_everything", "7", "--project", "keyproj", "--scprint_training.name", "keyrun",
        "--wandblog", "all", "--log_freq", "2", "--log_graph", "true",
        "--set_float32_matmul_precision", "high",
        "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
        "--checkpoint.save_last", "true",
    )  # fmt: skip
    fit(
        workdir, "B",
        "--seed_everything", "7", "--wandblog", "parameters", "--log_freq", "1",
        "--log_graph", "false", "--set_float32_matmul_precision", "false",
        "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "1",
        "--checkpoint.save_last", "false",
    )  # fmt: skip
    fit(
        workdir, "C",
        "--seed_everything", "8", "--ckpt_path", str(step_checkpoints(workdir / "ckA")[2]),
        "--wandblog", "null", "--log_graph", "false",
        "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
    )  # fmt: skip
    return workdir


def step_checkpoints(folder: Path) -> dict[int, Path]:
    """ModelCheckpoint's files by training step (its default name: epoch=E-step=S.ckpt)."""
    found = {}
    for path in folder.glob("*.ckpt"):
        match = re.search(r"step=(\d+)", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def wandb_run(workdir: Path, run: str) -> dict:
    (run_dir,) = (workdir / "logs" / run / "wandb").glob("offline-run-*")
    return read_run(run_dir)


def probe(workdir: Path, run: str) -> dict:
    return json.loads((workdir / f"probe_{run}.json").read_text())


def steps_logging(history: list[dict], prefix: str) -> list[int]:
    return sorted(
        int(row["trainer/global_step"])
        for row in history
        if any(key.startswith(prefix) for key in row)
    )


def test_project_and_run_name_reach_the_wandb_run(runs):
    a, b = wandb_run(runs, "A"), wandb_run(runs, "B")
    assert (a["project"], a["name"]) == ("keyproj", "keyrun")
    assert b["project"] == "scprint"  # base.yml's project
    assert b["name"] != "keyrun"


def test_wandblog_and_log_freq_choose_what_is_logged_and_how_often(runs):
    a, b, c = (wandb_run(runs, r)["history"] for r in "ABC")
    assert steps_logging(a, "gradients/") == [2, 4]  # all, every 2 steps
    assert steps_logging(a, "parameters/") == [2, 4]
    assert steps_logging(b, "parameters/") == [1, 2, 3, 4]  # parameters, every step
    assert steps_logging(b, "gradients/") == []
    assert steps_logging(c, "gradients/") == steps_logging(c, "parameters/") == []  # null
    row = next(r for r in a if any(k.startswith("gradients/") for k in r))
    assert any(k.startswith("gradients/net.transformer.blocks.0.mixer") for k in row)


def test_log_graph_logs_the_model_graph(runs):
    a, b = wandb_run(runs, "A"), wandb_run(runs, "B")
    assert "graph_0" in a["summary"]
    (graph_file,) = [f for f in a["files"] if f.startswith("media/graph/")]
    (run_dir,) = (runs / "logs/A/wandb").glob("offline-run-*")
    graph = json.loads((run_dir / "files" / graph_file).read_text())
    names = {node["name"] for node in graph["nodes"]}
    assert any(n.startswith("net.transformer.blocks.0.") for n in names)  # modules the step ran
    assert "graph_0" not in b["summary"]


def test_set_float32_matmul_precision_sets_torch_for_the_run(runs):
    assert probe(runs, "A")["float32_matmul_precision"] == "high"
    assert probe(runs, "B")["float32_matmul_precision"] == "highest"  # false: torch default


def test_seed_everything_makes_runs_repeatable_and_its_value_matters(runs):
    assert probe(runs, "A")["torch_initial_seed"] == 7
    assert probe(runs, "C")["torch_initial_seed"] == 8
    # same seed, same data: identical weights after 4 steps, whatever was watched/logged
    a = load(step_checkpoints(runs / "ckA")[4])["state_dict"]
    b = load(step_checkpoints(runs / "ckB")[4])["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_keys_shape_the_checkpoint_folder(runs):
    assert sorted(step_checkpoints(runs / "ckA")) == [1, 2, 3, 4]  # every step, all kept
    assert (runs / "ckA" / "last.ckpt").exists()  # save_last
    assert sorted(step_checkpoints(runs / "ckB")) == [4]  # every 2 steps, top 1 kept
    assert not (runs / "ckB" / "last.ckpt").exists()


def test_ckpt_path_resumes_instead_of_restarting(runs):
    assert probe(runs, "C")["start_step"] == 2
    assert sorted(step_checkpoints(runs / "ckC")) == [3, 4]  # steps 1-2 were not redone
    last = load(runs / "ckC" / "last.ckpt")
    assert last["global_step"] == STEPS
    adam_steps = {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {STEPS}  # the optimizer state came from A's checkpoint
