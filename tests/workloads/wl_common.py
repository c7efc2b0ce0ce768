"""Shared protocol of the Python workloads (zdtm style).

A workload builds its state, prints READY, keeps working until a file named GO appears
in its working directory (the harness creates it after checkpoint + restore), then
checks its own state, prints "PASS: ..." or "FAIL: ...", and exits 0 or 1.
Standard library only: workloads run as an unprivileged user with the system python3.
"""

import os
import sys
import time


def ready(detail: str = "") -> None:
    print(f"READY {detail}".rstrip(), flush=True)


def go_given() -> bool:
    return os.path.exists("GO")


def wait_go(step: float = 0.02, work=None) -> None:
    """Call work() (if any) every `step` seconds until GO appears."""
    while not go_given():
        if work is not None:
            work()
        time.sleep(step)


def verdict(ok: bool, detail: str, code_if_pass: int = 0) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {detail}", flush=True)
    sys.exit(code_if_pass if ok else 1)
