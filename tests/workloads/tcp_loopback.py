"""A TCP connection on loopback with both ends in the tree, exchanging sequenced messages.

The parent listens on 127.0.0.1 and serves; a child connects and sends n, the server
answers n+1, the client checks it and sends n+2, ... At GO the client sends a stop
message and exits 0 if it never saw a wrong number; the server checks the same, then
proves its restored listening socket still accepts a new connection.
"""

import os
import socket
import struct
import time

import wl_common

STOP = -1
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(4)
port = listener.getsockname()[1]


def recv8(s: socket.socket) -> int:
    buf = b""
    while len(buf) < 8:
        part = s.recv(8 - len(buf))
        if not part:
            raise EOFError
        buf += part
    return struct.unpack("q", buf)[0]


child = os.fork()
if child == 0:
    listener.close()
    c = socket.create_connection(("127.0.0.1", port))
    n, errors = 0, 0
    while not wl_common.go_given():
        c.sendall(struct.pack("q", n))
        reply = recv8(c)
        if reply != n + 1:
            errors += 1
        n = reply + 1
        time.sleep(0.002)
    c.sendall(struct.pack("q", STOP))
    os._exit(0 if errors == 0 and n > 0 else 1)

conn, _ = listener.accept()
wl_common.ready(f"port={port}")
expected, errors, exchanges = 0, 0, 0
while True:
    v = recv8(conn)
    if v == STOP:
        break
    if v != expected:
        errors += 1
    conn.sendall(struct.pack("q", v + 1))
    expected = v + 2
    exchanges += 1
code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
probe = socket.create_connection(("127.0.0.1", port), timeout=5)
extra, _ = listener.accept()
probe.sendall(b"x")
accepted = extra.recv(1) == b"x"
ok = errors == 0 and code == 0 and accepted and exchanges > 0
wl_common.verdict(ok, f"{exchanges} exchanges, {errors} errors, client exit {code}, listener accepts: {accepted}")
