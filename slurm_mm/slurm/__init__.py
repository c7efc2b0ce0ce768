"""The only code that talks to Slurm. See client.py."""

from slurm_mm.slurm.client import Job, Node, SlurmClient, connect

__all__ = ["Job", "Node", "SlurmClient", "connect"]
