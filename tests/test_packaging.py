"""The Debian package (debian/build-deb.sh, which runs `make venv install`): the layout a
site gets, and mm-init builds kept across upgrades so older images stay restorable.

Builds the .deb from this checkout (PyPI reachable for the venv's dependencies) and
inspects it extracted into a scratch root; never installs into the machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from slurm_mm import defaults

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["bash", str(REPO / "debian" / "build-deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (deb,) = out.glob("slurm-mm_*.deb")
    return deb


@pytest.fixture()
def root(deb, tmp_path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    return tmp_path


def postinst(root: Path) -> None:
    subprocess.run(["sh", str(REPO / "debian" / "postinst"), "configure"],
                   env={"DPKG_ROOT": str(root), "PATH": "/usr/bin:/bin"}, check=True, timeout=30)


def test_package_installs_what_plugstack_and_slurm_conf_name(root):
    assert (root / defaults.SPANK_PLUGIN.lstrip("/")).is_file()
    assert (root / defaults.RUN_WRAPPER.lstrip("/")).is_file()
    for hook in ("prolog", "epilog"):
        path = root / defaults.PROLOG_DIR.lstrip("/") / hook
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith(f"#!{defaults.PREFIX}/venv/bin/python -I\n")
    shipped = root / "opt/slurm_mm/share/slurm"
    assert {p.name for p in shipped.iterdir()} >= {"plugstack.conf", "slurm.conf.snippet",
                                                   "cli_filter.lua", "config.yaml"}
    assert defaults.SPANK_PLUGIN in (shipped / "plugstack.conf").read_text()
    assert f"Prolog={defaults.PROLOG_DIR}/prolog" in (shipped / "slurm.conf.snippet").read_text()
    assert (root / "lib/systemd/system/slurm-mm-agent.service").is_file()
    assert "/run/slurm_mm" in (root / "usr/lib/tmpfiles.d/slurm_mm.conf").read_text()


def test_commands_are_on_the_system_path_and_run(root):
    for name in ("slurm-mm", "slurm-mm-run"):
        link = root / "usr/bin" / name
        assert os.readlink(link) == f"{defaults.PREFIX}/venv/bin/{name}"
        script = root / "opt/slurm_mm/venv/bin" / name
        assert script.read_text().splitlines()[0] .startswith(f"#!{defaults.PREFIX}/venv/bin/python")
    # The relocated venv works where it lies (its python finds its own site-packages).
    proc = subprocess.run([str(root / "opt/slurm_mm/venv/bin/python"), "-I", "-m", "slurm_mm.cli", "--help"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0 and "checkpoint" in proc.stdout, proc.stderr


def test_no_staging_path_left_in_the_package(root, deb):
    proc = subprocess.run(["grep", "-rlI", "/tmp/slurm_mm-deb.", str(root)], capture_output=True, text=True)
    assert proc.stdout == ""


def test_upgrade_keeps_older_mm_init_builds(root):
    libexec = root / "opt/slurm_mm/libexec"
    builds = root / "opt/slurm_mm/share/mm-init"
    (first,) = builds.iterdir()
    postinst(root)
    assert os.readlink(libexec / "mm-init") == first.name
    assert (libexec / first.name).read_bytes() == first.read_bytes()
    # The next package carries a new build only; dpkg removes the old share/ file.
    new = builds / "mm-init-00000000deadbeef"
    new.write_bytes(first.read_bytes() + b"\0")
    first.unlink()
    postinst(root)
    assert os.readlink(libexec / "mm-init") == new.name
    assert (libexec / first.name).is_file(), "the old build is gone: its images cannot restore"
    assert (libexec / new.name).is_file()
    postinst(root)  # idempotent
    assert sorted(p.name for p in libexec.glob("mm-init-*")) == sorted([first.name, new.name])
