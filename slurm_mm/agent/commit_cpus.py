"""Which CPUs a periodic commit may use: the node's CPUs that no job runs on.

A periodic commit runs while its job (and the node's other jobs) compute. At idle
priority it still took 10-20% from a CPU-bound job on a 2-vCPU VM when the scheduler was
free to place its threads, and 0-3% when it ran on the other CPU only (measured,
docs/benchmarks.md). A job's tree lives in its Slurm step cgroups; with ConstrainCores=yes
their cpuset limits its processes' affinity to the CPUs Slurm allocated, so the affinity
of each job's init says which CPUs are taken. Where jobs are not bound (every CPU is in some job's affinity), the CPUs that
were mostly idle over a short look are taken as free; where none is, the least busy one,
so the commit never runs more threads than there are CPUs it may use.
Stopping commits (preemption, drain) do not come here: they run anywhere, at full speed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.25
IDLE_SHARE = 0.5  # a CPU idle at least this share of the look counts as free


def spare_cpus(job_pids: Iterable[int], *, sample_seconds: float = SAMPLE_SECONDS) -> frozenset[int]:
    """CPUs (of the calling process's own) for a background commit; never empty."""
    allowed = frozenset(os.sched_getaffinity(0))
    used: set[int] = set()
    for pid in job_pids:
        try:
            used |= os.sched_getaffinity(pid)
        except OSError:  # the job's process is gone or not ours to ask
            continue
    free = allowed - used
    if free:
        return free
    idle = _idle_shares(allowed, sample_seconds)
    if not idle:
        return allowed
    free = frozenset(cpu for cpu, share in idle.items() if share >= IDLE_SHARE)
    return free or frozenset({max(idle, key=lambda cpu: idle[cpu])})


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (idle + iowait, total) clock ticks from /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        try:
            values = [int(v) for v in fields[1:9]]
            times[int(fields[0][3:])] = (values[3] + values[4], sum(values))
        except (ValueError, IndexError):
            continue
    return times


def _idle_shares(cpus: frozenset[int], seconds: float) -> dict[int, float]:
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except OSError as exc:
        log.debug("cannot read /proc/stat: %s", exc)
        return {}
    shares: dict[int, float] = {}
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            shares[cpu] = (after[cpu][0] - before[cpu][0]) / total if total > 0 else 1.0
    return shares
