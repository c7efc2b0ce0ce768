#!/usr/bin/env bash
# The demo and cluster tests on Debian 13 (Slurm 24.11): contrib/debian-root/run.sh for trixie.
#
#     flock -o /tmp/slurm_mm-cluster.lock bash contrib/trixie/run.sh [--demo-only | --tests-only] [PYTEST ARGS...]
exec bash "$(dirname "$0")/../debian-root/run.sh" --suite trixie "$@"
