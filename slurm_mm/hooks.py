"""Slurm Prolog and Epilog for enrolled jobs (run as root by slurmd).

Prolog: mark the job enrolled on this node (the agent serves no other job), prepare its
checkpoint directory (root-owned, readable by the owner), advance the epoch fence to
this run's restart count (so an older copy of the job can never commit again), and on a
requeued run name the image that will be restored.
Epilog: remove what the agent made for the job on this node (staging, markers); if the
job ended for good, also its images. Slurm shows every ending job as COMPLETING, with
exit code 0 for a requeue too, but a requeue raises the restart count before the
Epilog runs (measured: SLURM_JOB_RESTART_COUNT is the next run's), so a count above the
one the Prolog saw means "requeued: keep the images"; the same count means the job is
COMPLETED, FAILED, CANCELLED or TIMEOUT for good. Without the Prolog's record (no
marker), images are kept and trimmed to the retention count, unless the agent saw the
job's own tree exit 0; a run the agent itself requeued keeps them whatever the counts.
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
from slurm_mm.agent import enrollment
from slurm_mm.checkpointer import open_store, restorable
from slurm_mm.engine.owner import Owner
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
    cfg = config.load(require_safe_owner=True)
    enrollment.mark_enrolled(cfg, job, env["SLURMD_NODENAME"], epoch, env.get("SPANK_SLURM_MM_INTERVAL", ""))
    store = open_store(cfg)
    store.prepare_job(job, uid, gid)
    store.advance_epoch(job, epoch)
    if epoch == 0:
        return
    # Manifest-level choice only: the agent verifies checksums while it extracts, so the
    # prolog does not read the whole image a second time before the job can start.
    # The same choice as the agent's (checkpointer.restorable), owner included.
    owner = Owner(uid, gid, ())  # restorable() compares uid and gid only
    image = next((i for i, refusal in restorable(store, job, before_epoch=epoch, owner=owner) if not refusal), None)
    if image is None:
        log.warning("job %s run %d: no usable image; the script starts from the beginning", job, epoch)
    else:
        log.warning("job %s run %d: will restore %s (trigger %s, epoch %d)", job, epoch,
                    image.path.name, image.manifest.trigger, image.manifest.epoch)


def epilog(env: dict[str, str]) -> None:
    job, node = env["SLURM_JOB_ID"], env.get("SLURMD_NODENAME", "")
    cfg = config.load(require_safe_owner=True)
    for staging in (cfg.staging_dir, cfg.gpu_staging_dir):
        shutil.rmtree(staging / job, ignore_errors=True)
    run, requeued = None, False
    if node:
        shutil.rmtree(cfg.checkpoint_root / ".staging" / node / job, ignore_errors=True)
        run = enrollment.recorded_run(cfg, job, node)
        requeued = enrollment.requeued_by_agent(cfg, job, node)
        enrollment.forget(cfg, job, node)
    store = open_store(cfg)
    marker = completion_marker(cfg, job)
    completed = marker.is_file() and not marker.is_symlink()
    ending = int(env.get("SLURM_JOB_RESTART_COUNT") or 0)
    exit_code = env.get("SLURM_JOB_EXIT_CODE", "?")
    if requeued or (run is not None and ending > run):
        removed = store.gc(job)
        log.warning("job %s run %s is being requeued (as run %d): images kept, %d old ones removed",
                    job, run, ending, len(removed))
    elif (run is not None and ending == run) or (run is None and completed):
        store.remove_job(job)
        log.warning("job %s ended for good (run %d, exit %s): its images were removed", job, ending, exit_code)
    else:
        removed = store.gc(job)
        log.warning("job %s ended (exit %s) without a Prolog record here: images kept, %d old ones removed",
                    job, exit_code, len(removed))
    if completed:
        marker.unlink()


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
