"""The node agent's metrics (Prometheus textfile format) and one summary log line per event.

Each agent keeps counters in memory and rewrites `<metrics_dir>/slurm_mm_<node>.prom`
atomically (temporary file + rename, as node_exporter's textfile collector expects)
after every checkpoint, restore or job start. The directory is the site's: nothing is
written when it does not exist. Labels are bounded sets (trigger, outcome, error type,
owner uid), never job ids, so the series count stays small on a busy node. Every event
is also logged as one `key=value` line naming the job and the trigger, for journald.

Never raises into the agent: a metrics failure is logged once and ignored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slurm_mm.store import Image

log = logging.getLogger("slurm_mm.agent")

# name -> (type, help); documented in docs/admin-guide.md ("Metrics").
METRICS: dict[str, tuple[str, str]] = {
    "slurm_mm_agent_start_time_seconds": ("gauge", "Unix time the node agent started."),
    "slurm_mm_jobs_started_total": ("counter", "Enrolled job runs started on this node, by mode (launched = fresh start, restored)."),
    "slurm_mm_checkpoints_total": ("counter", "Checkpoints by trigger (periodic, preempt, drain, manual, suspend) and outcome (success, failure)."),
    "slurm_mm_checkpoint_failures_total": ("counter", "Failed checkpoints by trigger and reason (the error's type)."),
    "slurm_mm_checkpoint_duration_seconds_sum": ("counter", "Total seconds from trigger to committed image, by trigger."),
    "slurm_mm_checkpoint_duration_seconds_count": ("counter", "Checkpoints counted in the duration sum, by trigger."),
    "slurm_mm_checkpoint_freeze_seconds_sum": ("counter", "Total seconds jobs were frozen for CRIU's dump, by trigger."),
    "slurm_mm_checkpoint_freeze_seconds_count": ("counter", "Dumps counted in the freeze sum, by trigger."),
    "slurm_mm_checkpoint_bytes_total": ("counter", "Bytes of committed images, by kind (raw = as dumped, stored = after compression)."),
    "slurm_mm_checkpoint_last_success_timestamp_seconds": ("gauge", "Unix time of the last committed image on this node."),
    "slurm_mm_restores_total": ("counter", "Restores by outcome (success, failure)."),
    "slurm_mm_restore_failures_total": ("counter", "Failed restores by reason (the error's type)."),
    "slurm_mm_restore_duration_seconds_sum": ("counter", "Total seconds from image chosen to job running again (extract + CRIU restore)."),
    "slurm_mm_restore_duration_seconds_count": ("counter", "Restores counted in the duration sum."),
    "slurm_mm_store_written_bytes_total": ("counter", "Stored image bytes committed from this node, by job owner uid."),
}


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + body + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters of one agent; `write()` publishes them."""

    def __init__(self, directory: Path | None, node: str) -> None:
        self.directory = directory
        self.node = node
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self.lock = threading.Lock()
        self._warned = False
        self.set("slurm_mm_agent_start_time_seconds", time.time())

    # ------------------------------------------------------------ recording

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self.lock:
            self.values[name][tuple(sorted(labels.items()))] = value

    def job_started(self, job_id: str, mode: str) -> None:
        self.add("slurm_mm_jobs_started_total", mode=mode)
        log.info("event=start job=%s mode=%s", job_id, mode)
        self.write()

    def checkpoint_done(self, job_id: str, trigger: str, started: float, image: Image) -> None:
        """A committed image; `started` is time.monotonic() when the trigger fired."""
        m = image.manifest
        seconds = time.monotonic() - started
        raw = sum(f.size for f in m.files)
        stored = sum(f.stored_size for f in m.files)
        timings = (m.extra or {}).get("timings", {}) if isinstance(m.extra, dict) else {}
        freeze = timings.get("dump")
        self.add("slurm_mm_checkpoints_total", trigger=trigger, outcome="success")
        self.add("slurm_mm_checkpoint_duration_seconds_sum", seconds, trigger=trigger)
        self.add("slurm_mm_checkpoint_duration_seconds_count", 1, trigger=trigger)
        if isinstance(freeze, (int, float)):
            self.add("slurm_mm_checkpoint_freeze_seconds_sum", float(freeze), trigger=trigger)
            self.add("slurm_mm_checkpoint_freeze_seconds_count", 1, trigger=trigger)
        self.add("slurm_mm_checkpoint_bytes_total", raw, kind="raw")
        self.add("slurm_mm_checkpoint_bytes_total", stored, kind="stored")
        self.add("slurm_mm_store_written_bytes_total", stored, uid=str(m.uid))
        self.set("slurm_mm_checkpoint_last_success_timestamp_seconds", time.time())
        log.info("event=checkpoint job=%s trigger=%s outcome=success image=%s seconds=%.3f freeze_seconds=%s "
                 "raw_bytes=%d stored_bytes=%d", job_id, trigger, image.path.name, seconds,
                 "-" if freeze is None else f"{freeze:.3f}", raw, stored)
        self.write()

    def checkpoint_failed(self, job_id: str, trigger: str, started: float, error: BaseException) -> None:
        reason = type(error).__name__
        self.add("slurm_mm_checkpoints_total", trigger=trigger, outcome="failure")
        self.add("slurm_mm_checkpoint_failures_total", trigger=trigger, reason=reason)
        log.warning("event=checkpoint job=%s trigger=%s outcome=failure reason=%s seconds=%.3f error=%r",
                    job_id, trigger, reason, time.monotonic() - started, str(error))
        self.write()

    def restore_done(self, job_id: str, image: Image, started: float, error: BaseException | None = None) -> None:
        seconds = time.monotonic() - started
        trigger = image.manifest.trigger
        if error is None:
            self.add("slurm_mm_restores_total", outcome="success")
            self.add("slurm_mm_restore_duration_seconds_sum", seconds)
            self.add("slurm_mm_restore_duration_seconds_count", 1)
            log.info("event=restore job=%s trigger=%s outcome=success image=%s seconds=%.3f",
                     job_id, trigger, image.path.name, seconds)
        else:
            reason = type(error).__name__
            self.add("slurm_mm_restores_total", outcome="failure")
            self.add("slurm_mm_restore_failures_total", reason=reason)
            log.warning("event=restore job=%s trigger=%s outcome=failure image=%s reason=%s error=%r",
                        job_id, trigger, image.path.name, reason, str(error))
        self.write()

    # ------------------------------------------------------------ publishing

    def text(self) -> str:
        """The Prometheus text exposition of every series, each with a node label."""
        lines = []
        with self.lock:
            snapshot = {name: dict(series) for name, series in self.values.items()}
        for name, (kind, help_text) in METRICS.items():
            series = snapshot.get(name)
            if not series:
                continue
            if not name.endswith("_count"):  # _sum/_count pairs share one HELP/TYPE block
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(series.items()):
                lines.append(f"{name}{_labels(tuple(sorted((('node', self.node), *key))))} {_number(value)}")
        return "\n".join(lines) + "\n"

    def path(self) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"slurm_mm_{self.node}.prom"

    def write(self) -> None:
        path = self.path()
        if path is None or not path.parent.is_dir():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.text())
            os.replace(tmp, path)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write metrics to %s: %s", path, exc)
                self._warned = True


# The agent process's metrics; configured by `python -m slurm_mm.agent`. Until then (unit
# tests, tools) events are counted but nothing is written.
registry = Metrics(None, os.uname().nodename)


def configure(directory: Path | None, node: str) -> Metrics:
    global registry
    registry = Metrics(directory, node)
    registry.write()
    return registry
