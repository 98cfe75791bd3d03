"""Fetch and cache the emulated CXL machine's guest kernel (Debian bookworm-backports 6.12).

`prepare_kernel()` downloads `linux-image-6.12.*-amd64-unsigned` with apt, unpacks it under
the cache directory, runs depmod on its modules and links /lib/modules/<version> on the host
to them, so that `modprobe` works inside the guest (which sees the host's root). Idempotent:
the second call finds the unpacked kernel and only checks the link.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from tiermem.errors import TiermemError

CACHE_DIR = os.environ.get("TIERMEM_GUEST_CACHE", "/var/cache/tiermem/guest")
BACKPORTS_LINE = "deb http://deb.debian.org/debian bookworm-backports main\n"
BACKPORTS_FILE = "/etc/apt/sources.list.d/tiermem-bookworm-backports.list"
_PKG_RE = re.compile(r"^linux-image-(6\.12\.\d+\+deb12-amd64)-unsigned$")


@dataclass(frozen=True)
class GuestKernel:
    version: str        # e.g. 6.12.117+deb12-amd64
    root: str           # the unpacked package
    vmlinuz: str
    modules_dir: str    # <root>/lib/modules/<version>

    def module_path(self, name: str) -> str:
        """Path of a loadable module (compressed .ko.xz as shipped) by module name."""
        dep = os.path.join(self.modules_dir, "modules.dep")
        with open(dep) as f:
            for line in f:
                rel = line.split(":", 1)[0]
                base = os.path.basename(rel).split(".ko", 1)[0]
                if base.replace("-", "_") == name.replace("-", "_"):
                    return os.path.join(self.modules_dir, rel)
        raise TiermemError(f"guest kernel {self.version} has no module {name!r} ({dep})")

    def module_deps(self, names: list[str]) -> list[str]:
        """Module paths for names and all their dependencies, dependencies first."""
        deps: dict[str, list[str]] = {}
        with open(os.path.join(self.modules_dir, "modules.dep")) as f:
            for line in f:
                mod, _, rest = line.partition(":")
                deps[mod] = rest.split()
        by_name = {os.path.basename(m).split(".ko", 1)[0].replace("-", "_"): m for m in deps}
        order: list[str] = []

        def visit(rel: str) -> None:
            for d in deps.get(rel, []):
                visit(d)
            if rel not in order:
                order.append(rel)

        for n in names:
            rel = by_name.get(n.replace("-", "_"))
            if rel is None:
                raise TiermemError(f"guest kernel {self.version} has no module {n!r}")
            visit(rel)
        return [os.path.join(self.modules_dir, r) for r in order]


def find_cached(cache_dir: str = CACHE_DIR) -> GuestKernel | None:
    """The unpacked kernel in the cache, or None."""
    found = sorted(glob.glob(os.path.join(cache_dir, "root/boot/vmlinuz-*")))
    if not found:
        return None
    vmlinuz = found[-1]
    version = os.path.basename(vmlinuz)[len("vmlinuz-"):]
    root = os.path.join(cache_dir, "root")
    mods = os.path.join(root, "lib/modules", version)
    if not os.path.exists(os.path.join(mods, "modules.dep")):
        return None
    return GuestKernel(version, root, vmlinuz, mods)


def _run(argv: list[str], what: str, cwd: str | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise TiermemError(f"{what}: {argv[0]} not found (install it with apt)") from e
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TiermemError(f"{what} failed (exit {p.returncode}): {last}")
    return p.stdout


def _ensure_backports(log) -> bool:
    """Adds the bookworm-backports suite to apt's sources if no source has it. True if added."""
    files = glob.glob("/etc/apt/sources.list.d/*") + ["/etc/apt/sources.list"]
    for fn in files:
        try:
            with open(fn) as f:
                if "bookworm-backports" in f.read():
                    return False
        except OSError:
            continue
    log(f"adding bookworm-backports to apt sources ({BACKPORTS_FILE})")
    try:
        with open(BACKPORTS_FILE, "w") as f:
            f.write(BACKPORTS_LINE)
    except OSError as e:
        raise TiermemError(f"cannot write {BACKPORTS_FILE}: {e.strerror} (run as root)") from e
    return True


def _newest_package(log) -> str | None:
    out = _run(["apt-cache", "pkgnames", "linux-image-6.12."], "apt-cache pkgnames")
    versions = []
    for name in out.split():
        m = _PKG_RE.match(name)
        if m:
            nums = tuple(int(x) for x in re.findall(r"\d+", m.group(1).split("+")[0]))
            versions.append((nums, name))
    return max(versions)[1] if versions else None


def download(cache_dir: str = CACHE_DIR, log=print) -> GuestKernel:
    """Downloads and unpacks the newest 6.12 backports kernel into cache_dir."""
    added = _ensure_backports(log)
    pkg = None if added else _newest_package(log)
    if pkg is None:
        log("apt-get update (looking for linux-image-6.12.*-amd64-unsigned in bookworm-backports)")
        _run(["apt-get", "update", "-q"], "apt-get update")
        pkg = _newest_package(log)
    if pkg is None:
        raise TiermemError("no linux-image-6.12.*-amd64-unsigned package in apt's sources "
                           "(is bookworm-backports reachable?)")
    dl = os.path.join(cache_dir, "dl")
    os.makedirs(dl, exist_ok=True)
    os.chmod(dl, 0o777)  # apt's _apt user writes here
    if not glob.glob(os.path.join(dl, pkg + "_*.deb")):
        log(f"downloading {pkg}")
        _run(["apt-get", "download", "-q", pkg], f"apt-get download {pkg}", cwd=dl)
    deb = sorted(glob.glob(os.path.join(dl, pkg + "_*.deb")))[-1]
    tmp = os.path.join(cache_dir, "root.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"unpacking {os.path.basename(deb)}")
    _run(["dpkg-deb", "-x", deb, tmp], "dpkg-deb -x")
    version = os.path.basename(glob.glob(os.path.join(tmp, "boot/vmlinuz-*"))[0])[8:]
    _run(["depmod", "-b", tmp, version], "depmod")
    root = os.path.join(cache_dir, "root")
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    k = find_cached(cache_dir)
    if k is None:
        raise TiermemError(f"unpacked {deb} but found no kernel in {root}")
    return k


def link_modules(k: GuestKernel, log=print) -> None:
    """Makes /lib/modules/<guest version> on the host point at the cached modules, so the
    guest (which runs on the host's root) finds them with modprobe."""
    link = os.path.join("/lib/modules", k.version)
    if os.path.islink(link) and os.readlink(link) == k.modules_dir:
        return
    if os.path.exists(link) and not os.path.islink(link):
        return  # a real install of the same kernel on the host: it has the same modules
    os.makedirs("/lib/modules", exist_ok=True)
    if os.path.islink(link):
        os.unlink(link)
    log(f"linking {link} -> {k.modules_dir}")
    os.symlink(k.modules_dir, link)


def uncompressed(k: GuestKernel, cache_dir: str = CACHE_DIR, log=print) -> str | None:
    """The kernel as a plain ELF vmlinux (cached), which QEMU boots through its PVH entry
    point, skipping the in-guest decompressor (seconds under TCG). None if it cannot be
    extracted (no zstd tool, or a kernel compressed another way): then boot vmlinuz."""
    out = os.path.join(cache_dir, f"vmlinux-{k.version}")
    if os.path.exists(out):
        return out
    with open(k.vmlinuz, "rb") as f:
        data = f.read()
    off = data.find(b"\x28\xb5\x2f\xfd")            # zstd frame magic (CONFIG_KERNEL_ZSTD)
    if off < 0 or shutil.which("zstd") is None:
        return None
    log("extracting the uncompressed guest kernel (PVH boot)")
    # zstd exits 1 on the bzImage's trailing bytes after the frame; the frame is complete
    p = subprocess.run(["zstd", "-d", "-c", "-q"], input=data[off:], capture_output=True)
    if not p.stdout.startswith(b"\x7fELF") or len(p.stdout) < len(data):
        return None
    with open(out + ".tmp", "wb") as f:
        f.write(p.stdout)
    os.replace(out + ".tmp", out)
    return out


def prepare_kernel(cache_dir: str = CACHE_DIR, log=print) -> GuestKernel:
    k = find_cached(cache_dir) or download(cache_dir, log)
    link_modules(k, log)
    return k
