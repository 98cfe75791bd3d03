"""Build the emulated CXL machine's tiny initramfs (busybox + the 9p modules + init scripts).

The guest boots into busybox init. Its sysinit script loads the 9p modules, mounts the
host's root (9p tag `hostroot`, read-only) on /newroot, mounts proc/sys/dev/tmpfs/tracefs/
debugfs/bpffs/cgroup2 inside it, mounts the writable work folder (9p tag `work`) at the
path the kernel command line gives (`tiermem.work=`), and init then keeps the guest agent
running in a chroot there, with the host's own /usr/bin/python3. The image is cached and
rebuilt only when its inputs change.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess

from emulation.guest_kernel import CACHE_DIR, GuestKernel
from tiermem.errors import TiermemError

BUSYBOX = "/bin/busybox"
MODULES = ["netfs", "9pnet", "9pnet_virtio", "9p"]
MSIZE = 512000

INITTAB = """\
::sysinit:/setup
::respawn:/agent.sh
::ctrlaltdel:/bin/poweroff -f
::shutdown:/bin/sync
"""

SETUP = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "tiermem-init: $*" > /dev/console; sync; poweroff -f; }
for m in $(cat /modules.order); do insmod /lib/mods/$m || fail "insmod $m failed"; done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=@MSIZE@ hostroot $R \
  || fail "cannot mount the host root (9p tag hostroot)"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs $R/$d; done
mount -t tracefs nodev $R/sys/kernel/tracing
mount -t debugfs nodev $R/sys/kernel/debug
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 nodev $R/sys/fs/cgroup
PROJ=$(arg tiermem.project)
if [ -n "$PROJ" ]; then
  mkdir -p $R$PROJ 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=@MSIZE@ project $R$PROJ \
    || fail "cannot mount the project checkout on $PROJ (9p tag project)"
fi
WORK=$(arg tiermem.work)
if [ -n "$WORK" ]; then
  mkdir -p $R$WORK 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@ work $R$WORK \
    || fail "cannot mount the work folder on $WORK (9p tag work)"
fi
hostname tiermem-cxl
ip link set lo up 2>/dev/null
echo "tiermem-init: root mounted at $(cut -d" " -f1 /proc/uptime) s" > /dev/console
"""

AGENT_SH = r"""#!/bin/sh
export PATH=/bin
AGENT=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^tiermem.agent=//p' | tail -n 1)
PY=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^tiermem.python=//p' | tail -n 1)
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 XDG_CACHE_HOME=/tmp/.cache MPLCONFIGDIR=/tmp/.mpl \
  CXLFORK_KEY=/run/tiermem/cxlfork.key \
  chroot /newroot ${PY:-/usr/bin/python3} -u -S $AGENT
"""


def _inputs_hash(k: GuestKernel) -> str:
    h = hashlib.sha256()
    for part in (INITTAB, SETUP, AGENT_SH, str(MSIZE), k.version, " ".join(MODULES)):
        h.update(part.encode())
    st = os.stat(BUSYBOX)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_initramfs(k: GuestKernel, cache_dir: str = CACHE_DIR, log=print) -> str:
    """Path of the cached initramfs for kernel k, building it if its inputs changed."""
    out = os.path.join(cache_dir, "initramfs.cpio")
    stamp = out + ".hash"
    want = _inputs_hash(k)
    try:
        with open(stamp) as f:
            if f.read().strip() == want and os.path.exists(out):
                return out
    except OSError:
        pass
    if not os.path.exists(BUSYBOX):
        raise TiermemError(f"{BUSYBOX} not found: apt-get install busybox-static")
    log("building the guest initramfs")
    stage = os.path.join(cache_dir, "initramfs.d")
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "etc", "proc", "sys", "dev", "newroot", "lib/mods"):
        os.makedirs(os.path.join(stage, d))
    shutil.copy2(BUSYBOX, os.path.join(stage, "bin/busybox"))
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(stage, "bin", a))
    os.symlink("bin/busybox", os.path.join(stage, "init"))
    order = []
    for path in k.module_deps(MODULES):
        name = os.path.basename(path).split(".ko", 1)[0] + ".ko"
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        elif not path.endswith(".ko"):
            raise TiermemError(f"unsupported module compression: {path}")
        with open(os.path.join(stage, "lib/mods", name), "wb") as f:
            f.write(data)
        order.append(name)
    files = {"etc/inittab": (INITTAB, 0o644), "setup": (SETUP.replace("@MSIZE@", str(MSIZE)), 0o755),
             "agent.sh": (AGENT_SH, 0o755), "modules.order": ("\n".join(order) + "\n", 0o644)}
    for rel, (text, mode) in files.items():
        p = os.path.join(stage, rel)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)
    listing = subprocess.run(["find", "."], cwd=stage, capture_output=True, check=True).stdout
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        p = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=stage,
                           input=listing, stdout=f, stderr=subprocess.PIPE)
    if p.returncode != 0:
        os.unlink(tmp)
        raise TiermemError(f"cpio failed: {p.stderr.decode(errors='replace').strip()}")
    os.replace(tmp, out)
    shutil.rmtree(stage, ignore_errors=True)
    with open(stamp, "w") as f:
        f.write(want + "\n")
    return out
