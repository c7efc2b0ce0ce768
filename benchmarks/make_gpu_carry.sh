#!/usr/bin/env bash
# Build, here (Debian 12), what the GPU machine needs for benchmarks/store_bench.py,
# gpu_bench.py and gpu_targets.py (no Slurm): this checkout, CRIU with the libraries
# Ubuntu 24.04 lacks (behind a wrapper that sets LD_LIBRARY_PATH), and the zstandard and
# filelock wheels for its Python 3.12 (xxhash and numpy are installed there).
#   bash benchmarks/make_gpu_carry.sh DIR     (DIR: an ignored folder the device run carries)
# There: cd DIR/repo && python3 benchmarks/gpu_targets.py ...
set -euo pipefail
DIR=${1:?usage: make_gpu_carry.sh DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${SLURM_MM_PREFIX:-/opt/slurm_mm}
rm -rf "$DIR/repo"
mkdir -p "$DIR/repo/.carry/criu/lib" "$DIR/repo/benchmarks/out/wheels"
(cd "$REPO" && git ls-files -co --exclude-standard | grep -v '^benchmarks/results/' | tar -cf - -T -) \
    | tar -xf - -C "$DIR/repo"
strip -o "$DIR/repo/.carry/criu/criu.bin" "$PREFIX/criu/sbin/criu"
for lib in libprotobuf-c.so.1 libnl-3.so.200 libnet.so.1; do
    cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$DIR/repo/.carry/criu/lib/"
done
cat > "$DIR/repo/.carry/criu/criu" <<'WRAP'
#!/bin/sh
d=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/criu.bin" "$@"
WRAP
chmod +x "$DIR/repo/.carry/criu/criu"
"$PREFIX/venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR/repo/benchmarks/out/wheels" zstandard==0.25.0 filelock==3.16.1
du -sh "$DIR"
