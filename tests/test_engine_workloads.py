"""Checkpoint/restore of real workloads run as an unprivileged user (zdtm style).

Each workload proves its own continuity after restore (checksums, sequences, locks, a
TCP exchange) and says PASS or FAIL; these tests run the cycle and read the verdict.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import time

import pytest

from engine_fixtures import (  # noqa: F401
    both_layouts,
    checkpoint_and_restore,
    engine_env,
    needs_root,
    squat_pids,
    workload,
)
from slurm_mm.engine import checkpoint_tree, proctree, read_metadata, restore_tree, wait_gone
from slurm_mm.errors import CheckpointFailed, ImageRefused, RestoreFailed

pytestmark = needs_root


def _passed(code: int, out: str) -> None:
    assert code == 0 and "PASS" in out, f"exit {code}, output {out!r}"


def test_memory_pattern_survives_restore(workload, tmp_path):
    w = workload("memory_pattern", "200")
    w.start()
    result, restored, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)
    assert result.image_bytes > 200 * 2**20


def test_threads_keep_stacks_tls_and_progress_across_restore(workload, tmp_path):
    w = workload("threads")
    w.start()
    _, _, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)


def test_child_processes_keep_their_pipe_ring_across_restore(workload, tmp_path):
    w = workload("children_pipes.py")
    w.start()
    result, restored, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)
    assert len(result.pids) >= 5  # init, parent, 3 children


@both_layouts
def test_append_mode_file_and_read_offset_survive_restore(workload, tmp_path, private_proc):
    w = workload("append_file.py")
    w.start(private_proc=private_proc)
    _, _, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)


def test_file_locks_stay_held_across_restore(workload, tmp_path):
    w = workload("file_lock.py")
    w.start()
    result = w.checkpoint(tmp_path / "img", leave_running=False)
    w.tree.wait(10)
    assert wait_gone(result.pids, 5, zombies_count=False) == []
    restored = w.restore(tmp_path / "img")
    try:
        fd = os.open(w.dir / "flock.lck", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        w.go()
        code = restored.wait(30)
    finally:
        restored.kill()
    _passed(code, w.text("restored.log"))


def test_tcp_loopback_connection_survives_restore(workload, tmp_path):
    w = workload("tcp_loopback.py")
    w.start()
    _, _, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)


@both_layouts
def test_python_counter_continues_without_gap_or_repeat(workload, tmp_path, private_proc):
    w = workload("counter.py")
    w.start(private_proc=private_proc)
    result, _, code, out = checkpoint_and_restore(w, tmp_path / "img")
    _passed(code, out)
    assert result.mount_ns == private_proc


@both_layouts
def test_c_counter_continues_when_original_pids_are_taken(workload, tmp_path, private_proc):
    """The tree has its own PID namespace: its host PIDs may be anyone's at restore."""
    w = workload("counter")
    w.start(private_proc=private_proc)
    squatters = []

    def take_pids(result):
        squatters.extend(squat_pids(result.pids))
        taken = [p for p in result.pids if os.path.exists(f"/proc/{p}")]
        assert taken, "no original PID could be taken: the test proves nothing"

    try:
        result, restored, code, out = checkpoint_and_restore(w, tmp_path / "img", before_restore=take_pids)
    finally:
        for s in squatters:
            s.kill()
            s.wait()
    _passed(code, out)
    assert restored.init_pid not in result.pids
    dumped = {p["ns_pid"] for p in read_metadata(tmp_path / "img")["processes"]}
    assert 1 in dumped and set(restored.ns_pids) == dumped, "the namespace's PIDs came back as they were"


def _kcmp_same_file(pid: int, fd1: int, fd2: int) -> bool:
    """Whether two fds of `pid` are one open file description (one offset)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(312, pid, pid, 0, fd1, fd2) == 0  # SYS_kcmp, KCMP_FILE


def _app_of(tree) -> int:
    (app,) = [p for p in proctree.children(tree.init_pid)]
    return app


def _restored_app(restored) -> int:
    """The app's host PID in a restored tree: the lowest namespace PID after the init's."""
    return restored.ns_pids[min(p for p in restored.ns_pids if p != 1)]


@both_layouts
def test_restored_job_output_goes_to_the_new_file_and_nowhere_else(workload, tmp_path, private_proc):
    """The Slurm case: stdin /dev/null, stdout and stderr one O_APPEND file (2>&1)."""
    w = workload("counter.py")
    null = os.open("/dev/null", os.O_RDONLY)
    w.fds.append(null)
    w.start(private_proc=private_proc, stdin=null)
    app = _app_of(w.tree)
    assert _kcmp_same_file(app, 1, 2), "2>&1 is one file description in the job"
    before = w.text("out.log")

    def check_restored(restored):
        app = _restored_app(restored)
        assert os.readlink(f"/proc/{app}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{app}/fd/1") == str(w.dir / "restored.log")
        assert _kcmp_same_file(app, 1, 2), "the new output serves stdout and stderr as one"

    result = w.checkpoint(tmp_path / "img", leave_running=False)
    assert w.tree.wait(10) == 137
    assert wait_gone(result.pids, 5, zombies_count=False) == []
    new_null = os.open("/dev/null", os.O_RDONLY)
    w.fds.append(new_null)
    restored = w.restore(tmp_path / "img", stdin=new_null)
    try:
        check_restored(restored)
        w.go()
        code = restored.wait(30)
    finally:
        restored.kill()
    out = w.text("restored.log")
    _passed(code, out)
    assert w.text("out.log") == before, "nothing (not mm-init, not the restored job) wrote to the old output"
    assert out.startswith("PASS")


@both_layouts
def test_restored_job_is_checkpointed_and_restored_again(workload, tmp_path, private_proc):
    """A restored tree holds the restorer's fds: with its own mount namespace they are
    on mounts it does not have, and go through the image as external files."""
    w = workload("counter.py")
    w.start(private_proc=private_proc)
    result = w.checkpoint(tmp_path / "img1", leave_running=False)
    w.tree.wait(10)
    assert wait_gone(result.pids, 5, zombies_count=False) == []
    first = w.restore(tmp_path / "img1", out_name="restored1.log")
    try:
        again = checkpoint_tree(first.init_pid, tmp_path / "img2", leave_running=False, criu=w.env.criu)
        assert first.wait(10) == 137
    finally:
        first.kill()
    assert bool(again.external_files) == private_proc
    if private_proc:
        assert set(again.external_files.values()) == {str(w.dir / "restored1.log")}
        with pytest.raises(RestoreFailed, match="pass a new stdout"):
            restore_tree(tmp_path / "img2", criu=w.env.criu)
    assert wait_gone(again.pids, 5, zombies_count=False) == []
    second = w.restore(tmp_path / "img2", out_name="restored2.log")
    w.go()
    try:
        code = second.wait(30)
    finally:
        second.kill()
    _passed(code, w.text("restored2.log"))


def test_exit_status_passes_through_restore(workload, tmp_path):
    w = workload("counter", "7")
    w.start()
    _, _, code, out = checkpoint_and_restore(w, tmp_path / "img")
    assert code == 7 and "PASS" in out, (code, out)


def test_signal_reaches_the_restored_app(workload, tmp_path):
    w = workload("counter.py")
    w.start()
    result = w.checkpoint(tmp_path / "img", leave_running=False)
    w.tree.wait(10)
    restored = w.restore(tmp_path / "img")
    time.sleep(0.1)
    restored.signal(signal.SIGTERM)  # to the namespace init, which relays it to the app
    assert restored.wait(10) == 128 + signal.SIGTERM


def test_leave_running_checkpoint_then_restore_a_second_copy(workload, tmp_path):
    w = workload("memory_pattern", "32")
    w.start()
    result = w.checkpoint(tmp_path / "img", leave_running=True)
    assert w.tree.poll() is None, "the original keeps running"
    copy = w.restore(tmp_path / "img", out_name="copy.log")
    try:
        assert copy.init_pid != w.tree.init_pid
        w.go()
        assert copy.wait(30) == 0 and "PASS" in w.text("copy.log"), w.text("copy.log")
        assert w.tree.wait(30) == 0 and "PASS" in w.text("out.log"), w.text("out.log")
    finally:
        copy.kill()
    assert result.leave_running and result.timings["dump"] > 0


def test_failed_dump_raises_checkpoint_failed_and_the_job_keeps_running(workload, tmp_path):
    w = workload("counter.py", "0", "io_uring")  # CRIU cannot dump an io_uring fd
    w.start()
    with pytest.raises(CheckpointFailed) as info:
        w.checkpoint(tmp_path / "img", leave_running=False)
    assert "criu dump" in str(info.value) and "\n" not in str(info.value)
    assert "Error" in info.value.log_excerpt
    assert w.tree.poll() is None, "the job survived the failed dump"
    w.go()
    assert w.tree.wait(30) == 0 and "PASS" in w.text("out.log"), w.text("out.log")


class FakeGpu:
    """Stands in for GpuCheckpointer: the app (namespace PID 2) 'has GPU state'."""

    def __init__(self):
        self.calls: list[tuple[str, list[int]]] = []

    def suspend(self, pids):
        pids = list(pids)
        self.calls.append(("suspend", pids))
        return pids[1:2]

    def resume(self, pids):
        self.calls.append(("resume", list(pids)))
        return list(pids)


def test_gpu_state_is_rolled_back_when_the_dump_fails(workload, tmp_path):
    w = workload("counter.py", "0", "io_uring")
    w.start()
    gpu = FakeGpu()
    with pytest.raises(CheckpointFailed):
        w.checkpoint(tmp_path / "img", leave_running=False, gpu=gpu)
    (op1, pids), (op2, resumed) = gpu.calls
    assert (op1, op2) == ("suspend", "resume") and resumed == pids[1:2]
    assert w.tree.poll() is None


def test_gpu_resume_follows_namespace_pids_after_restore(workload, tmp_path):
    w = workload("counter.py")
    w.start()
    gpu = FakeGpu()
    images = tmp_path / "img"
    result, restored, code, out = checkpoint_and_restore(w, images, gpu=gpu)
    _passed(code, out)
    assert [c[0] for c in gpu.calls] == ["suspend", "resume"], "no resume at dump time (tree killed)"
    (app_ns,) = read_metadata(images)["gpu_ns_pids"]
    assert app_ns > 1 and gpu.calls[1][1] == [restored.ns_pids[app_ns]] == restored.gpu_pids


def test_image_with_gpu_state_is_refused_without_a_gpu_checkpointer(workload, tmp_path):
    """Restored without the driver's restore, its CUDA processes would stay locked (hung):
    such an image is refused before anything of it runs."""
    w = workload("counter.py")
    w.start()
    images = tmp_path / "img"
    w.checkpoint(images, leave_running=False, gpu=FakeGpu())
    w.tree.wait(10)
    with pytest.raises(RestoreFailed, match=r"GPU state of 1 process\(es\) .* without a GPU checkpointer"):
        w.restore(images)
    leftover = [p for p in os.listdir("/proc") if p.isdigit() and _cwd(p) == str(w.dir)]
    assert leftover == [], "nothing of the refused tree runs"


@both_layouts
def test_restore_refuses_a_tree_that_is_not_the_owners(workload, tmp_path, engine_env, private_proc):
    w = workload("counter.py")
    w.start(private_proc=private_proc)
    w.checkpoint(tmp_path / "img", leave_running=False)
    w.tree.wait(10)
    lines = w.text("counter.log")
    other = engine_env.user.pw_uid + 1
    with pytest.raises(ImageRefused):
        w.restore(tmp_path / "img", owner_uid=other, owner_gids=[other])
    time.sleep(0.2)
    assert w.text("counter.log") == lines, "no instruction of the refused tree ran"
    leftover = [p for p in os.listdir("/proc") if p.isdigit() and _cwd(p) == str(w.dir)]
    assert leftover == [], "nothing of the refused tree is left"


def _cwd(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


@both_layouts
def test_engine_metadata_records_stdio_and_criu_version(workload, tmp_path, private_proc):
    w = workload("counter.py")
    w.start(private_proc=private_proc)
    images = tmp_path / "img"
    w.checkpoint(images, leave_running=True)
    meta = json.loads((images / "engine.json").read_text())
    assert meta["mount_ns"] is private_proc and meta["external_files"] == {}
    assert meta["criu_version"] == w.env.criu.version()
    assert meta["stdio"]["1"]["criu_key"] == str(w.dir / "out.log").lstrip("/")
    assert meta["stdio"]["0"]["target"] == "/dev/null"
    uids = {p["ns_pid"]: p["uid"] for p in meta["processes"]}
    assert uids.pop(1) == 0 and set(uids.values()) == {w.env.user.pw_uid}


@pytest.fixture
def job_cgroups():
    """A fresh cgroup in each of a few v1 controllers, standing in for a new job's step."""
    name = f"slurm_mm_engine_test_{os.getpid()}"
    dirs = [f"/sys/fs/cgroup/{c}/{name}" for c in ("pids", "memory", "freezer")
            if os.path.isdir(f"/sys/fs/cgroup/{c}")]
    if not dirs:
        pytest.skip("no v1 cgroup controllers")
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    yield name, dirs
    for d in dirs:
        deadline = time.monotonic() + 5
        while os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_restored_tree_lives_in_the_cgroups_it_is_given(workload, tmp_path, job_cgroups):
    """DESIGN invariant 4: restored processes belong to the new job, not the old one."""
    name, dirs = job_cgroups
    w = workload("counter.py")
    w.start()
    w.checkpoint(tmp_path / "img", leave_running=False)
    w.tree.wait(10)
    restored = w.restore(tmp_path / "img", join_cgroups=dirs)
    try:
        for pid in restored.ns_pids.values():
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
            for d in dirs:
                controller = d.split("/")[4]
                assert any(f":{controller}:/{name}" in l or f",{controller}:/{name}" in l for l in lines), (pid, lines)
        w.go()
        assert restored.wait(30) == 0
    finally:
        restored.kill()
