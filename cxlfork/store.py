"""The page store: a directory on a tmpfs whose memory is bound to the CXL (slow) node.

Page files live here as `<image-id>.pages` (0600, directory 0700), next to `<image-id>.owner`
(the image directory that uses it). Clones map these files MAP_PRIVATE, so pages nobody writes
are shared from the store's page cache. Placement: the default store is a tmpfs mounted with
`mpol=bind:N` (N = the slow node from tiermem.topology; node 0 with a warning on a one-node
host); independent of the mount, the writer binds each page file's shared policy to N with
mbind(2) before filling it.

Default location: $CXLFORK_STORE, else /var/lib/cxlfork/store (mounted as tmpfs when root),
else /dev/shm/cxlfork-store (root) or /dev/shm/cxlfork-store-UID (other users). The store
cxlfork mounts uses `huge=within_size`: page files are written in 2 MiB folios (about 3x faster
to fill than 4 KiB pages here), and clones still map and copy them page by page.

A store must be a directory of the caller's, 0700, under directories nobody else can replace
(cxlfork.trust.check_dir): one another user owns (e.g. pre-created under /dev/shm) is refused.
"""
from __future__ import annotations

import os
import subprocess
import sys

from cxlfork import trust
from cxlfork.errors import CxlforkError

DEFAULT = "/var/lib/cxlfork/store"
FALLBACK = "/dev/shm/cxlfork-store"


def fallback() -> str:
    """The /dev/shm store of this user (root's is FALLBACK; others get their own)."""
    return FALLBACK if os.geteuid() == 0 else f"{FALLBACK}-{os.geteuid()}"


def mount_options(node: int) -> str:
    """tmpfs options of a store cxlfork mounts (the default one; the benchmark's)."""
    return f"mode=0700,mpol=bind:{node},huge=within_size"


def mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fs type, options) of the mount holding path."""
    path = os.path.realpath(path)
    best = ("/", "", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].replace("\\040", " ")
            sep = parts.index("-")
            fstype, opts = parts[sep + 1], parts[sep + 3] if len(parts) > sep + 3 else ""
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
                best = (mp, fstype, opts)
    return best


def cxl_node() -> tuple[int, str | None]:
    """The node of the CXL tier and a warning when the host has none."""
    try:
        from tiermem.topology import slow_node_or_fallback
        return slow_node_or_fallback()
    except Exception as e:  # topology unreadable: still usable, say so
        return 0, f"cannot read the memory topology ({e}); using node 0 as the CXL tier"


class Store:
    def __init__(self, path: str, node: int, warning: str | None = None):
        self.path = path
        self.node = node
        self.warning = warning

    def pages_path(self, image_id: str) -> str:
        return os.path.join(self.path, f"{image_id}.pages")

    def owner_path(self, image_id: str) -> str:
        return os.path.join(self.path, f"{image_id}.owner")

    def tmp_pages_path(self, image_id: str) -> str:
        return os.path.join(self.path, f"{image_id}.pages.tmp.{os.getpid()}")


def _ensure_dir(path: str) -> None:
    """Create the store directory 0700 if missing; an existing one is checked, not changed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
    os.chmod(path, 0o700)                     # umask aside: 0700 exactly


def _checked(path: str, node: int, warning: str | None) -> Store:
    trust.check_dir(path, "store")
    return Store(path, node, warning)


def open_store(path: str | None = None, create: bool = True) -> Store:
    """The store at path (must be on tmpfs), or the default one (mounted if needed)."""
    node, warning = cxl_node()
    if path:
        path = os.path.abspath(path)
        if create:
            try:
                _ensure_dir(path)
            except OSError as e:
                raise CxlforkError(f"cannot create store directory {path}: {e.strerror}") from e
        trust.check_dir(path, "store")
        fstype = mount_of(path)[1]
        if fstype != "tmpfs":
            raise CxlforkError(f"store {path} is on {fstype or 'an unknown fs'}, not tmpfs: "
                               "page files must live in memory to be mapped copy-on-write")
        return Store(path, node, warning)
    env = os.environ.get("CXLFORK_STORE")
    if env:
        return open_store(env, create)
    mine = os.geteuid() == 0 or (os.path.isdir(DEFAULT)
                                 and os.stat(DEFAULT).st_uid == os.geteuid())
    if mine and mount_of(DEFAULT)[0] == DEFAULT:
        return _checked(DEFAULT, node, warning)
    if create and os.geteuid() == 0:
        try:
            _ensure_dir(DEFAULT)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options(node),
                                "cxlfork-store", DEFAULT], capture_output=True, text=True)
            if r.returncode == 0:
                return _checked(DEFAULT, node, warning)
            warn = f"could not mount the store tmpfs on {DEFAULT}: {r.stderr.strip()}"
        except OSError as e:
            warn = f"could not mount the store tmpfs on {DEFAULT}: {e}"
        print(f"cxlfork: warning: {warn}; using {FALLBACK}", file=sys.stderr)
    fb = fallback()
    if create:
        try:
            _ensure_dir(fb)
        except OSError as e:
            raise CxlforkError(f"cannot create store directory {fb}: {e.strerror}") from e
    elif not os.path.lexists(fb):
        return Store(fb, node, warning)          # nothing stored yet (gc: nothing to do)
    return _checked(fb, node, warning)


def gc(store: Store) -> list[str]:
    """Remove page files no published image uses, and leftovers of killed checkpoints."""
    from cxlfork import image as image_mod
    removed = []
    try:
        names = os.listdir(store.path)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        p = os.path.join(store.path, name)
        if ".pages.tmp." in name or ".owner.tmp." in name:
            pid = name.rsplit(".", 1)[-1]
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                continue                       # a checkpoint still running
            owner = os.path.join(store.path, name.split(".")[0] + ".owner")
            _remove_tmp_image(owner)
            os.unlink(p)
            removed.append(p)
            continue
        if name.endswith(".pages"):
            image_id = name[:-len(".pages")]
            owner = store.owner_path(image_id)
            try:
                with open(owner) as f:
                    img = f.read().strip()
            except FileNotFoundError:
                img = ""
            if img and (image_mod.image_id_of(img) == image_id or _publishing(img)):
                continue
            _remove_tmp_image(owner)
            for q in (p, owner):
                if os.path.exists(q):
                    os.unlink(q)
                    removed.append(q)
    return removed


def _publishing(img: str) -> bool:
    """A checkpoint still running has IMAGE.tmp.PID (PID alive) and no IMAGE yet."""
    parent, base = os.path.dirname(img) or ".", os.path.basename(img) + ".tmp."
    try:
        return any(n.startswith(base) and n[len(base):].isdigit()
                   and os.path.exists(f"/proc/{n[len(base):]}") for n in os.listdir(parent))
    except OSError:
        return False


def _remove_tmp_image(owner: str) -> None:
    """A checkpoint killed before publishing leaves IMAGE.tmp.PID: remove it too."""
    import shutil
    try:
        with open(owner) as f:
            img = f.read().strip()
    except FileNotFoundError:
        return
    parent = os.path.dirname(img) or "."
    base = os.path.basename(img) + ".tmp."
    try:
        for n in os.listdir(parent):
            if n.startswith(base) and n[len(base):].isdigit() \
                    and not os.path.exists(f"/proc/{n[len(base):]}"):
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
    except FileNotFoundError:
        pass
