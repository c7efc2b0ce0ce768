#!/usr/bin/env bash
# Install whatever is missing (Slurm, munge, CRIU 4.2.1, the venv, `make install`),
# then run the test suite against a real local Slurm cluster with real CRIU. Run as root.
#     bash contrib/run-tests.sh [PYTEST ARGS...]       whole suite (tests/)
#     bash contrib/run-tests.sh -x tests/test_foo.py   only the files/dirs named
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/install-deps.sh
paths=()
for arg in "$@"; do
    case "$arg" in tests|tests/*) paths+=("$arg") ;; esac
done
[ ${#paths[@]} -gt 0 ] || set -- "$@" tests
exec /opt/slurm_mm/venv/bin/python -m pytest -ra "$@"
