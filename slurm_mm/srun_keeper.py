"""Runs Slurm's `srun` for a step of an enrolled job and writes its exit code to a file.

The node agent starts this (as the job's user) instead of `srun` itself: the agent is
srun's parent only until it restarts, and a restarted agent cannot wait for a process it
did not start. This keeper stays srun's parent and writes srun's exit code (128+N when
killed by signal N) to the descriptor the agent opened on its record of the step
(agent/job_records.py), where a restarted agent reads it. Its own exit code is the same.

    python -I -m slurm_mm.srun_keeper STATUS_FD srun ARGS...
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: srun_keeper STATUS_FD COMMAND [ARGS...]", file=sys.stderr)
        return 2
    fd = int(argv[0])
    try:
        rc = subprocess.call(argv[1:])
    except OSError as exc:
        print(f"slurm_mm: cannot run {argv[1]}: {exc.strerror}", file=sys.stderr)
        rc = 127
    code = rc if rc >= 0 else 128 - rc
    try:
        os.write(fd, f"{code}\n".encode())
        os.close(fd)
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
