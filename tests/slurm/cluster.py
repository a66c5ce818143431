"""A real single-node Slurm cluster for the tests, started and stopped from Python.

Everything but the config lives in one private directory: its own munged (own key and
socket, so a system munge is left alone), slurmctld and slurmd on free ports, state and
logs. The config itself must be at Slurm's default path, /etc/slurm/slurm.conf: the
plugin's job step (snakemake-executor-plugin-slurm-jobstep 0.6.1) strips every SLURM_*
variable, SLURM_CONF included, before it calls srun inside a job. So the cluster refuses
to start over a slurm.conf it did not write, serialises test sessions with a lock file
there, and removes its config when it stops.

Needs root (slurmd launches jobs as the submitting user, slurmctld runs as SlurmUser=root)
and the Debian packages ``slurmctld slurmd slurm-client munge`` (Slurm 22.05).

The node declares more CPUs and memory than a CI machine has (``SlurmdParameters=
config_overrides``): Slurm then schedules the profile's real resource requests (a GPU rule
asking for 4 CPUs and 32 GB) instead of rejecting them. Nothing is enforced (no cgroups),
so the oversubscription only affects bookkeeping. The two GPUs are gres with
``File=/dev/null`` and ``File=/dev/zero``: Slurm allocates them and sets
CUDA_VISIBLE_DEVICES, there is no device.

Run by hand: ``python tests/slurm/cluster.py start DIR`` / ``stop DIR``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REQUIRED_PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "squeue")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"
NODE = "localnode"
NODE_CPUS = 16
NODE_MEMORY_MB = 256_000
# Finished jobs stay visible to squeue/scontrol this long: the workflow polls job states
# with squeue (no accounting database here) and the tests read the job records.
MIN_JOB_AGE_S = 3600
SLURM_ETC = Path("/etc/slurm")
# What a Snakemake run through profiles/slurm needs on this cluster on top of the profile:
# job states from squeue (no accounting database) and short poll intervals.
SNAKEMAKE_OVERRIDES = [
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "1",
]  # fmt: skip
MARKER = "# written by tests/slurm/cluster.py (removed when the test cluster stops)"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the local cluster (not root, packages missing, ...)."""


def why_unavailable() -> str | None:
    """The reason this machine cannot start the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts jobs as their user)"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (
            f"missing {', '.join(missing)}: install the Debian packages "
            f"`apt-get install -y {DEBIAN_PACKAGES}`"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user: install the Debian package munge"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSlurm:
    root: Path

    extra_partitions: tuple[str, ...] = ()  # "name" or "name:MaxTime" (minutes)
    conf: Path = SLURM_ETC / "slurm.conf"
    lock_timeout_s: float = 1800
    _lock_fd: int | None = None

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "run" / "munge.socket"

    def env(self, base: dict | None = None) -> dict[str, str]:
        """An environment whose Slurm commands talk to this cluster."""
        env = dict(os.environ if base is None else base)
        for var in list(env):  # a test run inside a Slurm job must not leak its own job
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_")):
                env.pop(var)
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, check=check, timeout=60
        )

    # -- start / stop -------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> None:
        reason = why_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        self._lock()
        self.stop(unlock=False)  # leftovers of an earlier run in the same directory
        if self.conf.exists() and MARKER not in self.conf.read_text():
            self._unlock()
            raise ClusterUnavailable(
                f"{self.conf} exists and was not written by the tests: this machine has its "
                "own Slurm; run the Slurm tests on a machine (or container) without one"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged runs as user munge and must reach its directory
        self._start_munge()
        self._write_config()
        for daemon, log in (("slurmctld", "slurmctld.log"), ("slurmd", "slurmd.log")):
            args = [daemon]
            if daemon == "slurmd":
                args += ["-N", NODE]
            proc = subprocess.run(args, env=self.env(), capture_output=True, text=True)
            if proc.returncode != 0:
                raise ClusterUnavailable(
                    f"{daemon} did not start ({proc.stderr.strip()}); see {self.root / 'log' / log}"
                )
        self._wait_until_idle(timeout_s)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        for sub in ("", "run", "log", "lib"):
            (mdir / sub).mkdir(parents=True, exist_ok=True)
            os.chown(mdir / sub, munge.pw_uid, munge.pw_gid)
            (mdir / sub).chmod(0o700 if sub in ("", "lib") else 0o755)
        (mdir).chmod(0o711)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        subprocess.run(
            [
                "runuser", "-u", "munge", "--", "munged",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={mdir / 'run' / 'munged.pid'}",
                f"--log-file={mdir / 'log' / 'munged.log'}",
                f"--seed-file={mdir / 'lib' / 'munged.seed'}",
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        check = subprocess.run(
            f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}",
            shell=True, capture_output=True, text=True,
        )  # fmt: skip
        if "Success" not in check.stdout:
            raise ClusterUnavailable(f"munge does not work: {check.stdout}{check.stderr}")

    def slurm_settings(self) -> dict[str, object]:
        """slurm.conf's KEY=VALUE settings; the site cluster changes some and adds its own."""
        host, r = socket.gethostname().split(".")[0], self.root
        return {
            "ClusterName": "scprint-test",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "CredType": "cred/munge",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": f"{r}/state",
            "SlurmdSpoolDir": f"{r}/spool",
            "SlurmctldPidFile": f"{r}/run/slurmctld.pid",
            "SlurmdPidFile": f"{r}/run/slurmd.pid",
            "SlurmctldLogFile": f"{r}/log/slurmctld.log",
            "SlurmdLogFile": f"{r}/log/slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "GresTypes": "gpu",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "SlurmdParameters": "config_overrides",
            "MinJobAge": MIN_JOB_AGE_S,
            "DefMemPerCPU": 1000,
            "ReturnToService": 2,
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=2",
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 60,
            "InactiveLimit": 0,
            "KillWait": 5,
            # jobs are not requeueable unless they ask (sbatch --requeue), as on many clusters
            "JobRequeue": 0,
        }

    def nodes_and_partitions(self) -> str:
        """slurm.conf's NodeName and PartitionName lines."""
        host = socket.gethostname().split(".")[0]
        return (
            f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} "
            f"RealMemory={NODE_MEMORY_MB} Gres=gpu:2 State=UNKNOWN\n"
            f"PartitionName=cpu Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
            f"PartitionName=gpu Nodes={NODE} MaxTime=INFINITE State=UP\n"
        ) + "".join(
            f"PartitionName={name} Nodes={NODE} MaxTime={max_time or 'INFINITE'} State=UP\n"
            for name, _, max_time in (p.partition(":") for p in self.extra_partitions)
        )

    def _write_slurm_conf(self) -> None:
        settings = "".join(f"{key}={value}\n" for key, value in self.slurm_settings().items())
        self.conf.write_text(f"{MARKER}\n{settings}{self.nodes_and_partitions()}")

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        self._write_slurm_conf()
        (SLURM_ETC / "gres.conf").write_text(
            f"{MARKER}\n"
            f"NodeName={NODE} Name=gpu File=/dev/null\n"
            f"NodeName={NODE} Name=gpu File=/dev/zero\n"
        )

    def _wait_until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", check=False)
            state = " ".join(sorted(set(proc.stdout.split())))
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterUnavailable(
            f"node {NODE} is '{state}' after {timeout_s:.0f} s, not idle; see {self.root / 'log'}"
        )

    def _lock(self) -> None:
        """One test cluster per machine: wait for another test session's to stop."""
        import fcntl

        SLURM_ETC.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(SLURM_ETC / ".scprint-test-cluster.lock", os.O_CREAT | os.O_RDWR)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(
                        "another test session holds the local Slurm cluster "
                        f"({SLURM_ETC / '.scprint-test-cluster.lock'})"
                    ) from None
                time.sleep(2)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def stop(self, unlock: bool = True) -> None:
        """Stop the daemons started from this directory (by their pid files)."""
        pidfiles = [
            self.root / "run" / "slurmd.pid",
            self.root / "run" / "slurmctld.pid",
            self.root / "munge" / "run" / "munged.pid",
        ]
        for pidfile in pidfiles:
            try:
                pid = int(pidfile.read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pidfile.unlink(missing_ok=True)
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            pidfile.unlink(missing_ok=True)
        for conf in (self.conf, SLURM_ETC / "gres.conf"):
            if conf.exists() and MARKER in conf.read_text():
                conf.unlink()
        if unlock:
            self._unlock()

    # -- reading Slurm's own records ----------------------------------------------------

    def job_record(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -d` as a dict (finished jobs stay for MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-d", "-o", str(job_id)).stdout
        record: dict[str, str] = {}
        for field in out.split():
            key, _, value = field.partition("=")
            record.setdefault(key, value)
        return record

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still remembers, oldest first."""
        out = self.run("scontrol", "show", "job", "-d", "-o").stdout
        records = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            record: dict[str, str] = {}
            for field in line.split():
                key, _, value = field.partition("=")
                record.setdefault(key, value)
            records.append(record)
        return sorted(records, key=lambda r: int(r["JobId"]))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]).resolve())
    if argv[0] == "start":
        cluster.start()
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
