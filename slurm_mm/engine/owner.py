"""Who a restored or launched application runs as: its uid, gid and supplementary groups.

One place decides the groups (the passwd database's, plus the job's gid), so a launch, a
restore by the agent and a restore by the CLI give a job the same credentials.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


def owner_groups(uid: int, gid: int | None = None) -> list[int]:
    """The groups a process of `uid` holds: its passwd groups with `gid` (its passwd
    primary group when None). KeyError: `uid` has no passwd entry and no gid is given."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        if gid is None:
            raise
        return [gid]
    primary = pw.pw_gid if gid is None else gid
    return sorted(set(os.getgrouplist(pw.pw_name, primary)) | {primary})


@dataclass(frozen=True)
class Owner:
    """The credentials a job's processes hold (never root: see JobCheckpointer.restorable)."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, uid: int, gid: int) -> Owner:
        return cls(uid, gid, tuple(owner_groups(uid, gid)))
