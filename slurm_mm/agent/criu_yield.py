"""An ordinary dump gives the node's CRIU gate up when a stopping dump waits for it.

The gate serves stopping dumps (preemption, drain) first, but only once the current
holder is done; a periodic or manual dump that hangs (a file on a FUSE or dead NFS
mount) would hold it until `timeouts.checkpoint`, past another job's GraceTime. So
while an ordinary dump runs, a watchdog looks at the gate: when a stopping dump has
waited YIELD_AFTER seconds, the ordinary dump's criu is killed. That dump fails, its
job runs on with its earlier images (a failed dump never harms the job), and the
stopping dump gets the gate.

Kills only criu processes that are this agent's own children and dump `init_pid`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slurm_mm.agent.criu_gate import CriuGate

log = logging.getLogger(__name__)

YIELD_AFTER = 2.0  # seconds a stopping dump waits before an ordinary one is cut short
POLL = 0.25


def _own_criu_dumps(criu: Path, init_pid: int) -> list[int]:
    """PIDs of this process's children running `criu dump ... --tree init_pid ...`."""
    me = os.getpid()
    found = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            kids = Path(f"/proc/{me}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:2] != [str(criu).encode(), b"dump"] or b"--tree" not in argv:
                continue
            at = argv.index(b"--tree") + 1
            if at < len(argv) and argv[at] == str(init_pid).encode():
                found.append(int(kid))
    return found


@contextmanager
def yields_to_urgent(gate: CriuGate, criu: Path, init_pid: int, *, after: float = YIELD_AFTER) -> Iterator[None]:
    """Run an ordinary dump of `init_pid`; cut it short when a stopping dump waits."""
    done = threading.Event()

    def watch() -> None:
        waited_since: float | None = None
        while not done.wait(POLL):
            if not gate.urgent_waiting():
                waited_since = None
                continue
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since < after:
                continue
            killed = False
            for pid in _own_criu_dumps(criu, init_pid):
                log.warning("a stopping dump waits for CRIU: killing the ordinary dump of pid %d (criu %d)",
                            init_pid, pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                except ProcessLookupError:
                    pass
            if killed:
                return
            # Between two criu runs (or before the first): the next one is cut short.

    thread = threading.Thread(target=watch, name=f"criu-yield-{init_pid}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
