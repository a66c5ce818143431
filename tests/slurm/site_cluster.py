"""A Slurm cluster shaped like a real site, for tests/test_slurm_site.py.

What it adds to tests/slurm/cluster.py's one-node cluster (whose munge, lock and config
rules it reuses):

- accounting: slurmdbd on a private MariaDB (its own data directory and TCP port on
  127.0.0.1), ``AccountingStorageEnforce=associations,limits,qos``; one account
  (``ACCOUNT``) and an association for the submitting user, who may use QoS normal + gpu;
- two compute nodes, each slurmd in its own network and UTS namespace: its own hostname
  (node1, node2) and address (10.77.0.11/.12) on a bridge (``BRIDGE``, 10.77.0.1 on the
  host side, where slurmctld listens) that start() makes and stop() removes;
- partitions cpu (default), gpu (``AllowQos=gpu``: jobs without ``--qos=gpu`` are refused)
  and short (gpu's nodes, ``MaxTime`` 60 minutes, below the train job's 2,880);
- typed fake GPUs: ``gpu:a40:2`` a node (``File=/dev/null`` and ``/dev/zero``), and a
  GPU-memory GRES ``gmem`` (48G a node, not consumed) as sites have for ``gmem:40G``;
- jobs submitted by a non-root user (``SUBMITTER``, created if missing); job states read
  with ``sacct`` (the plugin's default).

Memory is enforced as sites do: TaskPlugin=task/cgroup with cgroup/v1 (this VM mounts
the v1 memory controller writable), ConstrainRAMSpace; a job over its --mem is killed
(the step that went over ends OUT_OF_MEMORY). Each slurmd keeps its own tree
(/sys/fs/cgroup/memory/slurm_<node>); see docs/dev-notes.md.

Needs root, ``slurmctld slurmd slurm-client slurmdbd munge mariadb-server`` and iproute2.
Run by hand: ``python tests/slurm/site_cluster.py start DIR`` / ``stop DIR``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import (  # noqa: E402
    MARKER,
    SLURM_ETC,
    ClusterUnavailable,
    LocalSlurm,
    free_port,
    why_unavailable,
)

SITE_PROGRAMS = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sacct", "ip")
BRIDGE = "scprint-br0"
HOST_ADDR = "10.77.0.1"
NODES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
ACCOUNT = "scprint-lab"
SUBMITTER = "scprint-user"
GPU_TYPE = "a40"
# GPU memory as some sites ask for it (`--gres=gpu:A40:4,gmem:40G`): a count-only GRES a
# node has, not consumed by the jobs that ask for it (each asks for "at least")
GPU_MEMORY_GRES, GPU_MEMORY = "gmem", "48G"
NODE_CPUS = 16
NODE_MEMORY_MB = 256_000


def why_site_unavailable() -> str | None:
    reason = why_unavailable()
    if reason:
        return reason
    missing = [p for p in SITE_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (
            f"missing {', '.join(missing)}: install the Debian packages "
            "`apt-get install -y slurmdbd mariadb-server iproute2`"
        )
    return None


def netns(node: str) -> str:
    return f"scprint-{node}"


@dataclass
class SiteSlurm(LocalSlurm):
    dbd_conf: Path = SLURM_ETC / "slurmdbd.conf"
    dbd_port: int = 0  # chosen when the config is written

    def start(self, timeout_s: float = 90) -> None:
        reason = why_site_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        self._lock()
        self.stop(unlock=False)
        if self.conf.exists() and MARKER not in self.conf.read_text():
            self._unlock()
            raise ClusterUnavailable(f"{self.conf} exists and was not written by the tests")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        self._submitter()
        self._start_munge()
        self._network()
        self._start_mariadb()
        self._write_config()
        self._daemon(["slurmdbd"], "slurmdbd.log")
        self._wait(lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False)
                   .returncode == 0, 30, "slurmdbd to answer")  # fmt: skip
        self._associations()
        self._daemon(["slurmctld"], "slurmctld.log")
        for node in NODES:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            # its own hostname (UTS namespace) inside its own network namespace
            self._daemon(
                # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup
                # filesystem slurmd reads at start
                ["nsenter", f"--net=/run/netns/{netns(node)}", "unshare", "--uts", "--mount",
                 "sh", "-c",
                 f"{self.python_view()} hostname {node} && exec slurmd -N {node} -f {self.conf}"],
                f"slurmd-{node}.log",
            )  # fmt: skip
        self._wait(self._nodes_idle, timeout_s, "both nodes to be idle")

    def python_view(self) -> str:
        """Shell commands (run in a new mount namespace) that let a non-root user reach
        this Python where it sits under a directory only root may enter (pyenv in /root,
        mode 0700): that directory is covered by a 0755 one holding just the interpreter's
        tree. Empty where the interpreter is reachable already."""
        real = Path(sys.executable).resolve()
        for parent in reversed(real.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                child = real.relative_to(parent).parts[0]
                view = self.root / "python-view"
                return (
                    f"mount --make-rprivate / && mkdir -p {view}/{child} && chmod 755 {view} "
                    f"&& mount --bind {parent}/{child} {view}/{child} "
                    f"&& mount --rbind {view} {parent} && "
                )
        return ""

    def as_submitter(self, *args: str) -> list[str]:
        """A command line that runs ``args`` as the non-root submitter."""
        return ["unshare", "--mount", "sh", "-c",
                f'{self.python_view()} exec runuser -u {SUBMITTER} -- "$@"', "sh", *args]  # fmt: skip

    # -- pieces -------------------------------------------------------------------------

    def _daemon(self, args: list[str], log: str) -> None:
        proc = subprocess.run(args, env=self.env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(
                f"{args[0]} did not start ({proc.stderr.strip()}); see {self.root / 'log' / log}"
            )

    def _wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out waiting for {what}; see {self.root / 'log'}")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in NODES)

    def _submitter(self) -> None:
        """The non-root user who submits (created once, kept: users are cheap)."""
        try:
            pwd.getpwnam(SUBMITTER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/bin/bash", SUBMITTER],
                check=True, capture_output=True,
            )  # fmt: skip

    def _network(self) -> None:
        """A bridge on the host and one veth pair per node; the node's end, named eth0,
        lives in the node's namespace with the node's address."""
        sh = self._ip
        sh("link", "add", BRIDGE, "type", "bridge")
        sh("addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE)
        sh("link", "set", BRIDGE, "up")
        for i, (node, addr) in enumerate(NODES.items(), 1):
            ns, host_end = netns(node), f"scprint-v{i}"
            sh("netns", "add", ns)
            sh("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("link", "set", host_end, "master", BRIDGE, "up")
            sh("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("-n", ns, "link", "set", "eth0", "up")
            sh("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*args: str, check: bool = True) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise ClusterUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

    @property
    def db_port_file(self) -> Path:
        return self.root / "mysql.port"

    def _start_mariadb(self) -> None:
        data, sock = self.root / "mysql", self.root / "run" / "mysqld.sock"
        subprocess.run(
            ["mariadb-install-db", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        port = free_port()
        self.db_port_file.write_text(str(port))
        subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
             f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1",
             f"--pid-file={self.root / 'run' / 'mysqld.pid'}",
             f"--log-error={self.root / 'log' / 'mysqld.log'}",
             "--innodb-buffer-pool-size=32M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        sql = (
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        self._wait(
            lambda: subprocess.run(["mariadb", f"--socket={sock}", "-e", sql],
                                   capture_output=True).returncode == 0,
            60, "MariaDB",
        )  # fmt: skip

    def _associations(self) -> None:
        """The cluster, a QoS for GPU jobs, an account and the user's association."""
        for args in (
            ["add", "cluster", "scprint-test"],
            ["add", "qos", "gpu"],
            ["add", "account", ACCOUNT, "Cluster=scprint-test"],
            ["add", "user", SUBMITTER, f"Account={ACCOUNT}", "Cluster=scprint-test"],
            ["modify", "user", SUBMITTER, "set", "QOS=normal,gpu", "DefaultQOS=normal"],
            ["add", "user", "root", f"Account={ACCOUNT}", "Cluster=scprint-test"],
        ):
            self.run("sacctmgr", "-i", *args)

    def slurm_settings(self) -> dict[str, object]:
        """The one-node cluster's settings, changed for two nodes in their own namespaces
        (per-node spool, pid and log files), cgroup memory limits and enforced accounting."""
        r = self.root
        return super().slurm_settings() | {
            "SlurmctldHost": f"{socket.gethostname().split('.')[0]}({HOST_ADDR})",
            "SlurmdSpoolDir": f"{r}/spool/%n",
            "SlurmdPidFile": f"{r}/run/slurmd-%n.pid",
            "SlurmdLogFile": f"{r}/log/slurmd-%n.log",
            "TaskPlugin": "task/cgroup",
            "GresTypes": f"gpu,{GPU_MEMORY_GRES}",
            "AccountingStorageType": "accounting_storage/slurmdbd",
            "AccountingStorageHost": "127.0.0.1",
            "AccountingStoragePort": self.dbd_port,
            # for slurmdbd connections the munge socket is this setting, not AuthInfo
            "AccountingStoragePass": self.munge_socket,
            "AccountingStorageEnforce": "associations,limits,qos",
            "AccountingStorageTRES": f"gres/gpu,gres/gpu:{GPU_TYPE},gres/{GPU_MEMORY_GRES}",
        }

    def nodes_and_partitions(self) -> str:
        return "".join(
            f"NodeName={node} NodeHostname={node} NodeAddr={addr} CPUs={NODE_CPUS} "
            f"RealMemory={NODE_MEMORY_MB} "
            f"Gres=gpu:{GPU_TYPE}:2,{GPU_MEMORY_GRES}:no_consume:{GPU_MEMORY} State=UNKNOWN\n"
            for node, addr in NODES.items()
        ) + (
            "PartitionName=cpu Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP\n"
            "PartitionName=gpu Nodes=node[1-2] AllowQos=gpu MaxTime=INFINITE State=UP\n"
            "PartitionName=short Nodes=node[1-2] AllowQos=gpu MaxTime=60 State=UP\n"
        )

    def _write_config(self) -> None:
        r, self.dbd_port = self.root, free_port()
        self.dbd_conf.write_text(
            f"""{MARKER}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port_file.read_text()}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        )
        self.dbd_conf.chmod(0o600)
        self._write_slurm_conf()
        # memory limits as sites enforce them: this VM mounts cgroup v1 controllers, memory
        # writable (cgroup v2 here is an empty unified tree); each slurmd makes its own
        # tree, /sys/fs/cgroup/memory/slurm_<node>
        (SLURM_ETC / "cgroup.conf").write_text(
            f"{MARKER}\nCgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
            "ConstrainRAMSpace=yes\nConstrainSwapSpace=yes\nAllowedSwapSpace=0\n"
            "ConstrainCores=no\nConstrainDevices=no\n"
        )
        (SLURM_ETC / "gres.conf").write_text(
            f"{MARKER}\n"
            f"NodeName=node[1-2] Name=gpu Type={GPU_TYPE} File=/dev/null\n"
            f"NodeName=node[1-2] Name=gpu Type={GPU_TYPE} File=/dev/zero\n"
            f"NodeName=node[1-2] Name={GPU_MEMORY_GRES} Count={GPU_MEMORY}\n"
        )

    def stop(self, unlock: bool = True) -> None:
        run = self.root / "run"
        if (run / "slurmctld.pid").exists():
            # jobs first: their slurmstepd and tasks outlive slurmd and would keep a node's
            # network namespace, and with it the veth pair, alive (an interrupted test run
            # left them; the next start failed on "File exists")
            self.run("scancel", "--user", SUBMITTER, check=False)
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for pidfile in [run / f"slurmd-{n}.pid" for n in NODES] + [
            run / "slurmctld.pid",
            run / "slurmdbd.pid",
        ]:
            _terminate(pidfile)
        # the database is thrown away with the directory: no clean shutdown (15 s) needed
        _terminate(run / "mysqld.pid", signal.SIGKILL)
        for node in NODES:
            self._ip("netns", "del", netns(node), check=False)  # removes its veth pair too
        self._ip("link", "del", BRIDGE, check=False)
        if self.dbd_conf.exists() and MARKER in self.dbd_conf.read_text():
            self.dbd_conf.unlink()
        cgroup_conf = SLURM_ETC / "cgroup.conf"
        if cgroup_conf.exists() and MARKER in cgroup_conf.read_text():
            cgroup_conf.unlink()
        super().stop(unlock=unlock)  # munged, slurm.conf, gres.conf, the lock

    # -- reading accounting ---------------------------------------------------------------

    def sacct(self, job_id: str) -> dict[str, str]:
        """The job's allocation as accounting recorded it."""
        fields = "JobID,State,Partition,Account,QOS,User,NodeList,NNodes,AllocTRES,Timelimit"
        out = self.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", fields).stdout
        (line,) = [x for x in out.splitlines() if x.strip()]
        return dict(zip(fields.split(","), line.split("|"), strict=True))


def _alive(pid: int) -> bool:
    """Running, not a zombie (MariaDB is a child of the test process until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it where it is ours
        except ChildProcessError:
            pass
        return False
    return True


def _terminate(pidfile: Path, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
    """Stop the daemon of ``pidfile``; SIGKILL if it outlives ``timeout_s``."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, sig)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pidfile.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: site_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = SiteSlurm(Path(argv[1]).resolve())
    if argv[0] == "stop":
        cluster.stop()
        return 0
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
