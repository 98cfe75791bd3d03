#!/bin/sh
# Build CRIU (the comparison baseline of bench/bench_cxlfork.py) from its public source into
# $CRIU_PREFIX (default /var/cache/tiermem/criu), outside the checkout. Idempotent: a binary
# there that reports the wanted version and passes `criu check` is kept.
#
#   CRIU_SRC=DIR  a CRIU source tree, or a git repository (a clone or a bare mirror) from which
#                 the tag v$CRIU_VERSION (else its newest commit) is exported
#   CRIU_VERSION  default 4.2
#
# Debian bookworm's criu 3.17.1 fails on this 6.18 kernel ("criu check": "vdso: Unexpected rt
# vDSO area bounds"), hence a build from source. Build dependencies come from apt.
set -eu

CRIU_VERSION=${CRIU_VERSION:-4.2}
CRIU_PREFIX=${CRIU_PREFIX:-/var/cache/tiermem/criu}
BIN=$CRIU_PREFIX/$CRIU_VERSION/sbin/criu
DEPS="build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler \
protobuf-compiler python3-protobuf libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev \
libbsd-dev libgnutls28-dev uuid-dev libaio-dev"

die() { echo "criu.sh: error: $*" >&2; exit 1; }

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "Version: $CRIU_VERSION\b" \
   && "$BIN" check >/dev/null 2>&1; then
    echo "criu $CRIU_VERSION: $BIN (already built)"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "run as root (apt-get, and criu itself needs root)"
[ -n "${CRIU_SRC:-}" ] || die "set CRIU_SRC to a CRIU source tree or git repository" \
    "(github.com/checkpoint-restore/criu, tag v$CRIU_VERSION)"
[ -d "$CRIU_SRC" ] || die "CRIU_SRC=$CRIU_SRC is not a directory"

missing=$(dpkg-query -W -f='${Status} ${Package}\n' $DEPS 2>/dev/null \
          | grep -v '^install ok installed' | awk '{print $NF}'; \
          for p in $DEPS; do dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "== installing CRIU build dependencies: $(echo $missing | tr '\n' ' ')"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $DEPS
fi

tmp=$(mktemp -d /tmp/criu-build.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ -f "$CRIU_SRC/Makefile" ] && [ -d "$CRIU_SRC/criu" ]; then
    cp -a "$CRIU_SRC/." "$tmp/src"
elif git -C "$CRIU_SRC" rev-parse --git-dir >/dev/null 2>&1; then
    ref=v$CRIU_VERSION
    git -C "$CRIU_SRC" rev-parse -q --verify "$ref^{commit}" >/dev/null || {
        ref=$(git -C "$CRIU_SRC" rev-parse HEAD)
        echo "criu.sh: warning: no tag v$CRIU_VERSION in $CRIU_SRC; building its newest commit $ref" >&2
    }
    mkdir "$tmp/src"
    git -C "$CRIU_SRC" archive "$ref" | tar -x -C "$tmp/src"
else
    die "CRIU_SRC=$CRIU_SRC is neither a CRIU source tree nor a git repository"
fi

echo "== building criu $CRIU_VERSION in $tmp/src (a few minutes on 2 cores)"
make -C "$tmp/src" -j"$(nproc)" criu >"$tmp/build.log" 2>&1 \
    || { tail -30 "$tmp/build.log" >&2; die "criu build failed (log above)"; }
mkdir -p "$CRIU_PREFIX/$CRIU_VERSION/sbin"
install -m 0755 "$tmp/src/criu/criu" "$BIN.new"
mv "$BIN.new" "$BIN"
ln -sfn "$CRIU_VERSION/sbin" "$CRIU_PREFIX/sbin"
"$BIN" check || die "$BIN check failed on kernel $(uname -r)"
echo "criu $CRIU_VERSION: $BIN"
