#!/usr/bin/env bash
# Install whatever is missing, then show slurm_mm on a local 3-node Slurm cluster:
# a job is checkpointed, preempted, resumed on another node, and finishes correctly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
exec /opt/slurm_mm/venv/bin/python contrib/demo/demo.py
