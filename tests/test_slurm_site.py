"""profiles/slurm on a cluster shaped like a real site (tests/slurm/site_cluster.py): accounting
enforced through slurmdbd, an account and QoS the GPU partition requires, typed GPUs, two
nodes in their own network namespaces, a non-root submitter, job states from sacct.

Skips without root or the packages; SCPRINT_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from slurm.cluster import ClusterUnavailable
from slurm.site_cluster import ACCOUNT, GPU_TYPE, NODES, SUBMITTER, SiteSlurm, why_site_unavailable
from test_slurm import (
    TEST_SNAKEFILE,
    edit_profile,
    facts,
    fit_args,
    project,
    run_id,
    set_site,
    wait_for,
)

# the plugin's defaults (sacct for states), only the poll intervals shortened
FAST_POLLS = [
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def site():
    reason = why_site_unavailable()
    if reason:
        message = f"site-shaped Slurm cluster unavailable: {reason}"
        if os.environ.get("SCPRINT_REQUIRE_SLURM") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="scprint-site-", dir="/tmp"))
    cluster = SiteSlurm(root)
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.stop()
        pytest.fail(f"site-shaped Slurm cluster did not start: {err}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def site_project(path: Path) -> Path:
    """A project the submitter owns, its profile's SITE lines set for this site."""
    project(path)
    profile = path / "profiles" / "slurm" / "config.yaml"
    text = profile.read_text()
    text = set_site(text, "account", ACCOUNT)
    text = set_site(text, "QoS", "gpu")
    text = set_site(text, "GPU type", GPU_TYPE)
    profile.write_text(text)
    give_to_submitter(path)
    return path


def give_to_submitter(path: Path) -> None:
    user = pwd.getpwnam(SUBMITTER)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(path)], check=True)
    path.chmod(0o755)


def snakemake_as_user(site: SiteSlurm, workdir: Path, *args: str, env: dict | None = None,
                      check: bool = True, timeout: float = 900):  # fmt: skip
    env = dict(env or site.env())
    env.update(
        HOME=str(workdir), USER=SUBMITTER, LOGNAME=SUBMITTER,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        XDG_CACHE_HOME=str(workdir / ".cache"),
    )  # fmt: skip
    cmd = [
        *site.as_submitter(sys.executable), "-m", "snakemake",
        "-s", str(TEST_SNAKEFILE), "-d", str(workdir), "--profile", "profiles/slurm",
        *FAST_POLLS, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        logs = "\n".join(
            f"--- {log}\n{log.read_text()[-3000:]}"
            for log in sorted(workdir.glob("logs/**/*.log"))
            if log.is_file()
        )
        raise AssertionError(
            f"snakemake exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            f"\n{logs}"
        )
    return proc


def site_jobs(site: SiteSlurm, output: str) -> dict[str, dict]:
    """rule -> accounting's record of its job, for one Snakemake run."""
    name = run_id(output)
    records = {}
    for record in site.jobs():
        if record["JobName"] == name:
            rule = record["Comment"].removeprefix("rule_").split("_wildcards_")[0]
            records[rule] = site.sacct(record["JobId"])
    return records


@pytest.mark.slurm
def test_the_gpu_partition_admits_only_its_qos(site):
    """The cluster is what a site is: a job on the GPU partition without --qos=gpu is held
    (EnforcePartLimits=NO, Slurm's default: it waits, it is not refused)."""
    proc = site.run(
        *site.as_submitter("sbatch"), "--parsable", "-p", "gpu", "-A", ACCOUNT,
        f"--gpus={GPU_TYPE}:1", "-o", "/dev/null", "--wrap", "true",
    )  # fmt: skip
    job = proc.stdout.strip()
    try:
        wait_for(
            lambda: "QOS not permitted" in site.run("squeue", "-h", "-j", job, "-o", "%r").stdout,
            timeout=60, what="the job to be held for its QoS",
        )  # fmt: skip
    finally:
        site.run("scancel", job)


@pytest.mark.slurm
def test_account_qos_and_typed_gpus_reach_accounting_and_train_spans_two_nodes(site, tmp_path):
    workdir = site_project(Path(tempfile.mkdtemp(prefix="site-run-", dir="/tmp")))
    try:
        edit_profile(workdir, "train", cpus_per_task=1)
        give_to_submitter(workdir)
        proc = snakemake_as_user(
            site, workdir, "facts/train.txt", "facts/gene_embeddings.txt",
            "facts/preprocess.txt", "--config", "train_nodes=2", "train_gpus_per_node=1",
            f"train_gpu_model={GPU_TYPE}",
        )  # fmt: skip
        jobs = site_jobs(site, proc.stdout + proc.stderr)
        assert set(jobs) == {"train", "gene_embeddings", "preprocess"}
        for rule, job in jobs.items():
            assert job["State"] == "COMPLETED" and job["User"] == SUBMITTER, (rule, job)
            assert job["Account"] == ACCOUNT, (rule, job)
        assert (
            jobs["preprocess"]["QOS"] == "normal"
            and "gres/gpu" not in jobs["preprocess"]["AllocTRES"]
        )
        for rule in ("train", "gene_embeddings"):
            assert jobs[rule]["QOS"] == "gpu" and jobs[rule]["Partition"] == "gpu", jobs[rule]
            assert f"gres/gpu:{GPU_TYPE}=" in jobs[rule]["AllocTRES"], jobs[rule]
        train = jobs["train"]
        assert train["NNodes"] == "2" and train["NodeList"] == "node[1-2]", train
        assert f"gres/gpu:{GPU_TYPE}=2" in train["AllocTRES"], train  # one a node
        assert facts(workdir / "facts" / "train.txt")["HOST"] in NODES
        log = (workdir / "logs" / "train.log").read_text()
        assert "srun --nodes=2 --ntasks=2" in log, log
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slurm
def test_a_runtime_above_max_time_is_refused_at_the_site(site, tmp_path):
    workdir = site_project(Path(tempfile.mkdtemp(prefix="site-short-", dir="/tmp")))
    try:
        profile = workdir / "profiles" / "slurm" / "config.yaml"
        profile.write_text(set_site(profile.read_text(), "GPU partition", "short"))
        proc = snakemake_as_user(site, workdir, "facts/train.txt", check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "rule train: runtime 2880 min > MaxTime 60 min of partition 'short'" in output
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- two-node DDP ----------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_training_on_two_nodes_one_rank_each(site):
    """scprint fit through the profile's launcher on 2 nodes x 1 rank: gloo on CPU, each
    rank on its own node, world size 2, both ranks end with the same weights and the same
    validation metrics (gathered from both ranks' cells)."""
    from test_fit import build_tiny_collection, write_gene_files

    workdir = project(Path(tempfile.mkdtemp(prefix="site-ddp-", dir="/tmp")))
    try:
        profile = workdir / "profiles" / "slurm" / "config.yaml"
        text = set_site(profile.read_text(), "account", ACCOUNT)
        profile.write_text(set_site(text, "QoS", "gpu"))
        edit_profile(workdir, "train", cpus_per_task=1)
        info = build_tiny_collection(workdir)
        write_gene_files(workdir, info["genes"])
        give_to_submitter(workdir)
        args = fit_args(
            "ckpt_2n", 6,
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.callbacks+=slurm_probe.SlurmProbe",
            "--trainer.callbacks.init_args.out_dir", "probe_2n",
        )  # fmt: skip
        env = site.env()
        env["LAMIN_SETTINGS_DIR"] = str(workdir / "lamin" / "settings")
        env["PYTHONPATH"] = f"{Path(__file__).parent / 'slurm'}{os.pathsep}{env['PYTHONPATH']}"
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # rendezvous at node1's address; gloo on each node's own interface
        env.update(MASTER_ADDR=NODES["node1"], GLOO_SOCKET_IFNAME="eth0")
        proc = snakemake_as_user(
            site, workdir, "facts/train.txt", "--config", f"fit_args={args}",
            "train_nodes=2", "train_gpus_per_node=1", env=env,
        )  # fmt: skip
        train = site_jobs(site, proc.stdout + proc.stderr)["train"]
        assert train["State"] == "COMPLETED" and train["NodeList"] == "node[1-2]", train
        ranks = sorted(
            (yaml.safe_load(p.read_text()) for p in (workdir / "probe_2n").glob("*.json")),
            key=lambda r: r["rank"],
        )
        assert [r["rank"] for r in ranks] == [0, 1]
        assert {r["host"] for r in ranks} == set(NODES)  # each rank on its own node
        for r in ranks:
            assert r["world_size"] == 2 and r["backend"] == "gloo", r
            assert r["end_step"] == 6 and r["end_digest"] != r["start_digest"], r
        assert ranks[0]["end_digest"] == ranks[1]["end_digest"]
        assert ranks[0]["val_metrics"] and ranks[0]["val_metrics"] == ranks[1]["val_metrics"]
        log = (workdir / "logs" / "train.log").read_text()
        assert "srun-launch: job " in log and " on nodes node[1-2]" in log, log[-3000:]
        assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-3000:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- two-node resume after kill -9 -------------------------------------------------------------


def sbatch_two_nodes(site: SiteSlurm, workdir: Path, name: str, command: list[str],
                     env: dict) -> str:  # fmt: skip
    """Submit ``command`` as the submitter on 2 nodes x 1 rank through the profile's
    launcher (one srun step over the allocation, as the train rule does); the job id."""
    proc = subprocess.run(
        [*site.as_submitter("sbatch"), "--parsable", "-J", name, "-p", "gpu", "-A", ACCOUNT,
         "--qos=gpu", "--nodes=2", "--ntasks-per-node=1", f"--gres=gpu:{GPU_TYPE}:1",
         "--cpus-per-task=1", f"--chdir={workdir}", f"--output={workdir}/logs/{name}.log",
         "--wrap", shlex.join(["profiles/slurm/srun-launch", *command])],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return proc.stdout.strip().split(";")[0]


def wait_job(site: SiteSlurm, job: str, timeout: float = 900) -> str:
    """The job's final state, once slurmctld no longer runs it."""
    wait_for(
        lambda: not site.run("squeue", "-h", "-j", job, check=False).stdout.strip(),
        timeout=timeout, what=f"job {job} to end",
    )  # fmt: skip
    wait_for(lambda: site.sacct(job)["State"] not in ("RUNNING", "PENDING", "COMPLETING"),
             timeout=60, what=f"accounting of job {job}")  # fmt: skip
    return site.sacct(job)["State"]


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_killed_mid_epoch_and_rerun_end_with_the_uninterrupted_weights(site):
    """`scprint train-run` on 2 nodes x 1 rank (DDP, gloo on CPU) through Slurm: one job
    runs through; another is held by tests/resume_probe.py at the first batch after its
    step-4 checkpoint on both nodes, killed there with `scancel --signal=KILL` (SIGKILL to
    both ranks), and submitted again with the same command. The ranks train on different
    batches; the killed job and its rerun trained on the uninterrupted job's batches, rank
    for rank, and end with its weights, bitwise."""
    from resume_probe import batches
    from test_fit import THREADS, build_tiny_collection, write_gene_files
    from test_resume import EVERY, PER_EPOCH, STEPS, differing, load, train_run

    workdir = Path(tempfile.mkdtemp(prefix="site-resume-", dir="/tmp"))
    try:
        shutil.copytree(REPO / "profiles" / "slurm", workdir / "profiles" / "slurm")
        info = build_tiny_collection(workdir)
        write_gene_files(workdir, info["genes"])
        record = {run: workdir / f"batches-{run}" for run in ("full", "killed")}
        for folder in [*record.values(), workdir / "logs"]:
            folder.mkdir()
        give_to_submitter(workdir)
        env = site.env()
        env.update(
            HOME=str(workdir), USER=SUBMITTER, LOGNAME=SUBMITTER,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            XDG_CACHE_HOME=str(workdir / ".cache"),
            LAMIN_SETTINGS_DIR=str(workdir / "lamin" / "settings"),
            PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{env['PYTHONPATH']}",  # resume_probe
            # rendezvous at node1's address; gloo on each node's own interface
            MASTER_ADDR=NODES["node1"], GLOO_SOCKET_IFNAME="eth0", **THREADS,
        )  # fmt: skip
        shape = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
                 "--trainer.num_nodes", "2", "--trainer.devices", "1",
                 # an epoch's draws are shared out over the ranks: twice as many keep
                 # PER_EPOCH batches a rank, and the kill mid-epoch
                 "--data.n_samples_per_epoch", str(2 * 8 * PER_EPOCH)]  # fmt: skip
        marker = workdir / "paused"
        full = sbatch_two_nodes(site, workdir, "full", train_run("full", *shape),
                                {**env, "SCPRINT_TEST_BATCHES": str(record["full"])})  # fmt: skip
        killed_env = {
            **env, "SCPRINT_TEST_BATCHES": str(record["killed"]),
            "SCPRINT_TEST_PAUSE_AT": str(EVERY), "SCPRINT_TEST_PAUSE_MARKER": str(marker),
        }  # fmt: skip
        killed = sbatch_two_nodes(site, workdir, "killed", train_run("killed", *shape),
                                  killed_env)  # fmt: skip
        state = workdir / "checkpoints" / "killed" / "state"
        held = [marker.with_suffix(f".rank{r}") for r in (0, 1)]
        wait_for(
            lambda: all(p.exists() for p in held)
            and (state / f"epoch=0-step={EVERY}.ckpt").exists(),
            timeout=900, what="both ranks of the job to hold after the step-4 checkpoint",
        )  # fmt: skip
        site.run("scancel", "--signal=KILL", killed)
        assert wait_job(site, killed) != "COMPLETED"
        assert [p.read_text().split() for p in held] == [["0", str(EVERY), str(EVERY)]] * 2
        resume_point = load(state / "last.ckpt")
        (position,) = resume_point["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert (position["epoch"], position["batches"], position["world_size"]) == (0, EVERY, 2)
        assert not (workdir / "checkpoints" / "killed" / "last.ckpt").exists()

        rerun_env = {**env, "SCPRINT_TEST_BATCHES": str(record["killed"])}
        rerun = sbatch_two_nodes(site, workdir, "rerun", train_run("killed", *shape), rerun_env)
        for job, name in ((full, "full"), (rerun, "rerun")):
            log = (workdir / "logs" / f"{name}.log").read_text
            assert wait_job(site, job) == "COMPLETED", log()[-6000:]
        log = (workdir / "logs" / "rerun.log").read_text()
        assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-3000:]
        assert site.sacct(rerun)["NodeList"] == "node[1-2]"

        trained = {r: batches(record["full"], r) for r in (0, 1)}
        assert all(sorted(trained[r]) == list(range(STEPS)) for r in (0, 1))
        for step in range(STEPS):  # the ranks' batches differ at every step
            assert trained[0][step]["digest"] != trained[1][step]["digest"], step
        for r in (0, 1):  # the killed job's and the rerun's batches: the uninterrupted one's
            assert batches(record["killed"], r) == trained[r], r
        uninterrupted = load(workdir / "checkpoints" / "full" / "last.ckpt")
        resumed = load(workdir / "checkpoints" / "killed" / "last.ckpt")
        assert uninterrupted["global_step"] == resumed["global_step"] == STEPS
        assert differing(uninterrupted, resumed) == []
        assert uninterrupted["lr_schedulers"] == resumed["lr_schedulers"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
