"""mm-init and the launcher: the job's tree as CRIU needs it, run as the job's user."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from engine_fixtures import NATIVE, engine_env, needs_root, workload  # noqa: F401
from slurm_mm.engine import launch, proctree
from slurm_mm.errors import UsageError

pytestmark = needs_root
MM_INIT = str(NATIVE / "mm-init")


def _start(engine_env, argv, tmp_path, **kw):
    out = os.open(tmp_path / "out.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    u = engine_env.user
    os.fchown(out, u.pw_uid, u.pw_gid)  # the user's own output file, as Slurm makes it
    try:
        return launch(argv, uid=u.pw_uid, gid=u.pw_gid, stdout=out, stderr=out,
                      libexec=engine_env.libexec, **kw)
    finally:
        os.close(out)


def _wait_children(pid: int, n: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(kids := proctree.children(pid)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return kids


def _wait_exec(pid: int, comm: str, timeout: float = 5.0) -> None:
    """Until `pid` runs `comm` (it has dropped privileges and exec'd)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never became {comm}")


def test_app_runs_as_the_user_under_a_root_init_of_its_own_pid_namespace(engine_env, tmp_path):
    tree = _start(engine_env, ["sleep", "30"], tmp_path)
    try:
        (app,) = _wait_children(tree.init_pid, 1)
        _wait_exec(app, "sleep")
        init_ids, app_ids = proctree.task_ids(tree.init_pid), proctree.task_ids(app)
        assert init_ids.ns_pid == 1 and set(init_ids.uids) == {0}
        assert app_ids.ns_pid > 300 and set(app_ids.uids) == {engine_env.user.pw_uid}, \
            "the app starts at a random PID of its namespace, never at 2"
        assert set(app_ids.gids) == {engine_env.user.pw_gid} and app_ids.cap_eff == 0
        assert os.getsid(tree.init_pid) == tree.init_pid, "the init leads its own session"
        assert os.getpgid(app) == app, "the app has its own process group"
        assert proctree.open_file(tree.init_pid, 1).target == "/dev/null", "the init keeps no job stdio"
    finally:
        tree.kill()
        tree.wait(10)


def test_jobs_on_a_node_start_at_different_pids_as_on_any_node(engine_env, tmp_path):
    """`/tmp/out.$$` and Open MPI's session directories are named by PID: in fresh PID
    namespaces every job would be PID 2, and a rerun would meet its killed run's files."""
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    trees = [_start(engine_env, ["sleep", "30"], tmp_path / str(i)) for i in range(3)]
    try:
        apps = [_wait_children(t.init_pid, 1)[0] for t in trees]
        ns_pids = [proctree.task_ids(app).ns_pid for app in apps]
        assert len(set(ns_pids)) == 3 and min(ns_pids) > 300, ns_pids
    finally:
        for t in trees:
            t.kill()
            t.wait(10)


def test_sigterm_reaches_the_app_through_both_inits(engine_env, tmp_path):
    tree = _start(engine_env, ["sleep", "30"], tmp_path)
    _wait_children(tree.init_pid, 1)
    tree.signal(signal.SIGTERM)
    assert tree.wait(10) == 128 + signal.SIGTERM


def test_usr1_is_relayed_to_the_app_process_group(engine_env, tmp_path):
    script = "trap 'echo got-usr1; exit 5' USR1; echo armed; while :; do sleep 0.05; done"
    tree = _start(engine_env, ["sh", "-c", script], tmp_path)
    deadline = time.monotonic() + 5
    while "armed" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    tree.signal(signal.SIGUSR1)
    assert tree.wait(10) == 5
    assert "got-usr1" in (tmp_path / "out.log").read_text()


@pytest.mark.parametrize("script, code", [("exit 3", 3), ("kill -9 $$", 137), ("exit 0", 0)])
def test_exit_status_and_death_by_signal_pass_through(engine_env, tmp_path, script, code):
    assert _start(engine_env, ["sh", "-c", script], tmp_path).wait(10) == code


def test_missing_command_exits_127_with_a_message(engine_env, tmp_path):
    assert _start(engine_env, ["no-such-command-xyz"], tmp_path).wait(10) == 127
    assert "no-such-command-xyz" in (tmp_path / "out.log").read_text()


def test_working_directory_is_entered_as_the_user(engine_env, tmp_path):
    tree = _start(engine_env, ["true"], tmp_path, cwd="/root")
    assert tree.wait(10) == 125
    assert "cannot change directory to /root" in (tmp_path / "out.log").read_text()


def test_orphans_are_reaped_by_the_init(engine_env, tmp_path):
    tree = _start(engine_env, ["sh", "-c", "(sleep 0.2 &) ; sleep 1"], tmp_path)
    def orphan_gone() -> bool:  # exited after 0.2 s; only a reaping init makes it vanish
        kids = proctree.children(tree.init_pid)
        return len(kids) == 1 and all(proctree.task_ids(p) and proctree.task_ids(p).state != "Z" for p in kids)

    deadline = time.monotonic() + 0.9  # before the shell's own `sleep 1` ends
    while not orphan_gone():
        assert time.monotonic() < deadline, "the orphan was not reaped by the tree's init"
        time.sleep(0.02)
    assert tree.wait(10) == 0


def test_a_job_is_never_started_as_root_by_mistake(engine_env, tmp_path):
    with pytest.raises(UsageError):
        launch(["true"], uid=0, gid=0, libexec=engine_env.libexec)
    res = subprocess.run([MM_INIT, "--uid", "0", "--gid", "0", "--", "id"], capture_output=True, text=True)
    assert res.returncode == 125 and "refusing to run the command as root" in res.stderr
    res = subprocess.run([MM_INIT, "--", "id", "-u"], capture_output=True, text=True)
    assert res.returncode == 125, "no --uid as root means root: refused too"
    res = subprocess.run([MM_INIT, "--allow-root", "--", "id", "-u"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "0"


@pytest.mark.parametrize("args", [
    ["--uid", "1000", "--", "true"],  # --uid without --gid
    ["--uid", "x", "--gid", "1", "--", "true"],
    ["--uid", "1000", "--gid", "1000", "true"],  # no "--" before the command
    ["--uid", "1000", "--gid", "1000", "--"],  # no command
    ["--pid-fd", "1", "--allow-root", "--", "true"],  # stdout is never the pid fd
    ["--groups", "1,2", "--allow-root", "--", "true"],  # groups without a user
    ["--ns-init", "--allow-root", "--", "true"],  # mm-init's own, only for PID 1
])
def test_mm_init_refuses_bad_arguments(args):
    res = subprocess.run([MM_INIT, *args], capture_output=True, text=True)
    assert res.returncode == 125 and res.stderr.startswith("mm-init: "), res


def test_outer_process_writes_nothing_to_the_job_output_when_the_tree_is_killed(engine_env, tmp_path):
    """Measured: `unshare` printing into the job's stdout after the kill broke restores."""
    tree = _start(engine_env, ["sleep", "30"], tmp_path)
    _wait_children(tree.init_pid, 1)
    os.kill(tree.init_pid, signal.SIGKILL)  # what CRIU does after a dump
    assert tree.wait(10) == 137
    assert (tmp_path / "out.log").read_text() == ""


def test_launch_joins_given_cgroups(engine_env, tmp_path):
    cg = "/sys/fs/cgroup/pids/slurm_mm_engine_test"
    if not os.path.isdir("/sys/fs/cgroup/pids"):
        pytest.skip("no v1 pids controller")
    os.makedirs(cg, exist_ok=True)
    try:
        tree = _start(engine_env, ["sleep", "30"], tmp_path, join_cgroups=[cg])
        (app,) = _wait_children(tree.init_pid, 1)
        with open(f"/proc/{app}/cgroup") as f:
            assert any(line.endswith(":/slurm_mm_engine_test") and ":pids:" in line for line in f.read().splitlines())
        tree.kill()
        tree.wait(10)
    finally:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.05)


def _mount_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _mnt_id(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(line for line in f if line.startswith("mnt_id:")).split()[1])


def test_private_proc_gives_the_tree_its_own_mounts_and_proc(engine_env):
    """CUDA needs a /proc of the job's PID namespace (error 304 under the host's)."""
    # The reopen inside is the user's own: the output must be where the user can reach it.
    tmp_path = Path(tempfile.mkdtemp(dir=engine_env.base))
    tmp_path.chmod(0o755)
    host_mounts = open("/proc/self/mountinfo").read()
    script = "cat /proc/1/comm; grep NSpid /proc/self/status; ls /proc | grep -c '^[0-9]'; exec sleep 30"
    tree = _start(engine_env, ["sh", "-c", script], tmp_path, private_proc=True)
    try:
        (app,) = _wait_children(tree.init_pid, 1)
        _wait_exec(app, "sleep")
        assert _mount_ns(tree.init_pid) == _mount_ns(app) != _mount_ns("self")
        assert _mount_ns(tree.outer_pid) == _mount_ns("self"), "the outer mm-init stays on the host"
        comm, nspid, count = (tmp_path / "out.log").read_text().splitlines()
        assert comm == "mm-init" and len(nspid.split()) == 2, "the app's /proc is its PID namespace's"
        assert int(count) <= 5, "and shows only the job's processes"
        assert open("/proc/self/mountinfo").read() == host_mounts, "nothing propagated to the host"
        inside = {int(line.split()[0]) for line in open(f"/proc/{tree.init_pid}/mountinfo")}
        for pid in (tree.init_pid, app):
            for fd in (0, 1, 2):
                assert _mnt_id(pid, fd) in inside, f"fd {fd} of {pid} was reopened in the job's mounts"
        assert os.readlink(f"/proc/{tree.init_pid}/exe") == str(engine_env.libexec / "mm-init")
        assert proctree.task_ids(app).uids[0] == engine_env.user.pw_uid
    finally:
        tree.kill()
        tree.wait(10)


def test_private_proc_keeps_the_stdio_offset_and_sharing(engine_env, tmp_path):
    """A non-append output keeps its offset; stdout and stderr stay one description."""
    path = tmp_path / "out.log"
    path.write_text("x" * 100)
    fd = os.open(path, os.O_WRONLY)
    os.lseek(fd, 100, os.SEEK_SET)
    u = engine_env.user
    try:
        tree = launch(["sh", "-c", "echo out; echo err >&2; echo out2"], uid=u.pw_uid, gid=u.pw_gid,
                      stdout=fd, stderr=fd, private_proc=True, libexec=engine_env.libexec)
    finally:
        os.close(fd)
    assert tree.wait(10) == 0
    assert path.read_text() == "x" * 100 + "out\nerr\nout2\n"


def test_private_proc_leaves_an_unreachable_stdio_file_as_it_is(engine_env, tmp_path):
    """A file that cannot be found again by its name (deleted) is not reopened: the job runs."""
    path = tmp_path / "gone.log"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    path.unlink()
    u = engine_env.user
    try:
        tree = launch(["sh", "-c", "echo still-here"], uid=u.pw_uid, gid=u.pw_gid, stdout=fd, stderr=fd,
                      private_proc=True, libexec=engine_env.libexec)
        assert tree.wait(10) == 0
        assert os.pread(fd, 100, 0) == b"still-here\n"
    finally:
        os.close(fd)
