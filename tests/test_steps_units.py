"""What slurm_mm refuses to checkpoint: node counts of Slurm hostlists, and `srun`
clients in a process tree found by their executable (not their argv[0])."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slurm_mm.agent.steps import multi_node_reason, node_count, step_clients, steps_reason


@pytest.mark.parametrize("nodelist, count", [
    ("", 0), ("n1", 1), ("n[1-2]", 2), ("n1,n3", 2), ("n[1-3],m5", 4), ("n[1,3-5]", 4),
    ("rack[1-2]-n[1-4]", 8), ("node-7", 1),
])
def test_node_count_of_hostlists(nodelist, count):
    assert node_count(nodelist) == count


def test_single_node_job_is_not_refused():
    assert multi_node_reason("n2") is None


def test_multi_node_job_reason_names_the_nodes():
    text = multi_node_reason("n[1-2]")
    assert "allocated 2 nodes (n[1-2])" in text and "no images" in text


def _spawn(tmp_path: Path, exe_name: str, argv0: str) -> subprocess.Popen:
    exe = tmp_path / exe_name
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen(["bash", "-c", f'exec -a {argv0} "$0" 30', str(exe)])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/exe").resolve() != exe.resolve():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_srun_client_is_found_by_its_executable(tmp_path):
    proc = _spawn(tmp_path, "srun", "myapp")
    try:
        clients = step_clients([proc.pid])
        assert [c.pid for c in clients] == [proc.pid]
        assert "myapp 30" in steps_reason(clients)
    finally:
        proc.kill()
        proc.wait()


def test_other_programs_named_srun_in_argv_are_not_clients(tmp_path):
    proc = _spawn(tmp_path, "sleepy", "srun")
    try:
        assert step_clients([proc.pid, 999999999]) == []
    finally:
        proc.kill()
        proc.wait()
