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

from slurm_mm.agent import mpi
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


@pytest.mark.parametrize("argv, env, expected", [
    (["-n2", "./app"], {"SLURM_MPI_TYPE": "(null)"}, False),  # Slurm 24.11 inside a step
    (["--mpi=(null)", "./app"], {}, False),
    (["-n2", "./app"], {"SLURM_MPI_TYPE": "pmix"}, True),
])
def test_slurm_s_null_mpi_type_is_no_mpi(argv, env, expected, monkeypatch):
    monkeypatch.setattr(mpi, "slurm_mpi_default", lambda: "none")
    assert mpi.is_mpi_step(argv, env) is expected


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


def test_an_mpi_program_started_plainly_is_not_refused(tmp_path):
    # A singleton (an MPI-linked program run as a plain child, its own `orted` beside it)
    # lives wholly in the job's tree: it is checkpointed like any program.
    lib = tmp_path / "libmpi.so.40"
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", lib)
    orted = tmp_path / "orted"
    shutil.copy("/bin/sleep", orted)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", f"import ctypes, time; ctypes.CDLL({str(lib)!r}); "
                             f"open({str(ready)!r}, 'w').close(); time.sleep(30)"])
    helper = subprocess.Popen([str(orted), "30"])
    try:
        _wait_until(ready.exists)
        _wait_until(lambda: Path(f"/proc/{helper.pid}/exe").resolve() == orted.resolve())
        assert mpi_processes([proc.pid, helper.pid, 999999999]) == []
    finally:
        for p in (proc, helper):
            p.kill()
            p.wait()


def test_plain_processes_are_not_mpi():
    assert mpi_processes([os.getpid()]) == []


def test_a_step_that_names_no_mpi_plugin_leaves_it_to_the_cluster():
    assert requested_mpi(["-n4", "./app", "--mpi=x"], {}) == "x"  # conservative: a false MPI only costs images
    assert requested_mpi(["-n4", "./app"], {}) is None
