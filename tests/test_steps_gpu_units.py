"""GPU state of `srun` step tasks: each task's GPU inventory is kept with its image and
given back to its restore (without it the driver's restore would not run and the task
would stay locked, hung); the manifest records it when the batch tree has none."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from slurm_mm.agent.step_launch import JobSteps, Step, StepTask, steps_gpu_inventory
from slurm_mm.engine.owner import Owner

TOKEN = "0123456789abcdef"
INVENTORY = {"driver_version": "580.159.04", "cuda_driver_version": 13000, "count": 1,
             "gpus": [{"uuid": "GPU-1", "name": "NVIDIA H200", "memory_total_mib": 143771}]}


class Checkpointer:
    """dump(): rank 0's tree (init pid 100) has GPU state, rank 1's (101) has none."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def staging_beside(self, near: Path, name: str) -> Path:
        assert near.parent == self.tmp, "beside the image's staging: same filesystem"
        path = self.tmp / name
        path.mkdir()
        return path

    def file_spec(self, job_id, owner, *, env, script, pin_name):
        return None

    def dump(self, init_pid, staging, *, leave_running, files=None, leave_stopped=False):
        (staging / "pages-1.img").write_bytes(b"x")
        return SimpleNamespace(gpu_inventory=INVENTORY if init_pid == 100 else None, extra={"files": {}})


def _steps(tmp_path: Path) -> JobSteps:
    req = SimpleNamespace(owner=Owner(1000, 1000, (1000,)), env={}, argv=["train.py"], stdio=[0, 1, 2])
    sup = SimpleNamespace(job_id="7", req=req, tell=lambda text: None,
                          services=SimpleNamespace(checkpointer=Checkpointer(tmp_path), node="n1"))
    return JobSteps(sup)


def test_a_step_task_s_gpu_inventory_is_recorded_and_given_back_to_its_restore(tmp_path):
    steps = _steps(tmp_path)
    step = Step(TOKEN, ["python", "train.py"], {}, "/home", 5, ntasks=2)
    for rank in (0, 1):
        step.tasks[rank] = StepTask(rank, SimpleNamespace(init_pid=100 + rank), steps.sup.req)
    steps.steps[TOKEN] = step
    staging = tmp_path / "image"
    staging.mkdir()

    record = steps.dump(staging, leave_running=True)

    assert record[TOKEN]["gpu"] == {"0": INVENTORY}, "only the rank that had GPU state"
    assert steps_gpu_inventory(record) == INVENTORY, "the manifest records it"
    assert sorted(p.name for p in staging.iterdir()) == [f"step@{TOKEN}@0@pages-1.img",
                                                          f"step@{TOKEN}@1@pages-1.img"]

    asked: list[dict] = []
    steps.start_srun = lambda *args, **kw: asked.append(kw)  # type: ignore[method-assign]
    steps.unpacked = {TOKEN: {0: tmp_path / "r0", 1: tmp_path / "r1"}}
    steps.restored(SimpleNamespace(ns_pids={}), record)
    assert asked and asked[0]["gpu"] == {0: INVENTORY} and asked[0]["token"] == TOKEN


def test_steps_without_gpu_state_record_none():
    assert steps_gpu_inventory({}) is None
    assert steps_gpu_inventory({TOKEN: {"ranks": [0], "files": {}}}) is None
    assert steps_gpu_inventory({TOKEN: {"gpu": {"0": "not an inventory"}}}) is None
