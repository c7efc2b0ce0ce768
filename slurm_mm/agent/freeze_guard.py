"""Hold off Slurm's freezer while a suspended job's GPU state moves to host memory.

Slurm suspends a job with SIGTSTP and freezes its cgroup about 2 s later (docs/design.md, measured facts);
the CUDA checkpoint of a large GPU job takes longer, and the driver call hangs on a
frozen process. While the guard is active it thaws the job's freezer cgroup whenever
Slurm freezes it, and on exit freezes it again if Slurm had asked for that, so the job
ends up suspended as Slurm wants, with its GPU memory released.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class FreezerCgroup:
    """A cgroup v1 freezer directory (freezer.state) or a v2 cgroup (cgroup.freeze)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.v1 = (path / "freezer.state").exists()

    @classmethod
    def of(cls, procs_files: list[Path]) -> FreezerCgroup | None:
        for procs in procs_files:
            directory = procs.parent
            if (directory / "freezer.state").exists():
                return cls(directory)
            if (directory / "cgroup.freeze").exists():
                return cls(v2_freeze_point(directory))
        return None

    def frozen(self) -> bool:
        if self.v1:
            return (self.path / "freezer.state").read_text().strip() in ("FROZEN", "FREEZING")
        return (self.path / "cgroup.freeze").read_text().strip() == "1"

    def set_frozen(self, frozen: bool) -> None:
        if self.v1:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")


def v2_freeze_point(task_cgroup: Path) -> Path:
    """The cgroup v2 directory Slurm freezes for a task in `task_cgroup`.

    Slurm's cgroup/v2 writes cgroup.freeze of the step's `user` cgroup
    (.../step_N/user), not of the task's own (.../step_N/user/task_0), whose
    cgroup.freeze stays 0 while an ancestor freezes it.
    """
    for directory in (task_cgroup, *task_cgroup.parents):
        if directory.parent.name.startswith("step_"):
            return directory
    return task_cgroup


class FreezeGuard:
    """`with FreezeGuard(cgroup): long_gpu_step()` — the step never runs frozen."""

    def __init__(self, cgroup: FreezerCgroup | None, poll: float = 0.02) -> None:
        self.cgroup = cgroup
        self.poll = poll
        self.held_off = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FreezeGuard:
        if self.cgroup is not None:
            self._thread = threading.Thread(target=self._watch, name="freeze-guard", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(self.poll):
            try:
                if self.cgroup.frozen():
                    self.cgroup.set_frozen(False)
                    if not self.held_off:
                        log.info("holding off the freeze of %s until the GPU state is out", self.cgroup.path)
                    self.held_off = True
            except OSError as exc:
                log.warning("freeze guard on %s: %s", self.cgroup.path, exc)
                return

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.held_off:
            try:
                self.cgroup.set_frozen(True)  # what Slurm asked for, now that it is safe
            except OSError as exc:
                log.warning("cannot re-freeze %s: %s", self.cgroup.path, exc)
