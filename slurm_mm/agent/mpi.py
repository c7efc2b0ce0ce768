"""MPI in an enrolled job: found before any dump, and refused, never imaged.

MPI ranks hold state no image can carry: connections to their process manager (the
step's slurmstepd through PMI/PMIx, or `mpirun`'s daemon), shared-memory segments and
sockets between ranks, and a rank count the restored job would have to match. Measured
on the test cluster (OpenMPI 4.1, Slurm 22.05): ranks of `srun --mpi=pmix -n2` started
under slurm_mm each in their own PID namespace crashed in OpenMPI's shared-memory
transport, without any checkpoint. So:
- an `srun` that asks for an MPI plugin (`--mpi=X`, `SLURM_MPI_TYPE`, or the cluster's
  `MpiDefault`, other than `none`) is run by Slurm's own `srun` in the job's tree, its
  tasks as Slurm starts them;
- a job tree holding an MPI launcher (`mpirun`, `mpiexec`) or such an `srun` is refused
  checkpoints while it runs, with one line; a stopping trigger falls back to Slurm's
  requeue (agent/steps.py). A single MPI process started as a plain program (singleton,
  with its own `orted`) is all inside the tree and is checkpointed like any program.

Trusts: /proc of the job's own processes (exe, cmdline, environ of an srun), and the step's srun argv and
environment only to decide to refuse (a false "MPI" costs the job its checkpoints, never
anything else). Never reads or acts on a process outside the pids it is given.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from slurm_mm.engine.proctree import exe_name

# Launchers of several ranks (Open MPI 4 `mpirun` is `orterun`, 5 is `prterun`; MPICH and
# Intel MPI use Hydra). Not `orted`/`prted` alone: an MPI program started as a plain
# process (singleton) starts one beside itself, and that whole tree checkpoints and
# restores on another node (tests/test_real_apps.py, LAMMPS).
MPI_LAUNCHERS = frozenset({
    "mpirun", "mpiexec", "orterun", "prterun", "prte", "prun",
    "mpiexec.hydra", "mpiexec.openmpi", "mpirun.openmpi", "mpiexec.mpich", "mpirun.mpich",
    "hydra_pmi_proxy", "pmi_proxy",
})


@dataclass(frozen=True)
class MpiProcess:
    """A process of the job that is part of an MPI run, and what shows it."""

    pid: int
    program: str
    evidence: str

    def __str__(self) -> str:
        return f"`{self.program}` ({self.evidence})"


def _words(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def _srun_mpi(pid: int) -> str | None:
    """The MPI plugin a running `srun` client asked for, or None."""
    env = dict(w.partition("=")[::2] for w in _words(f"/proc/{pid}/environ"))
    kind = requested_mpi(_words(f"/proc/{pid}/cmdline")[1:], env)
    if kind is None:
        kind = slurm_mpi_default() or "none"
    return kind if _is_mpi(kind) else None


def mpi_processes(pids: Iterable[int]) -> list[MpiProcess]:
    """The processes among `pids` that launch MPI ranks: a launcher, or an `srun` with an
    MPI plugin (a vanished process is none), in pid order."""
    found = []
    for pid in sorted(set(pids)):
        program = exe_name(pid)
        if not program:
            continue
        if program in MPI_LAUNCHERS:
            found.append(MpiProcess(pid, program, "an MPI launcher"))
            continue
        if program == "srun" and (kind := _srun_mpi(pid)):
            found.append(MpiProcess(pid, program, f"--mpi={kind}"))
    return found


REFUSAL_PREFIX = "not checkpointed: MPI runs in this job"


def mpi_reason(processes: Sequence[MpiProcess]) -> str:
    """One line naming the first MPI process (a launcher starts before its ranks), so the
    line stays the same while the run goes on: it is told once."""
    return (f"{REFUSAL_PREFIX} ({processes[0]}); slurm_mm cannot checkpoint "
            "MPI ranks (their links to the MPI process manager and to each other cannot be restored), "
            "so it writes no images while MPI runs")


def requested_mpi(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The MPI plugin an `srun ARGV` names itself (`--mpi`, else SLURM_MPI_TYPE), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--mpi="):
            return arg.partition("=")[2] or "none"
        if arg == "--mpi" and i + 1 < len(argv):
            return argv[i + 1]
    return env.get("SLURM_MPI_TYPE") or None


def srun_mpi_type(argv: Sequence[str], env: Mapping[str, str], default: str | None = None) -> str:
    """The MPI plugin an `srun ARGV` runs with: its own request, else the cluster's
    MpiDefault ('none' when nothing asks for one)."""
    return requested_mpi(argv, env) or default or "none"


NO_MPI = ("none", "", "(null)")
"""What srun and its environment say for "no MPI plugin": Slurm 24.11 exports
SLURM_MPI_TYPE=(null) into a step that asked for none (an srun inside it inherits it)."""


def _is_mpi(kind: str) -> bool:
    return kind.strip().lower() not in NO_MPI


def is_mpi_step(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """True: Slurm's own srun must start this step (its tasks are MPI ranks). Slurm is
    asked for MpiDefault only when the step does not say."""
    kind = requested_mpi(argv, env)
    return _is_mpi(kind if kind is not None else slurm_mpi_default() or "none")


@functools.lru_cache(maxsize=1)
def slurm_mpi_default() -> str | None:
    """The cluster's MpiDefault (read once per agent); None when Slurm cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "MpiDefault":
            return value.strip()
    return None
