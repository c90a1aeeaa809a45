#!/usr/bin/env bash
# Builds the three Debian packages from release binaries:
#   lifeboat-agent  the agent: binary, hardened unit, /etc/lifeboat/agent.toml (conffile)
#   lifeboat-ps     the process-server appliance: binary, hardened unit, a
#                   system user and `lifeboat-ps init` at first install
#   lifeboat-mt     the master target (failover, verify): binary only; it has
#                   no long-running mode, so no unit
#
#   packaging/build-debs.sh [--bin-dir DIR] [--out DIR]
#
# --bin-dir (or LIFEBOAT_BIN_DIR) holds lifeboat-agent, lifeboat-ps and
# lifeboat-mt; default <workspace>/target/release, built with `build_release` when a
# binary is missing there (a --bin-dir given is never built into). --out
# (default <workspace>/target/debian) receives <package>_<version>_<arch>.deb.
#
# Built with dpkg-deb, not cargo-deb: dpkg-deb, dpkg-shlibdeps and objcopy
# come with every Debian build machine (dpkg, dpkg-dev, binutils), so this
# needs no extra tool and no network, and it packages the binaries the tests
# ran instead of building them again.
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="$ROOT/packaging"
BIN_DIR="${LIFEBOAT_BIN_DIR:-}"
OUT="$ROOT/target/debian"
MAINTAINER="${LIFEBOAT_MAINTAINER:-Lifeboat maintainers <maintainers@users.noreply.b-seed-94f9b6e4.example>}"

die() { echo "build-debs: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; BIN_DIR="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps objcopy; do
  command -v "$tool" >/dev/null \
    || die "$tool is missing: apt-get install dpkg-dev binutils"
done

BINARIES=(lifeboat-agent lifeboat-ps lifeboat-mt)
missing() { local b; for b in "${BINARIES[@]}"; do [ -x "$1/$b" ] || return 0; done; return 1; }
if [ -z "$BIN_DIR" ]; then
  BIN_DIR="$ROOT/target/release"
  if missing "$BIN_DIR"; then
    echo "build-debs: binaries missing in $BIN_DIR: building them (release)"
    # shellcheck source=../scripts/cargo-env.sh
    source "$ROOT/scripts/cargo-env.sh"
    build_release
  fi
fi
[ -d "$BIN_DIR" ] || die "no directory $BIN_DIR"
BIN_DIR="$(cd "$BIN_DIR" && pwd)"
for b in "${BINARIES[@]}"; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing (build with: source scripts/cargo-env.sh; build_release)"
done

# The version of every crate: [workspace.package] version.
VERSION="$(awk '/^\[/ { in_ws = ($0 == "[workspace.package]") }
  in_ws && /^version *=/ { gsub(/^version *= *"|".*$/, ""); print; exit }' "$ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no [workspace.package] version in $ROOT/Cargo.toml"
ARCH="$(dpkg --print-architecture)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
# dpkg-shlibdeps wants a source tree: debian/control, packages in debian/<name>.
mkdir -p "$STAGE/debian"
printf 'Source: lifeboat\n\nPackage: lifeboat\nArchitecture: any\n' >"$STAGE/debian/control"

# stage NAME: an empty package root with the binary (debug info stripped into
# the copy; the input is never modified) and the copyright file.
stage() {
  local name="$1" root="$STAGE/debian/$1"
  install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/$name"
  objcopy --strip-debug "$BIN_DIR/$name" "$root/usr/bin/$name"
  chmod 0755 "$root/usr/bin/$name"
  cat >"$root/usr/share/doc/$name/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: lifeboat

Files: *
Copyright: Lifeboat maintainers
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
}

# unit NAME: the package's systemd unit and its maintainer scripts.
unit() {
  local root="$STAGE/debian/$1" s
  install -D -m 0644 "$PKG/systemd/$1.service" "$root/lib/systemd/system/$1.service"
  for s in postinst prerm postrm; do
    install -m 0755 "$PKG/deb/$1/$s" "$root/DEBIAN/$s"
  done
}

# build NAME SUMMARY DESCRIPTION: DEBIAN/control (Depends from the binary's
# shared libraries, via dpkg-shlibdeps) and the .deb.
build() {
  local name="$1" summary="$2" description="$3" root="$STAGE/debian/$1" depends size deb
  depends="$(cd "$STAGE" && dpkg-shlibdeps -O "debian/$name/usr/bin/$name")"
  depends="${depends#shlibs:Depends=}"
  size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
  cat >"$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Description: $summary
$(printf '%s\n' "$description" | fold -s -w 72 | sed 's/ *$//; s/^/ /')
CONTROL
  deb="$OUT/${name}_${VERSION}_${ARCH}.deb"
  dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
  echo "built $deb ($(du -h "$deb" | cut -f1))"
}

stage lifeboat-agent
unit lifeboat-agent
install -D -m 0644 "$PKG/examples/agent.toml" "$STAGE/debian/lifeboat-agent/etc/lifeboat/agent.toml"
install -D -m 0644 "$PKG/examples/agent.toml" \
  "$STAGE/debian/lifeboat-agent/usr/share/doc/lifeboat-agent/examples/agent.toml"
echo /etc/lifeboat/agent.toml >"$STAGE/debian/lifeboat-agent/DEBIAN/conffiles"
build lifeboat-agent "Lifeboat agent: continuous block-level replication of this machine's disks" \
  "Serves the protected disks (image files or block devices) over NBD and replicates every write to a Lifeboat process server, with crash-consistent and app-consistent (fsfreeze) recovery points. Configure /etc/lifeboat/agent.toml, then enable lifeboat-agent.service."

stage lifeboat-ps
unit lifeboat-ps
install -D -m 0644 "$PKG/examples/ps.toml" "$STAGE/debian/lifeboat-ps/usr/share/doc/lifeboat-ps/examples/ps.toml"
build lifeboat-ps "Lifeboat process server: receives agents' streams, uploads them to an object store" \
  "Accepts Lifeboat agents over mutually authenticated TLS, caches their writes durably and uploads them, encrypted, to S3, Azure or a filesystem store, with retention and consistency groups. The first install creates the lifeboat-ps user and runs lifeboat-ps init in /var/lib/lifeboat-ps (CA, certificates, key-encryption key, ps.toml)."

stage lifeboat-mt
build lifeboat-mt "Lifeboat master target: failover and verification of recovery points" \
  "Lists a machine's recovery points in the object store, writes its disks at any point or time (failover, test-failover, also for consistency groups) and verifies that a point can be recovered."
