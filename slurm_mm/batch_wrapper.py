"""`slurm-mm-run`: the batch task of an enrolled job (runs as the job's user).

The SPANK plugin points the batch task's argv[0] here and passes the real script in
SLURM_MM_SCRIPT. This process stays the batch step's task: it hands its stdin/stdout/
stderr and the job's command to the node agent, which starts the job in its own PID
namespace (or restores it from an image), relays the signals Slurm sends it (Slurm
signals only slurmstepd's direct children; docs/design.md) and exits with the job's exit
status. It holds no privilege and decides nothing about images. When the agent
restarts (an upgrade, a crash), the job's tree runs on: this process reconnects with a
`reattach` request and the new agent takes the job over (agent/adopt.py); signals that
came meanwhile are relayed then.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from types import FrameType

from slurm_mm import defaults
from slurm_mm.agent import protocol

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGTSTP, signal.SIGCONT, signal.SIGALRM)
DEFAULT_SOCKET = defaults.AGENT_SOCKET
REATTACH_SECONDS = 120.0  # how long a restarting agent may take to come back


def say(text: str) -> None:
    print(f"slurm_mm: {text}", file=sys.stderr, flush=True)


def run_unprotected(argv: list[str], why: str) -> None:
    say(f"{why}; the job runs without checkpoints")
    os.execv(argv[0], argv)


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    return sock


def main() -> int:
    script = os.environ.get("SLURM_MM_SCRIPT")
    if not script:
        say("SLURM_MM_SCRIPT is not set: slurm-mm-run is started by the slurm_mm SPANK plugin")
        return 1
    argv = [script, *sys.argv[1:]]
    node = os.environ.get("SLURMD_NODENAME", "")
    path = protocol.socket_path(os.environ.get("SLURM_MM_AGENT_SOCKET", DEFAULT_SOCKET), node)
    try:
        sock = connect(path)
    except OSError as exc:
        run_unprotected(argv, f"node agent not reachable at {path} ({exc.strerror})")
        return 1  # not reached
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_MM_SCRIPT", "SLURM_MM_AGENT_SOCKET")}
    request = {"op": "start", "job_id": os.environ.get("SLURM_JOB_ID", ""), "argv": argv,
               "env": env, "cwd": os.getcwd()}
    protocol.send(sock, request, fds=[0, 1, 2])
    link = {"sock": sock, "up": True}
    pending: list[int] = []

    def relay(signum: int, _frame: FrameType | None) -> None:
        if not link["up"]:
            pending.append(signum)  # relayed once a restarted agent has the job
            return
        try:
            protocol.send(link["sock"], {"op": "signal", "signal": signum})
        except OSError:
            pending.append(signum)

    for sig in RELAYED:
        signal.signal(sig, relay)
    # A short job can end before the agent's "started" reaches us: take the messages in
    # whatever order they come.
    while True:
        try:
            message, fds = protocol.recv(link["sock"])
        except (EOFError, OSError, protocol.ProtocolError) as exc:
            link["up"] = False
            link["sock"].close()
            say(f"lost the node agent ({exc}); reconnecting")
            again = reattach(path, {**request, "op": "reattach"})
            if again is None:
                say(f"error: the node agent did not come back within {REATTACH_SECONDS:.0f} s; "
                    "the job cannot be supervised")
                return 1
            link["sock"] = again
            continue
        for fd in fds:
            os.close(fd)
        if message["op"] == "refused":
            say(f"error: {message.get('message', 'the node agent refused the job')}")
            return 1
        if message["op"] == "reattached":
            say("the restarted node agent took the job over")
            link["up"] = True
            while pending:
                relay(pending.pop(0), None)
        if message["op"] == "exit":
            return int(message.get("status", 1))


def reattach(path: str, request: dict) -> socket.socket | None:
    """Reconnect to a restarting agent and ask it to take the job over (None: it did not
    come back in time)."""
    deadline = time.monotonic() + REATTACH_SECONDS
    while time.monotonic() < deadline:
        try:
            sock = connect(path)
        except OSError:
            time.sleep(1.0)
            continue
        try:
            protocol.send(sock, request, fds=[0, 1, 2])
            return sock
        except OSError:
            sock.close()
            time.sleep(1.0)
    return None


if __name__ == "__main__":
    sys.exit(main())
