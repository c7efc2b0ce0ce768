"""`slurm-mm checkpoint --pid PID --to DIR` and `slurm-mm restore DIR` (issue 3): the
Slurm-free CLI, run as a subprocess against real trees, real CRIU and a real store.

Workloads run as the unprivileged user `mmtest` under mm-init (tests/engine_fixtures.py)
and judge their own continuity after restore (zdtm style); these tests read the
verdict, the exit codes, the files and the one-line errors.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import filelock
import pytest

from engine_fixtures import REPO, USER, engine_env, needs_root, workload  # noqa: F401
from slurm_mm.engine import launch, wait_gone
from slurm_mm.engine.proctree import children, task_ids
from slurm_mm.store import ImageStore

pytestmark = needs_root

PYTHON = "/opt/slurm_mm/venv/bin/python"


@dataclass
class Cli:
    """Runs `python -m slurm_mm.cli` from the working tree with a test configuration."""

    config: Path
    staging: Path
    base: Path

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_MM_CONFIG": str(self.config)}

    def argv(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "slurm_mm.cli", *args]

    def __call__(self, *args: str, user: str | None = None, timeout: float = 60,
                 **kw) -> subprocess.CompletedProcess:
        argv = self.argv(*args)
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        return subprocess.run(argv, cwd=REPO, env=self.env(), text=True, timeout=timeout, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env(), text=True, **kw)

    def job_dir(self, name: str = "myjob") -> Path:
        """A job directory in a fresh store root (created by the CLI, root 0711)."""
        root = Path(os.path.join(self.base, f"store-{time.monotonic_ns()}"))
        return root / name


@pytest.fixture
def cli(engine_env, tmp_path) -> Cli:
    base = engine_env.base / f"cli-{tmp_path.name}"
    base.mkdir(mode=0o755)
    config = base / "config.yaml"
    staging = base / "staging"
    config.write_text(f"staging_dir: {staging}\nlibexec_dir: {engine_env.libexec}\nkeep_images: 5\n"
                      "timeouts:\n  lock: 1\n")
    return Cli(config, staging, base)


def _error_line(result: subprocess.CompletedProcess | tuple[int, str], code: int, *words: str) -> str:
    """The command failed with `code` and said one line, `slurm-mm: error: ...`, with `words`."""
    rc, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("slurm-mm: error: "), err
    for w in words:
        assert w in line, (w, line)
    return line


def _app_pid(init_pid: int) -> int:
    return min(children(init_pid), key=lambda p: task_ids(p).ns_pid)


def _lines(w, name: str = "counter.log") -> int:
    return w.text(name).count("\n")


def _wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.02)


def _corrupt_largest_file(image: Path) -> None:
    """Flip one byte in the middle of the image's largest stored file (size unchanged)."""
    victim = max((p for p in image.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


class PtyReader:
    """A pseudo-terminal to give a command as its stderr, and everything written to it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.data = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every writer closed the slave
                return
            if not chunk:
                return
            self.data += chunk

    def text(self) -> str:
        os.close(self.slave)
        self._thread.join(10)
        os.close(self.master)
        return self.data.decode(errors="replace")


# --------------------------------------------------------------------------- the cycle

def test_counter_checkpointed_twice_lists_verifies_and_resumes_without_gap(workload, cli, engine_env):
    w = workload("counter.py")
    w.start()
    d = cli.job_dir("myjob")
    pid = w.tree.init_pid

    first = cli("checkpoint", "--pid", str(pid), "--to", str(d), "--leave-running")
    assert first.returncode == 0 and first.stderr == "", first.stderr  # no progress when not a tty
    assert first.stdout.startswith(f"{d}/ckpt-000001: ") and first.stdout.count("\n") == 1, first.stdout
    assert f"tree {pid} left running" in first.stdout and "dump " in first.stdout
    assert w.tree.poll() is None, "--leave-running keeps the tree"
    seen = _lines(w)
    _wait_until(lambda: _lines(w) > seen + 5, 10, "counting after the first checkpoint")

    second = cli("checkpoint", "--pid", str(pid), "--to", str(d))
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"{d}/ckpt-000002: ") and f"tree {pid} stopped" in second.stdout
    assert w.tree.wait(10) == 137, "the dump ended the tree"
    at_dump = w.text("counter.log")
    assert os.listdir(cli.staging) == [], "staging directories are removed"

    listed = cli("images", str(d), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["image"] for r in rows] == ["ckpt-000002", "ckpt-000001"]
    assert {(r["trigger"], r["epoch"], r["node"]) for r in rows} == {("manual", 0, socket.gethostname())}
    manifest = json.loads((d / "ckpt-000002" / "manifest.json").read_text())
    assert (manifest["uid"], manifest["gid"]) == (engine_env.user.pw_uid, engine_env.user.pw_gid)
    assert manifest["job_id"] == "myjob" and manifest["extra"]["timings"]["dump"] > 0
    for r in rows:
        ok = cli("verify", r["path"])
        assert ok.returncode == 0 and ok.stdout.startswith(f"{r['path']}: ok"), ok.stderr

    out_before = w.text("out.log")
    with open(w.dir / "restored.log", "a") as out:
        restore = cli.popen("restore", str(d), stdout=out, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: restore.poll() is not None or len(w.text("counter.log")) > len(at_dump), 20,
                    "counting after restore")
        w.go()
        _, err = restore.communicate(timeout=30)
    finally:
        restore.kill()
    assert restore.returncode == 0, err
    assert w.text("restored.log").startswith("PASS"), w.text("restored.log")  # 1..n, no gap, no repeat
    assert w.text("counter.log").startswith(at_dump)
    assert w.text("out.log") == out_before, "the restored tree writes where `slurm-mm restore` was run"
    assert os.listdir(cli.staging) == []


def test_restore_exits_with_the_restored_jobs_exit_code(workload, cli):
    w = workload("counter", "7")
    w.start()
    d = cli.job_dir("exit7")
    assert cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d)).returncode == 0
    assert w.tree.wait(10) == 137
    w.go()  # the tree is gone; the restored counter sees GO at its next step
    with open(w.dir / "restored.log", "a") as out:
        result = cli("restore", str(d), stdout=out, stderr=subprocess.PIPE)
    assert result.returncode == 7, result.stderr
    assert "PASS" in w.text("restored.log")


def test_foreground_restore_passes_signals_to_the_restored_tree(workload, cli):
    w = workload("counter")
    w.start()
    d = cli.job_dir("signalled")
    assert cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d)).returncode == 0
    assert w.tree.wait(10) == 137
    at_dump = len(w.text("counter.log"))
    restore = cli.popen("restore", str(d), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: restore.poll() is not None or len(w.text("counter.log")) > at_dump, 20,
                    "counting after restore")
        time.sleep(0.3)  # the tree runs a moment before `slurm-mm restore` starts waiting for it
        restore.send_signal(signal.SIGTERM)  # as a terminal's Ctrl-C or Slurm's TERM would reach it
        _, err = restore.communicate(timeout=20)
    finally:
        restore.kill()
        w.go()  # whatever went wrong, a restored counter ends
    assert restore.returncode == 128 + signal.SIGTERM, err


def test_restore_detach_prints_the_restored_init_pid_and_leaves_it_running(workload, cli):
    w = workload("counter")
    w.start()
    d = cli.job_dir("detached")
    assert cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d)).returncode == 0
    assert w.tree.wait(10) == 137
    with open(w.dir / "restored.log", "a") as out:
        result = cli("restore", str(d), "--detach", stdout=out, stderr=subprocess.PIPE)
    assert result.returncode == 0, result.stderr
    pid = int(w.text("restored.log").splitlines()[0])
    try:
        ids = task_ids(pid)
        assert ids is not None and ids.ns_pid == 1, "the printed pid is the restored namespace init"
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "mm-init"
        w.go()
        assert wait_gone([pid], 20, zombies_count=False) == []
    finally:
        if task_ids(pid):
            os.kill(pid, signal.SIGKILL)
    assert "PASS" in w.text("restored.log"), w.text("restored.log")


def test_damaged_newest_image_falls_back_to_the_previous_one(workload, cli):
    """memory_pattern writes no file, so its older image is as good as the newer one."""
    w = workload("memory_pattern", "32")
    w.start()
    d = cli.job_dir("damaged")
    pid = str(w.tree.init_pid)
    assert cli("checkpoint", "--pid", pid, "--to", str(d), "--leave-running").returncode == 0
    term = PtyReader()
    stop = cli("checkpoint", "--pid", pid, "--to", str(d), stdout=subprocess.PIPE, stderr=term.slave)
    shown = term.text()
    assert stop.returncode == 0, shown
    assert re.search(r"\rslurm-mm: storing image: [\d.]+ \w+ / [\d.]+ MiB, [\d.]+ \w+/s", shown), repr(shown)
    assert w.tree.wait(10) == 137

    _corrupt_largest_file(d / "ckpt-000002")
    _error_line(cli("verify", str(d / "ckpt-000002")), 4, "ckpt-000002")
    w.go()
    term = PtyReader()
    with open(w.dir / "restored.log", "a") as out:
        result = cli("restore", str(d), stdout=out, stderr=term.slave)
    shown = term.text()
    assert result.returncode == 0, shown
    assert "PASS" in w.text("restored.log"), w.text("restored.log")
    assert "slurm-mm: skipping ckpt-000002: " in shown and "slurm-mm: restoring ckpt-000001" in shown, shown
    assert re.search(r"\rslurm-mm: extracting image: [\d.]+ \w+ / [\d.]+ MiB, [\d.]+ \w+/s", shown), repr(shown)

    _corrupt_largest_file(d / "ckpt-000001")
    none_left = cli("restore", str(d))
    _error_line(none_left, 4, "no complete, verified image", str(d))
    assert "skipping ckpt-000002" in none_left.stderr and "skipping ckpt-000001" in none_left.stderr
    assert os.listdir(cli.staging) == []


# --------------------------------------------------------------------------- refusals

def test_checkpoint_refuses_a_pid_that_is_not_a_tree_init(workload, cli):
    w = workload("counter")
    w.start()
    d = cli.job_dir()
    sleepers = [subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "30"]),
                subprocess.Popen(["unshare", "--pid", "--fork", "setsid", "sleep", "30"])]
    try:
        _wait_until(lambda: all(children(s.pid) for s in sleepers), 5, "unshare's children")
        not_leader, not_mm_init = (children(s.pid)[0] for s in sleepers)
        never = int(Path("/proc/sys/kernel/pid_max").read_text())  # PIDs stay below pid_max
        cases = [
            (never, f"pid {never}: no such process"),
            (os.getpid(), "not PID 1 of its own PID namespace"),
            (_app_pid(w.tree.init_pid), "not PID 1 of its own PID namespace"),
            (not_leader, "not a session leader"),
            (not_mm_init, "runs 'sleep', not mm-init"),
        ]
        for pid, words in cases:
            _error_line(cli("checkpoint", "--pid", str(pid), "--to", str(d)), 2, str(pid), words)
    finally:
        for s in sleepers:
            s.kill()
            s.wait()
    assert not d.parent.exists(), "nothing was written"
    assert w.tree.poll() is None, "the tree was not touched"


def test_checkpoint_refuses_a_tree_whose_application_runs_as_root(cli, engine_env):
    tree = launch(["sleep", "30"], uid=0, gid=0, allow_root=True, libexec=engine_env.libexec)
    try:
        _wait_until(lambda: children(tree.init_pid), 5, "the application")
        d = cli.job_dir()
        _error_line(cli("checkpoint", "--pid", str(tree.init_pid), "--to", str(d)), 2, "runs as root")
        assert tree.poll() is None and not d.parent.exists()
    finally:
        tree.kill()
        tree.wait(10)


def test_restore_refuses_an_image_of_a_root_owned_application(cli, tmp_path):
    d = cli.job_dir("rootjob")
    src = tmp_path / "criu"
    src.mkdir()
    (src / "engine.json").write_text("{}")
    ImageStore(d.parent).commit("rootjob", src, epoch=0, uid=0, gid=0, node="n1", trigger="manual")
    _error_line(cli("restore", str(d)), 4, "uid 0", "root-owned")
    assert os.listdir(cli.staging) == []


def test_checkpoint_refuses_a_job_directory_fenced_by_a_later_run(workload, cli, engine_env):
    w = workload("counter")
    w.start()
    d = cli.job_dir("123")
    store = ImageStore(d.parent)
    store.prepare_job("123", engine_env.user.pw_uid, engine_env.user.pw_gid)
    store.advance_epoch("123", 3)  # a Slurm job's third run wrote here
    _error_line(cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d)), 4,
                "epoch 0 is older than the fence 3", "later runs")
    assert w.tree.poll() is None and store.images("123") == []


def test_a_failed_dump_is_one_line_and_the_tree_keeps_running(workload, cli):
    w = workload("counter.py", "0", "io_uring")  # CRIU cannot dump an io_uring fd
    w.start()
    d = cli.job_dir("uring")
    _error_line(cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d)), 5, "criu dump")
    assert w.tree.poll() is None and os.listdir(cli.staging) == []
    w.go()
    assert w.tree.wait(30) == 0 and "PASS" in w.text("out.log"), w.text("out.log")


def test_a_stopped_trees_image_is_kept_when_the_store_refuses_it(workload, cli):
    """The dump ended the tree; if the commit fails, its CRIU image must not be deleted."""
    w = workload("counter")
    w.start()
    d = cli.job_dir("busy")
    d.parent.mkdir(mode=0o711)
    ImageStore(d.parent).prepare_job("busy", w.env.user.pw_uid, w.env.user.pw_gid)
    with filelock.FileLock(d / ".lock"):  # another writer holds the job (timeouts.lock: 1 s)
        result = cli("checkpoint", "--pid", str(w.tree.init_pid), "--to", str(d))
    line = _error_line(result, 4, "another writer holds", "kept in")
    assert w.tree.wait(10) == 137
    kept = Path(line.rsplit("kept in ", 1)[1])
    assert kept.parent == cli.staging / "busy" and (kept / "engine.json").is_file() and list(kept.glob("pages-*.img"))
    assert ImageStore(d.parent).images("busy") == []


def test_unsafe_job_directories_are_refused_before_anything_runs(workload, cli, tmp_path):
    w = workload("counter")
    w.start()
    pid = str(w.tree.init_pid)
    target = cli.job_dir("real")
    target.mkdir(parents=True)
    link = target.parent / "link"
    link.symlink_to(target)
    dotdot = f"{target.parent}/x/../myjob"
    _error_line(cli("checkpoint", "--pid", pid, "--to", dotdot), 2, "must not contain '..'")
    _error_line(cli("restore", dotdot), 2, "must not contain '..'")
    _error_line(cli("checkpoint", "--pid", pid, "--to", str(link)), 3, f"{link} is a symlink")
    _error_line(cli("restore", str(link)), 3, f"{link} is a symlink")
    _error_line(cli("checkpoint", "--pid", pid, "--to", str(target.parent / "bad name")), 2, "job id")
    assert w.tree.poll() is None and os.listdir(target) == []
    _error_line(cli("restore", str(target.parent / "missing")), 4, "does not exist")


def test_usage_errors_and_non_root_callers(cli):
    d = str(cli.job_dir())
    _error_line(cli("checkpoint", "--pid", "1"), 2, "--pid needs --to")
    _error_line(cli("checkpoint", "--to", d), 2, "--to and --leave-running go with --pid")
    _error_line(cli("checkpoint", "123", "--pid", "1", "--to", d), 2, "not both")
    _error_line(cli("checkpoint", "--pid", "1", "--to", d, user=USER), 9, "needs root")
    _error_line(cli("restore", d, user=USER), 9, "needs root")
