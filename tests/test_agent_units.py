"""Pure logic of the node agent: staging choice, root-only dirs, peer auth parsing."""

from __future__ import annotations

import os
import socket

import pytest

from slurm_mm.agent import auth, protocol
from slurm_mm.agent.staging import fits, root_only_dir, tree_resident_bytes
from slurm_mm.errors import PermissionDenied


def test_staging_fits_only_what_leaves_the_reserve_free(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert fits(tmp_path, 1 << 20, 0.0)
    assert not fits(tmp_path, free + (1 << 30), 0.0)
    assert not fits(tmp_path, 1 << 20, 0.9999)  # a reserve larger than what is free


def test_tree_resident_bytes_counts_this_process():
    assert tree_resident_bytes([os.getpid()]) > 1 << 20
    assert tree_resident_bytes([2 ** 22 + 12345]) == 0  # gone: counts nothing


def test_root_only_dir_refuses_an_open_parent(tmp_path):
    parent = tmp_path / "p"
    parent.mkdir(mode=0o700)
    made = root_only_dir(parent / "x")
    assert made.is_dir() and (os.stat(made).st_mode & 0o777) == 0o700
    os.chmod(parent, 0o777)
    with pytest.raises(PermissionDenied, match="root-only"):
        root_only_dir(parent / "y")


def test_a_process_outside_slurm_is_no_batch_step():
    assert auth.batch_step_job(os.getpid(), "n1") is None


def test_messages_carry_descriptors_and_peer_credentials(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    protocol.send(a, {"op": "start", "x": 1}, fds=[w])
    message, fds = protocol.recv(b)
    assert message == {"op": "start", "x": 1} and len(fds) == 1
    os.write(fds[0], b"hi")
    assert os.read(r, 2) == b"hi"
    pid, uid, _gid = protocol.peer_credentials(b)
    assert pid == os.getpid() and uid == os.geteuid()
    for fd in (r, w, *fds):
        os.close(fd)


def test_oversized_or_opless_messages_are_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall((protocol.MAX_MESSAGE + 1).to_bytes(4, "big"))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.recv(b)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c.sendall(len(b"[1]").to_bytes(4, "big") + b"[1]")
    with pytest.raises(protocol.ProtocolError, match="no 'op'"):
        protocol.recv(d)
