"""What the workflow asks of Slurm, decided in one place.

- The train job's shape: ``train.nodes`` x ``train.gpus_per_node`` in config/config.yaml
  become the sbatch request (``--nodes``, one task per GPU set explicitly, a per-node
  ``--gres``) and Lightning's ``--trainer.num_nodes`` / ``--trainer.devices``, so the two
  can never disagree. Tasks are never left to a plugin default: plugin releases >= 2.7.1
  stopped adding ``--ntasks-per-gpu=1`` on their own, and the job then started one rank.
- GPU memory: ``train.gpu_memory`` (a site's GRES such as ``gmem:40G``) beside the GPUs;
  host memory per GPU (``--mem-per-gpu``) in the profile's slurm_extra with ``mem_mb: 0``,
  checked before submitting so that ``--mem`` is not sent with it.
- Time limits: a job whose runtime exceeds its partition's MaxTime stays PENDING forever
  on a cluster with EnforcePartLimits=NO (Slurm's default); the workflow checks every
  job against ``scontrol show partition`` before submitting and stops with the rule, its
  runtime and the limit instead.
"""

from __future__ import annotations

import re
import subprocess

from scprint.io import StageError

GPU_MEMORY_GRES = re.compile(r"^[A-Za-z0-9_]+:\d+[KMGT]?$")


def train_resources(nodes: int, gpus_per_node: int, gpu_model: str | None = None,
                    gpu_memory: str | None = None) -> dict:  # fmt: skip
    """Snakemake resources of the train job for snakemake-executor-plugin-slurm.

    One node: the plugin's ``gpu``/``gpu_model`` (``--gpus=[TYPE:]N``). Several nodes: a
    per-node ``gres`` (``--gpus`` is a job total that Slurm may split unevenly across
    nodes). Either way ``tasks_per_gpu=1`` makes the plugin send ``--ntasks-per-gpu=1``,
    hence one rank per GPU. Unused keys are 0 or "" (the plugin skips falsy values).

    ``gpu_memory``: a site's GRES for GPU memory, NAME:COUNT (``gmem:40G``, as in
    ``--gres=gpu:A40:4,gmem:40G``). Plugin 2.6.1 sends one GRES item (its pattern refuses
    a comma list) and refuses ``--gres`` in slurm_extra, so it goes in ``gres`` beside
    ``--gpus``: one node only (several nodes need the GPUs in ``gres`` themselves), and
    with ``--ntasks`` instead of ``--ntasks-per-gpu``.

    ``mpi`` is "" or truthy: the train rule runs its command in the batch step either way
    (the jobstep plugin only looks whether the key exists); truthy makes the submit plugin
    send ``--ntasks={tasks}``."""
    if nodes < 1 or gpus_per_node < 1:
        raise StageError(
            f"train.nodes ({nodes}) and train.gpus_per_node ({gpus_per_node}) must be >= 1 "
            "in config/config.yaml"
        )
    if gpu_memory and not GPU_MEMORY_GRES.match(gpu_memory):
        raise StageError(
            f"train.gpu_memory {gpu_memory!r}: expected the site's GPU-memory GRES as "
            "NAME:COUNT, e.g. gmem:40G (`sinfo -o '%N %G'` lists the node's GRES)"
        )
    if nodes == 1 and gpu_memory:
        # Slurm 22.05 refuses --ntasks-per-gpu beside any other GRES ("Requested node
        # configuration is not available", measured on the site test cluster), so the
        # tasks are a count: the plugin sends --ntasks only for an "mpi" job with tasks > 1
        # (one task is Slurm's default); the command is not wrapped in a step either way
        return {"nodes": 1, "gpu": gpus_per_node, "gpu_model": gpu_model or "",
                "gres": gpu_memory, "tasks_per_gpu": 0,
                "mpi": "srun" if gpus_per_node > 1 else "",
                "tasks": gpus_per_node if gpus_per_node > 1 else 0}  # fmt: skip
    if nodes == 1:
        return {"nodes": 1, "gpu": gpus_per_node, "gpu_model": gpu_model or "", "gres": "",
                "tasks_per_gpu": 1, "mpi": "", "tasks": 0}  # fmt: skip
    if gpu_memory:
        raise StageError(
            f"train.gpu_memory ({gpu_memory}) with train.nodes {nodes}: the Slurm plugin "
            "sends a single --gres item, and several nodes already need it for the GPUs "
            "(gpu[:TYPE]:N a node); train on one node with it, or leave it null and pick "
            "GPUs by train.gpu_model"
        )
    gpu_type = f"{gpu_model}:" if gpu_model else ""
    return {"nodes": nodes, "gpu": 0, "gpu_model": "", "gres": f"gpu:{gpu_type}{gpus_per_node}",
            "tasks_per_gpu": 1, "mpi": "", "tasks": 0}  # fmt: skip


def trainer_args(nodes: int, gpus_per_node: int) -> list[str]:
    """Lightning's view of the same shape (`scprint fit` arguments)."""
    return ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(gpus_per_node)]


def gpu_hours_factor(nodes: int, gpus_per_node: int) -> int:
    """GPUs a training job holds: the bill counts every one of them for the whole run."""
    return nodes * gpus_per_node


# -- time limits ---------------------------------------------------------------------------
def slurm_minutes(value: str) -> int | None:
    """Slurm's time ([D-]HH:MM:SS, MM:SS, MM) in minutes; None for UNLIMITED/INFINITE."""
    value = value.strip()
    if value.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = 0, parts[0], 0
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def partition_max_time(partition: str) -> int | None:
    """A partition's MaxTime in minutes (None: no limit), from `scontrol show partition`."""
    proc = subprocess.run(
        ["scontrol", "show", "partition", "-o", partition],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise StageError(
            f"partition {partition!r}: `scontrol show partition {partition}` failed "
            f"({(proc.stderr or proc.stdout).strip()}); set slurm_partition in "
            "profiles/slurm/config.yaml to a partition `sinfo -s` lists"
        )
    match = re.search(r"\bMaxTime=(\S+)", proc.stdout)
    return slurm_minutes(match.group(1)) if match else None


def check_time_limits(jobs: list[tuple[str, str, int]]) -> None:
    """Refuse jobs (rule, partition, runtime minutes) that ask more than their partition's
    MaxTime: Slurm would keep them PENDING forever and the run would wait silently. A
    group job's "rule" reads `group NAME (N jobs)`."""
    limits: dict[str, int | None] = {}
    too_long = {}
    for rule, partition, runtime in jobs:
        if not partition or not isinstance(runtime, int):
            continue
        if partition not in limits:
            limits[partition] = partition_max_time(partition)
        limit = limits[partition]
        if limit is not None and runtime > limit:
            too_long[rule] = (partition, runtime, limit)
    if too_long:
        lines = [
            f"{'' if rule.startswith('group ') else 'rule '}{rule}: runtime {runtime} min"
            f" > MaxTime {limit} min of partition {part!r}"
            for rule, (part, runtime, limit) in sorted(too_long.items())
        ]
        raise StageError(
            "jobs ask for more time than their partition allows; Slurm would keep them "
            "PENDING forever:\n  " + "\n  ".join(lines) + "\nfix: lower `runtime` for the "
            "rule in profiles/slurm/config.yaml (training checkpoints and requeues itself "
            "before the limit, so a run longer than MaxTime still finishes), send it to a "
            "partition with a longer MaxTime (`sinfo -o '%P %l'`), or for a group (its "
            "jobs run one after another: runtimes add up) lower DATASETS PER JOB there"
        )


def check_memory_options(jobs: list[tuple[str, object, str]]) -> None:
    """Refuse jobs (rule, mem_mb, slurm_extra) that would send both ``--mem`` and
    ``--mem-per-gpu`` (sbatch: "mutually exclusive"): the plugin sends ``--mem`` whenever
    mem_mb is set, and the profile's default-resources set it for every rule."""
    both = [rule for rule, mem_mb, extra in jobs
            if mem_mb and re.search(r"--mem-per-gpu[=\s]", extra or "")]  # fmt: skip
    if both:
        raise StageError(
            f"rule(s) {', '.join(sorted(set(both)))}: --mem-per-gpu in slurm_extra together "
            "with mem_mb: sbatch refuses --mem with --mem-per-gpu; set `mem_mb: 0` for the "
            "rule in profiles/slurm/config.yaml (0 sends no --mem)"
        )


def check_before_submitting(workflow) -> None:
    """The Snakefiles' `onstart:` hook: on the Slurm executor, check every job to run, and
    every group job (the per-dataset batches: one sbatch job, runtimes summed), against
    its partition's MaxTime (jobs made after a checkpoint, such as per-dataset downloads
    on a first run, are known only later and not checked here)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if getattr(plugin, "name", None) != "slurm":
        return
    jobs, memory, groups = [], [], set()
    for job in workflow.dag.needrun_jobs():
        memory.append(
            (job.rule.name, job.resources.get("mem_mb"), job.resources.get("slurm_extra"))
        )
        group = workflow.dag.get_job_group(job)
        if group is not None:
            if group in groups:
                continue
            groups.add(group)
            name = f"group {group.groupid} ({len(list(group.jobs))} jobs)"
            resources = group.resources
        else:
            name, resources = job.rule.name, job.resources
        jobs.append((name, resources.get("slurm_partition"), resources.get("runtime")))
    check_memory_options(memory)
    check_time_limits(jobs)
