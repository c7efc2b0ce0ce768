"""Does the store's filesystem take POSIX ACLs? Asked once, at agent start and by
`slurm-mm config check`.

Images are root's and readable by their owner through an ACL entry (acl.py). Without
ACLs (some NFSv4 mounts, ramfs, ...) the only way left to let the owner read them is
group ownership by the job's primary group, and then every user of that group can read
every image of that group, that is, each other's memory. So the agent refuses such a
store unless the site says (`no_acl_fallback: group`) that every user has a private
primary group, where the group is the user.

The probe writes one empty root-only file in the store's root (or the nearest existing
directory above it, where the root will be made) and removes it again.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from slurm_mm.config import Config
from slurm_mm.errors import ConfigError
from slurm_mm.store import acl

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP)


def probe_dir(root: Path) -> Path:
    """The directory the probe runs in: root, or the nearest existing one above it."""
    path = root
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def supports_acls(directory: Path) -> bool:
    """Whether a file created in `directory` takes an access ACL. OSError if it cannot be
    probed (not writable, ...)."""
    name = directory / f".slurm_mm-acl-probe-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.setxattr(fd, acl.XATTR, acl.owner_read_acl(os.geteuid(), directory=False))
        return True
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(name)


def require_acls(cfg: Config) -> None:
    """ConfigError (one line) when the store's filesystem has no ACLs and the site has not
    chosen the private-group fallback."""
    if cfg.no_acl_fallback == "group":
        return
    where = probe_dir(cfg.checkpoint_root)
    try:
        ok = supports_acls(where)
    except OSError as exc:
        raise ConfigError(f"checkpoint_root '{cfg.checkpoint_root}': cannot check for POSIX ACL support "
                          f"in {where}: {exc.strerror}") from None
    if not ok:
        raise ConfigError(
            f"checkpoint_root '{cfg.checkpoint_root}' is on a filesystem without POSIX ACLs: images would be "
            "readable by the job's whole primary group; set no_acl_fallback: group only if every user has a "
            "private primary group (docs/admin-guide.md)")
