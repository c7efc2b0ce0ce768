"""A stand-in for gpu_worker.py that keeps CUDA process states in a JSON file.

For unit tests of the orchestration (ordering, rollback, watchdog) on machines without
a GPU; the real driver is exercised by validate_gpu.py on the GPU machine. It follows
the driver's state machine (lock: running->locked, checkpoint: locked->checkpointed,
restore: checkpointed->locked, unlock: locked->running) and the file says which calls
fail or hang:

    {"states": {"100": 0}, "fail": {"checkpoint:101": 2}, "hang": ["lock:102"],
     "calls": []}

Unknown PIDs answer like a non-CUDA process (CUDA_ERROR_NOT_INITIALIZED). Every call
is appended to "calls" so tests can check the order. Usage: fake_driver_worker.py FILE
[--not-ready REASON].
"""

import fcntl
import json
import sys
import time

RUNNING, LOCKED, CHECKPOINTED = 0, 1, 2
MOVES = {"lock": (RUNNING, LOCKED), "checkpoint": (LOCKED, CHECKPOINTED),
         "restore": (CHECKPOINTED, LOCKED), "unlock": (LOCKED, RUNNING)}


def step(path: str, op: str, pid: str) -> tuple[dict, bool]:
    """Apply one call to the world file under a lock (workers run in parallel)."""
    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        world = json.load(handle)
        world.setdefault("calls", []).append(f"{op}:{pid}")
        key = f"{op}:{pid}"
        states = world.setdefault("states", {})
        hang = key in world.get("hang", [])
        if hang:
            answer = {}
        elif key in world.get("fail", {}):
            answer = {"ok": False, "code": world["fail"][key], "error": "CUDA_ERROR_INJECTED"}
        elif pid not in states:
            answer = {"ok": False, "code": 3, "error": "CUDA_ERROR_NOT_INITIALIZED"}
        elif op == "state":
            answer = {"ok": True, "state": states[pid]}
        elif op in MOVES:
            before, after = MOVES[op]
            if states[pid] != before:
                answer = {"ok": False, "code": 401, "error": "CUDA_ERROR_ILLEGAL_STATE"}
            else:
                states[pid] = after
                answer = {"ok": True}
        else:
            answer = {"ok": False, "code": 1, "error": "CUDA_ERROR_INVALID_VALUE"}
        handle.seek(0)
        handle.truncate()
        json.dump(world, handle)
    return answer, hang


def main() -> int:
    path = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "--not-ready":
        print(json.dumps({"ready": False, "reason": sys.argv[3]}), flush=True)
        return 0
    print(json.dumps({"ready": True, "driver_version": 13000}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer, hang = step(path, request["op"], str(request["pid"]))
        if hang:
            time.sleep(3600)
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
