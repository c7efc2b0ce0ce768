#!/usr/bin/env bash
# Run slurm_mm's demo and a set of cluster tests on Debian 13 (Slurm 24.11) inside a
# trixie root made with debootstrap from Debian's packages, on this machine's kernel.
#
#     flock /tmp/slurm_mm-cluster.lock bash contrib/trixie/run.sh [PYTEST ARGS...]
#
# The trixie test cluster uses the same ports, node names and cgroups as the host's:
# hold the cluster lock, as above. The root is kept (default /var/tmp/slurm_mm-trixie,
# or $SLURM_MM_TRIXIE_ROOT) so a second run skips debootstrap; the checkout is copied
# (git archive of HEAD plus the working tree's changes) into the root's /root/slurm_mm,
# a 0700 directory, as a newcomer's clone would be. Inside, the README's two commands
# run: contrib/demo.sh, then contrib/run-tests.sh with the given pytest arguments
# (default: the chosen cluster tests below); SLURM_MM_TRIXIE_DEMO=0 skips the demo.
# Output: $ROOT/root/trixie-run.log, the clusters' logs in $ROOT/root/trixie-logs/.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${SLURM_MM_TRIXIE_ROOT:-/var/tmp/slurm_mm-trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEFAULT_TESTS=(tests/test_cluster_foundation.py tests/test_shipped_site_config.py tests/test_slurm_client.py
               tests/test_slurm_jobs.py)
log() { printf 'trixie: %s\n' "$*"; }
die() { printf 'trixie: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, the test cluster)"
command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    log "debootstrap trixie into $ROOT (minbase)"
    debootstrap --variant=minbase --include=ca-certificates,git,procps trixie "$ROOT" "$MIRROR" >/tmp/slurm_mm-debootstrap.log 2>&1 ||
        { tail -20 /tmp/slurm_mm-debootstrap.log; die "debootstrap failed (log: /tmp/slurm_mm-debootstrap.log)"; }
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
logfile="$ROOT/root/trixie-run.log"
mkdir -p "$ROOT/.oldroot"
log "running the demo and tests in the root (log: $logfile)"
# A private mount namespace whose root IS the trixie root (pivot_root, not just chroot):
# CRIU dumps a job's mount tree and refuses mounts whose parent it cannot see
# ("No parent found for mountpoint"), as under a plain chroot. Everything mounted here,
# and the test cluster's daemons (stopped at the end, inside), live in that namespace.
set +e
unshare --mount --propagation private /bin/bash -s "$ROOT" "${SLURM_MM_TRIXIE_DEMO:-1}" "${tests[@]}" \
    <<'INNER' 2>&1 | tee "$logfile"
set -e
root=$1; want_demo=$2; shift 2
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
    HOME=/root LANG=C.UTF-8 /bin/bash -c '
    cd /root/slurm_mm || exit 1
    stop() {
        for d in /tmp/slurm_mm-test-cluster /tmp/slurm_mm-demo; do
            /opt/slurm_mm/venv/bin/python contrib/testcluster/testcluster.py --state-dir $d stop >/dev/null 2>&1
        done
    }
    trap stop EXIT
    . /etc/os-release; echo "== $PRETTY_NAME, kernel $(uname -r), $(date -u +%FT%TZ)"
    keep_logs() {  # the clusters live in the private /tmp: keep their logs in the root
        rm -rf "/root/trixie-logs/$1"; mkdir -p "/root/trixie-logs/$1"
        cp -r "$2"/log/. "/root/trixie-logs/$1/" 2>/dev/null || true
    }
    want_demo=$1; shift
    demo=0
    if [ "$want_demo" != 0 ]; then
        bash contrib/demo.sh; demo=$?
        keep_logs demo /tmp/slurm_mm-demo
        echo "== demo exit $demo"
    fi
    echo "== slurm $(dpkg-query -W -f="\${Version}" slurmd), $(/opt/slurm_mm/criu/sbin/criu --version | head -1)"
    bash contrib/run-tests.sh "$@"; tests=$?
    keep_logs tests /tmp/slurm_mm-test-cluster
    echo "== tests exit $tests"
    [ $demo = 0 ] && [ $tests = 0 ]' trixie "$want_demo" "$@"
INNER
rc=${PIPESTATUS[0]}
set -e
log "done: exit $rc (log: $logfile)"
exit "$rc"
