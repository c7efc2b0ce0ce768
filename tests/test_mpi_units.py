"""How slurm_mm tells MPI in a job: the MPI plugin an `srun` asks for, and MPI launchers
and ranks in a process tree, found by their executable and mapped libraries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_mm.agent.mpi import mpi_processes, mpi_reason, requested_mpi, srun_mpi_type


@pytest.mark.parametrize("argv, env, default, kind", [
    (["-n2", "./app"], {}, None, "none"),
    (["--mpi=pmix", "-n2", "./app"], {}, None, "pmix"),
    (["--mpi", "pmi2", "./app"], {}, None, "pmi2"),
    (["-n2", "./app"], {"SLURM_MPI_TYPE": "pmix_v4"}, None, "pmix_v4"),
    (["-n2", "./app"], {}, "pmix", "pmix"),               # the cluster's MpiDefault
    (["--mpi=none", "./app"], {"SLURM_MPI_TYPE": "pmix"}, "pmix", "none"),  # the option wins
])
def test_srun_mpi_type(argv, env, default, kind):
    assert srun_mpi_type(argv, env, default) == kind


def _wait_until(check) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_mpi_launcher_is_found_by_its_executable(tmp_path):
    exe = tmp_path / "mpirun"
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen(["bash", "-c", 'exec -a innocent "$0" 30', str(exe)])
    try:
        _wait_until(lambda: Path(f"/proc/{proc.pid}/exe").resolve() == exe.resolve())
        found = mpi_processes([proc.pid])
        assert [(p.pid, p.program) for p in found] == [(proc.pid, "mpirun")]
        assert "not checkpointed: MPI runs in this job (`mpirun` (an MPI launcher))" in mpi_reason(found)
    finally:
        proc.kill()
        proc.wait()


def test_rank_is_found_by_the_mpi_library_it_maps(tmp_path):
    # Any shared object named like Open MPI's library stands in for it.
    lib = tmp_path / "libmpi.so.40"
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", lib)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", f"import ctypes, time; ctypes.CDLL({str(lib)!r}); "
                             f"open({str(ready)!r}, 'w').close(); time.sleep(30)"])
    plain = subprocess.Popen(["sleep", "30"])
    try:
        _wait_until(ready.exists)
        found = mpi_processes([proc.pid, plain.pid, 999999999])
        assert [p.pid for p in found] == [proc.pid]
        assert found[0].evidence == "uses libmpi.so.40"
    finally:
        for p in (proc, plain):
            p.kill()
            p.wait()


def test_plain_processes_are_not_mpi():
    assert mpi_processes([os.getpid()]) == []


def test_a_step_that_names_no_mpi_plugin_leaves_it_to_the_cluster():
    assert requested_mpi(["-n4", "./app", "--mpi=x"], {}) == "x"  # conservative: a false MPI only costs images
    assert requested_mpi(["-n4", "./app"], {}) is None
