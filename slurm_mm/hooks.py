"""Slurm Prolog and Epilog for enrolled jobs (run as root by slurmd).

Prolog: prepare the job's checkpoint directory (root-owned, readable by the owner),
advance the epoch fence to this run's restart count (so an older copy of the job can
never commit again), and on a requeued run name the image that will be restored.
Epilog: a job that completed has its images removed; any other end keeps them, trimmed
to the retention count, and the node-local staging is removed. "Completed" is the node
agent's word (a root-owned marker it leaves when the job's own tree exited 0): Slurm
reports exit code 0 for a requeued job too, so the epilog cannot tell by itself.
Trusts only slurmd's environment (SLURM_JOB_*, SPANK_* set by the SPANK plugin in
sbatch) and a root-owned config. Never fails the job or drains the node for its own
errors: it logs them and exits 0.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys

from slurm_mm import config
from slurm_mm.checkpointer import open_store, restorable
from slurm_mm.errors import SlurmMMError

log = logging.getLogger("slurm_mm.hooks")


def _enrolled(env: dict[str, str]) -> bool:
    return env.get("SPANK_SLURM_MM_INTERVAL", "0") not in ("", "0")


def completion_marker(cfg: config.Config, job_id: str):
    """Node-local, root-owned: written by the agent when job_id's tree exited 0."""
    return cfg.run_dir / "completed" / job_id


def prolog(env: dict[str, str]) -> None:
    job, uid, gid = env["SLURM_JOB_ID"], int(env["SLURM_JOB_UID"]), int(env["SLURM_JOB_GID"])
    epoch = int(env.get("SLURM_JOB_RESTART_COUNT") or 0)
    store = open_store(config.load(require_safe_owner=True))
    store.prepare_job(job, uid, gid)
    store.advance_epoch(job, epoch)
    if epoch == 0:
        return
    # Manifest-level choice only: the agent verifies checksums while it extracts, so the
    # prolog does not read the whole image a second time before the job can start.
    # The same choice as the agent's (checkpointer.restorable), owner included.
    image = next((i for i, refusal in restorable(store, job, before_epoch=epoch, owner=None)
                  if not refusal and (i.manifest.uid, i.manifest.gid) == (uid, gid)), None)
    if image is None:
        log.warning("job %s run %d: no usable image; the script starts from the beginning", job, epoch)
    else:
        log.warning("job %s run %d: will restore %s (trigger %s, epoch %d)", job, epoch,
                    image.path.name, image.manifest.trigger, image.manifest.epoch)


def epilog(env: dict[str, str]) -> None:
    job = env["SLURM_JOB_ID"]
    cfg = config.load(require_safe_owner=True)
    if job.isdigit():
        for staging in (cfg.staging_dir, cfg.gpu_staging_dir):
            shutil.rmtree(staging / job, ignore_errors=True)
    store = open_store(cfg)
    marker = completion_marker(cfg, job)
    if marker.is_file() and not marker.is_symlink():
        store.remove_job(job)
        marker.unlink()
        log.warning("job %s completed: its images were removed", job)
    else:
        removed = store.gc(job)
        log.warning("job %s ended (exit %s): images kept, %d old ones removed", job,
                    env.get("SLURM_JOB_EXIT_CODE", "?"), len(removed))


def _to_journal(name: str) -> None:
    """slurmd keeps no Prolog/Epilog output: the lines also go to syslog (the journal)."""
    if not os.path.exists("/dev/log"):
        return
    try:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        return
    handler.setFormatter(logging.Formatter(f"slurm_mm-{name}: %(message)s"))
    logging.getLogger().addHandler(handler)


def run(hook) -> int:
    """Run a hook for an enrolled job at the site's log_level; never fails the job."""
    logging.basicConfig(level=logging.INFO, format=f"slurm_mm {hook.__name__}: %(message)s")
    _to_journal(hook.__name__)
    env = dict(os.environ)
    if not _enrolled(env) or not env.get("SLURM_JOB_ID", "").isdigit():
        return 0  # a job without --checkpoint-interval is untouched by slurm_mm
    try:
        logging.getLogger().setLevel(config.log_level(config.load(require_safe_owner=True)))
        hook(env)
    except (SlurmMMError, KeyError, ValueError, OSError) as exc:
        log.error("job %s: %s", env.get("SLURM_JOB_ID"), exc)
    return 0


def prolog_main() -> int:
    return run(prolog)


def epilog_main() -> int:
    return run(epilog)


if __name__ == "__main__":
    sys.exit(run(prolog if sys.argv[1:] == ["prolog"] else epilog))
