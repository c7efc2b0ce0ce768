"""Asking a node agent something (used by the `slurm-mm` CLI)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from slurm_mm.agent import protocol
from slurm_mm.errors import AgentUnavailable, SlurmMMError, by_kind


def request(path: Path, message: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"no node agent at {path} ({exc.strerror})") from None
    with sock:
        protocol.send(sock, message)
        try:
            reply, fds = protocol.recv(sock)
        except (EOFError, OSError, protocol.ProtocolError) as exc:
            raise SlurmMMError(f"node agent at {path} did not answer: {exc}") from None
    for fd in fds:
        import os  # noqa: PLC0415

        os.close(fd)
    if reply["op"] == "error":
        raise by_kind(reply.get("kind"), str(reply.get("message", "unknown error")))
    return reply
