"""Put processes into a Slurm step's cgroups, so restored trees belong to the new job.

A restored tree must live in the new job's step cgroups (measured: otherwise it
survives scancel as an orphan). The agent copies the cgroup membership of the job's
batch task, read from /proc (kernel-written), into cgroup.procs files under
/sys/fs/cgroup.
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def step_cgroup_procs(pid: int) -> list[Path]:
    """cgroup.procs files of every Slurm-managed cgroup that `pid` is in."""
    files: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _num, controllers, path = line.split(":", 2)
        if "/job_" not in path or ".." in path.split("/"):
            continue
        if controllers == "":
            base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
        else:
            first = controllers.split(",")[0].removeprefix("name=")
            base = CGROUP_ROOT / first
            if not base.is_dir():
                base = CGROUP_ROOT / controllers
        procs = base / path.lstrip("/") / "cgroup.procs"
        if procs.exists():
            files.append(procs)
    return files


def join(procs_files: list[Path]) -> None:
    """Move the calling process into each cgroup (before exec of mm-init or criu)."""
    for procs in procs_files:
        with open(procs, "w") as handle:
            handle.write("0")  # "0" = the writing process itself
