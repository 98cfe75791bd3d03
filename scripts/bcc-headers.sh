#!/bin/sh
# Kernel headers for bcc (Debian's python3-bpfcc compiles BPF programs against them).
#  * host: Debian bookworm's 6.1 headers, linked as /lib/modules/$(uname -r)/{build,source}
#    when the running kernel has no headers package of its own (enough for tracepoints);
#  * emulated CXL machine: the guest kernel's exact linux-headers-<version> (bookworm-
#    backports), installed on the host (the guest sees the host's root read-only) and linked
#    as /lib/modules/<guest version>/build (that directory is the link made by
#    `python -m emulation prepare`, pointing into its kernel cache).
# Idempotent: does nothing when the links already resolve to headers. Needs root and apt.
set -eu

GUEST_CACHE=${TIERMEM_GUEST_CACHE:-/var/cache/tiermem/guest}
updated=0

apt_install() {
    if [ "$updated" = 0 ] && ! apt-cache show "$1" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# bcc needs build/ (generated config) and source/ (include/linux/kconfig.h ...).
has_headers() { [ -e "$1/build/include/generated/autoconf.h" ] && \
                [ -e "$1/source/include/linux/kconfig.h" ]; }

link_to() {  # link_to <modules dir> <debian headers version>
    # Debian's headers: linux-headers-<ver>-amd64 (build) uses linux-headers-<ver>-common
    # (source), as the links its package makes under /lib/modules/<ver>-amd64.
    mkdir -p "$1"
    b=/usr/src/linux-headers-$2
    src=${b%-amd64}-common
    [ -d "$src" ] || src=$b
    for pair in "build:$b" "source:$src"; do
        l=${pair%%:*}; t=${pair#*:}
        if [ -L "$1/$l" ] || [ ! -e "$1/$l" ]; then ln -sfn "$t" "$1/$l"; fi
    done
}

ensure_backports() {
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            > /etc/apt/sources.list.d/bookworm-backports.list
        apt-get update -q >/dev/null
        updated=1
    fi
}

# --- host --------------------------------------------------------------------------------
host=$(uname -r)
if ! has_headers "/lib/modules/$host"; then
    if apt-cache show "linux-headers-$host" >/dev/null 2>&1; then
        apt_install "linux-headers-$host"
    else
        pkg=$(apt-cache pkgnames linux-headers-6.1.0- | grep -E '^linux-headers-6\.1\.0-[0-9]+-amd64$' \
              | sort -t- -k4,4n | tail -1)
        if [ -z "$pkg" ]; then apt-get update -q >/dev/null; updated=1
            pkg=$(apt-cache pkgnames linux-headers-6.1.0- | grep -E '^linux-headers-6\.1\.0-[0-9]+-amd64$' \
                  | sort -t- -k4,4n | tail -1)
        fi
        [ -n "$pkg" ] || { echo "bcc-headers: no linux-headers-6.1.0-*-amd64 in apt" >&2; exit 1; }
        ver=${pkg#linux-headers-}
        [ -d "/usr/src/linux-headers-$ver" ] || apt_install "$pkg"
        link_to "/lib/modules/$host" "$ver"
        echo "bcc-headers: host $host uses the headers of $ver"
    fi
fi

# --- guest (only when the emulated machine's kernel is prepared) ----------------------------
for vmlinuz in "$GUEST_CACHE"/root/boot/vmlinuz-*; do
    [ -e "$vmlinuz" ] || continue
    gver=${vmlinuz##*/vmlinuz-}
    mods="/lib/modules/$gver"
    [ -d "$mods" ] || mods="$GUEST_CACHE/root/lib/modules/$gver"
    if has_headers "$mods"; then continue; fi
    if [ ! -d "/usr/src/linux-headers-$gver" ]; then
        ensure_backports
        apt_install "linux-headers-$gver"
    fi
    link_to "$mods" "$gver"
    echo "bcc-headers: guest $gver uses /usr/src/linux-headers-$gver"
done
exit 0
