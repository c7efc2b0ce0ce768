"""GpuCheckpointer's orchestration and watchdog, off the GPU.

The driver is replaced by tests/gpu/fake_driver_worker.py, which follows the CUDA
checkpoint state machine in a file and can fail or hang chosen calls; the watchdog is
tested with a worker that really sleeps. The real driver is tested by tests/gpu/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_mm.engine import gpu
from slurm_mm.engine.gpu import CudaState, DriverWorker, GpuCheckpointer, GpuTimeouts
from slurm_mm.errors import GpuError, GpuTimeout

FAKE = Path(__file__).parent / "gpu" / "fake_driver_worker.py"
QUICK = GpuTimeouts(lock_s=0.5, grace_s=1.0, floor_s=2.0, bytes_per_s=1e12, quick_s=2.0, start_s=10.0)


class World:
    """The fake driver's view of a set of CUDA processes."""

    def __init__(self, path: Path, states: dict[int, int], **behaviour) -> None:
        self.path = path
        path.write_text(json.dumps({"states": {str(p): s for p, s in states.items()}, **behaviour}))

    def read(self) -> dict:
        return json.loads(self.path.read_text())

    def states(self) -> dict[int, int]:
        return {int(p): s for p, s in self.read()["states"].items()}

    def calls(self) -> list[str]:
        return self.read().get("calls", [])


class FakeTree(GpuCheckpointer):
    """Every PID it is given counts as holding /dev/nvidia* (there are none here)."""

    def cuda_processes(self, pids):
        return list(pids)


def checkpointer(world: World, **kwargs) -> GpuCheckpointer:
    gc = FakeTree.open(
        worker_argv=[sys.executable, str(FAKE), str(world.path)],
        timeouts=QUICK,
        gpu_memory=lambda: {},
        **kwargs,
    )
    assert gc is not None
    return gc


@pytest.fixture
def world_path(tmp_path: Path) -> Path:
    return tmp_path / "world.json"


def test_suspend_locks_all_before_checkpointing_any_and_resume_restores_before_unlocking(world_path):
    world = World(world_path, {100: 0, 101: 0})
    with checkpointer(world) as gc:
        assert gc.suspend([100, 101]) == [100, 101]
        assert world.states() == {100: 2, 101: 2}
        calls = [c for c in world.calls() if not c.startswith("state")]
        assert sorted(calls[:2]) == ["lock:100", "lock:101"]
        assert sorted(calls[2:]) == ["checkpoint:100", "checkpoint:101"]
        assert gc.resume([100, 101, 555]) == [100, 101]
        assert world.states() == {100: 0, 101: 0}
        calls = [c for c in world.calls() if not c.startswith("state")][4:]
        assert sorted(calls[:2]) == ["restore:100", "restore:101"]
        assert sorted(calls[2:]) == ["unlock:100", "unlock:101"]


def test_failed_checkpoint_restores_and_unlocks_the_others(world_path):
    world = World(world_path, {100: 0, 101: 0}, fail={"checkpoint:101": 999})
    with checkpointer(world) as gc:
        with pytest.raises(GpuError) as caught:
            gc.suspend([100, 101])
    message = str(caught.value)
    assert "checkpoint failed for pid 101" in message and "rolled back" in message
    assert world.states() == {100: 0, 101: 0}


def test_failed_lock_unlocks_those_already_locked(world_path):
    world = World(world_path, {100: 0, 101: 0}, fail={"lock:101": 2})
    with checkpointer(world, max_parallel=1) as gc:
        with pytest.raises(GpuError, match="lock failed for pid 101"):
            gc.suspend([100, 101])
    assert world.states() == {100: 0, 101: 0}
    assert "checkpoint:100" not in world.calls()


def test_hung_lock_raises_gpu_timeout_and_rolls_back_the_rest(world_path):
    world = World(world_path, {100: 0, 101: 0}, hang=["lock:101"])
    with checkpointer(world) as gc:
        started = time.monotonic()
        with pytest.raises(GpuTimeout, match="pid 101"):
            gc.suspend([100, 101])
        elapsed = time.monotonic() - started
    assert elapsed < QUICK.for_call("lock") + 5
    assert world.states() == {100: 0, 101: 0}


def test_resume_accepts_processes_restored_by_criu_in_checkpointed_state(world_path):
    # After `criu restore` the processes come back "checkpointed" and hold no GPU files.
    world = World(world_path, {200: 2, 201: 1})
    with checkpointer(world) as gc:
        assert sorted(gc.resume([200, 201, 202])) == [200, 201]
        assert gc.state(200) is CudaState.RUNNING
        assert gc.state(202) is None
    assert world.states() == {200: 0, 201: 0}
    assert "restore:201" not in world.calls()


def test_resume_names_the_process_it_could_not_restore_and_unlocks_the_others(world_path):
    world = World(world_path, {200: 2, 201: 2}, fail={"restore:201": 999})
    with checkpointer(world) as gc:
        with pytest.raises(GpuError, match="pid 201"):
            gc.resume([200, 201])
    assert world.states() == {200: 0, 201: 2}


def test_state_of_a_vanished_process_is_none_but_an_os_error_on_a_live_one_is_raised(world_path):
    # Driver 580 answers CUDA_ERROR_OPERATING_SYSTEM (304) for a PID that does not exist.
    gone = 2**22 + 7
    world = World(world_path, {}, fail={f"state:{gone}": 304, f"state:{os.getpid()}": 304})
    with checkpointer(world) as gc:
        assert gc.state(gone) is None
        with pytest.raises(gpu.CudaCallFailed, match="304"):
            gc.state(os.getpid())


def test_suspend_of_tree_without_cuda_processes_calls_nothing(world_path):
    world = World(world_path, {})
    with checkpointer(world) as gc:
        gc.cuda_processes = lambda pids: []
        assert gc.suspend([os.getpid()]) == []
    assert world.calls() == []


def test_pid_with_gpu_files_unknown_to_the_driver_is_refused(world_path):
    world = World(world_path, {})
    with checkpointer(world) as gc:
        with pytest.raises(GpuError, match="does not know it as a CUDA process"):
            gc.suspend([300])


def test_timeouts_scale_with_gpu_memory():
    t = GpuTimeouts()
    assert t.for_call("checkpoint", 80 * gpu.GiB) > t.for_call("checkpoint", 8 * gpu.GiB) > t.floor_s
    # 80 GiB must get more than the slowest measured copy (0.9 GB/s) needs.
    assert t.for_call("checkpoint", 80 * gpu.GiB) > 80 * gpu.GiB / 0.9e9
    assert t.for_call("lock") == t.lock_s + t.grace_s


# ---------------------------------------------------------------------- the watchdog

SLEEPY_WORKER = [
    sys.executable, "-c",
    "import json,sys,time\n"
    "print(json.dumps({'ready': True}), flush=True)\n"
    "for line in sys.stdin:\n"
    "    time.sleep(float(json.loads(line)['sleep']))\n"
    "    print(json.dumps({'ok': True}), flush=True)\n",
]


def test_watchdog_kills_a_worker_whose_call_hangs():
    worker = DriverWorker(SLEEPY_WORKER)
    assert worker.start()["ready"]
    assert worker.call({"op": "fake", "pid": 1, "sleep": 0}, timeout=5) == {"ok": True}
    hung = worker.pid
    started = time.monotonic()
    with pytest.raises(GpuTimeout, match="did not return within 1 s"):
        worker.call({"op": "fake", "pid": 1, "sleep": 60}, timeout=1.0)
    assert time.monotonic() - started < 4
    assert not Path(f"/proc/{hung}").exists() or "Z" in Path(f"/proc/{hung}/stat").read_text().split()[2]
    # The next call gets a fresh worker.
    assert worker.call({"op": "fake", "pid": 1, "sleep": 0}, timeout=5) == {"ok": True}
    assert worker.pid != hung
    worker.close()


def test_worker_that_dies_midcall_is_an_error_not_a_hang():
    worker = DriverWorker([sys.executable, "-c", "import json;print(json.dumps({'ready': True}), flush=True);input()"])
    worker.start()
    with pytest.raises(GpuError, match="exited"):
        worker.call({"op": "state", "pid": 1}, timeout=10)


def test_worker_start_that_hangs_times_out():
    worker = DriverWorker([sys.executable, "-c", "import time; time.sleep(60)"], start_timeout=1.0)
    with pytest.raises(GpuTimeout, match="start"):
        worker.start()


# --------------------------------------------------------------- no GPU, no driver


def test_no_driver_gives_none(world_path):
    World(world_path, {})
    argv = [sys.executable, str(FAKE), str(world_path), "--not-ready", "libcuda.so.1 not loadable"]
    assert GpuCheckpointer.open(worker_argv=argv) is None


def test_real_worker_on_a_machine_without_cuda_reports_not_ready():
    try:
        subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10, check=True)
        pytest.skip("this machine has an NVIDIA driver")
    except (OSError, subprocess.SubprocessError):
        pass
    greeting = DriverWorker().start()
    assert greeting["ready"] is False and greeting["reason"]
    assert gpu.open_checkpointer() is None


def test_nvidia_files_and_process_tree_read_proc():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert gpu.process_tree(os.getpid())[0] == os.getpid()
        assert child.pid in gpu.process_tree(os.getpid())
        assert gpu.nvidia_files(child.pid) == []
        assert gpu.nvidia_files(2**22 + 1) == []  # no such process: nothing held
    finally:
        child.kill()
        child.wait()
