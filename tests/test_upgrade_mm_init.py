"""Upgrading mm-init never strands an image (real CRIU, real processes, a scratch prefix).

CRIU records the path of mm-init (the init of every job's tree) in each image and
refuses a restore when the file there has another build-ID. `make install` therefore
installs each build as libexec/mm-init-<hash> and points libexec/mm-init at the newest:
an image taken before an upgrade restores with the build it recorded.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from engine_fixtures import REPO, engine_env, needs_root, workload  # noqa: F401
from slurm_mm.engine import wait_gone
from slurm_mm.errors import SlurmMMError

pytestmark = needs_root


def install_build(src: Path, prefix: Path, build_id: str) -> None:
    """Build mm-init from a copy of slurm_mm/native with its own build-ID, `make install` it."""
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "slurm_mm" / "native", src,
                    ignore=shutil.ignore_patterns("mm-init", "*.so", "*.o"))
    subprocess.run(["make", "-s", "-C", str(src), "install", f"PREFIX={prefix}",
                    f"LDFLAGS=-Wl,--build-id=0x{build_id}"], check=True, capture_output=True)


def build_ids(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


def test_image_taken_before_an_mm_init_upgrade_restores(workload, engine_env, tmp_path):
    prefix = engine_env.base / f"prefix-{secrets.token_hex(4)}"
    libexec = prefix / "libexec"
    old_id, new_id = secrets.token_hex(20), secrets.token_hex(20)
    install_build(tmp_path / "src", prefix, old_id)
    old_build = libexec / os.readlink(libexec / "mm-init")
    assert build_ids(old_build) == old_id

    w = workload("counter.py")
    w.env = dataclasses.replace(w.env, libexec=libexec)
    w.start()
    exe = os.readlink(f"/proc/{w.tree.init_pid}/exe")
    assert exe == str(old_build), "the tree runs the versioned build, so images record it"
    result = w.checkpoint(tmp_path / "img", leave_running=False)
    assert w.tree.wait(10) == 137
    assert wait_gone(result.pids, 5, zombies_count=False) == []

    install_build(tmp_path / "src", prefix, new_id)  # the upgrade
    new_build = libexec / os.readlink(libexec / "mm-init")
    assert new_build != old_build and build_ids(new_build) == new_id
    assert old_build.is_file(), "the upgrade removed the build older images need"

    # Control: had the upgrade replaced the old file in place, CRIU would refuse the image.
    saved = tmp_path / "saved-old-build"
    shutil.copy2(old_build, saved)
    shutil.copy2(new_build, old_build)
    with pytest.raises(SlurmMMError):
        w.restore(tmp_path / "img", out_name="refused.log")
    shutil.copy2(saved, old_build)

    restored = w.restore(tmp_path / "img")
    w.go()
    code = restored.wait(60)
    out = w.text("restored.log")
    assert code == 0 and "PASS" in out, f"exit {code}, output {out!r}"
