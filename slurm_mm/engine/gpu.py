"""Moving a process tree's GPU state into host memory and back (CUDA driver checkpoint API).

CRIU cannot dump a process that holds GPU memory and /dev/nvidia* handles. The CUDA
driver's checkpoint API, called from outside the process, locks its CUDA API, copies its
GPU memory into its own host memory and releases the GPU; the process is then an
ordinary CPU process that CRIU can dump, and restore + unlock give it its GPU back.

Order is everything (docs/design.md, measured facts): the driver calls hang on a stopped or frozen process,
so `suspend()` runs on the running tree before anything freezes it, and `resume()`
after the thaw or after `criu restore`. The lock blocks the application's CUDA calls,
so GPU state cannot change between suspend() and the CPU dump.

Guarantees:
- every driver call runs in a killable worker process (gpu_worker.py) under a watchdog
  scaled to the GPU memory involved: a late call raises GpuTimeout, it never hangs us;
- suspend() either leaves every CUDA process of the tree checkpointed, or puts every
  process it touched back to running and raises GpuError (a failed checkpoint never harms the job).

Knows processes and the driver; never Slurm, the store or CRIU. Runs as root: it trusts
its caller for the PIDs, reads /proc, and hands requests to libcuda, nothing else.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from slurm_mm.engine import gpu_inventory
from slurm_mm.errors import CudaCallFailed, GpuError, GpuTimeout

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("gpu_worker.py")
GiB = 1 << 30
# Used to size watchdogs when nothing tells how much GPU memory a process holds.
FALLBACK_GPU_BYTES = 80 * GiB

# cuCheckpointProcessGetState's answers, measured on driver 580 (docs/gpu-validation.md):
# a live process without CUDA gives NOT_INITIALIZED, a PID that does not exist
# OPERATING_SYSTEM (which other OS failures give too, so it counts only if the PID is gone).
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_OPERATING_SYSTEM = 304


class CudaState(enum.Enum):
    """CUprocessState: where a process stands in the lock/checkpoint/restore/unlock cycle."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4  # newer drivers report the transitions too
    RESTORING = 5


# ------------------------------------------------------------------------- watchdog


@dataclass(frozen=True)
class GpuTimeouts:
    """How long each driver call may take before its worker is killed.

    Copy rates measured on an H100 (docs/gpu-validation.md): checkpoint 0.9-2 GB/s, restore 3-6 GB/s,
    bound by host page faults. `bytes_per_s` is set well below both so that a slow but
    live call is never mistaken for a hung one; a hung call costs `floor_s` + size/rate.
    """

    lock_s: float = 10.0  # the driver's own lock timeout (timeoutMs)
    grace_s: float = 10.0  # watchdog margin over the driver's own lock timeout
    floor_s: float = 30.0  # least time any checkpoint or restore gets
    bytes_per_s: float = 0.5e9
    quick_s: float = 15.0  # state queries and unlock
    start_s: float = 30.0  # worker start + cuInit

    def for_call(self, op: str, gpu_bytes: int = 0) -> float:
        if op == "lock":
            return self.lock_s + self.grace_s
        if op in ("checkpoint", "restore"):
            return self.floor_s + gpu_bytes / self.bytes_per_s
        return self.quick_s


_ABANDONED: list[subprocess.Popen] = []  # killed workers stuck in the kernel; reaped later


def _reap_abandoned() -> None:
    for proc in list(_ABANDONED):
        if proc.poll() is not None:
            _ABANDONED.remove(proc)


class DriverWorker:
    """One gpu_worker.py child: line-delimited JSON requests, each answer under a watchdog.

    A late answer gets the worker SIGKILLed and GpuTimeout raised; the next call starts a
    fresh worker. `argv` exists for tests (a fake worker that sleeps); in production it is
    this interpreter running gpu_worker.py in isolated mode.
    """

    def __init__(self, argv: Sequence[str] | None = None, *, start_timeout: float = 30.0) -> None:
        self.argv = list(argv) if argv else [sys.executable, "-I", str(WORKER_SCRIPT)]
        self.start_timeout = start_timeout
        self.ready: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> dict:
        """Start the worker; returns its greeting ({"ready": bool, ...})."""
        _reap_abandoned()
        env = dict(os.environ)
        # The worker must see every GPU: restore may target any of them.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
                start_new_session=True,  # terminal signals to slurm_mm never hit a call midway
            )
        except OSError as exc:
            raise GpuError(f"cannot start CUDA driver worker {self.argv[0]}: {exc.strerror}") from None
        self._buf = b""
        self.ready = self._read(self.start_timeout, "start of the CUDA driver worker")
        if not self.ready.get("ready"):
            self.close()
        return self.ready

    def call(self, request: Mapping, timeout: float) -> dict:
        """Send one request; its answer, or GpuTimeout after `timeout` seconds."""
        if self._proc is None or self._proc.poll() is not None:
            greeting = self.start()
            if not greeting.get("ready"):
                raise GpuError(f"CUDA driver unavailable: {greeting.get('reason', 'unknown reason')}")
        what = f"CUDA {request.get('op')} of pid {request.get('pid')}"
        try:
            os.write(self._proc.stdin.fileno(), (json.dumps(dict(request)) + "\n").encode())
        except OSError:
            self.kill()
            raise GpuError(f"{what}: CUDA driver worker is gone") from None
        return self._read(timeout, what)

    def _read(self, timeout: float, what: str) -> dict:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                worker = self._proc.pid
                self.kill()
                raise GpuTimeout(
                    f"{what} did not return within {timeout:.0f} s (driver worker {worker} killed)"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                status = self._proc.wait()
                self._proc = None
                raise GpuError(f"{what}: CUDA driver worker exited with status {status}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            self.kill()
            raise GpuError(f"{what}: unreadable answer from CUDA driver worker: {line[:200]!r}") from None

    def kill(self) -> None:
        """SIGKILL the worker; one stuck in the kernel is left to be reaped later."""
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is None:
            return
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            log.warning("CUDA driver worker %d did not die at SIGKILL; abandoned", proc.pid)
            _ABANDONED.append(proc)
        for pipe in (proc.stdin, proc.stdout):
            if pipe:
                pipe.close()

    def close(self) -> None:
        """Let the worker end at EOF; kill it if it does not go within 2 s."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            self.kill()
            return
        proc.stdout.close()
        self._proc = None


# ---------------------------------------------------------------------------- /proc


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (parents before children), from /proc's children lists."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
    return seen


def nvidia_files(pid: int) -> list[str]:
    """The /dev/nvidia* files `pid` holds open: non-empty means it has a CUDA context."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return []
    except PermissionError:
        raise GpuError(f"cannot read /proc/{pid}/fd: permission denied (needs root)") from None
    found = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            found.append(target)
    return sorted(set(found))


# ---------------------------------------------------------------------- checkpointer


class GpuCheckpointer:
    """Checkpoints and restores the GPU state of a process tree through the CUDA driver.

    The protocol the CPU engine uses:
    - `suspend(pids)` before the CPU dump, on the running tree: lock then checkpoint every
      process that holds a CUDA context; returns those PIDs. Any failure: everything it
      touched is restored and unlocked, GpuError raised.
    - `resume(pids)` after the dump (job goes on) or after `criu restore` + thaw: restore
      then unlock every process the driver reports locked or checkpointed.
    - `state(pid)`: the driver's CudaState for pid, None for a non-CUDA process.
    Processes are handled in parallel (one worker each, up to `max_parallel`); all are
    locked before any is checkpointed and all restored before any is unlocked, as the
    driver asks for processes that share GPU memory.
    """

    def __init__(
        self,
        *,
        timeouts: GpuTimeouts | None = None,
        max_parallel: int = 8,
        worker_argv: Sequence[str] | None = None,
        gpu_memory: Callable[[], Mapping[int, int]] = gpu_inventory.process_gpu_memory,
    ) -> None:
        self.timeouts = timeouts or GpuTimeouts()
        self.max_parallel = max(1, max_parallel)
        self._worker_argv = worker_argv
        self._gpu_memory = gpu_memory
        self._idle: queue.SimpleQueue[DriverWorker] = queue.SimpleQueue()
        self._workers: list[DriverWorker] = []
        self._bytes: dict[int, int] = {}
        self._fallback_bytes: int | None = None
        self.driver_version = 0
        self.last_timings: dict[str, float] = {}

    @classmethod
    def open(cls, **kwargs) -> GpuCheckpointer | None:
        """A checkpointer, or None when this node has no usable CUDA checkpoint API.

        None means: libcuda.so.1 missing, cuInit failing (no GPU), or a driver without
        the cuCheckpointProcess* entry points. The reason is logged at INFO. A driver
        that hangs at cuInit is not "no GPU": that raises GpuTimeout.
        """
        checkpointer = cls(**kwargs)
        worker = checkpointer._new_worker()
        greeting = worker.start()
        if not greeting.get("ready"):
            log.info("no GPU checkpointing on this node: %s", greeting.get("reason"))
            return None
        checkpointer.driver_version = int(greeting.get("driver_version", 0))
        checkpointer._idle.put(worker)
        return checkpointer

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers.clear()
        self._idle = queue.SimpleQueue()

    def __enter__(self) -> GpuCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- driver calls

    def _new_worker(self) -> DriverWorker:
        worker = DriverWorker(self._worker_argv, start_timeout=self.timeouts.start_s)
        self._workers.append(worker)
        return worker

    def _worker(self) -> DriverWorker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._new_worker()

    def _call(self, op: str, pid: int, **extra) -> dict:
        timeout = self.timeouts.for_call(op, self._gpu_bytes(pid))
        request = {"op": op, "pid": pid, **extra}
        if op == "lock":
            request["timeout_ms"] = int(self.timeouts.lock_s * 1000)
        worker = self._worker()
        try:
            answer = worker.call(request, timeout)
        finally:
            self._idle.put(worker)
        if not answer.get("ok"):
            raise CudaCallFailed(op, pid, int(answer.get("code", -1)), str(answer.get("error")))
        return answer

    def _each(self, op: str, pids: Sequence[int], **extra) -> tuple[list[int], dict[int, GpuError]]:
        """Run `op` on every pid (in parallel); which succeeded, and why the others failed."""
        done: list[int] = []
        failed: dict[int, GpuError] = {}

        def one(pid: int) -> None:
            try:
                self._call(op, pid, **extra)
                done.append(pid)
            except GpuError as exc:
                failed[pid] = exc

        if len(pids) <= 1 or self.max_parallel == 1:
            for pid in pids:
                one(pid)
        else:
            with ThreadPoolExecutor(max_workers=min(len(pids), self.max_parallel)) as pool:
                list(pool.map(one, pids))
        return [p for p in pids if p in done], failed

    def _gpu_bytes(self, pid: int) -> int:
        if pid in self._bytes:
            return self._bytes[pid]
        if self._fallback_bytes is None:
            inventory = gpu_inventory.read_inventory()
            self._fallback_bytes = inventory.memory_total if inventory and inventory.count else FALLBACK_GPU_BYTES
        return self._fallback_bytes

    # -- the protocol

    def state(self, pid: int) -> CudaState | None:
        """The driver's view of `pid`; None if it is not a CUDA process (or is gone)."""
        try:
            answer = self._call("state", pid)
        except CudaCallFailed as exc:
            if exc.code == CUDA_ERROR_NOT_INITIALIZED:
                return None
            if exc.code == CUDA_ERROR_OPERATING_SYSTEM and not os.path.exists(f"/proc/{pid}"):
                return None
            raise
        try:
            return CudaState(answer["state"])
        except ValueError:
            raise GpuError(f"pid {pid}: unknown CUDA process state {answer['state']}") from None

    def cuda_processes(self, pids: Iterable[int]) -> list[int]:
        """The PIDs among `pids` that hold /dev/nvidia* open (have a live CUDA context)."""
        return [pid for pid in pids if nvidia_files(pid)]

    def suspend(self, pids: Iterable[int]) -> list[int]:
        """Lock and checkpoint every CUDA process among `pids`; all or nothing.

        Must run while the processes run: on driver 580 every call, GetState included,
        hangs on a stopped process. Returns the PIDs now checkpointed; on failure every
        touched process is back to running and GpuError (GpuTimeout for a hung call) is
        raised with what went wrong. After a GpuTimeout whose rollback could not finish
        ("rollback incomplete"), call resume(pids) once the tree runs again.
        """
        self.last_timings = {}
        pids = list(dict.fromkeys(pids))
        candidates = self.cuda_processes(pids)
        if not candidates:
            return []
        usage = self._gpu_memory() or {}
        for pid in candidates:
            if pid in usage:
                self._bytes[pid] = usage[pid]
        self.last_timings["gpu_bytes"] = float(sum(usage.get(pid, 0) for pid in candidates))

        states: dict[int, CudaState] = {}
        for pid in candidates:
            state = self.state(pid)
            if state is None:
                raise GpuError(
                    f"pid {pid} holds {', '.join(nvidia_files(pid)) or '/dev/nvidia*'} "
                    "but the CUDA driver does not know it as a CUDA process"
                )
            if state not in (CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED):
                raise GpuError(f"pid {pid} is in CUDA state {state.name.lower()}, cannot checkpoint it")
            states[pid] = state

        to_lock = [p for p in candidates if states[p] is CudaState.RUNNING]
        started = time.monotonic()
        _, failed = self._each("lock", to_lock)
        self.last_timings["lock_s"] = time.monotonic() - started
        if failed:
            self._roll_back(candidates, failed, "lock")
        to_checkpoint = [p for p in candidates if states[p] is not CudaState.CHECKPOINTED]
        started = time.monotonic()
        _, failed = self._each("checkpoint", to_checkpoint)
        self.last_timings["checkpoint_s"] = time.monotonic() - started
        if failed:
            self._roll_back(candidates, failed, "checkpoint")
        log.info(
            "GPU state of %s checkpointed (lock %.1f s, checkpoint %.1f s)",
            candidates, self.last_timings["lock_s"], self.last_timings["checkpoint_s"],
        )
        return candidates

    def _roll_back(self, pids: list[int], failed: dict[int, GpuError], step: str) -> None:
        first_pid, first = next(iter(failed.items()))
        problems = []
        try:
            self._to_running(pids)
        except GpuError as exc:
            problems.append(str(exc))
        outcome = "rolled back" if not problems else f"rollback incomplete: {'; '.join(problems)}"
        cls = GpuTimeout if isinstance(first, GpuTimeout) else GpuError
        raise cls(f"GPU {step} failed for pid {first_pid}: {first}; {outcome}") from first

    def resume(
        self,
        pids: Iterable[int],
        *,
        gpu_bytes: Mapping[int, int] | None = None,
        gpu_pairs: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        """Restore then unlock every process among `pids` the driver holds locked or checkpointed.

        Works on the processes of a suspend() as on processes `criu restore` brought back
        (state "checkpointed", no /dev/nvidia* open). They must be running (thawed).
        `gpu_bytes` (pid -> bytes, e.g. from the manifest) sizes the watchdogs; `gpu_pairs`
        (gpu_inventory.gpu_pairs(recorded, here)) moves them onto other GPUs. Returns the
        PIDs resumed; raises GpuError naming those that could not be.
        """
        self.last_timings = {}
        if gpu_bytes:
            self._bytes.update(gpu_bytes)
        return self._to_running(list(dict.fromkeys(pids)), gpu_pairs)

    def _to_running(self, pids: list[int], gpu_pairs: Sequence[tuple[str, str]] = ()) -> list[int]:
        states = {}
        problems = []
        for pid in pids:
            try:
                state = self.state(pid)
            except GpuError as exc:
                problems.append(f"pid {pid}: {exc}")
                continue
            if state is not None and state is not CudaState.RUNNING:
                states[pid] = state
        to_restore = [p for p, s in states.items() if s is CudaState.CHECKPOINTED]
        started = time.monotonic()
        extra = {"gpu_pairs": [list(p) for p in gpu_pairs]} if gpu_pairs else {}
        restored, failed = self._each("restore", to_restore, **extra)
        self.last_timings["restore_s"] = time.monotonic() - started
        problems += [f"pid {p}: {e}" for p, e in failed.items()]
        to_unlock = [p for p, s in states.items() if s is CudaState.LOCKED] + restored
        started = time.monotonic()
        unlocked, failed = self._each("unlock", to_unlock)
        self.last_timings["unlock_s"] = time.monotonic() - started
        problems += [f"pid {p}: {e}" for p, e in failed.items()]
        problems += [
            f"pid {p}: CUDA state {s.name.lower()}"
            for p, s in states.items()
            if s not in (CudaState.CHECKPOINTED, CudaState.LOCKED)
        ]
        if problems:
            raise GpuError(f"GPU resume incomplete: {'; '.join(problems)}")
        for pid in unlocked:
            self._bytes.pop(pid, None)
        return unlocked


def open_checkpointer(**kwargs) -> GpuCheckpointer | None:
    """GpuCheckpointer.open(): a checkpointer, or None on a node without GPU checkpointing."""
    return GpuCheckpointer.open(**kwargs)
