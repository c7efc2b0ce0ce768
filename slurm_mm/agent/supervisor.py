"""One enrolled job on this node: start or restore it, checkpoint it, report its exit.

All checkpoint triggers of a job (periodic, preemption, drain, manual) go through
`checkpoint()`, which holds the job's lock: they are serialised, so two images of one
job are never taken at once. A checkpoint that fails leaves the job running (the engine
rolls back). The signals Slurm sends the batch task come here too (`on_signal`): the
supervisor decides whether one starts a preemption image, a SUSPEND or is the job's.
Everything it uses from the node comes in a NodeServices, by constructor.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from slurm_mm.agent import commit_cpus, dump_deadline, enrollment, job_comment, job_records, metrics, protocol, quota
from slurm_mm.agent.job_record import REQUEUED_EXIT, CheckpointProgress, JobRecord, JobState, LaunchRequest
from slurm_mm.agent.preemption import PreemptNotice
from slurm_mm.agent.services import NodeServices
from slurm_mm.agent.step_launch import steps_gpu_inventory
from slurm_mm.agent.steps import StepGuard
from slurm_mm.checkpointer import ProcessTree, RestoreTarget
from slurm_mm.config import RESTORE_POLICIES
from slurm_mm.engine.proctree import tree_pids
from slurm_mm.errors import ImageError, RestoreFailed, RestoreRefusedByPolicy, SlurmMMError
from slurm_mm.hooks import completion_marker
from slurm_mm.slurm.version import slurm_requeues_preempted_job_on_exit
from slurm_mm.store import Image, Trigger
from slurm_mm.store.manifest import STOPPING_TRIGGERS

log = logging.getLogger(__name__)

# How long a failed commit's restore-in-place waits for the dumped tree to be gone.
OLD_TREE_GONE_SECONDS = 30.0


class JobSupervisor:
    def __init__(self, services: NodeServices, request: LaunchRequest, conn: socket.socket) -> None:
        self.services = services
        self.checkpointer = services.checkpointer
        self.req = request
        self.conn = conn
        self.job_id = request.job.job_id
        self.epoch = request.job.restart_count
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.suspended = threading.Event()  # Slurm SUSPEND: frozen, nothing to dump
        self.tree: ProcessTree | None = None
        self.manual_checkpoint_at: float | None = None  # a user's last one (monotonic), for the rate limit
        self.gpu_suspended: list[int] = []  # PIDs whose GPU state a SUSPEND moved out
        self.record = JobRecord(self.job_id, request.uid, request.interval)
        self.send_lock = threading.Lock()
        self.steps = StepGuard(self)
        self.preempt_notice = PreemptNotice()  # this run's own preemption notices

    # ------------------------------------------------------------ messages

    def tell(self, text: str) -> None:
        """A line in the job's own stderr, where its user looks first."""
        log.info("job %s: %s", self.job_id, text)
        try:
            os.write(self.req.stdio[2], f"slurm_mm: {text}\n".encode())
        except OSError:
            pass

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            try:
                protocol.send(self.conn, message)
            except OSError:
                pass

    # ------------------------------------------------------------ start

    def start(self) -> str:
        """Restore the newest usable image of an earlier run, else follow the restore policy."""
        store = self.checkpointer.store
        store.prepare_job(self.job_id, self.req.uid, self.req.gid)
        store.advance_epoch(self.job_id, self.epoch)
        mode = "launched"
        self.steps.prepare()
        if self.epoch > 0:
            tried = []
            for image in self._candidate_images():
                tried.append(image.path.name)
                restore_started = time.monotonic()
                try:
                    self.tree = self._restore(image)
                except (ImageError, SlurmMMError) as exc:
                    metrics.registry.restore_done(self.job_id, image, restore_started, exc)
                    self.tell(f"cannot restore {image.path.name}: {exc}")
                    continue
                mode = "restored"
                metrics.registry.restore_done(self.job_id, image, restore_started)
                self.tell(f"restored from {image.path.name} (taken {_age(image.manifest.created)} ago "
                          f"on {image.manifest.node}, trigger {image.manifest.trigger})")
                for line in getattr(self.tree, "files_report", []):
                    self.tell(f"file {line}")
                if image.manifest.trigger == Trigger.PERIODIC:
                    self.tell(LOST_RUN_NOTE)
                break
            else:
                if tried:
                    return self._no_restorable_image(tried)
                self.tell("no image of an earlier run: starting the job script from the beginning")
            if mode == "restored":
                self.steps.check_restored(self.tree)
        if self.tree is None:
            self.tree = self.checkpointer.launch(self.req, record_end=True)
        self._running(mode)
        return mode

    def _running(self, mode: str) -> None:
        self.record.mode = mode
        self.record.state = JobState.RUNNING
        job_records.save(self.checkpointer.records, self)
        metrics.registry.job_started(self.job_id, mode)
        self.steps.on_start()
        threading.Thread(target=self._wait_exit, name=f"wait-{self.job_id}", daemon=True).start()
        if self.req.interval > 0:
            threading.Thread(target=self._periodic, name=f"periodic-{self.job_id}", daemon=True).start()

    def _no_restorable_image(self, tried: list[str]) -> str:
        """Images exist but none can be restored: the site's (or job's) restore policy decides."""
        policy = self.restore_policy()
        if policy == "fail":
            self.tell(f"restore policy 'fail': no image of {', '.join(tried)} can be restored; the job fails")
            raise RestoreRefusedByPolicy(f"job {self.job_id}: none of its images can be restored "
                                         f"({', '.join(tried)}); restore policy 'fail'")
        if policy == "hold" and not self._held_before():
            self.tell(f"restore policy 'hold': no image of {', '.join(tried)} can be restored; the job is "
                      "requeued and held: `scontrol release` it to run the script from the beginning")
            self.record.state = JobState.REQUEUED
            try:
                enrollment.mark_requeued(self.services.config, self.job_id, self.services.node, self.epoch)
                self.services.slurm.requeue(self.job_id, hold=True)
            except SlurmMMError as exc:
                raise RestoreRefusedByPolicy(f"job {self.job_id}: could not hold it ({exc})") from None
            return "held"
        self.tell("no image could be restored: starting the job script from the beginning")
        self.tree = self.checkpointer.launch(self.req, record_end=True)
        self._running("launched")
        return "launched"

    def restore_policy(self) -> str:
        """The job's own SLURM_MM_RESTORE_POLICY (its choice, for its own job) or the site's."""
        wanted = self.req.env.get("SLURM_MM_RESTORE_POLICY", "")
        return wanted if wanted in RESTORE_POLICIES else self.services.config.restore_policy

    def _held_before(self) -> bool:
        """A job released after a hold reruns (the marker is the hold's own, per job)."""
        marker = self.pin_root().parent / ".held"
        try:
            os.unlink(marker)
            return True
        except FileNotFoundError:
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.close(fd)
            except OSError:
                pass
            return False

    def pin_root(self) -> Path:
        return self.checkpointer.pin_root(self.job_id)

    def _candidate_images(self):
        for image, refusal in self.checkpointer.restorable(self.job_id, before_epoch=self.epoch,
                                                           owner=self.req.owner):
            if refusal:
                self.tell(f"not restoring {image.path.name}: {refusal}")
                continue
            yield image

    def _restore(self, image: Image) -> ProcessTree:
        self.record.progress = CheckpointProgress("extracting", "restore", time.time())
        extra = image.manifest.extra

        def target(staging: Path) -> RestoreTarget:
            self.steps.unpack(staging, extra)  # step tasks' images set aside, their files checked
            return RestoreTarget.of(self.req)

        try:
            return self.checkpointer.restore_image(
                self.job_id, image, target, progress=self._progress, on_phase=self._phase,
                after=lambda tree, staging: self.steps.restored(tree, extra))
        finally:
            self.steps.discard_unpacked()  # nothing left once restored() took them
            self.record.progress = CheckpointProgress()

    def _phase(self, phase: str) -> None:
        self.record.progress.phase = phase

    # ------------------------------------------------------------ running

    def _progress(self, done: int, total: int) -> None:
        self.record.progress.bytes_done = done
        self.record.progress.bytes_total = total

    def _wait_exit(self) -> None:
        tree = self.tree
        status = tree.wait()
        self.stopped.set()
        with self.lock:  # a stopping checkpoint decides what the job's end means
            if self.tree is not tree:
                return  # restored in place after a failed commit: a new waiter took over
            if self.record.state in (JobState.CHECKPOINTED, JobState.REQUEUED):
                log.info("job %s: tree stopped after checkpoint (status %s)", self.job_id, status)
                job_records.forget(self.checkpointer.records, self.job_id)
                return
            if self.steps.ended_by_preemption(status):
                job_records.forget(self.checkpointer.records, self.job_id)
                return
            self.record.state = JobState.EXITED
        log.info("job %s: exited with %s", self.job_id, status)
        if status == 0:
            self._mark_completed()
        self.send({"op": "exit", "status": status})
        self.services.jobs.forget(self.job_id, self)
        job_records.forget(self.checkpointer.records, self.job_id)

    def _mark_completed(self) -> None:
        """Tell the epilog the job completed, so its images can go (hooks.py)."""
        marker = completion_marker(self.services.config, self.job_id)
        try:
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            marker.write_text(f"{self.epoch}\n")
        except OSError as exc:
            log.warning("job %s: cannot write %s: %s", self.job_id, marker, exc)

    def _periodic(self) -> None:
        while not self.stopped.wait(self.req.interval):
            try:
                self.checkpoint(Trigger.PERIODIC)
            except Exception:  # noqa: BLE001 - one failed image must not end the job's periodic ones
                log.exception("job %s: periodic checkpoint failed", self.job_id)

    def on_signal(self, signum: int) -> None:
        """A signal Slurm sent the batch task, relayed by slurm-mm-run: a preemption notice
        starts the preemption image (the job's own handler never sees it: the image must
        hold the job as it was), SIGTSTP/SIGCONT of a SUSPEND move GPU state out and back,
        anything else is the job's."""
        preemption = self.services.preemption
        if signum in (signal.SIGUSR1, signal.SIGTERM) and preemption.job_ends_run(self.job_id, self.epoch):
            self.preempt_notice.saw(f"{signal.Signals(signum).name} to the batch task")
            self.checkpointer.hurry(self.job_id)
            threading.Thread(target=self.checkpoint, args=(Trigger.PREEMPT,), daemon=True).start()
            return
        if signum == signal.SIGTSTP:  # SUSPEND: move GPU state out before the freeze
            self.suspended.set()
            if self.tree is not None:
                self.gpu_suspended = self.checkpointer.suspend_gpu(self.tree.init_pid, self.req.cgroup_procs)
            return
        if signum == signal.SIGCONT:
            self.gpu_suspended = self.checkpointer.resume_gpu(self.gpu_suspended)
            self.suspended.clear()
        self.forward(signum)

    def forward(self, signum: int) -> None:
        if self.tree is not None and not self.stopped.is_set():
            self.tree.signal(signum)

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, trigger: Trigger, requeue: bool = False, defer_requeue: bool = False) -> Image | None:
        """Take an image now; for preempt/drain (or `requeue`) the job stops and is requeued
        (by the caller, through finish_stop(), when `defer_requeue`)."""
        stopping = requeue or trigger in STOPPING_TRIGGERS
        with self.lock:
            if self.record.state != JobState.RUNNING or self.stopped.is_set() or self.tree is None:
                return None
            if self.suspended.is_set():
                self.record.last_error = "the job is suspended"
                log.info("job %s: no %s checkpoint while suspended", self.job_id, trigger)
                return None
            refusal = self.steps.refusal(stopping)
            if refusal:
                self.steps.refuse(trigger, stopping, refusal)
                return None
            self.record.progress = CheckpointProgress("dumping", trigger, time.time())
            if stopping:  # a restarted agent must know the tree's end may be this dump's
                job_records.save(self.checkpointer.records, self, stopping=str(trigger))
            started = time.monotonic()
            staging: Path | None = None
            try:
                quota.check(self.services.config, self.checkpointer.store, self.job_id, self.req.uid)
                staging, mode = self.checkpointer.dump_staging(
                    self.job_id, f"dump-{int(time.time() * 1000)}",
                    tree_pids(self.tree.init_pid) + self.steps.jobsteps.task_pids())
                self.record.progress.mode = mode
                image = self._dump_and_commit(staging, trigger, stopping)
            except SlurmMMError as exc:
                self.record.last_error = str(exc)
                metrics.registry.checkpoint_failed(self.job_id, trigger, started, exc)
                self.tell(f"{trigger} checkpoint failed: {exc}" + self._fallback_note(stopping))
                return None
            finally:
                self.record.progress = CheckpointProgress()
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
            m = image.manifest
            metrics.registry.checkpoint_done(self.job_id, trigger, started, image)
            job_comment.publish(self.services.slurm, self.job_id, image)
            self.record.last_image = {"name": image.path.name, "created": m.created, "trigger": m.trigger,
                                      "size": sum(f.stored_size for f in m.files),
                                      "same_node_only": bool(m.extra.get("files", {}).get("same_node_only"))}
            self.steps.clear()
            job_records.save(self.checkpointer.records, self)
            if stopping:
                self.record.state = JobState.CHECKPOINTED
        if stopping and not defer_requeue:
            self.finish_stop(image, trigger)
        return image

    def finish_stop(self, image: Image, trigger: str) -> None:
        if trigger == Trigger.PREEMPT and slurm_requeues_preempted_job_on_exit():
            # Slurm requeues a job that ends in its grace time; our own requeue would
            # leave its preemption mark set and requeue the next run when it completes.
            self.tell(f"checkpointed to {image.path.name} for {trigger}; Slurm requeues it")
            self.record.state = JobState.REQUEUED
            self.send({"op": "exit", "status": REQUEUED_EXIT})
            return
        self.tell(f"checkpointed to {image.path.name} for {trigger}; requeueing")
        self._requeue()

    def _fallback_note(self, stopping: bool) -> str:
        if not stopping:
            return "; the job keeps running"
        last = self.record.last_image.get("name")
        if last:
            # Another notice (the batch task's signal, the agent's poll) may still try again
            # within the grace time and succeed: this is what happens if none does.
            return f"; unless a later image is taken before Slurm stops it, the job will resume from {last}"
        return "; no earlier image exists: a requeued run starts from the beginning"

    def _dump_and_commit(self, staging: Path, trigger: Trigger, stopping: bool) -> Image:
        assert self.tree is not None
        files = self.checkpointer.file_spec(self.job_id, self.req.owner, env=self.req.env,
                                            script=self.req.argv[0], pin_name=staging.name)
        deadline = dump_deadline.grace_end(self.services.slurm, self.job_id) if trigger == Trigger.PREEMPT else None
        tree = self.tree
        dumped = self.steps.dump(staging, trigger, stopping, deadline, lambda leave_running: self.checkpointer.dump(
            tree.init_pid, staging, deadline=deadline, leave_running=leave_running, files=files))
        for note in dumped.extra.get("files", {}).get("notes", []):
            self.tell(note)
        dumped.gpu_inventory = dumped.gpu_inventory or steps_gpu_inventory(dumped.extra["steps"])
        try:
            self.record.progress.phase = "writing"
            return self.checkpointer.commit(self.job_id, dumped, epoch=self.epoch, owner=self.req.owner,
                                            trigger=trigger, progress=self._progress,
                                            cpus=self._background_cpus(trigger))
        except SlurmMMError as exc:
            if stopping:  # the dump ended the tree: bring it back from the local image
                self._restore_in_place(staging, dumped.gpu_inventory, exc, dumped.extra)
            raise

    def _background_cpus(self, trigger: Trigger) -> frozenset[int] | None:
        """Where a periodic commit runs: off the CPUs of the node's jobs (commit_cpus.py)."""
        if trigger != Trigger.PERIODIC or self.services.config.commit_cpus != "spare":
            return None
        pids = [tree.init_pid for _, sup in self.services.jobs.items()
                if (tree := getattr(sup, "tree", None)) is not None]
        return commit_cpus.spare_cpus(pids)

    def _restore_in_place(self, staging: Path, gpu: dict[str, Any] | None, cause: SlurmMMError,
                          extra: dict[str, Any]) -> None:
        """Nothing lost when the store refuses an image: the job resumes here from it, its
        steps too, once the dumped tree is gone (never two copies of the job at once)."""
        try:
            if not self.stopped.wait(OLD_TREE_GONE_SECONDS):
                raise RestoreFailed(f"the dumped tree is still there after {OLD_TREE_GONE_SECONDS:.0f} s")
            self.steps.unpack(staging, extra)
            try:
                self.tree = self.checkpointer.restore(staging, RestoreTarget.of(self.req), gpu,
                                                      pin_root=self.pin_root(), job_id=self.job_id)
            except SlurmMMError:
                self.steps.discard_unpacked()
                raise
            self.steps.restored(self.tree, extra)
        except SlurmMMError as exc:
            self.tell(f"could not store the image ({cause}) nor resume the job here ({exc}); "
                      "requeueing it to resume from its last stored image")
            self.record.state = JobState.CHECKPOINTED
            threading.Thread(target=self._requeue, daemon=True).start()
            return
        self.stopped.clear()
        job_records.save(self.checkpointer.records, self)
        threading.Thread(target=self._wait_exit, name=f"wait-{self.job_id}", daemon=True).start()
        self.tell(f"could not store the image ({cause}); the job resumed on this node")

    def _requeue(self) -> None:
        try:
            enrollment.mark_requeued(self.services.config, self.job_id, self.services.node, self.epoch)
            self.services.slurm.requeue(self.job_id)
            self.record.state = JobState.REQUEUED
            # Slurm has the requeue: the batch task may go now instead of waiting out KillWait
            # (it would hold the node from the preemptor). Not 0: should the requeue somehow
            # not take, the run must never read as a success.
            self.send({"op": "exit", "status": REQUEUED_EXIT})
        except SlurmMMError as exc:
            self.tell(f"requeue failed ({exc}); Slurm's own preemption or the admin must requeue it")


# A periodic image is never the end of a run: the run went on past it and was lost (its
# node failed, or it was stopped without a newer image). What slurm_mm cannot bring back
# of that run is said where the user looks, not only in docs.
LOST_RUN_NOTE = ("the run after that image was lost: its work since the image is redone; files it "
                 "created, appended to or deleted on shared filesystems after closing them are as it "
                 "left them (docs/user-guide.md, \"Not covered\")")


def _age(created: float) -> str:
    seconds = max(0, int(time.time() - created))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
