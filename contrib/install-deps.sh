#!/usr/bin/env bash
# Install what slurm_mm needs on Debian 12 (Slurm 22.05) or Debian 13 (Slurm 24.11):
# Slurm + munge from apt, CRIU 4.2.1 built from Debian sid's source into a
# project-owned prefix, a Python venv with slurm_mm, then `make install`: the SPANK
# plugin in $PREFIX/lib, native helpers in $PREFIX/libexec, prolog/epilog in
# $PREFIX/prolog_epilog, `slurm-mm`/`slurm-mm-run` in /usr/local/bin, the systemd unit
# and tmpfiles.d entry (the same layout as the .deb from debian/build-deb.sh).
# Idempotent: every step checks whether its work is already done, so a second run
# takes seconds. Run as root.
set -euo pipefail

PREFIX=${SLURM_MM_PREFIX:-/opt/slurm_mm}
CRIU_VERSION=4.2.1
REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and a CRIU into $PREFIX)"
. /etc/os-release
case "${VERSION_ID:-}" in
    12|13) ;;
    *) log "warning: tested on Debian 12 and 13 only, this is ${PRETTY_NAME:-unknown}" ;;
esac

APT_PKGS=(munge slurmctld slurmd slurm-client libslurm-dev slurm-wlm-basic-plugins-dev
          python3-venv python3-dev gcc make pkg-config iproute2 procps util-linux xz-utils
          protobuf-c-compiler libprotobuf-c-dev libnl-3-dev libnet1-dev libcap-dev
          libbsd-dev uuid-dev protobuf-compiler libprotobuf-dev python3-protobuf)
# Real applications the test suite runs as users' jobs (tests/test_real_apps.py).
APT_PKGS+=(gromacs velvet bwa samtools lammps)
# MPI jobs the suite runs (tests/test_slurm_mpi.py): Open MPI 4.1 on Debian 12, 5.0 on 13;
# Slurm's mpi/pmix plugin is in slurmd's own packages on both.
APT_PKGS+=(openmpi-bin libopenmpi-dev)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing from apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    # --no-install-recommends keeps asciidoc/xmlto from pulling a TeX toolchain.
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install failed for: ${missing[*]}"
fi
# Debian's packages enable and start the daemons; the test cluster runs its own.
for svc in slurmctld slurmd; do
    pid=$(pgrep -x "$svc" -P 1 2>/dev/null || true)
    [ -z "$pid" ] || { systemctl stop "$svc" 2>/dev/null || kill $pid 2>/dev/null || true; }
done

CRIU="$PREFIX/criu/sbin/criu"
if [ -x "$CRIU" ] && "$CRIU" --version 2>/dev/null | grep -q "Version: $CRIU_VERSION"; then
    log "CRIU $CRIU_VERSION already in $PREFIX/criu"
else
    log "building CRIU $CRIU_VERSION from Debian sid's source package"
    work=$(mktemp -d /tmp/slurm_mm-criu.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    chmod 0755 "$work"
    mkdir -p "$work/apt/lists/partial" "$work/apt/sources.list.d"
    echo "deb-src http://deb.debian.org/debian sid main" > "$work/apt/sources.list"
    # A private apt config: the machine's sources stay untouched. Valid-Until is
    # ignored because VM clocks here can run ahead of sid's Release file.
    aptopts=(-o "Dir::Etc::SourceList=$work/apt/sources.list"
             -o "Dir::Etc::SourceParts=$work/apt/sources.list.d"
             -o "Dir::State::Lists=$work/apt/lists"
             -o "Acquire::Check-Valid-Until=false" -o "APT::Get::Only-Source=true")
    apt-get "${aptopts[@]}" update -q >/dev/null
    # The .debian.tar.xz is missing on the mirror, so `apt-get source` fails: ask apt
    # only for the orig tarball's address and fetch that one file.
    url=$(cd "$work" && apt-get "${aptopts[@]}" source --print-uris "criu=$CRIU_VERSION-1" 2>/dev/null \
          | awk -F"'" '/orig\.tar/ {print $2; exit}')
    [ -n "$url" ] || die "criu=$CRIU_VERSION-1 not found in Debian sid's sources"
    tarball="$work/$(basename "$url")"
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tarball"
    tar -xf "$tarball" -C "$work"
    src=$(find "$work" -maxdepth 1 -type d -name "criu-$CRIU_VERSION*" | head -1)
    [ -n "$src" ] || die "unpacked CRIU source not found in $work"
    make -C "$src" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -20 "$work/build.log"; die "CRIU build failed"; }
    install -D -m 0755 "$src/criu/criu" "$CRIU"
    "$CRIU" --version | grep -q "Version: $CRIU_VERSION" || die "installed CRIU does not report $CRIU_VERSION"
    log "CRIU $CRIU_VERSION installed as $CRIU"
fi

VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    # Debian's python3, not a user's pyenv: job users must be able to exec it.
    /usr/bin/python3 -m venv "$VENV"
fi
# A regular (not editable) install: job users run slurm-mm-run from this venv, and
# the checkout may sit where they cannot read (CI clones anywhere). Reinstall when
# the package's sources change.
stamp="$VENV/.slurm_mm-installed"
want=$(cd "$REPO" && find pyproject.toml slurm_mm -type f \( -name '*.py' -o -name '*.toml' \) \
       -not -path '*/__pycache__/*' | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing slurm_mm and test tools into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >"$PREFIX/pip.log" 2>&1 || true
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "$REPO" >>"$PREFIX/pip.log" 2>&1 &&
    "$VENV/bin/pip" install -q "$REPO[test,gpu]" >>"$PREFIX/pip.log" 2>&1 ||
        { tail -20 "$PREFIX/pip.log"; die "pip install failed (log: $PREFIX/pip.log)"; }
    echo "$want" > "$stamp"
fi
# Native parts are built against what is installed here: the SPANK plugin must match
# the running Slurm (24.11 refuses a 22.05 build). Job users load the plugin, the
# wrapper and the prolog from $PREFIX, never from this checkout (which may be 0700).
make -s -C "$REPO" install PREFIX="$PREFIX" >"$PREFIX/make-install.log" 2>&1 ||
    { tail -20 "$PREFIX/make-install.log"; die "make install failed (log: $PREFIX/make-install.log)"; }
chmod -R go+rX "$PREFIX"
log "ok: $("$CRIU" --version | head -1), Slurm $(dpkg-query -W -f="\${Version}" slurmd), python $("$VENV/bin/python" -V 2>&1)"
