"""Messages between the node agent and its clients over a unix socket.

A message is a 4-byte big-endian length and a JSON object; file descriptors (the job's
stdin/stdout/stderr) travel with a message as SCM_RIGHTS. The agent trusts nothing in
a message that SO_PEERCRED and /proc do not confirm (see auth.py).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from typing import Any, Callable

from slurm_mm.errors import ProtocolError

__all__ = ["ProtocolError", "peer_credentials", "recv", "relay_signals", "send"]

MAX_MESSAGE = 4 * 1024 * 1024  # a job's argv + environment fit easily
MAX_SMALL_MESSAGE = 64 * 1024  # any request but a batch task's start
MAX_FDS = 8


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    payload = json.dumps(message).encode()
    data = struct.pack(">I", len(payload)) + payload
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], ancillary)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int, fds: list[int], deadline: float | None) -> bytes:
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer took too long to send its request")
            sock.settimeout(left)
        fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        data, ancdata, flags, _addr = sock.recvmsg(remaining, fd_space)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - (len(cdata) % got.itemsize)])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            fds.clear()
            raise ProtocolError("too many descriptors in one message")
        if not data:
            raise EOFError("peer closed the connection")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def recv(sock: socket.socket, *, max_size: int = MAX_MESSAGE,
         deadline: float | None = None) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it (the caller owns and closes them).

    `max_size`: larger messages are refused before their body is read. `deadline`
    (time.monotonic()): the whole message must have come by then, else TimeoutError;
    it leaves the socket with a timeout set.
    """
    fds: list[int] = []
    try:
        (size,) = struct.unpack(">I", _recv_exact(sock, 4, fds, deadline))
        if size > max_size:
            raise ProtocolError(f"message of {size} bytes exceeds {max_size}")
        payload = _recv_exact(sock, size, fds, deadline)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    try:
        message = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message is not JSON or has no 'op'")
    return message, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from the peer."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def socket_path(template: str, node: str) -> str:
    """Expand %n (node name) in a socket path, as plugstack.conf's agent_socket allows."""
    return template.replace("%n", node)


def relay_signals(sock: socket.socket, on_signal: Callable[[int], None], spacing: float = 0.0) -> None:
    """Hand each signal a task relays (`{"op": "signal", "signal": N}`) to `on_signal`,
    until the task goes away. `spacing`: seconds between two (a signal may ask slurmctld
    something: no floods)."""
    while True:
        try:
            relayed, extra = recv(sock, max_size=MAX_SMALL_MESSAGE)
        except (EOFError, OSError, ProtocolError):
            return
        for fd in extra:
            os.close(fd)
        if relayed.get("op") == "signal" and isinstance(relayed.get("signal"), int):
            on_signal(relayed["signal"])
        if spacing:
            time.sleep(spacing)
