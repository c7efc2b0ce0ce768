"""The result mpi_ring.c prints for an uninterrupted run, and how tests build it."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("mpi_ring.c")
MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ring(ranks: int, steps: int) -> str:
    """`result=<hex> ranks=<n> steps=<n>` of an uninterrupted run."""
    values = [_mix(r + 1) for r in range(ranks)]
    for step in range(1, steps + 1):
        values = [_mix(values[r] ^ ((values[(r - 1) % ranks] + step) & MASK)) for r in range(ranks)]
    result = 0
    for v in values:
        result = _mix(result ^ v)
    return f"result={result:016x} ranks={ranks} steps={steps}"


def build(target: Path) -> Path:
    """Compile the ring with mpicc into `target` (a file the job's user can run)."""
    subprocess.run(["mpicc", "-O2", "-o", str(target), str(SOURCE)], check=True,
                   capture_output=True, text=True)
    target.chmod(0o755)
    return target
