#!/usr/bin/env bash
# On the GPU machine (Ubuntu 24.04, root, no Slurm, no network): install the bundle that
# make_bundle.sh built, then run slurm_gpu_scenario.py and leave its report and logs in OUT.
#   bash tests/gpu/run_under_slurm.sh BUNDLE_DIR OUT [scenario options...]
# Installs Slurm/munge at Debian's paths (new files only, nothing of the system's is
# overwritten), the libraries the machine lacks in /usr/local/lib/slurm_mm-deps, CRIU and
# the native helpers in /opt/slurm_mm, and /opt/slurm_mm/venv on top of the machine's
# PyTorch Python, so that the job's user can run slurm-mm-run and PyTorch alike.
set -uo pipefail
BUNDLE=$(cd "${1:?bundle dir}" && pwd)
OUT=${2:?out dir}
shift 2
PREFIX=${SLURM_MM_PREFIX:-/opt/slurm_mm}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PY=${SLURM_MM_GPU_PYTHON:-/opt/torch/.venv/bin/python3}
ROOT=/tmp/slurm_mm-bundle
START=$(date +%s)
log() { printf '[%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
mkdir -p "$OUT" "$ROOT/slurm" "$ROOT/libs"

log "unpacking $(ls "$BUNDLE"/debs/*.deb | wc -l) Debian packages"
for deb in "$BUNDLE"/debs/*.deb; do
    name=$(dpkg-deb -f "$deb" Package)
    if grep -qx "$name" "$BUNDLE/debs/SLURM_PKGS"; then dpkg -x "$deb" "$ROOT/slurm"; else dpkg -x "$deb" "$ROOT/libs"; fi
done
cp -a --update=none "$ROOT/slurm/usr/." /usr/
# Debian names the daemons *-wlm and links the usual names in its postinst (alternatives).
for d in slurmctld slurmd slurmstepd; do [ -e "/usr/sbin/$d" ] || ln -s "$d-wlm" "/usr/sbin/$d"; done
mkdir -p "$PREFIX/criu/sbin" "$PREFIX/libexec" "$PREFIX/src" /usr/local/lib/slurm_mm-deps
install -m 0755 "$BUNDLE/criu" "$PREFIX/criu/sbin/criu"
install -m 0755 "$BUNDLE/libexec/mm-init" "$BUNDLE/libexec/libmm_prlimit.so" "$BUNDLE/libexec/libmm_unixsk.so" "$PREFIX/libexec/"
echo /usr/local/lib/slurm_mm-deps > /etc/ld.so.conf.d/zz-slurm_mm-deps.conf

# Libraries: only sonames the machine lacks, found by ldd on what was installed.
bins() {
    (cd "$ROOT/slurm" && find usr -type f \( -perm -u+x -o -name '*.so*' \) | sed 's|^|/|')
    echo "$PREFIX/criu/sbin/criu"
}
for round in 1 2 3 4; do
    missing=$(bins | xargs -r ldd 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
    [ -z "$missing" ] && break
    log "round $round: libraries missing here: $(echo $missing)"
    for so in $missing; do
        src=$(find "$ROOT/libs" -name "$so" | head -1)
        [ -n "$src" ] && cp -a "$(dirname "$src")/$so"* /usr/local/lib/slurm_mm-deps/ || log "no $so in the bundle"
    done
    ldconfig
done
log "carried libraries used: $(ls /usr/local/lib/slurm_mm-deps | tr '\n' ' ')"

# The venv: the machine's PyTorch Python plus slurm_mm from this checkout and the wheels.
tar -xf "$BUNDLE/repo.tar" -C "$PREFIX/src"
rm -rf "$PREFIX/venv" && "$PY" -m venv --without-pip "$PREFIX/venv"
site=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$PREFIX/wheels"
for whl in "$BUNDLE"/wheels/*.whl; do
    "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$PREFIX/wheels"
done
printf '%s\n' "$PREFIX/src" "$torch_site" "$PREFIX/wheels" > "$site/slurm_mm_paths.pth"
for pair in "slurm-mm:slurm_mm.cli" "slurm-mm-run:slurm_mm.batch_wrapper"; do
    printf '#!%s\nimport sys\nfrom %s import main\nsys.exit(main())\n' \
        "$PREFIX/venv/bin/python" "${pair#*:}" > "$PREFIX/venv/bin/${pair%%:*}"
    chmod 0755 "$PREFIX/venv/bin/${pair%%:*}"
done
# The rest of `make install`'s layout (the cluster runs the installed files, never the checkout's).
src="$PREFIX/src"
install -d -m 0755 "$PREFIX/lib" "$PREFIX/prolog_epilog" "$PREFIX/share/slurm"
install -m 0755 "$src/spank/slurm_mm_spank.so" "$PREFIX/lib/"
for hook in prolog epilog; do
    sed "1s|^#!.*|#!$PREFIX/venv/bin/python -I|" "$src/prolog_epilog/$hook" > "$PREFIX/prolog_epilog/$hook"
    chmod 0755 "$PREFIX/prolog_epilog/$hook"
done
install -m 0644 "$src"/contrib/slurm/{plugstack.conf,slurm.conf.snippet,cli_filter.lua,config.yaml} "$PREFIX/share/slurm/"
chmod -R go+rX "$PREFIX"
ldconfig
log "installed: $(slurmd -V) / $(munged -V 2>&1 | head -1) / $("$PREFIX/criu/sbin/criu" --version | head -1)"
"$PREFIX/venv/bin/python" -c 'import slurm_mm, yaml, zstandard, filelock, tabulate, pynvml, torch; print("python ok", torch.__version__)' \
    || log "python environment incomplete"
timeout 60 "$PREFIX/criu/sbin/criu" check > "$OUT/criu-check.txt" 2>&1; log "criu check: $(tail -1 "$OUT/criu-check.txt")"
log "cgroup: $(stat -fc %T /sys/fs/cgroup), controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null), self: $(cat /proc/self/cgroup)"

[ -n "${SLURM_MM_INSTALL_ONLY:-}" ] && exit 0
cd "$PREFIX/src"
export PYTHONUNBUFFERED=1
timeout --kill-after=10 "${SCENARIO_TIMEOUT:-480}" "$PREFIX/venv/bin/python" tests/gpu/slurm_gpu_scenario.py \
    --out "$OUT" --python "$PY" "$@" 2>&1 | tee "$OUT/scenario.log"
rc=${PIPESTATUS[0]}
log "scenario exit $rc"
# Whatever the outcome: no daemon left behind, logs back.
"$PREFIX/venv/bin/python" tests/gpu/slurm_gpu_cluster.py stop >/dev/null 2>&1
tar -czf "$OUT/logs.tgz" -C /tmp slurm_mm-gpu-cluster/log slurm_mm-gpu-cluster/etc 2>/dev/null
exit "$rc"
