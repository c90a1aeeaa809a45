#!/usr/bin/env bash
# Installs what Lifeboat's test suite and demo need on a fresh Debian 12 machine.
# Idempotent: each item is installed only when missing; prints nothing when all is
# present and one line per item it installs.
#
# Debian packages (apt-get, as root or through sudo):
#   libclang-dev  - bindgen for RocksDB's bindings (librocksdb-sys)
#   qemu-utils    - qemu-io, qemu-img, qemu-nbd (NBD clients / reference server)
#   nbdkit        - reference NBD server
#   libnbd-bin    - nbdcopy, nbdfuse, nbdinfo
#   python3-libnbd - nbdsh (the NBD server tests drive it)
#   fio           - load generator (nbd engine)
#   fuse3         - fusermount3 for nbdfuse
#   rsync         - resync peer
#   e2fsprogs     - mkfs.ext4 / e2fsck for filesystem checks of recovered images
#   sqlite3       - PRAGMA integrity_check of a database recovered at an app-consistent point
#   python3       - the SQLite writer of that test (its sqlite3 module)
#   dpkg-dev, binutils, systemd - dpkg-shlibdeps, objcopy/readelf and
#                   systemd-analyze for packaging/build-debs.sh and its test
#   chromium, fonts-dejavu-core - headless Chromium loads the process server's
#                   status page in its test (DOM and a screenshot)
#   curl          - a cookie-only POST to the planned-failover endpoint (refused)
#
# Object-store servers, cached OUTSIDE the clone in
# ${LIFEBOAT_TOOLS:-$HOME/.cache/lifeboat/tools}:
#   azurite/node_modules/.bin/azurite-blob  - Azure Blob emulator (npm azurite@3; needs npm)
#   s3s-fs/bin/s3s-fs                       - S3 server on a directory (cargo install
#                                             s3s-fs@0.14.1, ~3 min on an idle machine; its
#                                             build dir s3s-fs-target/ is removed afterwards)
#
# `install-deps.sh --demo` installs only what scripts/demo.sh uses (the Debian
# packages libclang-dev, qemu-utils, fio and python3): the demo runs on the embedded
# local-filesystem store, so it never waits for the test-only object-store servers.
#
# It only installs: it exports nothing and changes no configuration. The tests find the
# servers through $LIFEBOAT_TOOLS or the default path above.
set -euo pipefail

DEMO=0
case "${1:-}" in
    --demo) DEMO=1 ;;
    "") ;;
    *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
esac

TOOLS="${LIFEBOAT_TOOLS:-$HOME/.cache/lifeboat/tools}"

DEB_PACKAGES=(libclang-dev qemu-utils nbdkit libnbd-bin python3-libnbd fio fuse3 rsync e2fsprogs sqlite3 python3 dpkg-dev binutils systemd chromium fonts-dejavu-core curl)
if [ "$DEMO" = 1 ]; then
    DEB_PACKAGES=(libclang-dev qemu-utils fio python3)
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

missing=()
for p in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing Debian packages: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# Azurite (Azure Blob emulator).
if [ "$DEMO" = 1 ]; then
    exit 0
fi

AZURITE_BIN="$TOOLS/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$AZURITE_BIN" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "install-deps: installing Debian package npm (for Azurite)"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
    fi
    echo "install-deps: installing azurite@3 into $TOOLS/azurite"
    mkdir -p "$TOOLS/azurite"
    (cd "$TOOLS/azurite" && npm install --no-audit --no-fund --loglevel=error azurite@3 >/dev/null)
    [ -x "$AZURITE_BIN" ] || { echo "install-deps: $AZURITE_BIN missing after npm install" >&2; exit 1; }
fi

# s3s-fs (S3 server storing objects as files; checks SigV4 signatures).
S3S_BIN="$TOOLS/s3s-fs/bin/s3s-fs"
if [ ! -x "$S3S_BIN" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "install-deps: cargo is required to build s3s-fs (install Rust via rustup)" >&2
        exit 1
    fi
    echo "install-deps: building s3s-fs 0.14.1 into $TOOLS/s3s-fs (takes a few minutes)"
    mkdir -p "$TOOLS"
    CARGO_TARGET_DIR="$TOOLS/s3s-fs-target" nice -n 10 cargo install --quiet \
        s3s-fs@0.14.1 --features binary --locked --root "$TOOLS/s3s-fs"
    [ -x "$S3S_BIN" ] || { echo "install-deps: $S3S_BIN missing after cargo install" >&2; exit 1; }
    rm -rf "$TOOLS/s3s-fs-target"
fi
