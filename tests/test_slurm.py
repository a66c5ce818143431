"""profiles/slurm on a real Slurm cluster: routing, GPUs, retries, cancellation, DDP, requeue.

A single-node cluster (munge, slurmctld, slurmd from the Debian packages; partitions cpu,
gpu and internet; two gres GPUs backed by /dev/null and /dev/zero) is started once for
this module by tests/slurm/cluster.py and stopped afterwards. Every workflow runs through
`--profile profiles/slurm` (a copy in the project directory, as a user has it) plus only
what this cluster needs: job states from squeue (it has no accounting database) and short
poll intervals. Assertions read Slurm's own records (`scontrol show job`; finished jobs
stay for MinJobAge) and what the jobs saw in their environment.

Without root or the packages the tests skip with the reason; with SCPRINT_REQUIRE_SLURM=1
(CI) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from slurm.cluster import SNAKEMAKE_OVERRIDES, ClusterUnavailable, LocalSlurm, why_unavailable

PROFILE = REPO / "profiles" / "slurm"
TEST_SNAKEFILE = REPO / "tests" / "slurm" / "Snakefile"
INTERNET_PARTITION = "internet"
SHORT_PARTITION = "short"  # MaxTime 60 minutes, below train's 2,880
GPU_RULES = {"gene_embeddings", "train", "finetune"}
# the pipeline's per-dataset rules go to Slurm in groups: <group>_<rule> -> rule
GROUP_JOBS = {"downloads_download": "download", "preprocessing_preprocess": "preprocess"}


# -- the cluster ---------------------------------------------------------------------------


def _unavailable(reason: str):
    message = f"local Slurm cluster unavailable: {reason}"
    if os.environ.get("SCPRINT_REQUIRE_SLURM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def cluster():
    reason = why_unavailable()
    if reason:
        _unavailable(reason)
    # munged runs as user munge: its directory must not sit under pytest's 0700 tmp dirs
    root = Path(tempfile.mkdtemp(prefix="scprint-slurm-", dir="/tmp"))
    slurm = LocalSlurm(root, extra_partitions=(INTERNET_PARTITION, f"{SHORT_PARTITION}:60"))
    try:
        slurm.start()
    except ClusterUnavailable as err:
        slurm.stop()
        _unavailable(str(err))
    yield slurm
    slurm.stop()
    shutil.rmtree(root, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------


def project(path: Path) -> Path:
    """A project directory as a user has it: config/ and profiles/ from the repository, with
    the internet partition's SITE line set to this cluster's `internet` partition."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "config", path / "config", dirs_exist_ok=True)
    shutil.copytree(PROFILE, path / "profiles" / "slurm", dirs_exist_ok=True)
    profile = path / "profiles" / "slurm" / "config.yaml"
    profile.write_text(set_site(profile.read_text(), "internet access", INTERNET_PARTITION))
    return path


def set_site(profile_text: str, marker: str, value: str) -> str:
    """Change the value on the one `# SITE: ...marker...` line, as a user edits it."""
    lines = profile_text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if "# SITE" in line and marker in line]
    assert len(hits) == 1, f"expected one SITE line about {marker!r}, found {len(hits)}"
    line = lines[hits[0]]
    head, comment = line.split("#", 1) if not line.lstrip().startswith("#") else ("", line)
    if not head:  # a commented-out setting: uncomment it with the new value
        indent = line[: len(line) - len(line.lstrip())]
        key = comment.lstrip("# ").split(":", 1)[0]
        lines[hits[0]] = f"{indent}{key}: {value}   #{comment.split('#', 2)[-1]}"
    else:
        key, _, old = head.partition(":")
        anchor = re.match(r"\s*(&\S+\s+)?", old).group(1) or ""
        lines[hits[0]] = f"{key}: {anchor}{value}   #{comment}"
    return "".join(lines)


def edit_profile(workdir: Path, rule: str, **resources) -> None:
    """Change one rule's resources in the project's profile copy (what a user edits: on the
    command line, --set-resources would replace the profile's whole set-resources)."""
    path = workdir / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["set-resources"][rule].update(resources)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


def snakemake(
    cluster: LocalSlurm, workdir: Path, *args: str, snakefile: Path = TEST_SNAKEFILE,
    check: bool = True, background: bool = False, timeout: float = 900, env: dict | None = None,
    run_as: list[str] = (), polls: list[str] = SNAKEMAKE_OVERRIDES,
):  # fmt: skip
    """Snakemake on the test cluster with the project's Slurm profile; `run_as` prefixes the
    command (the site cluster's non-root submitter), `polls` sets the plugin's polling."""
    env = dict(env or cluster.env())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [
        *run_as, sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
        "--profile", "profiles/slurm", *polls, *args,
    ]  # fmt: skip
    if background:
        return subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        logs = "\n".join(
            f"--- {log}\n{log.read_text()[-3000:]}"
            for log in sorted(workdir.glob("logs/**/*.log"))
            if log.is_file()
        )
        raise AssertionError(
            f"snakemake {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}\n{logs}"
        )
    return proc


def run_id(output: str) -> str:
    """The plugin names every job of one Snakemake run after the run's id."""
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no 'SLURM run ID' in the output:\n{output[-3000:]}"
    return match.group(1)


def rule_of(record: dict) -> str:
    """The plugin puts `rule_<name>[_wildcards_<values>]` in the job comment."""
    match = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", record.get("Comment", ""))
    assert match, f"job {record['JobId']} has no rule comment: {record.get('Comment')}"
    return match.group(1)


def jobs_of_run(cluster: LocalSlurm, output: str) -> list[dict]:
    name = run_id(output)
    return [r for r in cluster.jobs() if r["JobName"] == name]


def facts(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, run=None):
    """Poll ``predicate`` until it is truthy; give up early when ``run`` (a Popen) ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and run.poll() is not None:
            raise AssertionError(
                f"snakemake ended ({run.returncode}) before {what}:\n{run.stdout.read()[-6000:]}"
            )
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def minutes(limit: str) -> int:
    """Slurm's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def expected_resources(profile_text: str) -> dict[str, dict]:
    """rule -> the resources the profile asks for (set-resources over default-resources)."""
    profile = yaml.safe_load(profile_text)
    default = profile["default-resources"]
    rules = set(profile["set-resources"]) | {
        "preprocess",
        "collection",  # their memory and runtime follow the data in the pipeline's rules
        "lamin_instance",
        "demo_data",
        "gene_positions",
        "tiny_esm",
        # the report's figures: small CPU jobs on the default resources
        "report_datasets",
        "report_collection",
        "report_genes",
        "report_training",
    }
    return {rule: {**default, **profile["set-resources"].get(rule, {})} for rule in rules}


def data_driven_runtimes(workdir: Path) -> dict[str, set[int]]:
    """rule -> the runtimes (minutes, first attempt) the workflow gives the jobs whose
    resources follow the listing (per dataset for download and preprocess: a Slurm job
    of several datasets asks for their sum, checked with group_datasets)."""
    from scprint.plan import collection_runtime_min, job_resources

    rows = sorted((workdir / "results" / "listing").glob("*.tsv"))
    return {
        "download": {job_resources("download", row)["runtime"] for row in rows},
        "preprocess": {job_resources("preprocess", row)["runtime"] for row in rows},
        "collection": {collection_runtime_min(len(rows))},
    }


def effective_partitions(profile_text: str) -> dict[str, str]:
    return {rule: r["slurm_partition"] for rule, r in expected_resources(profile_text).items()}


def test_each_site_setting_is_changed_on_one_line():
    text = (PROFILE / "config.yaml").read_text()
    base = effective_partitions(text)
    assert base["train"] == base["gene_embeddings"] == "gpu"
    assert {base[r] for r in base if r not in GPU_RULES} == {"cpu"}

    cpu = effective_partitions(set_site(text, "CPU jobs", "compute"))
    assert {cpu[r] for r in cpu if r not in GPU_RULES} == {"compute"}  # downloads follow
    assert cpu["train"] == "gpu"

    web = effective_partitions(set_site(text, "internet access", "web"))
    assert {r for r, p in web.items() if p == "web"} == {"list_datasets", "download"}

    gpu = effective_partitions(set_site(text, "GPU partition", "a100q"))
    assert {r for r, p in gpu.items() if p == "a100q"} == GPU_RULES

    model = expected_resources(set_site(text, "GPU type", "h100"))
    # training's type is config train.gpu_model: it goes into its per-node gres
    assert {r for r, res in model.items() if res.get("gpu_model") == "h100"} == GPU_RULES - {
        "train"
    }

    qos = expected_resources(set_site(text, "QoS", "gpu"))
    assert {r for r, res in qos.items() if res.get("qos") == "gpu"} == GPU_RULES

    account = expected_resources(set_site(text, "account", "mylab"))
    assert {res.get("slurm_account") for res in account.values()} == {"mylab"}


def test_gpu_memory_goes_beside_the_gpus_and_mem_per_gpu_excludes_mem():
    """The seed's `--gres=gpu:A40:4,gmem:40G --mem-per-gpu 90G` in what plugin 2.6.1 can send:
    the GPU-memory GRES as the one `gres` item beside --gpus (one node); --mem-per-gpu in
    slurm_extra only with mem_mb 0 (the plugin sends --mem for any other mem_mb)."""
    from scprint.io import StageError
    from scprint.slurm import check_memory_options, train_resources

    one = train_resources(1, 4, "A40", "gmem:40G")
    assert (one["gpu"], one["gpu_model"], one["gres"]) == (4, "A40", "gmem:40G")
    # Slurm refuses --ntasks-per-gpu beside another GRES: --ntasks (an "mpi" job's)
    assert (one["tasks_per_gpu"], one["mpi"], one["tasks"]) == (0, "srun", 4)
    single = train_resources(1, 1, "A40", "gmem:40G")  # one task: Slurm's default
    assert (single["tasks_per_gpu"], single["mpi"], single["tasks"]) == (0, "", 0)
    assert train_resources(2, 1, "A40")["gres"] == "gpu:A40:1"
    with pytest.raises(StageError, match="single --gres item"):
        train_resources(2, 1, "A40", "gmem:40G")
    with pytest.raises(StageError, match="NAME:COUNT"):
        train_resources(1, 4, "A40", "gpu:A40:4,gmem:40G")

    check_memory_options([("train", 0, "--signal=USR1@600 --mem-per-gpu=90G"),
                          ("preprocess", 8000, None)])  # fmt: skip
    with pytest.raises(StageError, match=r"rule\(s\) train: .*set `mem_mb: 0`"):
        check_memory_options([("train", 64000, "--mem-per-gpu 90G")])


# -- routing, on the cluster -----------------------------------------------------------------


@pytest.mark.slurm
def test_rules_run_in_their_partitions_and_gpu_rules_get_a_gpu(cluster, tmp_path):
    workdir = project(tmp_path)
    proc = snakemake(cluster, workdir, "all")
    wanted = expected_resources((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    records = {rule_of(r): r for r in jobs_of_run(cluster, proc.stdout + proc.stderr)}
    assert set(records) == {"list_datasets", "download", "preprocess", "collection"} | GPU_RULES

    for rule, record in records.items():
        want = wanted[rule]
        assert record["JobState"] == "COMPLETED", (rule, record["JobState"])
        assert record["Partition"] == want["slurm_partition"], rule
        assert minutes(record["TimeLimit"]) == want["runtime"], rule
        assert (
            record["MinMemoryNode"] == f"{want['mem_mb']}M"
            or record["MinMemoryNode"] == f"{want['mem_mb'] / 1024:.2f}G"
        ), (rule, record["MinMemoryNode"])
        seen = facts(workdir / "facts" / f"{rule}.txt")
        assert (
            seen["SLURM_JOB_ID"] == record["JobId"]
            and seen["SLURM_JOB_PARTITION"] == (want["slurm_partition"])
        )
        if rule in GPU_RULES:
            assert record.get("JOB_GRES") == "gpu:1", (rule, record.get("JOB_GRES"))
            # one of the node's two GPUs: GPU jobs (train, finetune, embeddings) may overlap
            assert seen["CUDA_VISIBLE_DEVICES"] in ("0", "1"), (rule, seen)
            assert seen["SLURM_CPUS_PER_TASK"] == str(want["cpus_per_task"]), rule
        else:
            assert record.get("JOB_GRES") in (None, "(null)"), (rule, record.get("JOB_GRES"))
            assert seen["CUDA_VISIBLE_DEVICES"] == "", rule
    assert records["download"]["Partition"] == INTERNET_PARTITION
    assert records["train"]["Requeue"] == "1"  # the profile's slurm-requeue (cluster default: 0)
    log = (workdir / "logs" / "train.log").read_text()
    assert "srun-launch: srun --nodes=1 --ntasks=1 --cpus-per-task=8" in log


# -- site settings ---------------------------------------------------------------------------


@pytest.mark.slurm
def test_a_runtime_above_the_partitions_max_time_is_refused_before_submitting(cluster, tmp_path):
    workdir = project(tmp_path)
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    profile.write_text(set_site(profile.read_text(), "GPU partition", SHORT_PARTITION))
    proc = snakemake(cluster, workdir, "facts/train.txt", "facts/download.txt", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rule train: runtime 2880 min > MaxTime 60 min of partition 'short'" in output
    assert "rule download" not in output  # within its partition's limit
    assert jobs_of_run(cluster, output) == []  # nothing was submitted


@pytest.mark.slurm
def test_qos_and_the_train_shape_reach_sbatch(cluster, tmp_path):
    """The profile's QoS line goes through the plugin's own `qos` resource (it refuses
    --qos in slurm_extra); config's train shape becomes --nodes, a per-node --gres and
    one task per GPU (one node: --gpus=N). This cluster has no accounting, so Slurm's record shows no QoS:
    the sbatch call the plugin logs is the evidence for it."""
    workdir = project(tmp_path)
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    profile.write_text(set_site(profile.read_text(), "QoS", "normal"))
    edit_profile(workdir, "train", cpus_per_task=1)  # 2 ranks on this 16-CPU node
    proc = snakemake(
        cluster, workdir, "facts/train.txt", "--verbose", "--config", "train_gpus_per_node=2"
    )
    output = proc.stdout + proc.stderr
    (call,) = [line for line in output.splitlines() if "sbatch call:" in line]
    assert " --qos=normal" in call and " --nodes=1" in call and " --gpus=2" in call
    assert " --ntasks-per-gpu=1" in call and "--gres" not in call
    (record,) = jobs_of_run(cluster, output)
    assert record["JobState"] == "COMPLETED" and record["Partition"] == "gpu"
    assert (record["NumNodes"], record["NumTasks"], record.get("JOB_GRES")) == ("1", "2", "gpu:2")
    log = (workdir / "logs" / "train.log").read_text()
    assert "srun --nodes=1 --ntasks=2 --cpus-per-task=1" in log


# -- failures --------------------------------------------------------------------------------


@pytest.mark.slurm
def test_a_failed_job_is_retried(cluster, tmp_path):
    workdir = project(tmp_path)
    proc = snakemake(cluster, workdir, "flaky/done.txt")
    states = [r["JobState"] for r in jobs_of_run(cluster, proc.stdout + proc.stderr)]
    assert states == ["FAILED", "COMPLETED"]
    assert (workdir / "flaky" / "done.txt").read_text() == "ok\n"


@pytest.mark.slurm
def test_a_job_out_of_memory_is_retried_with_more(cluster, tmp_path):
    from scprint.data.listing import DatasetRow, format_listing
    from scprint.plan import preprocess_mem_mb

    workdir = project(tmp_path)
    row = DatasetRow("big", "t", ("NCBITaxon:9606",), ("EFO:0009922",), 1_000_000, "u", 10**10)
    (workdir / "big.tsv").write_text(format_listing([row]))
    first, second = preprocess_mem_mb(1_000_000, 1), preprocess_mem_mb(1_000_000, 2)
    need = (first + second) // 2  # more than the first grant, less than the retry's
    proc = snakemake(
        cluster, workdir, "oom/done.txt", "--config", "oom_row=big.tsv", f"oom_need_mb={need}"
    )
    records = jobs_of_run(cluster, proc.stdout + proc.stderr)
    assert [r["JobState"] for r in records] == ["FAILED", "COMPLETED"]
    granted = [r["MinMemoryNode"] for r in records]
    assert granted in (
        [f"{first}M", f"{second}M"],
        [f"{first / 1024:.2f}G", f"{second / 1024:.2f}G"],
    )
    assert (workdir / "oom" / "done.txt").read_text() == "ok\n"


@pytest.mark.slurm
def test_a_cancelled_job_fails_the_run_clearly_and_a_rerun_redoes_only_what_is_missing(
    cluster, tmp_path
):
    workdir = project(tmp_path)
    run = snakemake(
        cluster, workdir, "chain/last.txt", "--retries", "0", "--config", "slow_seconds=120",
        background=True,
    )  # fmt: skip
    try:
        slow = wait_for(
            lambda: [
                r for r in cluster.jobs()
                if r.get("Comment") == "rule_slow" and r["JobState"] == "RUNNING"
                and (workdir / "chain" / "slow.started").exists()
            ],
            timeout=300, what="the slow job to run", run=run,
        )[0]  # fmt: skip
        cluster.run("scancel", slow["JobId"])
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert f"SLURM-job '{slow['JobId']}' failed, SLURM status is: 'CANCELLED'" in output
    assert "Error in rule slow" in output
    assert not (workdir / "chain" / "slow.txt").exists()
    first_job = (workdir / "chain" / "first.txt").read_text()

    rerun = snakemake(cluster, workdir, "chain/last.txt", "--config", "slow_seconds=1")
    rules = [rule_of(r) for r in jobs_of_run(cluster, rerun.stdout + rerun.stderr)]
    assert rules == ["slow", "last"]
    assert (workdir / "chain" / "first.txt").read_text() == first_job
    assert (workdir / "chain" / "last.txt").exists()


# -- training on Slurm: DDP through srun, requeue and resume ---------------------------------


@pytest.fixture(scope="module")
def fit_project(tmp_path_factory) -> Path:
    """A project with a tiny laminDB collection and gene files (test_fit's builder)."""
    from test_fit import build_tiny_collection, write_gene_files

    path = project(tmp_path_factory.mktemp("fit"))
    info = build_tiny_collection(path)
    write_gene_files(path, info["genes"])
    return path


def fit_args(ckpt_dir: str, max_steps: int, *extra: str) -> str:
    from test_fit import small_run_args

    args = [
        "--config", str(REPO / "config" / "base.yml"),
        "--config", str(REPO / "config" / "pretrain_small.yml"),
        "--trainer.max_steps", str(max_steps),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--wandblog", "null",
        "--trainer.default_root_dir", ckpt_dir,
        *small_run_args(ckpt_dir), *extra,
    ]  # fmt: skip
    return " ".join(args)


def fit_env(cluster: LocalSlurm, workdir: Path) -> dict[str, str]:
    env = cluster.env()
    env["LAMIN_SETTINGS_DIR"] = str(workdir / "lamin" / "settings")
    env["PYTHONPATH"] = f"{REPO / 'tests' / 'slurm'}{os.pathsep}{env['PYTHONPATH']}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # one node: rendezvous on loopback (the network guard refuses the node's host name)
    env["MASTER_ADDR"] = "127.0.0.1"
    return env


def probe_records(directory: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted(directory.glob("*.json"))]


@pytest.mark.slurm
@pytest.mark.slow
def test_ddp_two_cpu_ranks_started_by_srun_agree_on_the_weights(cluster, fit_project):
    workdir = fit_project
    args = fit_args(
        "ckpt_ddp", 6,
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
        "--trainer.callbacks+=slurm_probe.SlurmProbe",
        "--trainer.callbacks.init_args.out_dir", "probe_ddp",
    )  # fmt: skip
    # config's train.gpus_per_node: 2 (fake) GPUs, hence 2 ranks and Lightning's devices
    # 2 from the same key; the ranks train on CPU with gloo (the GPUs are /dev/null and
    # /dev/zero)
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    original = profile.read_text()
    edit_profile(workdir, "train", cpus_per_task=1)
    try:
        proc = snakemake(
            cluster, workdir, "facts/train.txt", "--config", f"fit_args={args}",
            "train_gpus_per_node=2", env=fit_env(cluster, workdir),
        )  # fmt: skip
    finally:
        profile.write_text(original)
    (record,) = jobs_of_run(cluster, proc.stdout + proc.stderr)
    assert record["NumTasks"] == "2" and record["JobState"] == "COMPLETED"
    assert record["Partition"] == "gpu" and record.get("JOB_GRES") == "gpu:2"
    log = (workdir / "logs" / "train.log").read_text()
    assert (
        "srun --nodes=1 --ntasks=2 --cpus-per-task=1 --kill-on-bad-exit=1 --ntasks-per-node=2"
        in log
    )
    ranks = probe_records(workdir / "probe_ddp")
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2 and r["backend"] == "gloo", r
        assert r["cluster_environment"] == "SLURMEnvironment" and r["job_id"] == record["JobId"]
        assert r["start_step"] == 0 and r["end_step"] == 6
        assert r["end_digest"] != r["start_digest"]  # it trained
    assert ranks[0]["start_digest"] == ranks[1]["start_digest"]
    assert ranks[0]["end_digest"] == ranks[1]["end_digest"]


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_job_resumes_at_the_same_step(cluster, fit_project):
    """What happens at the time limit (--signal=USR1@600 in the profile) or on preemption:
    Slurm signals the job's steps, Lightning saves hpc_ckpt_1.ckpt and requeues the job
    (allowed by the profile's --requeue; this cluster's default is not to), Slurm starts it
    again and training resumes from that checkpoint. Snakemake just sees a longer job."""
    import torch

    workdir = fit_project
    args = fit_args(
        "ckpt_requeue", 10,
        "--trainer.callbacks+=slurm_probe.SlurmProbe",
        "--trainer.callbacks.init_args.out_dir", "probe_requeue",
        "--trainer.callbacks.init_args.pause_at_step", "4",
    )  # fmt: skip
    run = snakemake(
        cluster, workdir, "facts/train.txt", "-F", "--config", f"fit_args={args}",
        env=fit_env(cluster, workdir), background=True,
    )  # fmt: skip
    try:
        paused = wait_for(
            lambda: [r for r in probe_records(workdir / "probe_requeue") if "paused_at_step" in r],
            timeout=600, what="training to reach step 4", run=run,
        )[0]  # fmt: skip
        job = paused["job_id"]
        cluster.run("scancel", "--signal=USR1", job)
        # Slurm holds a requeued job for 2 minutes (BeginTime); start it now instead
        wait_for(
            lambda: cluster.job_record(job).get("Restarts") == "1"
            and cluster.job_record(job)["JobState"] == "PENDING",
            timeout=120, what="the job to be requeued", run=run,
        )  # fmt: skip
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-6000:] + (workdir / "logs" / "train.log").read_text()
    (record,) = [r for r in jobs_of_run(cluster, output) if rule_of(r) == "train"]
    assert record["JobId"] == job  # the same Slurm job, started twice
    assert record["Restarts"] == "1" and record["JobState"] == "COMPLETED"
    assert record["Partition"] == "gpu" and record.get("JOB_GRES") == "gpu:1"
    hpc = torch.load(workdir / "ckpt_requeue" / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["global_step"] == 4
    first, second = sorted(probe_records(workdir / "probe_requeue"), key=lambda r: r["restarts"])
    assert (first["restarts"], first["start_step"], first["paused_at_step"]) == (0, 0, 4)
    assert "end_step" not in first  # killed by the requeue, never finished
    assert (second["restarts"], second["start_step"], second["end_step"]) == (1, 4, 10)
    assert second["cluster_environment"] == "SLURMEnvironment"


# -- the pipeline itself ---------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_the_demo_dag_runs_on_slurm_with_every_rule_in_its_partition(cluster, tmp_path):
    """The whole demo through the profile, with the demo's 4 datasets 2 to a Slurm job
    (the profile's groups; 10 by default, which would put all 4 in one job and run them
    one after another: 2 keeps two jobs side by side and still checks the batching)."""
    from scprint.plan import job_resources

    workdir = project(tmp_path)
    set_batching(workdir, datasets_per_job=2)
    # the Slurm plumbing, not the learning (tests/test_workflow.py asserts that): a third
    # of the demo's 360 training steps, through the config's train.args as a user would
    demo = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    demo["train"]["args"] = ["--trainer.max_epochs", "6"]
    (workdir / "config" / "demo-slurm.yaml").write_text(yaml.safe_dump(demo))
    configfile = "--configfile=config/demo-slurm.yaml"
    proc = snakemake(
        cluster, workdir, configfile, "all", KEEP_LOGS,
        snakefile=REPO / "workflow" / "Snakefile", timeout=3000,
    )  # fmt: skip
    wanted = expected_resources((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    data_driven = data_driven_runtimes(workdir)
    records = jobs_of_run(cluster, proc.stdout + proc.stderr)
    by_rule: dict[str, list[dict]] = {}
    for record in records:
        rule = rule_of(record)
        by_rule.setdefault(GROUP_JOBS.get(rule, rule), []).append(record)
    assert set(by_rule) == {
        "lamin_instance", "ontologies", "demo_data", "list_datasets", "download", "preprocess",
        "collection", "gene_positions", "tiny_esm", "gene_embeddings", "train", "finetune",
        "report_datasets", "report_collection", "report_genes", "report_training",
    }  # fmt: skip
    # 4 datasets, 2 to a job: 2 download and 2 preprocess sbatch jobs instead of 8
    datasets = sorted(p.stem for p in (workdir / "results" / "listing").glob("*.tsv"))
    assert len(datasets) == 4
    for stage in ("download", "preprocess"):
        jobs = by_rule[stage]
        assert len(jobs) == 2, (stage, [r["Comment"] for r in jobs])
        assert sorted(d for r in jobs for d in group_datasets(workdir, r)) == datasets, stage
        for record in jobs:
            members = [job_resources(stage, workdir / "results" / "listing" / f"{d}.tsv")
                       for d in group_datasets(workdir, record)]  # fmt: skip
            # the plugin runs a job's datasets one after another: the runtimes add up,
            # the memory is the largest one's
            assert minutes(record["TimeLimit"]) == sum(m["runtime"] for m in members), stage
            assert memory_mb(record) == max(m["mem_mb"] for m in members), stage
            assert record["NumCPUs"] == "1", stage
    for rule, jobs in by_rule.items():
        for record in jobs:
            assert record["JobState"] == "COMPLETED", (rule, record["JobId"])
            assert record["Partition"] == wanted[rule]["slurm_partition"], rule
            if rule in ("download", "preprocess"):
                continue  # checked above, member by member
            if rule in data_driven:  # the workflow's formulas (scprint.plan), not the profile
                assert minutes(record["TimeLimit"]) in data_driven[rule], rule
            else:
                assert minutes(record["TimeLimit"]) == wanted[rule]["runtime"], rule
            gres = record.get("JOB_GRES")
            assert (gres == "gpu:1") if rule in GPU_RULES else gres in (None, "(null)"), rule
    assert {r["Partition"] for r in by_rule["download"]} == {INTERNET_PARTITION}
    assert {r["Partition"] for r in by_rule["preprocess"]} == {"cpu"}
    # training ran as its own job step (profiles/slurm/srun-launch), where Lightning found
    # Slurm and armed the SIGUSR1 checkpoint-and-requeue handler
    train_log = (workdir / "logs" / "train" / "train.log").read_text()
    assert "srun-launch: srun --nodes=1 --ntasks=1 --cpus-per-task=8" in train_log
    assert "SLURM auto-requeueing enabled" in train_log
    summary = yaml.safe_load((workdir / "results" / "train" / "demo.json").read_text())
    assert summary["steps"] > 0
    assert (workdir / "checkpoints" / "demo" / "last.ckpt").stat().st_size > 0
    # nothing left to do, as Slurm's records say (no new jobs)
    again = snakemake(
        cluster, workdir, configfile, "all",
        snakefile=REPO / "workflow" / "Snakefile",
    )  # fmt: skip
    assert "Nothing to be done" in again.stdout + again.stderr
    # the report, made through the same profile on the login node, submits no job
    snakemake(
        cluster, workdir, configfile, "--report", "report.html",
        snakefile=REPO / "workflow" / "Snakefile",
    )  # fmt: skip
    report = (workdir / "report.html").read_text()
    assert "results/report/training/curves.png" in report and "dataset table" in report


# -- many datasets: per-dataset jobs submitted in groups -------------------------------------


def set_batching(workdir: Path, datasets_per_job: int) -> None:
    """The profile's one number for it: datasets per Slurm job (both groups)."""
    path = workdir / "profiles" / "slurm" / "config.yaml"
    text, n = re.subn(
        r"&datasets_per_job \d+", f"&datasets_per_job {datasets_per_job}", path.read_text()
    )
    assert n == 1, "expected one `&datasets_per_job N` in the profile"
    path.write_text(text)
    profile = yaml.safe_load(text)
    assert profile["group-components"] == {
        "downloads": datasets_per_job, "preprocessing": datasets_per_job,
    }  # fmt: skip
    # the datasets of a job run one after another: its request must say so
    assert profile["resources"] == {"dataset_slots": 1}
    assert profile["set-resource-scopes"] == {"dataset_slots": "local"}


# the plugin deletes the sbatch logs of successful jobs unless told to keep them: they
# say which datasets a group job ran
KEEP_LOGS = "--slurm-keep-successful-logs"


def group_datasets(workdir: Path, record: dict) -> list[str]:
    """The datasets (wildcard values) a group job ran: its comment has no wildcards
    (`rule_<group>_<rule>`), its sbatch log has the inner Snakemake's `--target-jobs`."""
    log = workdir / "logs" / "slurm" / f"group_{rule_of(record)}" / f"{record['JobId']}.log"
    match = re.search(r"--target-jobs (.+?) --", log.read_text())
    assert match, f"no --target-jobs in {log}"
    return sorted(spec.partition("=")[2] for spec in match.group(1).split())


def memory_mb(record: dict) -> float:
    value = record["MinMemoryNode"]
    return float(value[:-1]) * (1024 if value.endswith("G") else 1)


def attempts_of(workdir: Path, item: str) -> list[str]:
    """The Slurm job ids an item of the test Snakefile's batch_item rule ran in."""
    path = workdir / "batch" / "attempts" / item
    return path.read_text().split() if path.exists() else []


@pytest.mark.slurm
def test_a_bad_dataset_fails_its_batch_and_fails_alone_once_batches_are_off(cluster, tmp_path):
    """What a dataset that always fails does to the datasets in its Slurm job (the
    profile's `downloads` group, 2 per job; `bad` fails every attempt, `flaky` only its
    first): the job is retried whole and fails every attempt, and Snakemake removes its
    other dataset's output each time; other jobs finish (keep-going). The documented
    remedy, a rerun with one dataset per job, leaves the bad one failing alone."""
    workdir = project(tmp_path)
    set_batching(workdir, datasets_per_job=2)
    items = ["a", "bad", "c", "flaky"]
    targets = [f"batch/{i}.txt" for i in items]
    config = ["--config", "batch_bad=bad", "batch_flaky=flaky"]
    proc = snakemake(cluster, workdir, *targets, KEEP_LOGS, *config, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    jobs: dict[tuple[str, ...], list[dict]] = {}
    for record in jobs_of_run(cluster, output):
        assert rule_of(record) == "downloads_batch_item"
        jobs.setdefault(tuple(group_datasets(workdir, record)), []).append(record)
    assert sorted(d for group in jobs for d in group) == items  # 2 groups of 2
    (bad_group,) = [g for g in jobs if "bad" in g]
    (mate,) = [d for d in bad_group if d != "bad"]
    # the bad dataset's job: 3 attempts (retries: 2), all failed, its mate's output gone
    assert [r["JobState"] for r in jobs[bad_group]] == ["FAILED"] * 3
    assert not (workdir / "batch" / "bad.txt").exists()
    assert not (workdir / "batch" / f"{mate}.txt").exists()
    assert attempts_of(workdir, "bad")  # it ran
    # the other job finished (after a retry when `flaky` is in it)
    (good_group,) = [g for g in jobs if "bad" not in g]
    states = [r["JobState"] for r in jobs[good_group]]
    assert states == (["FAILED", "COMPLETED"] if "flaky" in good_group else ["COMPLETED"])
    for item in good_group:
        assert (workdir / "batch" / f"{item}.txt").read_text().strip() == jobs[good_group][-1][
            "JobId"
        ]

    mate_ran = bool(attempts_of(workdir, mate))  # only when it came before `bad`

    # the remedy (docs/slurm.md): one dataset per job for the rerun
    rerun = snakemake(
        cluster, workdir, *targets, KEEP_LOGS, "--group-components", "downloads=1",
        "preprocessing=1", *config, check=False,
    )  # fmt: skip
    assert rerun.returncode != 0
    by_item: dict[str, list[str]] = {}
    for record in jobs_of_run(cluster, rerun.stdout + rerun.stderr):
        (item,) = group_datasets(workdir, record)
        by_item.setdefault(item, []).append(record["JobState"])
    expected = {"bad": ["FAILED"] * 3, mate: ["COMPLETED"]}
    if mate == "flaky" and not mate_ran:  # its very first attempt fails
        expected[mate] = ["FAILED", "COMPLETED"]
    assert by_item == expected
    assert (workdir / "batch" / f"{mate}.txt").exists()
    assert not (workdir / "batch" / "bad.txt").exists()


@pytest.mark.slurm
def test_a_batch_whose_summed_runtime_exceeds_max_time_is_refused_before_submitting(
    cluster, tmp_path
):
    """Each job fits the partition's 60 minutes, two of them in one Slurm job do not."""
    workdir = project(tmp_path)
    set_batching(workdir, datasets_per_job=2)
    path = workdir / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["set-resources"]["batch_item"] = {"slurm_partition": SHORT_PARTITION, "runtime": 40}
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    proc = snakemake(cluster, workdir, "batch/a.txt", "batch/b.txt", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "group downloads (2 jobs): runtime 80 min > MaxTime 60 min of partition 'short'" in (
        output
    )
    assert jobs_of_run(cluster, output) == []  # nothing was submitted
