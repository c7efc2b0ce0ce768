"""`srun` inside an enrolled job's tree: a stand-in that a checkpoint can carry.

The real `srun` client holds connections to the step's slurmstepd, which no image can
bring back. So in an enrolled job, `srun` on the PATH is this stand-in: it hands its
argv, environment, working directory and stdin/stdout/stderr to the node agent, which
runs the real `srun` outside the job's tree (as the job's user) and starts the step's
tasks under slurm_mm. The stand-in then holds nothing but its stdio and waits for the
step's exit code in a file the agent writes, polling: a dump can take it at any moment,
and after a restore the agent relaunches the step (restoring its tasks) and writes the
new srun's exit code to the same file. Runs as the job's user; holds no privilege.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from slurm_mm.agent import protocol

POLL_SECONDS = 0.2


def say(text: str) -> None:
    print(f"slurm_mm: {text}", file=sys.stderr, flush=True)


def real_srun(argv: list[str]) -> None:
    """No agent to hand the step to: run Slurm's srun directly (the job is then refused
    checkpoints while the step runs, as for any srun in its tree)."""
    path = os.environ.get("PATH", "")
    shim = os.environ.get("SLURM_MM_STEPS_BIN", "")
    os.environ["PATH"] = ":".join(p for p in path.split(":") if p and p != shim)
    os.execvp("srun", ["srun", *argv])


def wait_exit_file(path: str) -> int:
    while True:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
            if text:
                return int(text)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(POLL_SECONDS)


def main() -> int:
    argv = sys.argv[1:]
    sock_path = os.environ.get("SLURM_MM_STEPS_SOCKET", "")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(sock_path)
    except OSError:
        real_srun(argv)
        return 1  # not reached
    with sock:
        protocol.send(sock, {"op": "srun", "job_id": os.environ.get("SLURM_JOB_ID", ""), "argv": argv,
                             "env": dict(os.environ), "cwd": os.getcwd()}, fds=[0, 1, 2])
        try:
            reply, fds = protocol.recv(sock)
        except (EOFError, OSError, protocol.ProtocolError) as exc:
            say(f"error: lost the node agent while starting a step ({exc})")
            return 1
        for fd in fds:
            os.close(fd)
    if reply.get("op") == "unprotected":
        real_srun(argv)
    if reply.get("op") != "srun-started" or not isinstance(reply.get("exit_file"), str):
        say(f"error: {reply.get('message', 'the node agent refused the step')}")
        return 1
    # From here on this process holds only its stdio: it can be dumped and restored.
    return wait_exit_file(reply["exit_file"])


if __name__ == "__main__":
    sys.exit(main())
