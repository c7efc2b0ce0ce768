#!/usr/bin/env bash
# Build slurm-mm_<version>_<arch>.deb from this checkout, on the Debian release and
# Slurm version it is for (the SPANK plugin must be built against the installed Slurm).
#
#     bash debian/build-deb.sh [OUTDIR]        (default OUTDIR: ./dist)
#     apt-get install ./dist/slurm-mm_*.deb
#
# Needs: gcc make python3-venv libslurm-dev (slurm/spank.h), network access to PyPI for
# the venv's dependencies; CRIU 4.2.1 in /opt/slurm_mm/criu (contrib/install-deps.sh
# builds it) is packaged too when present. The package holds the same layout as
# `make install`: /opt/slurm_mm/{venv,lib,libexec,prolog_epilog,share}, the commands in
# /usr/bin, the systemd unit and the tmpfiles.d entry.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$REPO/dist}")
PREFIX=/opt/slurm_mm
die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (not a Debian system?)"
[ -f /usr/include/slurm/spank.h ] || die "slurm/spank.h missing: apt-get install libslurm-dev"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml")
[ -n "$version" ] || die "no version in pyproject.toml"
arch=$(dpkg --print-architecture)
slurm=$(dpkg-query -W -f='${Version}' libslurm-dev 2>/dev/null | cut -d. -f1,2)
[ -n "$slurm" ] || die "cannot tell the Slurm version (is libslurm-dev installed?)"

stage=$(mktemp -d /tmp/slurm_mm-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
dirs=(DESTDIR="$root" PREFIX="$PREFIX" BINDIR=/usr/bin SYSTEMDDIR=/lib/systemd/system
      TMPFILESDIR=/usr/lib/tmpfiles.d)
make -s -C "$REPO" venv install "${dirs[@]}"

# mm-init builds go to share/ (owned by the package); postinst copies each into
# libexec/ where dpkg never removes it on upgrade: images taken under an older build
# name that exact file, and CRIU refuses a restore when its build-ID changed.
install -d -m 0755 "$root$PREFIX/share/mm-init"
mv "$root$PREFIX"/libexec/mm-init-* "$root$PREFIX/share/mm-init/"
rm -f "$root$PREFIX/libexec/mm-init"

# The venv was made at $root$PREFIX/venv: make it valid at $PREFIX/venv.
venv="$root$PREFIX/venv"
grep -rlI --null "$root" "$venv" | xargs -0 -r sed -i "s|$root||g"
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
! grep -rqI "$root" "$root" || die "staging path left in: $(grep -rlI "$root" "$root" | head -3)"

if [ -x "$PREFIX/criu/sbin/criu" ]; then
    install -D -m 0755 "$PREFIX/criu/sbin/criu" "$root$PREFIX/criu/sbin/criu"
else
    printf 'build-deb: warning: %s not built; the package will not carry CRIU\n' "$PREFIX/criu/sbin/criu" >&2
fi

install -d -m 0755 "$root/DEBIAN" "$root/usr/share/doc/slurm-mm"
install -m 0644 "$REPO/README.md" "$REPO/docs/admin-guide.md" "$root/usr/share/doc/slurm-mm/"
install -m 0755 "$REPO/debian/postinst" "$REPO/debian/postrm" "$root/DEBIAN/"
next_minor=$(echo "$slurm" | awk -F. '{printf "%d.%02d", $1, $2 + 1}')
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SLURM@/$slurm/" \
    -e "s/@SLURM_NEXT@/$next_minor/" \
    -e "s/@SIZE@/$(du -sk "$root" | cut -f1)/" "$REPO/debian/control.in" > "$root/DEBIAN/control"

mkdir -p "$OUT"
deb="$OUT/slurm-mm_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
printf 'build-deb: %s (Slurm %s, %s)\n' "$deb" "$slurm" "$(du -h "$deb" | cut -f1)"
