"""A real single-host Slurm cluster with two compute nodes, for testing launch scripts before a real allocation.

Slurm launch scripts break in ways only a scheduler shows (first-node rendezvous, ranks per node, environment
propagation), so the tests and users run them against real `slurmctld` + two `slurmd -N nodeX` daemons on one host,
with `munged` for auth and, optionally, `slurmdbd` + a private MariaDB so that `sacct` works (NeMo-Run's
SlurmExecutor polls job state through `sacct`).

Everything lives under one directory (config, state, spool, logs, pid files, munge key, database); daemons run in the
foreground as children of this process and are stopped by their own pids, never by name, so other Slurm or MariaDB
processes on the machine are untouched. Ports are picked free at start.

    python tools/local_slurm.py start --root /tmp/dispo-slurm     # prints `export SLURM_CONF=...`
    SLURM_CONF=/tmp/dispo-slurm/slurm.conf sbatch --nodes=2 examples/slurm/tiny_cpu.sbatch
    python tools/local_slurm.py stop --root /tmp/dispo-slurm

Debian packages used (installed with `--install` when missing, as root): slurmctld slurmd slurm-client munge, plus
slurmdbd mariadb-server for accounting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_NAME = "dispo-local"
NODE_NAMES: tuple[str, ...] = ("node1", "node2")
SLURM_PACKAGES: tuple[str, ...] = ("slurmctld", "slurmd", "slurm-client", "munge")
ACCOUNTING_PACKAGES: tuple[str, ...] = ("slurmdbd", "mariadb-server")
SLURM_BINARIES: tuple[str, ...] = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged")
ACCOUNTING_BINARIES: tuple[str, ...] = ("slurmdbd", "sacctmgr", "sacct", "mariadbd", "mariadb-install-db")
STATE_FILE = "cluster.json"
DEFAULT_MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
"""Slurm 22.05 ignores `AuthInfo=socket=` on slurmdbd connections, so with accounting munged must serve this path."""


@dataclass
class LocalSlurmCluster:
    """A running cluster: where its files are, the env clients need, and the pids of its daemons (start order)."""

    root: Path
    accounting: bool
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for sbatch/squeue/sacct (and everything they launch): points them at this cluster's config."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run_client(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster; raises with its output when it fails."""
        result = subprocess.run(
            list(argv), env=self.client_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (rc={result.returncode}): {result.stderr.strip()}")
        return result

    def wait_for_job(self, job_id: str, timeout: float = 120.0) -> str:
        """Poll `scontrol show job` until the job leaves PENDING/RUNNING; returns the final JobState.

        `scontrol` reads slurmctld's memory (MinJobAge keeps finished jobs there), so this works without accounting.
        """
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            out = self.run_client("scontrol", "show", "job", "-o", job_id).stdout
            state = _field(out, "JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s; see {self.log_dir}")

    def logs_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon log, to put into an assertion message when something fails."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path.name} <==\n" + "\n".join(text))
        return "\n".join(parts)


def _field(scontrol_line: str, key: str) -> str:
    """Value of `Key=value` in one-line scontrol output."""
    for token in scontrol_line.split():
        name, _, value = token.partition("=")
        if name == key:
            return value
    raise KeyError(f"{key} not in scontrol output: {scontrol_line.strip()[:300]}")


def missing_binaries(accounting: bool) -> list[str]:
    """Slurm/munge (and accounting) executables not on PATH (sbin included)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    wanted = SLURM_BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    return [name for name in wanted if shutil.which(name, path=path) is None]


def install_packages(accounting: bool, timeout: float = 600.0) -> None:
    """Install the Debian packages (as CI can: root + apt-get); a clear error when that is impossible."""
    missing = missing_binaries(accounting)
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        packages = " ".join(SLURM_PACKAGES + (ACCOUNTING_PACKAGES if accounting else ()))
        raise RuntimeError(
            f"missing {missing}; installing needs root and apt-get. Run `apt-get install -y {packages}` first."
        )
    packages = list(SLURM_PACKAGES + (ACCOUNTING_PACKAGES if accounting else ()))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, timeout=timeout, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=env,
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    still_missing = missing_binaries(accounting)
    if still_missing:
        raise RuntimeError(f"apt-get installed {packages} but {still_missing} are still not on PATH")


def _free_ports(count: int) -> list[int]:
    """Distinct ports free right now on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_port(port: int, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with rc={proc.returncode}; log {log}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def munge_socket_path(root: Path, accounting: bool) -> Path:
    """A private socket under `root` unless accounting is on (see DEFAULT_MUNGE_SOCKET)."""
    return DEFAULT_MUNGE_SOCKET if accounting else root / "munge" / "munge.socket"


def _check_socket_unused(path: Path) -> None:
    """Refuse to start a second munged on a socket another (live) munged serves: its key differs from ours."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # stale socket from a killed run; munged --force replaces it
    raise RuntimeError(
        f"a munged already serves {path}; the accounting cluster needs that path (Slurm 22.05 ignores AuthInfo "
        "for slurmdbd connections). Stop that cluster first, or start this one with accounting=False."
    )


def _write_configs(root: Path, accounting: bool, ports: dict[str, int]) -> None:
    host = socket.gethostname().split(".")[0]
    munge_socket = munge_socket_path(root, accounting)
    for sub in ("state", "log", "spool", "munge", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    (root / "plugstack.conf").write_text("# no SPANK plugins (no pyxis) in the local cluster\n")
    accounting_lines = (
        [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={ports['slurmdbd']}",
            "JobAcctGatherType=jobacct_gather/none",
        ]
        if accounting
        else ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
    )
    nodes = [
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[name]} CPUs=1 RealMemory=2048 "
        "State=UNKNOWN"
        for name in NODE_NAMES
    ]
    lines = [
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports['slurmctld']}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run'}/slurmd-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MinJobAge=600",
        "KillWait=5",
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "JobCompType=jobcomp/none",
        "MailProg=/bin/true",
        *accounting_lines,
        *nodes,
        f"PartitionName=debug Nodes={','.join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP",
    ]
    (root / "slurm.conf").write_text("\n".join(lines) + "\n")
    if accounting:
        dbd = root / "slurmdbd.conf"
        dbd.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={munge_socket}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={ports['slurmdbd']}",
                    "SlurmUser=root",
                    f"PidFile={root / 'run' / 'slurmdbd.pid'}",
                    f"LogFile={root / 'log' / 'slurmdbd.log'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={ports['mariadb']}",
                    "StorageUser=root",
                    "StorageLoc=slurm_acct_db",
                ]
            )
            + "\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a config readable by others


class _Starter:
    """Starts foreground daemons as children, recording each pid in the cluster (and on disk for `stop`)."""

    def __init__(self, cluster: LocalSlurmCluster) -> None:
        self.cluster = cluster

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.cluster.log_dir / f"{name}.stdout.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.cluster._procs[name] = proc
        self.cluster.pids[name] = proc.pid
        (self.cluster.root / STATE_FILE).write_text(
            json.dumps({"pids": self.cluster.pids, "accounting": self.cluster.accounting})
        )
        return proc


def start_cluster(root: Path, accounting: bool = True, timeout: float = 60.0) -> LocalSlurmCluster:
    """Write configs under `root` (must be empty or absent), start the daemons, wait until both nodes are idle."""
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"root={root} is not empty; give a fresh directory so two clusters never share state")
    missing = missing_binaries(accounting)
    if missing:
        raise RuntimeError(f"missing {missing}: run `python tools/local_slurm.py start --install` (root) first")
    root.mkdir(parents=True, exist_ok=True)
    names = ["slurmctld", *NODE_NAMES] + (["slurmdbd", "mariadb"] if accounting else [])
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    _write_configs(root, accounting, ports)
    cluster = LocalSlurmCluster(root=root, accounting=accounting)
    starter = _Starter(cluster)
    env = cluster.client_env()
    try:
        key = root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge_socket = munge_socket_path(root, accounting)
        _check_socket_unused(munge_socket)
        munge_socket.unlink(missing_ok=True)  # a dead run's socket would make the readiness wait below pass early
        munge_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        munged = starter.start(
            "munged",
            [
                "munged", "--foreground", "--force", f"--socket={munge_socket}",
                f"--key-file={key}", f"--pid-file={root / 'run' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
        )  # fmt: skip
        _wait_path(munge_socket, "munged", munged, root / "log" / "munged.stdout.log")  # --foreground: stderr
        if accounting:
            _start_accounting(root, ports, starter, env)
        ctld = starter.start("slurmctld", ["slurmctld", "-D", "-f", str(cluster.conf)], env=env)
        _wait_port(ports["slurmctld"], "slurmctld", ctld, root / "log" / "slurmctld.log")
        for name in NODE_NAMES:
            starter.start(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(cluster.conf)], env=env)
        _wait_nodes_idle(cluster, timeout)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _wait_path(path: Path, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with rc={proc.returncode}; log {log}:\n{_tail(log)}")
        if path.exists():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not create {path} within {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _start_accounting(root: Path, ports: dict[str, int], starter: _Starter, env: dict[str, str]) -> None:
    """Private MariaDB (TCP on 127.0.0.1 only, no grant tables: a throw-away test database) + slurmdbd + cluster row."""
    datadir = root / "mariadb"
    _run_checked(
        ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root", "--skip-test-db",
         "--auth-root-authentication-method=normal"],
    )  # fmt: skip
    mariadb = starter.start(
        "mariadb",
        ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", "--skip-grant-tables",
         "--bind-address=127.0.0.1", f"--port={ports['mariadb']}", f"--socket={root / 'run' / 'mariadb.sock'}",
         f"--pid-file={root / 'run' / 'mariadb.pid'}", f"--log-error={root / 'log' / 'mariadb.log'}",
         "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--skip-log-bin"],
    )  # fmt: skip
    _wait_port(ports["mariadb"], "mariadbd", mariadb, root / "log" / "mariadb.log")
    dbd = starter.start("slurmdbd", ["slurmdbd", "-D"], env=dict(env, SLURM_CONF=str(root / "slurm.conf")))
    _wait_port(ports["slurmdbd"], "slurmdbd", dbd, root / "log" / "slurmdbd.log", timeout=60)
    _run_checked(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=env)


def _run_checked(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    """Run a setup command; on failure raise with its output (CalledProcessError would hide it)."""
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc={result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def _wait_nodes_idle(cluster: LocalSlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        for name, proc in cluster._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with rc={proc.returncode}\n{cluster.logs_tail()}")
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=cluster.client_env(), capture_output=True, text=True, timeout=10
        )
        states = result.stdout.strip()
        node_states = dict(line.split() for line in states.splitlines() if line.strip())
        if all(node_states.get(name) == "idle" for name in NODE_NAMES):
            return
        time.sleep(0.3)
    raise TimeoutError(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r})\n{cluster.logs_tail()}")


def stop_cluster(cluster: LocalSlurmCluster, timeout: float = 15.0) -> None:
    """Cancel leftover jobs, then stop the daemons in reverse start order, by pid (SIGTERM, then SIGKILL)."""
    if "slurmctld" in cluster.pids and (cluster.root / "slurm.conf").exists():
        with contextlib.suppress(Exception):
            subprocess.run(
                ["scancel", "--full", f"--clusters={CLUSTER_NAME}", "-u", "root"],
                env=cluster.client_env(), capture_output=True, timeout=10,
            )  # fmt: skip
    for name in reversed(list(cluster.pids)):
        _stop_pid(cluster.pids[name], cluster._procs.get(name), timeout)
    cluster.pids.clear()
    cluster._procs.clear()
    state = cluster.root / STATE_FILE
    if state.exists():
        state.unlink()


def _stop_pid(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running_cluster(root: Path, accounting: bool = True, install: bool = True) -> Iterator[LocalSlurmCluster]:
    """Install when missing (if allowed), start, yield, and always stop: the body of the tests' session fixture."""
    if install:
        install_packages(accounting)
    cluster = start_cluster(root, accounting=accounting)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "install"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/dispo-slurm"), help="directory for all cluster files")
    parser.add_argument("--no-accounting", action="store_true", help="skip slurmdbd/MariaDB (sacct will not work)")
    parser.add_argument("--install", action="store_true", help="apt-get install missing packages first (root)")
    args = parser.parse_args(argv)
    accounting = not args.no_accounting
    if args.action == "install" or args.install:
        install_packages(accounting)
    if args.action == "start":
        cluster = start_cluster(args.root, accounting=accounting)
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# daemons: {cluster.pids}; stop with: python {sys.argv[0]} stop --root {cluster.root}")
    elif args.action == "stop":
        state = args.root.resolve() / STATE_FILE
        if not state.exists():
            raise SystemExit(f"no running cluster recorded in {state}")
        saved = json.loads(state.read_text())
        cluster = LocalSlurmCluster(root=args.root.resolve(), accounting=saved["accounting"], pids=dict(saved["pids"]))
        stop_cluster(cluster)
        print(f"stopped {saved['pids']}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
