#!/usr/bin/env bash
# Run slurm_mm's demo and a set of cluster tests on a minimal Debian root (default
# trixie: Debian 13, Slurm 24.11; bookworm: Debian 12, Slurm 22.05) made with
# debootstrap from Debian's packages, on this machine's kernel.
#
#     bash contrib/debian-root/run.sh --suite bookworm --prepare   # no cluster: no lock
#     flock -o /tmp/slurm_mm-cluster.lock bash contrib/debian-root/run.sh [--suite S] [--demo-only] [PYTEST ARGS...]
#
# --prepare only makes the root and runs contrib/install-deps.sh in it (apt, the CRIU
# build, `make install`), in PID and mount namespaces of its own: it starts and stops
# nothing outside the root, so it needs no lock. --demo-only runs the demo, no tests;
# --tests-only the tests, no demo.
# The root's test cluster uses the same ports, node names and cgroups as the host's:
# hold the cluster lock for everything else. The root is kept (default
# /var/tmp/slurm_mm-<suite>, or $SLURM_MM_ROOT_DIR) so a second run skips debootstrap; the checkout is copied
# (git archive of HEAD plus the working tree's changes) into the root's /root/slurm_mm,
# a 0700 directory, as a newcomer's clone would be. Inside, the README's two commands
# run: contrib/demo.sh, then contrib/run-tests.sh with the given pytest arguments
# (default: the chosen cluster tests below). Output: $ROOT/root/<suite>-run.log, the
# clusters' logs in $ROOT/root/<suite>-logs/.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=trixie
MODE=all
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) SUITE=${2:?--suite needs a name}; shift 2 ;;
        --prepare) MODE=prepare; shift ;;
        --demo-only) MODE=demo; shift ;;
        --tests-only) MODE=tests; shift ;;
        *) break ;;
    esac
done
[ "${SLURM_MM_TRIXIE_DEMO:-1}" != 0 ] || MODE=tests  # the older spelling of --tests-only
case "$SUITE" in bookworm|trixie) ;; *) echo "debian-root: error: unknown suite '$SUITE' (bookworm or trixie)" >&2; exit 2 ;; esac
ROOT=${SLURM_MM_ROOT_DIR:-${SLURM_MM_TRIXIE_ROOT:-/var/tmp/slurm_mm-$SUITE}}
[ "$SUITE" = trixie ] || ROOT=${SLURM_MM_ROOT_DIR:-/var/tmp/slurm_mm-$SUITE}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEFAULT_TESTS=(tests/test_cluster_foundation.py tests/test_shipped_site_config.py tests/test_slurm_client.py
               tests/test_slurm_jobs.py)
log() { printf '%s: %s\n' "$SUITE" "$*"; }
die() { printf '%s: error: %s\n' "$SUITE" "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, the test cluster)"
command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    log "debootstrap $SUITE into $ROOT (minbase)"
    dlog=/tmp/slurm_mm-debootstrap-$SUITE.log
    debootstrap --variant=minbase --include=ca-certificates,git,procps "$SUITE" "$ROOT" "$MIRROR" >"$dlog" 2>&1 ||
        { tail -20 "$dlog"; die "debootstrap failed (log: $dlog)"; }
fi
# Debian's package scripts must not start daemons in the root; the test cluster does.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# A site's TLS-intercepting proxy: its CA certificates and pip settings go in too.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null 2>&1 || true
fi
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$ROOT/etc/pip.conf"

log "copying $REPO into $ROOT/root/slurm_mm (mode 0700 /root)"
rm -rf "$ROOT/root/slurm_mm"
mkdir -p "$ROOT/root/slurm_mm"
chmod 0700 "$ROOT/root"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$ROOT/root/slurm_mm" -xf -

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=("${DEFAULT_TESTS[@]}")
logfile="$ROOT/root/$SUITE-run.log"
[ "$MODE" = all ] || logfile="$ROOT/root/$SUITE-$MODE.log"
mkdir -p "$ROOT/.oldroot"
log "running the demo and tests in the root (log: $logfile)"
# A private mount namespace whose root IS the trixie root (pivot_root, not just chroot):
# CRIU dumps a job's mount tree and refuses mounts whose parent it cannot see
# ("No parent found for mountpoint"), as under a plain chroot. Everything mounted here,
# and the test cluster's daemons (stopped at the end, inside), live in that namespace.
# --prepare: a PID namespace too, so that nothing in the root (install-deps stops
# Debian's freshly started Slurm daemons by name) can see, let alone signal, the host's.
ns=(--mount --propagation private)
[ "$MODE" != prepare ] || ns+=(--pid --fork)
set +e
unshare "${ns[@]}" /bin/bash -s "$ROOT" "$SUITE" "$MODE" "${tests[@]}" <<'INNER' 2>&1 | tee "$logfile"
set -e
root=$1; suite=$2; mode=$3; shift 3
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
cd "$root"
pivot_root . .oldroot
umount -l /.oldroot
set +e
exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 SUITE="$suite" MODE="$mode" /bin/bash -c '
    cd /root/slurm_mm || exit 1
    stop() {
        for d in /tmp/slurm_mm-test-cluster /tmp/slurm_mm-demo; do
            /opt/slurm_mm/venv/bin/python contrib/testcluster/testcluster.py --state-dir $d stop >/dev/null 2>&1
        done
    }
    trap stop EXIT
    . /etc/os-release; echo "== $PRETTY_NAME, kernel $(uname -r), $(date -u +%FT%TZ)"
    if [ "$MODE" = prepare ]; then
        bash contrib/install-deps.sh; rc=$?; echo "== install-deps exit $rc"; exit $rc
    fi
    keep_logs() {  # the clusters live in the private /tmp: keep their logs in the root
        rm -rf "/root/$SUITE-logs/$1"; mkdir -p "/root/$SUITE-logs/$1"
        cp -r "$2"/log/. "/root/$SUITE-logs/$1/" 2>/dev/null || true
    }
    demo=0
    if [ "$MODE" != tests ]; then
        bash contrib/demo.sh; demo=$?
        keep_logs demo /tmp/slurm_mm-demo
        echo "== demo exit $demo"
    fi
    [ "$MODE" != demo ] || exit $demo
    echo "== slurm $(dpkg-query -W -f="\${Version}" slurmd), $(/opt/slurm_mm/criu/sbin/criu --version | head -1)"
    bash contrib/run-tests.sh "$@"; tests=$?
    keep_logs tests /tmp/slurm_mm-test-cluster
    echo "== tests exit $tests"
    [ $demo = 0 ] && [ $tests = 0 ]' "$suite" "$@"
INNER
rc=${PIPESTATUS[0]}
set -e
log "done: exit $rc (log: $logfile)"
exit "$rc"
