"""POSIX access ACLs that let a job's owner read, never write, their images.

Image directories belong to root (PID 1 of a restored tree is root, so the images must
not be writable by the job's user), yet the owner should be able to list and read them.
An ACL entry user:<uid>:r-x (r-- on files) gives exactly that without adding the user to
any group. It is written as the kernel's binary xattr so no libacl or setfacl is needed.

Where the filesystem has no ACLs (EOPNOTSUPP), the fallback is group ownership by the
job's gid with mode 0750/0640: coarser (the whole group can read), so the caller logs it.
Never grants write to anyone but root.
"""

from __future__ import annotations

import errno
import os
import struct

XATTR = "system.posix_acl_access"
VERSION = 2

USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20
UNDEFINED_ID = 0xFFFFFFFF

READ, WRITE, EXECUTE = 4, 2, 1

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP)


def pack(entries: list[tuple[int, int, int]]) -> bytes:
    """Binary ACL: u32 version, then (u16 tag, u16 perm, u32 id) sorted by tag then id,
    the order the kernel requires (it rejects an unsorted ACL with EINVAL)."""
    body = b"".join(_ENTRY.pack(tag, perm, ident) for tag, perm, ident in sorted(entries))
    return _HEADER.pack(VERSION) + body


def unpack(data: bytes) -> list[tuple[int, int, int]]:
    """Inverse of pack(); ValueError on a malformed blob."""
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"ACL xattr has a bad length {len(data)}")
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"ACL xattr has version {version}, not {VERSION}")
    return [_ENTRY.unpack_from(data, off) for off in range(_HEADER.size, len(data), _ENTRY.size)]


def owner_read_acl(uid: int, *, directory: bool) -> bytes:
    """ACL for an image inode: root rwx/rw-, group r-x/r--, the job owner r-x/r--, others nothing.

    A MASK entry is mandatory once a named USER entry exists; it caps the owner at read.
    """
    read = READ | EXECUTE if directory else READ
    own = READ | WRITE | EXECUTE if directory else READ | WRITE
    return pack([
        (USER_OBJ, own, UNDEFINED_ID),
        (USER, read, uid),
        (GROUP_OBJ, read, UNDEFINED_ID),
        (MASK, read, UNDEFINED_ID),
        (OTHER, 0, UNDEFINED_ID),
    ])


def grant_owner_read(fd: int, uid: int, gid: int, *, directory: bool) -> bool:
    """Let `uid` read the inode open at `fd`. True with an ACL; False when the filesystem has
    none and group ownership by `gid` (mode 0750/0640) was used instead."""
    mode = 0o750 if directory else 0o640
    os.fchmod(fd, mode)
    try:
        os.setxattr(fd, XATTR, owner_read_acl(uid, directory=directory))
        return True
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    os.fchown(fd, -1, gid)
    # chown can clear set-id bits; set the mode again so it is exactly `mode`.
    os.fchmod(fd, mode)
    return False


def named_users(fd: int) -> list[int] | None:
    """uids with a named USER entry in the inode's access ACL; None if it has no ACL
    (or the filesystem has none)."""
    try:
        data = os.getxattr(fd, XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *_UNSUPPORTED):
            return None
        raise
    return [ident for tag, _perm, ident in unpack(data) if tag == USER]
