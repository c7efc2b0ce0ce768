#!/usr/bin/env bash
# Build, on the Debian 12 machine, everything the GPU machine (Ubuntu 24.04, no Slurm, no
# network) needs to run slurm_mm's test cluster: Debian 12's Slurm + munge packages and
# the libraries they need, CRIU (stripped), mm-init + libmm_prlimit.so + libmm_unixsk.so, the SPANK plugin
# built against the same Slurm's headers, Python wheels, and this checkout.
#   bash tests/gpu/make_bundle.sh DIR      (DIR: an ignored folder the device run carries)
# run_under_slurm.sh unpacks it there. Keep it under the 64 MiB a device call may carry.
set -euo pipefail
DIR=${1:?usage: make_bundle.sh DIR}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${SLURM_MM_PREFIX:-/opt/slurm_mm}
mkdir -p "$DIR/debs" "$DIR/wheels" "$DIR/libexec"

# Slurm and munge as Debian 12 ships them; the plugin must match this exact version.
SLURM_PKGS=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins libslurm38 munge libmunge2)
# Their libraries and CRIU's; run_under_slurm.sh installs only those the GPU machine lacks.
LIB_PKGS=(libhwloc15 libnuma1 liblua5.1-0 libjson-c5 libyaml-0-2 libreadline8 liblz4-1 libpam0g
          libdbus-1-3 libgcrypt20 libgpg-error0 libbz2-1.0 libudev1 libaudit1 libcap-ng0 libtinfo6
          libsystemd0 libcap2 libzstd1 liblzma5 libprotobuf-c1 libnl-3-200 libnet1 libbsd0 libmd0)
want=$(dpkg-query -W -f='${Version}' slurmd)
(cd "$DIR/debs" && rm -f ./*.deb && apt-get download -q "${SLURM_PKGS[@]/%/=$want}" >/dev/null 2>&1 \
    || apt-get download -q "${SLURM_PKGS[@]}" >/dev/null)
(cd "$DIR/debs" && apt-get download -q "${LIB_PKGS[@]}" >/dev/null 2>&1)
printf '%s\n' "${SLURM_PKGS[@]}" > "$DIR/debs/SLURM_PKGS"

# Wheels the slurm_mm venv needs, for the GPU machine's Python 3.12.
if [ -z "$(ls "$DIR/wheels"/*.whl 2>/dev/null)" ]; then
    "$PREFIX/venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/wheels" pyyaml==6.0.2 zstandard==0.25.0 filelock==3.16.1 tabulate==0.9.0 \
        xxhash==4.1.0 nvidia-ml-py==13.580.82
fi

strip -o "$DIR/criu" "$PREFIX/criu/sbin/criu"
make -s -C "$REPO/slurm_mm/native"
cp "$REPO/slurm_mm/native/mm-init" "$REPO/slurm_mm/native/libmm_prlimit.so" "$REPO/slurm_mm/native/libmm_unixsk.so" "$DIR/libexec/"
make -s -C "$REPO/spank"

# This checkout (tracked and new files) and the built plugin, as the job's users will see it.
(cd "$REPO" && { git ls-files -co --exclude-standard | grep -v '^benchmarks/results/' ; \
                 echo spank/slurm_mm_spank.so; } | tar -cf "$DIR/repo.tar" -T -)
cp "$REPO/tests/gpu/run_under_slurm.sh" "$DIR/"
du -sh "$DIR"
