"""What cxlfork trusts: directories and files only the caller controls, and the caller's key.

- `check_dir(path)`: a store directory must be a real directory (not a symlink) owned by the
  caller and not writable by group or others, and every directory above it owned by root or the
  caller and, if group/others may write it, sticky (so nobody else can rename it away and put
  another in its place). `open_dir` checks and opens it (O_DIRECTORY | O_NOFOLLOW); files in it
  are then opened relative to that fd.
- `open_owned(dir_fd, name)`: a regular file (O_NOFOLLOW) owned by the caller and not writable by
  group or others, checked with fstat on the fd that is then used.
- `key()` / `seal(data)`: manifests are sealed with HMAC-SHA256 under a 32-byte key only the
  caller's uid can read: $CXLFORK_KEY, else /var/lib/tiermem/cxlfork.key for root, else
  $XDG_STATE_HOME (default $HOME/.local/state)/tiermem/cxlfork.key. A checkpoint creates it
  (0600, in a 0700 directory, written to a temporary name and hard-linked into place, so two
  first checkpoints agree on one key); restore, verify and rm only read it.
- `pool_key()` / `pool_seal(data)`: images on a memory pool several hosts share
  (cxlfork.poolstore) are sealed under the pool's key instead, one for all the hosts of that
  pool: $CXLFORK_POOL_KEY, else /run/cxlfork/pool.key. It is never on the pool itself; the
  host that boots the pool's hosts writes it into each (emulation.hosts: 0600, root, tmpfs)
  and cxlfork never creates it. The same checks as the user's key (owner, mode 0600, 32
  bytes, no symlink, a directory only the caller controls).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import pwd
import stat

from cxlfork.errors import CxlforkError, ImageError

KEY_ENV = "CXLFORK_KEY"
ROOT_KEY = "/var/lib/tiermem/cxlfork.key"
POOL_KEY_ENV = "CXLFORK_POOL_KEY"
POOL_KEY = "/run/cxlfork/pool.key"
KEY_BYTES = 32
_keys: dict[tuple, bytes] = {}        # {(path, dev, ino, ctime): key} of this process


def _who() -> str:
    return f"uid {os.geteuid()}"


def _check_ancestors(path: str, what: str, err=CxlforkError) -> None:
    uid = os.geteuid()
    p = os.path.realpath(path)
    while True:
        try:
            st = os.lstat(p)
        except OSError as e:
            raise err(f"{what}: {p}: {e.strerror}") from e
        if st.st_uid not in (0, uid):
            raise err(f"{what}: {p} is owned by uid {st.st_uid} (not root, not {_who()}): "
                      "its owner could replace what is below it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise err(f"{what}: {p} is writable by group or others and not sticky: they could "
                      "replace what is below it")
        if p == "/":
            return
        p = os.path.dirname(p)


def check_dir(path: str, what: str, err=CxlforkError) -> os.stat_result:
    """Refuse a directory another user could change (see the module docstring)."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise err(f"{what} {path}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise err(f"{what} {path} is a symlink; give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise err(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise err(f"{what} {path} is owned by uid {st.st_uid}, not by you ({_who()}): its "
                  "owner could replace page files; remove it or use a directory of your own")
    if st.st_mode & 0o022:
        raise err(f"{what} {path} is writable by group or others (mode "
                  f"{stat.S_IMODE(st.st_mode):04o}); it must be 0700")
    _check_ancestors(os.path.dirname(path), f"{what} {path}", err)
    return st


def open_dir(path: str, what: str, err=CxlforkError) -> int:
    """check_dir, then an O_DIRECTORY | O_NOFOLLOW fd of it, re-checked with fstat."""
    st = check_dir(path, what, err)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise err(f"{what} {path}: {e.strerror}") from e
    st2 = os.fstat(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise err(f"{what} {path} was replaced while being opened")
    return fd


def check_owned(st: os.stat_result, path: str, what: str, err=CxlforkError) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise err(f"{what} {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise err(f"{what} {path} is owned by uid {st.st_uid}, not by you ({_who()}): "
                  "refusing to use what another user may have written")
    if st.st_mode & 0o022:
        raise err(f"{what} {path} is writable by group or others (mode "
                  f"{stat.S_IMODE(st.st_mode):04o})")


def open_owned(dir_fd: int, name: str, path: str, what: str, err=CxlforkError) -> int:
    """fd of the regular file name in dir_fd (O_NOFOLLOW), owned by the caller, not writable by
    group/others. FileNotFoundError passes through."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise err(f"{what} {path} is a symlink") from e
        if e.errno == errno.ENOENT:
            raise
        raise err(f"{what} {path}: {e.strerror}") from e
    try:
        check_owned(os.fstat(fd), path, what, err)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- the key -----------------------------------------------------------------------------------
def key_path() -> str:
    env = os.environ.get(KEY_ENV)
    if env:
        return os.path.abspath(env)
    if os.geteuid() == 0:
        return ROOT_KEY
    home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "tiermem", "cxlfork.key")


def _create_key(p: str) -> None:
    d = os.path.dirname(p)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        check_dir(d, "key directory", ImageError)
        tmp = f"{p}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)                   # atomic: a concurrent first use keeps its key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise ImageError(f"cannot create the cxlfork key {p}: {e.strerror}") from e


def key(create: bool = False) -> bytes:
    """The caller's sealing key (created by a checkpoint on first use)."""
    p = key_path()
    try:
        return _read_key(p, "cxlfork key")
    except FileNotFoundError:
        if not create:
            raise ImageError(f"no cxlfork key {p} ({_who()}): no image was checkpointed by "
                             "this user here, or the key was removed; images sealed with "
                             "another key are refused") from None
        _create_key(p)
        return _read_key(p, "cxlfork key")


def pool_key_path() -> str:
    env = os.environ.get(POOL_KEY_ENV)
    return os.path.abspath(env) if env else POOL_KEY


def pool_key() -> bytes:
    """The key of the memory pool this host shares (never created here: the host that boots
    the pool's hosts provisions it)."""
    p = pool_key_path()
    try:
        return _read_key(p, "pool key")
    except FileNotFoundError:
        raise ImageError(f"no pool key {p}: the host that boots the pool's hosts provisions "
                         f"it ('tiermem emulate start --hosts N' does); pool images are sealed "
                         f"with it") from None


def _read_key(p: str, what: str) -> bytes:
    """The 32 bytes of key file p, checked (FileNotFoundError passes through)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "is a symlink" if e.errno == errno.ELOOP else e.strerror
        raise ImageError(f"{what} {p}: {why}") from e
    try:
        st = os.fstat(fd)
        k = (p, st.st_dev, st.st_ino, st.st_ctime_ns)
        if k in _keys:
            return _keys[k]
        check_owned(st, p, what, ImageError)
        if st.st_mode & 0o077:
            raise ImageError(f"{what} {p} is readable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); it must be 0600"
                             + (" (make a new one: remove it and checkpoint again)"
                                if what == "cxlfork key" else ""))
        check_dir(os.path.dirname(p), f"directory of the {what} {p}:", ImageError)
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise ImageError(f"{what} {p} is {len(data)} bytes, not {KEY_BYTES} (corrupt)")
    _keys[k] = data
    return data


def seal(data: bytes, create: bool = False, with_key: bytes | None = None) -> str:
    """HMAC-SHA256 of data under the caller's key (or with_key), hex."""
    return hmac.new(with_key or key(create), data, hashlib.sha256).hexdigest()


def same_seal(a: str, b) -> bool:
    return isinstance(b, str) and hmac.compare_digest(a.encode(), b.encode("utf-8", "replace"))
