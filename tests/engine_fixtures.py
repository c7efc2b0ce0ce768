"""Fixtures and helpers of the tests/test_engine_*.py files: real CRIU, real processes.

Workloads (tests/workloads/) run as the unprivileged user `mmtest` under mm-init, are
checkpointed and restored with the engine, and judge their own state (zdtm style): the
harness only creates the GO file and reads their PASS/FAIL line and exit code.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from store_fixtures import ensure_user  # noqa: F401 - re-exported for the engine tests

from slurm_mm.engine import Criu, LaunchedTree, checkpoint_tree, launch, restore_tree, wait_gone

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = REPO / "tests" / "workloads"
NATIVE = REPO / "slurm_mm" / "native"  # built by the session fixture
USER = "mmtest"
C_WORKLOADS = ("counter", "memory_pattern", "threads")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU and mm-init need root")
# Both tree layouts: PID namespace only (CPU jobs), and PID + mount namespace with the
# tree's own /proc (mm-init --private-proc, GPU jobs).
both_layouts = pytest.mark.parametrize("private_proc", [False, True], ids=["pidns", "pidns+mntns"])


@dataclass
class EngineEnv:
    user: pwd.struct_passwd
    libexec: Path  # the freshly built native helpers (not a possibly stale install)
    criu: Criu
    workloads: Path  # copy of tests/workloads with the C ones compiled, readable by the user
    base: Path


@pytest.fixture(scope="session")
def engine_env() -> EngineEnv:
    if os.geteuid() != 0:
        pytest.skip("CRIU and mm-init need root")
    subprocess.run(["make", "-s", "-C", str(NATIVE)], check=True, capture_output=True)
    user = ensure_user(USER)
    base = Path(tempfile.mkdtemp(prefix="slurm_mm-engine-"))
    base.chmod(0o755)
    work = base / "workloads"
    shutil.copytree(WORKLOADS, work, ignore=shutil.ignore_patterns("__pycache__"))
    for name in C_WORKLOADS:
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(work / name), str(work / f"{name}.c")],
                       check=True, capture_output=True)
    for p in [work, *work.iterdir()]:
        p.chmod(0o755)
    # The helpers as an install has them: where the job's user can reach them (a clone in
    # root's 0700 home cannot be; the restore's owner check refuses what the user could not map).
    libexec = base / "libexec"
    shutil.copytree(NATIVE, libexec, ignore=shutil.ignore_patterns("*.c", "*.h", "*.o", "Makefile"))
    libexec.chmod(0o755)
    criu = Criu(libexec=libexec)
    criu.check()
    yield EngineEnv(user, libexec, criu, work, base)
    shutil.rmtree(base, ignore_errors=True)


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


@dataclass
class Workload:
    """One workload in its own directory (owned by the user), with its output files."""

    env: EngineEnv
    name: str
    args: list[str]
    dir: Path
    tree: LaunchedTree | None = None
    fds: list[int] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        if self.name.endswith(".py"):
            return ["/usr/bin/python3", "-u", str(self.env.workloads / self.name), *self.args]
        return [str(self.env.workloads / self.name), *self.args]

    def output(self, name: str = "out.log") -> int:
        """An output file of the user's (as Slurm opens the job's output: as the user)."""
        fd = _open_append(self.dir / name)
        os.fchown(fd, self.env.user.pw_uid, self.env.user.pw_gid)
        self.fds.append(fd)
        return fd

    def start(self, ready_timeout: float = 30.0, *, private_proc: bool = False, stdin: int | None = None) -> LaunchedTree:
        """Launch as the user, stdout and stderr one O_APPEND file (as Slurm gives them)."""
        out = self.output("out.log")
        u = self.env.user
        self.tree = launch(self.argv, uid=u.pw_uid, gid=u.pw_gid, cwd=self.dir, stdin=stdin,
                           stdout=out, stderr=out, private_proc=private_proc, libexec=self.env.libexec)
        self.wait_for("READY", "out.log", ready_timeout)
        return self.tree

    def text(self, name: str = "out.log") -> str:
        try:
            return (self.dir / name).read_text()
        except FileNotFoundError:
            return ""

    def wait_for(self, word: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while word not in self.text(name):
            if self.tree is not None and name == "out.log" and self.tree.poll() is not None:
                raise AssertionError(f"{self.name} ended ({self.tree.poll()}) before {word}: {self.text(name)!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {word} in {name} after {timeout} s: {self.text(name)!r}")
            time.sleep(0.02)

    def go(self) -> None:
        (self.dir / "GO").touch()

    def checkpoint(self, images: Path, **kw):
        assert self.tree is not None
        return checkpoint_tree(self.tree.init_pid, images, criu=self.env.criu, **kw)

    def restore(self, images: Path, out_name: str = "restored.log", **kw):
        out = self.output(out_name)
        kw.setdefault("owner_uid", self.env.user.pw_uid)
        return restore_tree(images, stdout=out, stderr=out, criu=self.env.criu, libexec=self.env.libexec, **kw)

    def close(self) -> None:
        if self.tree is not None and self.tree.poll() is None:
            self.tree.kill()
            self.tree.wait(10)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def workload(engine_env, request):
    """Factory: workload("counter.py", "0") -> a Workload in a fresh directory.

    The directories live under the session's base (0755), not pytest's tmp_path (0700
    for root, closed to the workload's user).
    """
    made: list[Workload] = []

    def make(name: str, *args: str) -> Workload:
        d = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=engine_env.base))
        os.chown(d, engine_env.user.pw_uid, engine_env.user.pw_gid)
        w = Workload(engine_env, name, list(args), d)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def checkpoint_and_restore(w: Workload, images: Path, *, before_restore=None, gpu=None, **restore_kw):
    """The standard cycle: checkpoint (tree killed), check it is gone, restore, GO, wait.

    Returns (checkpoint result, restored tree, exit code, restored output).
    """
    result = w.checkpoint(images, leave_running=False, gpu=gpu)
    assert w.tree.wait(10) == 137, "CRIU kills the tree after a dump"
    assert wait_gone(result.pids, 5, zombies_count=False) == [], "the tree is gone"
    if before_restore:
        before_restore(result)
    restored = w.restore(images, gpu=gpu, **restore_kw)
    w.go()
    try:
        code = restored.wait(60)
    except TimeoutError:
        restored.kill()
        restored.wait(10)
        raise
    return result, restored, code, w.text("restored.log")


def squat_pids(pids: list[int]) -> list[subprocess.Popen]:
    """Start a `sleep` at each of `pids` (host PIDs), so a restore cannot have them.

    Uses /proc/sys/kernel/ns_last_pid; a PID taken by something else meanwhile is
    simply skipped (it is taken either way).
    """
    squatters = []
    for pid in sorted(pids):
        deadline = time.monotonic() + 3
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)  # a zombie waiting for this host's slow PID 1
        if os.path.exists(f"/proc/{pid}"):
            continue
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "60"])
        squatters.append(p)
    return squatters

