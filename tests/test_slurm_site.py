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
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from slurm.cluster import ClusterUnavailable
from slurm.site_cluster import (
    ACCOUNT,
    GPU_MEMORY_GRES,
    GPU_TYPE,
    NODES,
    SUBMITTER,
    SiteSlurm,
    why_site_unavailable,
)
from test_slurm import (
    edit_profile,
    facts,
    fit_args,
    project,
    run_id,
    set_site,
    snakemake,
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
    env.update(HOME=str(workdir), USER=SUBMITTER, LOGNAME=SUBMITTER,
               XDG_CACHE_HOME=str(workdir / ".cache"))  # fmt: skip
    return snakemake(site, workdir, *args, env=env, check=check, timeout=timeout,
                     run_as=site.as_submitter(), polls=FAST_POLLS)  # fmt: skip


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


@pytest.mark.slurm
def test_gpu_memory_and_memory_per_gpu_reach_the_job(site):
    """The seed's request `--gres=gpu:A40:4,gmem:40G --mem-per-gpu 90G`, as this site has it:
    config train.gpu_memory (a GRES, sent beside --gpus) and the profile's --mem-per-gpu with
    mem_mb 0 (no --mem). The job's record shows both; the same profile with mem_mb left set
    stops before submitting instead of failing in sbatch."""
    workdir = site_project(Path(tempfile.mkdtemp(prefix="site-gmem-", dir="/tmp")))
    try:
        shape = ["--config", "train_gpus_per_node=2", f"train_gpu_model={GPU_TYPE}",
                 f"train_gpu_memory={GPU_MEMORY_GRES}:40G"]  # fmt: skip
        edit_profile(workdir, "train", cpus_per_task=1,
                     slurm_extra="--signal=USR1@600 --mem-per-gpu=2G")  # fmt: skip
        give_to_submitter(workdir)
        refused = snakemake_as_user(site, workdir, "facts/train.txt", *shape, check=False)
        assert refused.returncode != 0
        assert "rule(s) train: --mem-per-gpu in slurm_extra together with mem_mb" in (
            refused.stdout + refused.stderr
        )
        assert site_jobs(site, refused.stdout + refused.stderr) == {}  # nothing submitted

        edit_profile(workdir, "train", mem_mb=0)
        give_to_submitter(workdir)
        proc = snakemake_as_user(site, workdir, "facts/train.txt", "--verbose", *shape)
        output = proc.stdout + proc.stderr
        (call,) = [line for line in output.splitlines() if "sbatch call:" in line]
        assert f" --gres={GPU_MEMORY_GRES}:40G" in call and f" --gpus={GPU_TYPE}:2" in call
        # Slurm 22.05 refuses --ntasks-per-gpu beside another GRES
        assert " --ntasks=2" in call and "--ntasks-per-gpu" not in call, call
        assert " --mem-per-gpu=2G" in call and " --mem " not in call, call
        (record,) = [r for r in site.jobs() if r["JobName"] == run_id(output)]
        assert record["JobState"] == "COMPLETED", record
        assert record["TresPerNode"] == f"gres:{GPU_MEMORY_GRES}:40G", record
        assert record["TresPerJob"] == f"gres:gpu:{GPU_TYPE}:2", record
        assert record["MemPerTres"] == "gres:gpu:2048", record
        assert (record["NumNodes"], record["NumTasks"]) == ("1", "2"), record
        log = (workdir / "logs" / "train.log").read_text()
        assert "srun --nodes=1 --ntasks=2 --cpus-per-task=1" in log, log
        # the GRES is a real constraint: more GPU memory than a node has is refused
        proc = site.run(
            *site.as_submitter("sbatch"), "--parsable", "-p", "gpu", "-A", ACCOUNT,
            "--qos=gpu", f"--gpus={GPU_TYPE}:1", f"--gres={GPU_MEMORY_GRES}:64G",
            "-o", "/dev/null", "--wrap", "true", check=False,
        )  # fmt: skip
        assert "Requested node configuration is not available" in proc.stderr, proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slurm
def test_a_job_killed_by_the_memory_cgroup_is_retried_with_more(site):
    """Slurm's task/cgroup kills a job over its --mem (its step OUT_OF_MEMORY); Snakemake
    resubmits it (the profile's retries) with 1.5x the memory, as the data-driven rules
    ask on each attempt (scprint/plan.py), and the retry completes."""
    workdir = site_project(Path(tempfile.mkdtemp(prefix="site-oom-", dir="/tmp")))
    try:
        proc = snakemake_as_user(site, workdir, "oom_cgroup/done.txt", "--config",
                                 "oom_base_mb=1000")  # fmt: skip
        output = proc.stdout + proc.stderr
        records = [r for r in site.jobs() if r["JobName"] == run_id(output)]
        states = [site.sacct(r["JobId"])["State"] for r in records]
        # the kill hits the job step running the rule (the plugin's `srun ... snakemake`):
        # that step is OUT_OF_MEMORY, the job FAILED (its batch script exits non-zero)
        assert states == ["FAILED", "COMPLETED"], (states, output[-3000:])
        steps = site.run("sacct", "-n", "-P", "-j", records[0]["JobId"], "-o", "JobID,State")
        assert "|OUT_OF_MEMORY" in steps.stdout, steps.stdout
        assert [r["MinMemoryNode"] for r in records] in (["1000M", "1500M"],
                                                         ["1000M", "1.46G"]), records  # fmt: skip
        assert (workdir / "oom_cgroup" / "done.txt").read_text() == "ok\n"
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
                     env: dict, *extra: str) -> str:  # fmt: skip
    """Submit ``command`` as the submitter on 2 nodes x 1 rank through the profile's
    launcher (one srun step over the allocation, as the train rule does); the job id.
    ``extra``: more sbatch options."""
    proc = subprocess.run(
        [*site.as_submitter("sbatch"), "--parsable", "-J", name, "-p", "gpu", "-A", ACCOUNT,
         "--qos=gpu", "--nodes=2", "--ntasks-per-node=1", f"--gres=gpu:{GPU_TYPE}:1",
         # memory is enforced (cgroups): a rank gets --mem, not DefMemPerCPU's 1000 MB
         "--cpus-per-task=1", "--mem=8000",
         f"--chdir={workdir}", f"--output={workdir}/logs/{name}.log",
         "--open-mode=append", *extra,
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


@dataclass
class TwoNodeRuns:
    """A project for 2-node `scprint train-run` jobs submitted with sbatch_two_nodes, and
    its uninterrupted reference run ("full", started when the fixture is made, awaited by
    `reference()`): the fault tests compare their resumed runs with it."""

    site: SiteSlurm
    workdir: Path
    env: dict
    full_job: str = ""

    def command(self, name: str) -> list[str]:
        from test_resume import PER_EPOCH, train_run

        return train_run(
            name, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.num_nodes", "2", "--trainer.devices", "1",
            # an epoch's draws are shared out over the ranks: twice as many keep PER_EPOCH
            # batches a rank, and the kill mid-epoch
            "--data.n_samples_per_epoch", str(2 * 8 * PER_EPOCH),
        )  # fmt: skip

    def record(self, name: str) -> Path:
        """Where each rank of run ``name`` writes the batches it trained on."""
        folder = self.workdir / f"batches-{name}"
        if not folder.exists():
            folder.mkdir()
            give_to_submitter(folder)
        return folder

    def submit(self, name: str, env: dict | None = None, *extra: str,
               job_name: str | None = None) -> str:  # fmt: skip
        env = {**self.env, "SCPRINT_TEST_BATCHES": str(self.record(name)), **(env or {})}
        return sbatch_two_nodes(self.site, self.workdir, job_name or name, self.command(name),
                                env, *extra)  # fmt: skip

    def reference(self) -> dict:
        log = (self.workdir / "logs" / "full.log").read_text
        assert wait_job(self.site, self.full_job) == "COMPLETED", log()[-6000:]
        from test_resume import load

        return load(self.workdir / "checkpoints" / "full" / "last.ckpt")


@pytest.fixture(scope="module")
def two_node_runs(site):
    from test_fit import THREADS, build_tiny_collection, write_gene_files

    workdir = Path(tempfile.mkdtemp(prefix="site-resume-", dir="/tmp"))
    shutil.copytree(REPO / "profiles" / "slurm", workdir / "profiles" / "slurm")
    info = build_tiny_collection(workdir)
    write_gene_files(workdir, info["genes"])
    (workdir / "logs").mkdir()
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
    runs = TwoNodeRuns(site, workdir, env)
    runs.full_job = runs.submit("full")
    yield runs
    site.run("scancel", runs.full_job, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def rank_process(job: str, rank: int) -> tuple[int, str]:
    """(pid, node) of rank ``rank``'s training process of Slurm job ``job``: the nodes
    share the host's process table (only network, UTS and mount namespaces are their own)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_text(errors="replace").split("\0")
                if "=" in item
            )
            cmdline = (proc / "cmdline").read_text(errors="replace")
        except OSError:
            continue
        if (environ.get("SLURM_JOB_ID") == job and environ.get("SLURM_PROCID") == str(rank)
                and "train-run" in cmdline and "srun" not in cmdline):  # fmt: skip
            return int(proc.name), environ["SLURMD_NODENAME"]
    raise AssertionError(f"no process of rank {rank} of job {job}")


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_killed_mid_epoch_and_rerun_end_with_the_uninterrupted_weights(
    two_node_runs,
):
    """`scprint train-run` on 2 nodes x 1 rank (DDP, gloo on CPU) through Slurm: one job
    runs through (the fixture's); another is held by tests/resume_probe.py at the first
    batch after its step-4 checkpoint on both nodes, killed there with `scancel
    --signal=KILL` (SIGKILL to both ranks), and submitted again with the same command. The
    ranks train on different batches; the killed job and its rerun trained on the
    uninterrupted job's batches, rank for rank, and end with its weights, bitwise."""
    from resume_probe import batches
    from test_resume import EVERY, STEPS, differing, load

    runs, site = two_node_runs, two_node_runs.site
    workdir = runs.workdir
    marker = workdir / "paused"
    killed = runs.submit("killed", {"SCPRINT_TEST_PAUSE_AT": str(EVERY),
                                    "SCPRINT_TEST_PAUSE_MARKER": str(marker)})  # fmt: skip
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

    rerun = runs.submit("killed", job_name="rerun")
    log = (workdir / "logs" / "rerun.log").read_text
    assert wait_job(site, rerun) == "COMPLETED", log()[-6000:]
    assert "MEMBER: 1/2" in log() and "MEMBER: 2/2" in log(), log()[-3000:]
    assert site.sacct(rerun)["NodeList"] == "node[1-2]"
    uninterrupted = runs.reference()

    trained = {r: batches(runs.record("full"), r) for r in (0, 1)}
    assert all(sorted(trained[r]) == list(range(STEPS)) for r in (0, 1))
    for step in range(STEPS):  # the ranks' batches differ at every step
        assert trained[0][step]["digest"] != trained[1][step]["digest"], step
    for r in (0, 1):  # the killed job's and the rerun's batches: the uninterrupted one's
        assert batches(runs.record("killed"), r) == trained[r], r
    resumed = load(workdir / "checkpoints" / "killed" / "last.ckpt")
    assert uninterrupted["global_step"] == resumed["global_step"] == STEPS
    assert differing(uninterrupted, resumed) == []
    assert uninterrupted["lr_schedulers"] == resumed["lr_schedulers"]


@pytest.mark.slurm
@pytest.mark.slow
def test_one_rank_killed_ends_the_two_node_job_and_names_it(two_node_runs):
    """Rank 1 is held after step 1 while rank 0 goes on into the next step's gradient all-reduce
    and waits there for it; rank 1's process is then killed (kill -9). The job must not
    hang: srun (--kill-on-bad-exit in the launcher) ends the step, the job FAILS within a
    minute, and its log names the rank and node that died and says what to do."""
    runs, site = two_node_runs, two_node_runs.site
    marker = runs.workdir / "one-rank"
    job = runs.submit("one_rank", {"SCPRINT_TEST_PAUSE_AT": "1", "SCPRINT_TEST_PAUSE_RANKS": "1",
                                   "SCPRINT_TEST_PAUSE_MARKER": str(marker)})  # fmt: skip
    wait_for(lambda: marker.with_suffix(".rank1").exists(), timeout=900,
             what="rank 1 to hold after step 1")  # fmt: skip
    time.sleep(3)  # rank 0 is in the all-reduce by now (its steps take < 1 s)
    pid, node = rank_process(job, 1)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    state = wait_job(site, job, timeout=120)
    ended_after = time.monotonic() - killed_at
    log = (runs.workdir / "logs" / "one_rank.log").read_text()
    assert state == "FAILED", (state, log[-4000:])
    assert ended_after < 60, ended_after
    assert f"rank 1 on node {node} failed first (Killed)" in log, log[-4000:]
    assert "srun-launch: what to do:" in log and "resumes from the last" in log, log[-4000:]
    print(f"job ended {ended_after:.1f} s after the kill")


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_two_node_job_resumes_with_the_same_step_count(two_node_runs):
    """`scontrol requeue` of the running 2-node job (both ranks held after the step-4
    checkpoint): Slurm kills and restarts it with the same command; it resumes from
    checkpoints/<run>/state/last.ckpt and ends at the same global step, with the
    uninterrupted run's weights, bitwise."""
    from resume_probe import batches
    from test_resume import EVERY, STEPS, differing, load

    runs, site = two_node_runs, two_node_runs.site
    marker = runs.workdir / "requeue"
    job = runs.submit("requeued", {"SCPRINT_TEST_PAUSE_AT": str(EVERY),
                                   "SCPRINT_TEST_PAUSE_MARKER": str(marker)},
                      "--requeue")  # fmt: skip
    state = runs.workdir / "checkpoints" / "requeued" / "state"
    wait_for(
        lambda: all(marker.with_suffix(f".rank{r}").exists() for r in (0, 1))
        and (state / f"epoch=0-step={EVERY}.ckpt").exists(),
        timeout=900, what="both ranks to hold after the step-4 checkpoint",
    )  # fmt: skip
    site.run(*site.as_submitter("scontrol"), "requeue", job)  # as the job's owner would
    # a requeued job waits for its BeginTime (about two minutes); start it now
    wait_for(lambda: "Restarts=1 " in site.run("scontrol", "show", "job", "-o", job).stdout
             and "JobState=PENDING" in site.run("scontrol", "show", "job", "-o", job).stdout,
             timeout=120, what="the job to be requeued")  # fmt: skip
    site.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    log = (runs.workdir / "logs" / "requeued.log").read_text
    assert wait_job(site, job) == "COMPLETED", log()[-6000:]
    restarts = site.run("scontrol", "show", "job", job, check=False).stdout
    assert "Restarts=1" in restarts, restarts
    assert log().count("srun-launch: job ") == 2, log()[-6000:]  # two starts, one log
    uninterrupted = runs.reference()
    for r in (0, 1):
        assert batches(runs.record("requeued"), r) == batches(runs.record("full"), r), r
        # resumed, not started again: no step was trained twice (a fresh start would, and
        # would end with the same weights too)
        lines = (runs.record("requeued") / f"rank{r}.jsonl").read_text().splitlines()
        assert len(lines) == STEPS, lines
    resumed = load(runs.workdir / "checkpoints" / "requeued" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
    assert differing(uninterrupted, resumed) == []
