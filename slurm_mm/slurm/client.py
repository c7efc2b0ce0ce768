"""Slurm access behind one small client: connect() picks the backend.

pyslurm (slurm/pyslurm_client.py) when it is installed and matches the running Slurm,
else Slurm's own commands (slurm/commands.py). Nothing else in slurm_mm calls Slurm. It
knows Slurm, never CRIU.
"""

from __future__ import annotations

import logging

from slurm_mm.errors import SlurmError
from slurm_mm.slurm.commands import CommandClient, job_from_json, node_from_json, nodes_from_sinfo
from slurm_mm.slurm.model import COMMAND_TIMEOUT, Job, Node, SlurmClient

__all__ = ["COMMAND_TIMEOUT", "CommandClient", "Job", "Node", "SlurmClient", "connect", "job_from_json",
           "node_from_json", "nodes_from_sinfo"]
log = logging.getLogger(__name__)


def connect() -> SlurmClient:
    """pyslurm when it is installed and built for the running Slurm, else the commands."""
    try:
        from slurm_mm.slurm.pyslurm_client import PyslurmClient  # noqa: PLC0415
    except ImportError:
        return CommandClient()
    try:
        return PyslurmClient()
    except SlurmError as exc:
        log.info("pyslurm not usable (%s); using Slurm's commands", exc)
        return CommandClient()
