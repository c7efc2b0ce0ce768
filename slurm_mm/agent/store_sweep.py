"""Remove the images of jobs that ended for good without an Epilog to do it.

The Epilog removes a job's images when its run ends for good. A job that was requeued
and then cancelled (or failed to start) while pending never runs again, so no Epilog
sees its end, and its images would stay. Every `store_sweep_interval` seconds the agent
asks Slurm about the jobs in the store it answers for (those whose newest image this
node wrote, and directories with no image at all) and removes a job's directory when
Slurm says it ended for good (COMPLETED, CANCELLED, FAILED, TIMEOUT, OUT_OF_MEMORY,
BOOT_FAIL, DEADLINE) or no longer knows it (purged after MinJobAge). Every other
answer keeps them: pending, requeued, held, running, completing, suspended, NODE_FAIL
and PREEMPTED (both may be requeued), and any failure to ask. `slurm-mm gc` runs the same
sweep over every job of the store, for jobs whose writing node is gone.

Trusts Slurm's answer and the store's root-written manifests; removing twice (several
agents, an Epilog at the same time) is harmless. Assumes one Slurm cluster per store:
job ids of another cluster would be judged by this one's controller.
"""

from __future__ import annotations

import logging
import os
import threading

from slurm_mm.errors import JobGone, SlurmMMError
from slurm_mm.slurm.model import SlurmClient
from slurm_mm.store import ImageStore

log = logging.getLogger(__name__)
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


def answers_for(store: ImageStore, job_id: str, node: str | None) -> bool:
    """Whether `node` judges job_id: it wrote the job's newest image, or the job has none
    (node None: every job)."""
    if node is None:
        return True
    try:
        images = store.images(job_id)
    except (SlurmMMError, OSError):
        return False
    return not images or images[0].manifest.node == node


def ended_for_good(slurm: SlurmClient, job_id: str) -> bool:
    """True only on Slurm's word that the job can never run again."""
    try:
        state = slurm.job(job_id).state
    except JobGone:
        return True
    except SlurmMMError as exc:
        log.debug("store sweep: no answer about job %s: %s", job_id, exc)
        return False
    return state.upper() in ENDED


def sweep(store: ImageStore, slurm: SlurmClient, node: str | None) -> list[str]:
    """One pass; the jobs whose directories were removed."""
    try:
        jobs = sorted(name for name in os.listdir(store.root) if name.isdigit())
    except OSError:
        return []
    removed = []
    for job_id in jobs:
        if answers_for(store, job_id, node) and ended_for_good(slurm, job_id):
            try:
                store.remove_job(job_id)
            except (SlurmMMError, OSError) as exc:
                log.warning("store sweep: cannot remove job %s: %s", job_id, exc)
                continue
            log.warning("job %s ended for good with no Epilog to remove its images: removed them", job_id)
            removed.append(job_id)
    return removed


def start(store: ImageStore, slurm: SlurmClient, node: str, interval: float,
          stopping: threading.Event) -> threading.Thread | None:
    """Sweep every `interval` seconds until `stopping` is set (0: never)."""
    if interval <= 0:
        return None

    def loop() -> None:
        while not stopping.wait(interval):
            try:
                sweep(store, slurm, node)
            except Exception as exc:  # noqa: BLE001 - a failed sweep never takes the agent down
                log.warning("store sweep failed: %s", exc)

    thread = threading.Thread(target=loop, name="store-sweep", daemon=True)
    thread.start()
    return thread
