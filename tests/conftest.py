"""Shared fixtures: the real Slurm test cluster (started once per session)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import sys
from pathlib import Path

import pytest

from workloads import real_apps

REPO = Path(__file__).resolve().parents[1]
CRIU = Path(os.environ.get("SLURM_MM_CRIU", "/opt/slurm_mm/criu/sbin/criu"))


def _load_testcluster():
    spec = importlib.util.spec_from_file_location(
        "testcluster", REPO / "contrib" / "testcluster" / "testcluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["testcluster"] = module
    spec.loader.exec_module(module)
    return module


testcluster = _load_testcluster()


def pytest_sessionstart(session):
    """Fail loudly, never skip, when what the suite needs is missing."""
    tools = ("slurmctld", "slurmd", "munged", "sbatch", *real_apps.TOOLS)
    missing = [tool for tool in tools if not shutil.which(tool)]
    if not CRIU.exists():
        missing.append(str(CRIU))
    if os.geteuid() != 0:
        missing.append("root (the suite runs daemons and CRIU)")
    if missing:
        raise pytest.UsageError(
            "missing: " + ", ".join(missing) + " -- run `sudo bash contrib/install-deps.sh` "
            "(or the README's test command, which does)")


@pytest.fixture(scope="session")
def cluster():
    """A 3-node cluster (n1..n3) in its own state dir; stopped and cleaned at the end."""
    state = Path(os.environ.get("SLURM_MM_TEST_CLUSTER_DIR", "/tmp/slurm_mm-test-cluster"))
    c = testcluster.Cluster(state)
    testcluster.stop(c)
    if state.exists():
        shutil.rmtree(state)
    testcluster.start(c)
    yield c
    testcluster.stop(c)


@pytest.fixture()
def user_home() -> Path:
    testcluster.ensure_user()
    return Path(pwd.getpwnam(testcluster.USER).pw_dir)


@pytest.fixture()
def job_dir(user_home: Path, request) -> Path:
    """A fresh directory owned by the test user for one test's job files."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in request.node.name)
    path = user_home / "tests" / safe
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    pw = pwd.getpwnam(testcluster.USER)
    for p in (path.parent, path):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    return path


LOG_LINES_ON_FAILURE = 60
_LOG_START = pytest.StashKey[dict]()


def _cluster_log_dir() -> Path:
    return Path(os.environ.get("SLURM_MM_TEST_CLUSTER_DIR", "/tmp/slurm_mm-test-cluster")) / "log"


def _log_sizes() -> dict[Path, int]:
    try:
        return {p: p.stat().st_size for p in _cluster_log_dir().glob("*.log")}
    except OSError:
        return {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Remember where the cluster's logs stood, so a failure can show what this test wrote."""
    item.stash[_LOG_START] = _log_sizes()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed cluster test carries the agents' and slurmctld's lines from its own run:
    CI shows only the report, and a flaky failure is not seen again to be looked at."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or _LOG_START not in item.stash:
        return
    start = item.stash[_LOG_START]
    for path in sorted(_cluster_log_dir().glob("*.log")):
        if not path.name.startswith(("agent-", "slurmctld")):
            continue
        try:
            with path.open("rb") as f:
                f.seek(start.get(path, 0))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        if lines:
            report.sections.append((f"cluster log {path.name} (last {LOG_LINES_ON_FAILURE} lines of this test)",
                                    "\n".join(lines[-LOG_LINES_ON_FAILURE:])))
