"""Where the engine's native programs are: mm-init, libmm_prlimit.so and libmm_unixsk.so.

Root runs these, so they are looked up only in root-controlled places: the installed
libexec directory, then the package's own build directory (a development checkout,
`make -C slurm_mm/native`). Never PATH, never the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from slurm_mm.errors import ConfigError

INSTALLED_LIBEXEC = Path("/opt/slurm_mm/libexec")
BUILD_DIR = Path(__file__).resolve().parent.parent / "native"

MM_INIT = "mm-init"
PRLIMIT_SHIM = "libmm_prlimit.so"
UNIXSK_SHIM = "libmm_unixsk.so"

# CAP_SYS_RESOURCE: without it, root cannot read a user process's rlimits.
CAP_SYS_RESOURCE = 24


def find(name: str, libexec: str | os.PathLike | None = None) -> Path:
    """The path of native program `name`; ConfigError if it was not built/installed."""
    places = [Path(libexec).absolute()] if libexec else [INSTALLED_LIBEXEC, BUILD_DIR]
    for place in places:
        candidate = place / name
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{name} not found in {', '.join(str(p) for p in places)} "
        "(build it: make -C slurm_mm/native install)"
    )


def installed_inits(libexec: str | os.PathLike | None = None) -> list[Path]:
    """Every mm-init a restored tree's root init may run: the current one (where launch()
    finds it) and the versioned builds an upgrade keeps (mm-init-<id>) for older images,
    root-owned files only. `libexec`: the site's directory (config libexec_dir), else the
    default places."""
    places = [Path(libexec).absolute()] if libexec else [INSTALLED_LIBEXEC, BUILD_DIR]
    found = []
    for place in places:
        if (place / MM_INIT).is_file():
            found.append(place / MM_INIT)
        if place.is_dir():
            found += sorted(p for p in place.glob(f"{MM_INIT}-*")
                            if p.is_file() and not p.is_symlink() and p.stat().st_uid == 0)
    return found


def has_cap_sys_resource() -> bool:
    """Whether this process's effective capabilities include CAP_SYS_RESOURCE."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False
