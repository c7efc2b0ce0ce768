"""slurm_mm: make Slurm batch jobs survive preemption, drains and node failures."""

__version__ = "0.1.0"
