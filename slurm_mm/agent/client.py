"""Asking a node agent something (used by the `slurm-mm` CLI)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from slurm_mm.agent import protocol
from slurm_mm.errors import PermissionDenied, SlurmMMError


class AgentUnavailable(SlurmMMError):
    """No agent answers on that socket (wrong node, or the agent is down)."""


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
        text = str(reply.get("message", "unknown error"))
        if "may not" in text or "belongs to" in text:
            raise PermissionDenied(text)
        raise SlurmMMError(text)
    return reply
