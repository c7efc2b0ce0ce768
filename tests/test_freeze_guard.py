"""The freeze guard holds off a real freezer cgroup while a long step runs, then
freezes it as asked (what protects a GPU checkpoint from Slurm's suspend freeze)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from slurm_mm.agent.freeze_guard import FreezeGuard, FreezerCgroup

FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture()
def frozen_child():
    if not FREEZER.is_dir():
        pytest.fail("this test needs the cgroup v1 freezer at /sys/fs/cgroup/freezer")
    cg = FREEZER / f"slurm_mm_test_{os.getpid()}"
    cg.mkdir()
    proc = subprocess.Popen(["sh", "-c", "while true; do echo x >> /dev/null; done"])
    (cg / "cgroup.procs").write_text(str(proc.pid))
    yield FreezerCgroup(cg), proc
    (cg / "freezer.state").write_text("THAWED")
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    cg.rmdir()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_freeze_is_held_off_during_the_step_then_applied(frozen_child):
    cgroup, proc = frozen_child
    states_during: list[bool] = []

    def slurm_freezes() -> None:  # what slurmd does ~2 s after SIGTSTP
        time.sleep(0.2)
        cgroup.set_frozen(True)

    with FreezeGuard(cgroup) as guard:
        threading.Thread(target=slurm_freezes).start()
        for _ in range(10):  # the "GPU checkpoint": 1 s, needing a running process
            time.sleep(0.1)
            states_during.append(cgroup.frozen())
        before = _cpu_ticks(proc.pid)
        time.sleep(0.3)
        assert _cpu_ticks(proc.pid) > before  # it really runs inside the guard
    assert guard.held_off
    assert states_during.count(True) <= 2  # thawed within a poll or two
    deadline = time.monotonic() + 2
    while not cgroup.frozen():  # frozen afterwards, as Slurm asked
        assert time.monotonic() < deadline, "the held-off freeze was never applied"
        time.sleep(0.02)
    ticks = _cpu_ticks(proc.pid)
    time.sleep(0.3)
    assert _cpu_ticks(proc.pid) == ticks


def test_guard_without_a_freeze_leaves_the_cgroup_running(frozen_child):
    cgroup, _proc = frozen_child
    with FreezeGuard(cgroup) as guard:
        time.sleep(0.2)
    assert not guard.held_off and not cgroup.frozen()


def test_v2_guard_watches_the_cgroup_slurm_freezes(tmp_path):
    """Slurm's cgroup/v2 freezes .../step_N/user; the task's own cgroup.freeze stays 0."""
    task = tmp_path / "n1_slurmstepd.scope" / "job_7" / "step_batch" / "user" / "task_0"
    task.mkdir(parents=True)
    for directory in (task, task.parent, task.parent.parent):
        (directory / "cgroup.freeze").write_text("0\n")
    (task / "cgroup.procs").write_text("")
    cgroup = FreezerCgroup.of([task / "cgroup.procs"])
    assert cgroup is not None and not cgroup.v1
    assert cgroup.path == task.parent
    (task.parent / "cgroup.freeze").write_text("1\n")  # what slurmstepd writes on suspend
    assert cgroup.frozen()
