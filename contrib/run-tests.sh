#!/usr/bin/env bash
# Install whatever is missing (Slurm, munge, CRIU 4.2.1, the venv), then run the whole
# test suite against a real local Slurm cluster with real CRIU. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
exec /opt/slurm_mm/venv/bin/python -m pytest -ra "$@" tests
