"""Fakes at the agent's true boundaries: the checkpointer (CRIU + store), Slurm, and
job trees. Shared by the agent's unit tests; they record what was asked of them."""

from __future__ import annotations

import atexit
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from slurm_mm.errors import ImageCorrupt
from slurm_mm.slurm.model import Job, Node

UID, GID = 4242, 4242


# ---------------------------------------------------------------- fakes at the boundaries

_stand_in: subprocess.Popen | None = None


def stand_in_pid() -> int:
    """A childless process of the tests' own for fake trees' init: /proc reads of a tree see
    it, and a kill the code under test sends a tree (a restored tree holding an srun is
    SIGKILLed) hits it. Never the test process: the cluster's daemons and the sruns they run
    are its descendants, and on 24.11 a unit test's "restored tree" found one and killed the
    whole suite."""
    global _stand_in
    if _stand_in is None or _stand_in.poll() is not None:
        _stand_in = subprocess.Popen(["sleep", "86400"])
        atexit.register(_stand_in.kill)
    return _stand_in.pid


class FakeTree:
    """A job tree: ends when told to (or when a stopping dump ends it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.init_pid = stand_in_pid()
        self.ended = threading.Event()
        self.status = 0
        self.signals: list[int] = []

    def end(self, status: int) -> None:
        self.status = status
        self.ended.set()

    def wait(self, timeout: float | None = None) -> int:
        self.ended.wait(timeout)
        return self.status

    def poll(self) -> int | None:
        return self.status if self.ended.is_set() else None

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.end(137)


def fake_image(seq: int, *, epoch: int = 0, uid: int = UID, gid: int = GID, trigger: str = "periodic"):
    manifest = SimpleNamespace(epoch=epoch, uid=uid, gid=gid, trigger=trigger, created=time.time(), node="n1",
                               files=[SimpleNamespace(size=10, stored_size=5)], extra={}, gpu=None, total_size=10)
    return SimpleNamespace(path=Path(f"/store/job/ckpt-{seq:06d}"), seq=seq, manifest=manifest)


class FakeCheckpointer:
    """JobCheckpointer's surface, recording calls; failures are injected per call kind."""

    def __init__(self, tmp: Path, images: list | None = None) -> None:
        self.tmp = tmp
        self.images = images or []
        self.calls: list[tuple] = []
        self.commit_cpus: list = []  # the cpus= of each commit
        self.fail: dict[str, BaseException] = {}
        self.bad_images: set[int] = set()
        self.trees: list[FakeTree] = []
        self.records = None  # no job records: nothing outlives an agent restart here
        self.store = SimpleNamespace(prepare_job=lambda job, uid, gid: (tmp / "store" / job).mkdir(
                                         parents=True, exist_ok=True), advance_epoch=lambda *a: None,
                                     images=lambda job: list(self.images), root=tmp / "store")

    def _tree(self, name: str) -> FakeTree:
        tree = FakeTree(name)
        self.trees.append(tree)
        return tree

    def launch(self, req, *, record_end=False):
        self.calls.append(("launch",))
        return self._tree("launched")

    def restorable(self, job_id, *, before_epoch, owner):
        for image in self.images:
            m = image.manifest
            if m.epoch >= before_epoch:
                yield image, "not older"
            elif (m.uid, m.gid) != (owner.uid, owner.gid):
                yield image, "not the owner's"
            else:
                yield image, ""

    def restore_image(self, job_id, image, target, *, progress=None, on_phase=None, after=None, files=True):
        self.calls.append(("restore_image", image.seq))
        if image.seq in self.bad_images:
            raise ImageCorrupt(f"{image.path.name}: chunk 3 does not match its hash")
        return self._tree(f"restored-{image.seq}")

    def restore(self, images, target, gpu, *, pin_root, job_id=None):
        self.calls.append(("restore", Path(images).name))
        if "restore" in self.fail:
            raise self.fail["restore"]
        return self._tree("restored-in-place")

    def pin_root(self, job_id):
        return self.tmp / "store" / job_id / ".pins"

    def dump_staging(self, job_id, name, pids):
        path = self.tmp / "staging" / name
        path.mkdir(parents=True)
        return path, "async"

    def file_spec(self, job_id, owner, *, env, script, pin_name):
        return None

    def dump(self, init_pid, staging, *, leave_running, files=None, deadline=None, leave_stopped=False):
        self.calls.append(("dump", leave_running))
        if "dump" in self.fail:
            raise self.fail["dump"]
        if not leave_running:  # CRIU ends the dumped tree
            next(t for t in self.trees if t.init_pid == init_pid and not t.ended.is_set()).end(137)
        return SimpleNamespace(staging=staging, gpu_inventory=None, criu_version="4.2", extra={})

    def commit(self, job_id, dumped, *, epoch, owner, trigger, progress=None, cpus=None):
        self.calls.append(("commit", str(trigger)))
        self.commit_cpus.append(cpus)
        if "commit" in self.fail:
            raise self.fail["commit"]
        image = fake_image(len(self.images) + 1, epoch=epoch, trigger=str(trigger))
        self.images.insert(0, image)
        return image

    def hurry(self, job_id):
        self.calls.append(("hurry",))

    def suspend_gpu(self, init_pid, cgroup_procs):
        self.calls.append(("suspend_gpu",))
        return [init_pid]

    def resume_gpu(self, pids):
        self.calls.append(("resume_gpu", list(pids)))
        return []


class FakeSlurm:
    """Slurm as the agent sees it: one job, its preemption state, requeues recorded."""

    def __init__(self, job: Job) -> None:
        self.current = job
        self.requeues: list[tuple[str, bool]] = []

    def job(self, job_id):
        return self.current

    def jobs(self, node=None):
        return [self.current]

    def node(self, name):
        return Node(name, "allocated", (), "")

    def requeue(self, job_id, hold=False):
        self.requeues.append((job_id, hold))

    def drain(self, node, reason):
        pass

    def preempt_mode(self, partition):
        return "SUSPEND" if partition == "gang" else "REQUEUE"

    def grace_time(self, partition):
        return 20

    def run_in_job(self, job_id, node, argv, env):
        return 0

    def set_admin_comment(self, job_id, text):
        pass


def make_job(restart_count: int = 0, *, preempt_time: int = 0, start_time: int = 1000,
             partition: str = "low") -> Job:
    return Job(job_id="77", user_id=UID, group_id=GID, state="RUNNING", batch_host="n1",
               restart_count=restart_count, preempt_time=preempt_time, start_time=start_time, nodes="n1",
               partition=partition, requeue=True, exit_code=None, work_dir="/tmp")
