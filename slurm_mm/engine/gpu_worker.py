"""The process that makes CUDA driver checkpoint calls on slurm_mm's behalf.

The driver's checkpoint calls can block forever (on a stopped or frozen target they
never return), and a thread stuck in the driver cannot be stopped. So every call runs
here, in a child process that the caller can kill: `slurm_mm.engine.gpu` starts this
file as a script (`python -I gpu_worker.py`), sends one JSON request per line on stdin
and reads one JSON answer per line on stdout, and kills the process when an answer is
late.

It trusts only its parent: requests come from the pipe, nothing is read from files or
the environment beyond what libcuda itself reads. It imports nothing but the standard
library, so it runs under `-I` from any directory. It must never decide anything:
one request, one driver call, one answer.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time

LIBCUDA = "libcuda.so.1"
CUDA_SUCCESS = 0

# The checkpoint entry points, in the order a driver gained them (550 on Linux).
SYMBOLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessGetRestoreThreadId",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


class LockArgs(ctypes.Structure):
    """CUcheckpointLockArgs: 64 bytes, only timeoutMs is used; the rest must be zero."""

    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class GpuPair(ctypes.Structure):
    """CUcheckpointGpuPair: the UUID a process was checkpointed on, the one to restore onto."""

    _fields_ = [("oldUuid", ctypes.c_ubyte * 16), ("newUuid", ctypes.c_ubyte * 16)]


class RestoreArgs(ctypes.Structure):
    """CUcheckpointRestoreArgs: 64 bytes; gpuPairs/gpuPairsCount first, the rest zero."""

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_ubyte * 52),
    ]


assert ctypes.sizeof(LockArgs) == 64 and ctypes.sizeof(RestoreArgs) == 64


class Driver:
    """libcuda's checkpoint API, loaded and initialised; raises RuntimeError if unusable."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL(LIBCUDA)
        except OSError as exc:
            raise RuntimeError(f"{LIBCUDA} not loadable: {exc}") from None
        self.version = ctypes.c_int(0)
        if self.lib.cuDriverGetVersion(ctypes.byref(self.version)) != CUDA_SUCCESS:
            self.version.value = 0
        rc = self.lib.cuInit(0)
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"cuInit(0) failed: {self.error_name(rc)}")
        missing = [name for name in SYMBOLS if not hasattr(self.lib, name)]
        if missing:
            raise RuntimeError(
                f"driver (CUDA {self.version.value}) lacks the checkpoint API: no {missing[0]}"
            )
        for name in SYMBOLS:
            getattr(self.lib, name).restype = ctypes.c_int

    def error_name(self, rc: int) -> str:
        name = ctypes.c_char_p()
        try:
            if self.lib.cuGetErrorName(rc, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
                return name.value.decode()
        except AttributeError:
            pass
        return f"CUresult {rc}"

    def call(self, request: dict) -> dict:
        op = request.get("op")
        pid = int(request.get("pid", 0))
        if op == "state":
            out = ctypes.c_int(-1)
            rc = self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(out))
            return self._answer(rc, state=out.value)
        if op == "restore_tid":
            out = ctypes.c_int(0)
            rc = self.lib.cuCheckpointProcessGetRestoreThreadId(pid, ctypes.byref(out))
            return self._answer(rc, tid=out.value)
        if op == "lock":
            args = LockArgs(timeoutMs=int(request.get("timeout_ms", 0)))
            return self._answer(self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)))
        if op == "checkpoint":
            return self._answer(self.lib.cuCheckpointProcessCheckpoint(pid, None))
        if op == "restore":
            pairs = request.get("gpu_pairs") or []
            if not pairs:
                return self._answer(self.lib.cuCheckpointProcessRestore(pid, None))
            array = (GpuPair * len(pairs))()
            for slot, (old, new) in zip(array, pairs):
                slot.oldUuid[:] = bytes.fromhex(old)
                slot.newUuid[:] = bytes.fromhex(new)
            args = RestoreArgs(gpuPairs=array, gpuPairsCount=len(pairs))
            return self._answer(self.lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)))
        if op == "unlock":
            return self._answer(self.lib.cuCheckpointProcessUnlock(pid, None))
        return {"ok": False, "code": -1, "error": f"unknown op {op!r}"}

    def _answer(self, rc: int, **values: int) -> dict:
        if rc == CUDA_SUCCESS:
            return {"ok": True, **values}
        return {"ok": False, "code": rc, "error": self.error_name(rc)}


def _die_with_parent() -> None:
    # An orphaned worker could finish a lock nobody will undo: go when the parent goes.
    # Not PR_SET_PDEATHSIG: that fires when the parent *thread* ends, and slurm_mm
    # starts workers from short-lived pool threads. The watcher runs while the main
    # thread is inside the driver, since ctypes releases the GIL around foreign calls.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        driver = Driver()
    except RuntimeError as exc:
        _send({"ready": False, "reason": str(exc)})
        return 0
    _send({"ready": True, "driver_version": driver.version.value})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = driver.call(request)
        except (ValueError, TypeError, KeyError) as exc:
            answer = {"ok": False, "code": -1, "error": f"bad request: {exc}"}
        _send(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
