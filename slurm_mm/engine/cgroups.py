"""Putting the processes the engine starts (mm-init, criu restore) into given cgroups.

The engine is handed cgroup directories (v1 controllers or v2, e.g. the new job's step
cgroups); it never works out which ones: that is Slurm's business, not the engine's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence


def procs_file(cgroup: str | os.PathLike) -> str:
    """The cgroup.procs file of a cgroup given as its directory or as that file itself."""
    path = Path(cgroup)
    return str(path if path.name in ("cgroup.procs", "tasks") else path / "cgroup.procs")


def joiner(cgroups: Sequence[str | os.PathLike]) -> Callable[[], None]:
    """A subprocess preexec_fn writing the child's PID into each cgroup's cgroup.procs.

    `cgroups`: cgroup directories, or their cgroup.procs files.
    It runs between fork and exec, so the process and everything it forks (the job's
    tree) start inside those cgroups. Plain os calls only: no locks, no imports.
    An error aborts the start (subprocess re-raises it in the parent).
    """
    procs_files = [procs_file(c) for c in cgroups]

    def join() -> None:
        pid = str(os.getpid()).encode()
        for path in procs_files:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join
