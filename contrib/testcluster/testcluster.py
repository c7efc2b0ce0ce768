#!/opt/slurm_mm/venv/bin/python
"""A real Slurm cluster on one machine for slurm_mm's tests and demo.

munged + slurmctld + three slurmd (n1..n3, Debian's MULTIPLE_SLURMD build) with
proctrack/cgroup, two partitions (`low`: preemptible, `high`), the slurm_mm SPANK
plugin, Prolog/Epilog, a node agent per node, and a directory standing in for the
shared parallel filesystem. Never touches the machine's own /etc/slurm.

slurm_mm is used as a site gets it: the installed layout under /opt/slurm_mm (`make
install`, run by contrib/install-deps.sh, or the .deb) and the installed copies of
contrib/slurm/ (plugstack.conf, slurm.conf.snippet, cli_filter.lua) as shipped, with
only site values substituted (paths, node names, the minimum interval). Nothing a job
user loads comes from the checkout. Config, logs and spool live under one state
directory; the agents' sockets and pid files in slurm_mm's default run dir
(/run/slurm_mm), as on a real node. `stop` kills the daemons by PID file and removes
the cgroups they made.

    testcluster.py start [--preempt-mode requeue|suspend]   testcluster.py stop
    testcluster.py status                                   testcluster.py env
    testcluster.py kill-node n1                             testcluster.py start-node n1
"""

from __future__ import annotations

import argparse
import json
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

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("SLURM_MM_PREFIX", "/opt/slurm_mm"))
PYTHON = PREFIX / "venv" / "bin" / "python"
SHIPPED = PREFIX / "share" / "slurm"  # contrib/slurm/ as installed
RUN_DIR = Path("/run/slurm_mm")  # slurm_mm's default run_dir and agent socket dir
NODES = ("n1", "n2", "n3")
CTLD_PORT = 17817
NODE_PORTS = {name: 17818 + i for i, name in enumerate(NODES)}
USER = "mmuser"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def default_state_dir() -> Path:
    return Path(os.environ.get("SLURM_MM_CLUSTER_DIR", "/tmp/slurm_mm-cluster"))


@dataclass(frozen=True)
class Cluster:
    """Paths of one cluster instance; every file it makes is under `state`."""

    state: Path

    @property
    def etc(self) -> Path:
        return self.state / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def mm_config(self) -> Path:
        return self.etc / "slurm_mm.yaml"

    @property
    def shared(self) -> Path:
        """Stands in for the shared parallel filesystem."""
        return self.state / "shared"

    @property
    def checkpoint_root(self) -> Path:
        return self.shared / "checkpoints"

    @property
    def run(self) -> Path:
        """Pid files and the agents' sockets: slurm_mm's default run dir."""
        return RUN_DIR

    def agent_socket(self, node: str) -> Path:
        """The plugin's and agent's default agent_socket, /run/slurm_mm/agent-%n.sock."""
        return self.run / f"agent-{node}.sock"

    @property
    def metrics(self) -> Path:
        """Stands in for node_exporter's textfile collector directory."""
        return self.state / "metrics"

    @property
    def log(self) -> Path:
        return self.state / "log"

    @property
    def munge_socket(self) -> Path:
        return self.state / "munge" / "munge.socket.2"

    def env(self) -> dict[str, str]:
        """Environment for Slurm commands and slurm_mm tools talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.slurm_conf)
        env["SLURM_MM_CONFIG"] = str(self.mm_config)
        env["PATH"] = f"{PREFIX / 'venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"


# ---------------------------------------------------------------- configuration

def slurm_version() -> tuple[int, int]:
    out = subprocess.run(["slurmd", "-V"], capture_output=True, text=True, check=True).stdout
    major, minor = out.split()[1].split(".")[:2]
    return int(major), int(minor)


def write_configs(c: Cluster, preempt_mode: str) -> None:
    for d in (c.etc, c.run, c.log, c.state / "ctld", c.shared, c.state / "staging", c.metrics):
        d.mkdir(parents=True, exist_ok=True)
    for n in NODES:
        (c.state / "spool" / n).mkdir(parents=True, exist_ok=True)
    os.chmod(c.state, 0o755)
    os.chmod(c.shared, 0o755)
    c.checkpoint_root.mkdir(exist_ok=True)
    os.chmod(c.checkpoint_root, 0o711)

    version = slurm_version()
    suspend = preempt_mode == "suspend"
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={NODE_PORTS[n]} "
        "CPUs=2 RealMemory=2000 State=UNKNOWN"
        for n in NODES
    )
    c.slurm_conf.write_text(f"""\
# Written by contrib/testcluster/testcluster.py: a slurm_mm test cluster.
ClusterName=slurmmm
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential expiry: a requeued job may start again after ~11 s, not 121 s.
AuthInfo=socket={c.munge_socket},cred_expire=10
StateSaveLocation={c.state / 'ctld'}
SlurmdSpoolDir={c.state / 'spool'}/%n
SlurmctldPidFile={c.pid_file('slurmctld')}
SlurmdPidFile={c.run}/slurmd-%n.pid
SlurmctldLogFile={c.log}/slurmctld.log
SlurmdLogFile={c.log}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TaskPlugin=task/cgroup
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/partition_prio
PreemptMode={'SUSPEND,GANG' if suspend else 'REQUEUE'}
SlurmdTimeout=10
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
MpiDefault=none
PlugStackConfig={c.etc / 'plugstack.conf'}
{shipped_slurm_conf(c, version)}
{nodes}
PartitionName=low Nodes={','.join(NODES)} Default=YES PriorityTier=1 PreemptMode={'SUSPEND' if suspend else 'REQUEUE'} GraceTime=20 MaxTime=INFINITE State=UP
PartitionName=high Nodes={','.join(NODES)} PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
""")
    shutil.copy(shipped("cli_filter.lua"), c.etc / "cli_filter.lua")
    (c.etc / "cgroup.conf").write_text(
        "CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
    )
    (c.etc / "plugstack.conf").write_text(shipped_plugstack_conf())
    for hook in ("prolog", "epilog"):
        script = c.etc / hook
        # Slurm builds the prolog's environment itself: point the installed hook at
        # this cluster's config (a site keeps it at /etc/slurm_mm/config.yaml).
        script.write_text(
            "#!/bin/sh\n"
            f"SLURM_MM_CONFIG={c.mm_config}; export SLURM_MM_CONFIG\n"
            f"exec {PREFIX / 'prolog_epilog' / hook}\n"
        )
        script.chmod(0o755)
    c.mm_config.write_text(f"""\
# slurm_mm configuration of the test cluster (see docs/admin-guide.md).
# run_dir, agent_socket, criu_path, libexec_dir: the built-in defaults.
checkpoint_root: {c.checkpoint_root}
staging_dir: {c.state / 'staging'}
metrics_dir: {c.metrics}
min_interval: 5
job_mount_namespace: {os.environ.get("SLURM_MM_TEST_MOUNT_NS", "never")}
""")


def shipped(name: str) -> Path:
    path = SHIPPED / name
    if not path.is_file():
        raise RuntimeError(f"{path} is not installed: run contrib/install-deps.sh (make install)")
    return path


# Site values the test cluster substitutes in the shipped files (text -> replacement).
PLUGSTACK_SITE_VALUES = {"min_interval=5m": "min_interval=5s"}


def shipped_plugstack_conf() -> str:
    """contrib/slurm/plugstack.conf with only the site's minimum interval changed."""
    text = shipped("plugstack.conf").read_text()
    for old, new in PLUGSTACK_SITE_VALUES.items():
        if old not in text:
            raise RuntimeError(f"shipped plugstack.conf no longer contains '{old}'")
        text = text.replace(old, new)
    return text


def shipped_slurm_conf(c: Cluster, version: tuple[int, int]) -> str:
    """contrib/slurm/slurm.conf.snippet with site paths (and 23.02+'s spelling of the
    preemption-signal switch, as the snippet's own comment tells admins to)."""
    subs = {
        f"Prolog={PREFIX}/prolog_epilog/prolog": f"Prolog={c.etc / 'prolog'}",
        f"Epilog={PREFIX}/prolog_epilog/epilog": f"Epilog={c.etc / 'epilog'}",
    }
    if version >= (23, 2):
        subs["SlurmctldParameters=preempt_send_user_signal"] = "PreemptParameters=send_user_signal"
    text = shipped("slurm.conf.snippet").read_text()
    for old, new in subs.items():
        if old not in text:
            raise RuntimeError(f"shipped slurm.conf.snippet no longer contains '{old}'")
        text = text.replace(old, new)
    return text.rstrip("\n")


# ---------------------------------------------------------------- daemons

def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_pid(pid_file: Path, timeout: float = 15.0) -> None:
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} ({pid_file.name}) to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 5, f"pid {pid} to die")
    pid_file.unlink(missing_ok=True)


def start_munge(c: Cluster) -> None:
    mdir = c.state / "munge"
    mdir.mkdir(exist_ok=True)
    os.chmod(mdir, 0o755)  # non-root clients must reach the socket (FACTS.md)
    key = mdir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    if read_pid(c.pid_file("munged")):
        return
    subprocess.run(
        ["munged", "--force", f"--key-file={key}", f"--socket={c.munge_socket}",
         f"--pid-file={c.pid_file('munged')}", f"--log-file={c.log / 'munged.log'}",
         f"--seed-file={mdir / 'munged.seed'}"],
        check=True,
    )
    wait_for(c.munge_socket.exists, 10, "munged socket")


def start_ctld(c: Cluster) -> None:
    if read_pid(c.pid_file("slurmctld")):
        return
    subprocess.run(["slurmctld", "-i"], env=c.env(), check=True)
    wait_for(lambda: read_pid(c.pid_file("slurmctld")) is not None, 15, "slurmctld")


def start_node(c: Cluster, node: str) -> None:
    if read_pid(c.run / f"slurmd-{node}.pid"):
        return
    subprocess.run(["slurmd", "-N", node], env=c.env(), check=True)
    wait_for(lambda: read_pid(c.run / f"slurmd-{node}.pid") is not None, 15, f"slurmd {node}")
    start_agent(c, node)


def start_agent(c: Cluster, node: str) -> None:
    """The node agent runs beside each slurmd, as on a real node."""
    pid_file = c.pid_file(f"agent-{node}")
    if read_pid(pid_file):
        return
    log = open(c.log / f"agent-{node}.log", "ab")
    # -I and cwd /: the installed package, never a checkout that happens to be the cwd
    # (its files may be unreadable to the job users the agent runs helpers as).
    proc = subprocess.Popen(
        [str(PYTHON), "-I", "-m", "slurm_mm.agent", "--node", node, "--pid-file", str(pid_file),
         "--poll-interval", "1"],
        env=c.env(), cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    sock = c.agent_socket(node)
    wait_for(lambda: sock.exists() or proc.poll() is not None, 15, f"agent {node}")
    if proc.poll() is not None:
        raise RuntimeError(f"agent for {node} exited with {proc.returncode}; see {c.log}/agent-{node}.log")


def set_agent_config(c: Cluster, key: str, value: str) -> None:
    """Set one slurm_mm config key (YAML text) and restart the node agents to read it."""
    text = c.mm_config.read_text()
    lines = [l for l in text.splitlines() if not l.startswith(f"{key}:")]
    c.mm_config.write_text("\n".join(lines + [f"{key}: {value}"]) + "\n")
    for node in NODES:
        stop_pid(c.pid_file(f"agent-{node}"))
        start_agent(c, node)


def node_states(c: Cluster) -> dict[str, str]:
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], env=c.env(), capture_output=True, text=True
    )
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        name, state = line.split()
        states[name] = state
    return states


def ensure_user() -> None:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)


def check_installed() -> None:
    """The cluster runs the installed slurm_mm, never the checkout's build."""
    for path in (PREFIX / "lib" / "slurm_mm_spank.so", PREFIX / "venv" / "bin" / "slurm-mm-run",
                 PREFIX / "prolog_epilog" / "prolog", PREFIX / "libexec" / "mm-init"):
        if not path.exists():
            raise RuntimeError(f"{path} is not installed: run contrib/install-deps.sh (make install)")


def clean_run_dir(c: Cluster) -> None:
    """A fresh cluster starts job ids at 1 again: stale completion markers or sockets of
    an earlier cluster must not be taken for this one's."""
    if c.run.exists():
        shutil.rmtree(c.run)
    c.run.mkdir(mode=0o755, parents=True)


def start(c: Cluster, preempt_mode: str = "requeue") -> None:
    if read_pid(c.pid_file("slurmctld")):
        raise RuntimeError(f"a test cluster is already running in {c.state}; stop it first")
    busy = [port for port in (CTLD_PORT, *NODE_PORTS.values()) if port_in_use(port)]
    if busy:
        raise RuntimeError(f"ports {busy} are in use: is another test cluster running? "
                           "(stop it with: testcluster.py --state-dir DIR stop)")
    ensure_user()
    check_installed()
    clean_run_dir(c)
    write_configs(c, preempt_mode)
    start_munge(c)
    start_ctld(c)
    for node in NODES:
        start_node(c, node)
    wait_for(lambda: all(s == "idle" for s in node_states(c).values())
             and len(node_states(c)) == len(NODES), 30, "3 idle nodes")


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def kill_node(c: Cluster, node: str) -> None:
    """Hard node failure: slurmd, the node agent and every job process on it die."""
    thaw(node)
    for daemon in (f"slurmd-{node}", f"agent-{node}"):
        pid = read_pid(c.run / f"{daemon}.pid")
        if pid:
            os.kill(pid, signal.SIGKILL)
    for pid in cgroup_pids(node):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_cgroups(node: str) -> list[Path]:
    return sorted(CGROUP_ROOT.glob(f"*/slurm_{node}"))


def cgroup_pids(node: str) -> list[int]:
    pids: set[int] = set()
    for root in node_cgroups(node):
        for procs in root.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass
    return sorted(pids)


def thaw(node: str) -> None:
    """Frozen (suspended) processes ignore SIGKILL until thawed."""
    for root in node_cgroups(node):
        for state in root.rglob("freezer.state"):
            try:
                state.write_text("THAWED")
            except OSError:
                pass


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rmdir_all(dirs, tries: int = 20) -> None:
    """Remove cgroup directories (deepest given first); a dying task's cgroup empties late."""
    for d in dirs:
        for _ in range(tries):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def remove_cgroups(node: str) -> None:
    thaw(node)
    kill_all(cgroup_pids(node))
    for root in node_cgroups(node):
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        rmdir_all(dirs + [root])


def stop(c: Cluster) -> None:
    # slurmds first: stopping slurmctld first can stall the stop ~10 s (FACTS.md).
    for node in NODES:
        stop_pid(c.run / f"slurmd-{node}.pid")
        stop_pid(c.pid_file(f"agent-{node}"))
    stop_pid(c.pid_file("slurmctld"))
    stop_pid(c.pid_file("munged"))
    for node in NODES:
        remove_cgroups(node)


def status(c: Cluster) -> dict:
    daemons = {"munged": c.pid_file("munged"), "slurmctld": c.pid_file("slurmctld")}
    for n in NODES:
        daemons[f"slurmd-{n}"] = c.run / f"slurmd-{n}.pid"
        daemons[f"agent-{n}"] = c.pid_file(f"agent-{n}")
    return {name: read_pid(p) for name, p in daemons.items()}


# ---------------------------------------------------------------- jobs (tests + demo)

def sbatch(c: Cluster, script: str, *options: str, user: str = USER, cwd: Path | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Submit `script` (text) as `user`, like a user at a login node would."""
    home = Path(pwd.getpwnam(user).pw_dir)
    cwd = cwd or home
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "USER": user, "LANG": "C.UTF-8",
           "SLURM_CONF": str(c.slurm_conf)}
    proc = subprocess.run(
        ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
         "sbatch", "--parsable", *options],
        input=script, capture_output=True, text=True, cwd=cwd, timeout=60,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def job_id(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().split(";")[0]


def job_info(c: Cluster, job: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (works on Slurm 22.05 and 24.11)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=c.env(),
                         capture_output=True, text=True, timeout=30)
    info: dict[str, str] = {}
    for token in out.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def admin_comment(c: Cluster, job: str) -> str:
    """The job's AdminComment (it holds spaces, so not from job_info's tokens)."""
    out = subprocess.run(["scontrol", "show", "job", job], env=c.env(), capture_output=True,
                         text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.strip().startswith("AdminComment="):
            return line.strip().partition("=")[2].strip()
    return ""


def wait_job(c: Cluster, job: str, states: set[str], timeout: float,
             node_not: str | None = None) -> dict[str, str]:
    """Wait until the job is in one of `states` (and, if given, not on `node_not`)."""
    last: dict[str, str] = {}

    def reached() -> bool:
        nonlocal last
        last = job_info(c, job)
        return last.get("JobState") in states and (
            node_not is None or last.get("BatchHost") != node_not)
    try:
        wait_for(reached, timeout, f"job {job} to reach {sorted(states)}", interval=0.5)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last seen {last.get('JobState')} on {last.get('BatchHost')}"
                           f" reason {last.get('Reason')}") from None
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start")
    p_start.add_argument("--preempt-mode", choices=("requeue", "suspend"), default="requeue")
    sub.add_parser("stop")
    sub.add_parser("status")
    sub.add_parser("env")
    for name in ("kill-node", "start-node"):
        sub.add_parser(name).add_argument("node", choices=NODES)
    args = parser.parse_args(argv)
    c = Cluster(args.state_dir)
    try:
        if args.command == "start":
            start(c, args.preempt_mode)
            print(f"test cluster up in {c.state}: nodes {', '.join(NODES)} idle")
            print(f"use it with: export SLURM_CONF={c.slurm_conf} SLURM_MM_CONFIG={c.mm_config}")
        elif args.command == "stop":
            stop(c)
            print(f"test cluster in {c.state} stopped")
        elif args.command == "status":
            print(json.dumps(status(c), indent=2))
        elif args.command == "env":
            print(f"export SLURM_CONF={c.slurm_conf} SLURM_MM_CONFIG={c.mm_config}")
        elif args.command == "kill-node":
            kill_node(c, args.node)
        elif args.command == "start-node":
            start_node(c, args.node)
    except (subprocess.CalledProcessError, TimeoutError, RuntimeError, OSError) as exc:
        print(f"testcluster: error: {exc} (logs: {c.log})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
