"""The resident restore service: `cxlfork restore` without the interpreter start.

`cxlfork service [--socket PATH]` (root) imports everything the restore command needs once and
listens on a unix SOCK_SEQPACKET socket (default /run/cxlfork/restore.sock, mode 0666: any
user may ask, the answer depends on who asks). The client is `cxlfork-restore` (native/
restore_client.c), which takes the same arguments as `cxlfork restore`. Per request a child
the service forked ahead (_prefork, while idle: the fork is off the request's path) gets the
accepted connection and:

1. receives the message (magic, umask, arguments, environment) and the caller's fds 0, 1, 2
   and working directory (SCM_RIGHTS), and reads the caller's credentials (SO_PEERCRED; the
   process held through a pidfd while it is looked at);
2. refuses, with one error line on the caller's stderr and status 1, a caller that could not
   run the restore itself: anyone but uid 0 with at least the service's effective
   capabilities (the restore needs them: ptrace, PR_SET_MM_MAP, clone3 set_tid, userfaultfd),
   so nobody restores an image through the service that their own command could not;
3. answers "fall back" (the client then runs the Python command, which then acts exactly as
   before) where it could not give the clone what the caller's own command would: another
   mount, network, PID, IPC, UTS, user or cgroup namespace, another root directory, a seccomp
   filter or no_new_privs, cgroups it cannot join;
4. takes the caller's place: its gids and groups, every cgroup of the caller (so clones are
   born where the caller's own restorer would be), rlimits, nice value, CPU affinity,
   oom_score_adj, umask, working directory, environment, and the caller's fds as 0, 1, 2;
5. runs the `cxlfork restore` command itself (cxlfork.cli, the same code, options, output and
   waiting for the clones, serving their userfaultfd) and sends its exit status back.

What differs from running the command: the clones are not in the caller's session or process
group (a terminal's Ctrl-C stops the client, not the clones), and their parent is the
service's request process, not the client.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import struct
import sys

SOCK = "/run/cxlfork/restore.sock"
MAGIC = b"CXR1"
FALLBACK = 256
MAX_MSG = 192 << 10
NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")


class Refused(Exception):
    """The caller may not restore here (one line on its stderr, status 1)."""


class Fallback(Exception):
    """The service cannot act as the caller's own command would: the client runs that."""


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _cgroups(pid: int) -> dict[frozenset, str]:
    """{hierarchy key (controllers; empty for cgroup v2): path} of a process."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctl, path = line.rstrip("\n").split(":", 2)
            out[frozenset(c for c in ctl.split(",") if c)] = path
    return out


def _cgroup_mounts() -> dict[frozenset, tuple[str, str]]:
    """{hierarchy key: (mount point, root in the hierarchy)} from our mountinfo."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, b = line.split(" - ", 1)
            a, b = a.split(), b.split()
            if b[0] == "cgroup2":
                out.setdefault(frozenset(), (a[4], a[3]))
            elif b[0] == "cgroup":
                opts = b[2].split(",")
                known = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
                         "clone_children", "xattr", "noprefix", "cpuset_v2_mode",
                         "memory_recursiveprot", "nsdelegate", "memory_localevents",
                         "favordynmods"}
                ctl = frozenset(o for o in opts if o not in known and
                                not o.startswith("release_agent="))
                out.setdefault(ctl, (a[4], a[3]))
    return out


def check_caller(pid: int, uid: int) -> dict[str, str]:
    """Refused/Fallback unless the service may restore for PID exactly as its own command
    would; returns its /proc status fields."""
    if uid != 0 or pid <= 0:
        raise Refused(f"restore service: uid {uid} may not restore through it (a restore "
                      "needs root with the service's capabilities; nothing was restored)")
    st, me = _status(pid), _status(os.getpid())
    if int(st["CapEff"], 16) & int(me["CapEff"], 16) != int(me["CapEff"], 16) or \
            int(st["CapBnd"], 16) & int(me["CapBnd"], 16) != int(me["CapBnd"], 16):
        raise Refused(f"restore service: PID {pid} lacks capabilities the restore needs "
                      f"(effective {st['CapEff']}, the service has {me['CapEff']}); nothing "
                      "was restored")
    if st.get("Uid", "").split() != ["0"] * 4:
        raise Fallback(f"the caller's user IDs are {st.get('Uid')}")
    for k in ("NoNewPrivs", "Seccomp"):
        if st.get(k, "0").strip() != me.get(k, "0").strip():
            raise Fallback(f"the caller has {k} {st.get(k)}")
    for ns in NAMESPACES:
        try:
            a, b = os.stat(f"/proc/{pid}/ns/{ns}"), os.stat(f"/proc/self/ns/{ns}")
        except FileNotFoundError:
            continue
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise Fallback(f"the caller is in another {ns} namespace")
    a, b = os.stat(f"/proc/{pid}/root"), os.stat("/")
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        raise Fallback("the caller has another root directory")
    return st


def become(pid: int, st: dict[str, str]) -> None:
    """Take the caller's gids and groups, cgroups, rlimits, nice, affinity, oom_score_adj."""
    mine, theirs = _cgroups(os.getpid()), _cgroups(pid)
    mounts = _cgroup_mounts()
    for key, path in theirs.items():
        if mine.get(key) == path:
            continue
        if key not in mounts:
            raise Fallback(f"the caller's cgroup {path} ({','.join(sorted(key)) or 'v2'}) "
                           "is not mounted here")
        mnt, root = mounts[key]
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            raise Fallback(f"the caller's cgroup {path} is outside the mount at {mnt}")
        try:
            with open(os.path.join(mnt, rel, "cgroup.procs"), "w") as f:
                f.write("0")
        except OSError as e:
            raise Fallback(f"joining the caller's cgroup {path}: {e.strerror}") from e
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            n = getattr(resource, name)
            resource.setrlimit(n, resource.prlimit(pid, n))
    os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, pid))
    os.sched_setaffinity(0, os.sched_getaffinity(pid))
    with open(f"/proc/{pid}/oom_score_adj") as f:
        adj = f.read().strip()
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(adj)
    groups = [int(g) for g in st.get("Groups", "").split()]
    os.setgroups(groups)
    os.setresgid(*(int(g) for g in st["Gid"].split()[:3]))


def parse(data: bytes) -> tuple[int, list[str], dict[str, str]]:
    """(umask, argv, environment) of a request message."""
    if not data.startswith(MAGIC) or not data.endswith(b"\0"):
        raise Refused("restore service: malformed request (not from cxlfork-restore)")
    parts = data[len(MAGIC):-1].split(b"\0")
    try:
        um = int(parts[0], 8)
        end = parts.index(b"", 1)
    except ValueError:
        raise Refused("restore service: malformed request (not from cxlfork-restore)")
    argv = [os.fsdecode(a) for a in parts[1:end]]
    env = dict(os.fsdecode(e).split("=", 1) for e in parts[end + 1:] if b"=" in e)
    if not argv or argv[0] != "restore":
        raise Fallback("not a restore command")
    return um, argv, env


SO_PEERPIDFD = 77                   # Linux 6.5+: a pidfd of the peer as it connected


def _peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the connecting process (SO_PEERPIDFD, so a PID reused meanwhile is not
    taken for the caller; pidfd_open where the kernel lacks it); Refused if it is gone."""
    try:
        fd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            raise Refused("restore service: the caller exited") from None
    with open(f"/proc/self/fdinfo/{fd}") as f:
        got = next((int(x.split()[1]) for x in f if x.startswith("Pid:")), -1)
    if got != pid or pid <= 0:
        raise Refused("restore service: the caller exited")
    return fd


def handle(conn: socket.socket, warm_w: int = -1) -> None:
    """One request, in a child of the service (never returns). warm_w: a pipe on which the
    image and policy go back to the service, which then warms its cache for the next
    request (see serve)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)        # the service's handlers are not ours
    signal.signal(signal.SIGINT, signal.default_int_handler)
    own_key = os.environ.get("CXLFORK_KEY")
    code, why = 1, b""
    fds: list[int] = []
    try:
        conn.settimeout(5)
        data, anc, flags, _ = conn.recvmsg(MAX_MSG, socket.CMSG_SPACE(4 * 4))
        for level, typ, d in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(d) // 4}i", d[:len(d) // 4 * 4]))
        if len(fds) != 4 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise Fallback("the request lacks its fds or is too large")
        os.dup2(fds[2], 2)                      # errors go to the caller from here on
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, 12))
        pidfd = _peer_pidfd(conn, pid)
        st = check_caller(pid, uid)
        um, argv, env = parse(data)
        become(pid, st)
        if select.select([pidfd], [], [], 0)[0]:
            raise Refused("restore service: the caller exited")
        os.close(pidfd)
        os.dup2(fds[0], 0)
        os.dup2(fds[1], 1)
        os.fchdir(fds[3])
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.umask(um)
        os.environ.clear()
        os.environ.update(env)
        if env.get("CXLFORK_KEY") != own_key:
            # manifests the service validated were checked with its key, not this one
            from cxlfork import restore
            restore._CACHE.clear()
            _hint[:] = [warm_w, None]
        else:
            _hint[:] = [warm_w, argv]
        code = run(argv, conn)
    except Refused as e:
        os.write(2, f"cxlfork: error: {e}\n".encode())
        code = 1
    except Fallback as e:
        code, why = FALLBACK, str(e).encode()
    except Exception as e:                       # noqa: BLE001 - one line, never a traceback
        os.write(2, f"cxlfork: error: restore service: {type(e).__name__}: {e}\n".encode())
        code = 1
    try:
        conn.send(struct.pack("i", code) + why[:500])
    except OSError:
        pass
    _answered()
    os._exit(0)


VALUE_OPTS = ("--policy", "-n", "--pidfile", "--stdio", "--netns", "--pidns")


def restore_target(args: list[str]) -> tuple[str | None, str, bool]:
    """(image, policy, eager) of `cxlfork restore ARGS` (a quick scan, only a cache hint: the
    command parses its arguments itself)."""
    image, policy, eager, i = None, "mow", False, 0
    while i < len(args):
        a = args[i]
        if a in VALUE_OPTS and i + 1 < len(args):
            if a == "--policy":
                policy = args[i + 1]
            i += 2
            continue
        if a.startswith("--policy="):
            policy = a.split("=", 1)[1]
        elif a == "--eager":
            eager = True
        elif not a.startswith("-") and image is None:
            image = a
        i += 1
    return image, policy, eager


_hint: list = [-1, None]       # in a request child: [warm pipe, argv to send on it or None]


def _answered() -> None:
    """The caller has its answer: send the warm hint now (and close the pipe, which tells
    the service the request is off the CPU's critical path: it then forks the next spare)."""
    fd, argv = _hint
    _hint[:] = [-1, None]
    if argv is not None:
        _tell_warm(fd, argv)
    elif fd >= 0:
        os.close(fd)


def _tell_warm(fd: int, argv: list[str]) -> None:
    """Send (absolute image path, policy, eager) of a restore command to the service."""
    if fd < 0:
        return
    try:
        im, policy, eager = restore_target(argv[1:])
        if im:
            os.write(fd, json.dumps([os.path.abspath(im), policy, eager]).encode()[:4000])
    except OSError:
        pass
    finally:
        os.close(fd)


def warm(msg: bytes) -> bool:
    """Validate an image and build its plan into this process's restore cache (the next
    request's child inherits it: cxlfork.restore._CACHE); errors are the request's to report,
    not ours. False if the cache already held it (nothing changed)."""
    from cxlfork import restore
    try:
        image, policy, eager = json.loads(msg)
        hit = restore._CACHE.get(image)
        key = restore._stat_key(os.path.join(image, "manifest.json"))
        if hit is not None and hit[0] == key and any(k[0] == policy for k in hit[2]):
            return False
        restore.Prepared(image, policy, eager=eager).close()
    except Exception:                            # noqa: BLE001
        pass
    return True


def run(argv: list[str], conn: socket.socket | None = None) -> int:
    """The restore command itself (cxlfork.cli), as `cxlfork ARGV`; its exit status. With
    --detach and clones to serve, this process answers the caller (status 0) and then serves
    their userfaultfd itself until they exit (the command would fork a server for that)."""
    global detached_serve

    def serve_here():
        from cxlfork.restore import serve_lazy_forever
        sys.stdout.flush()
        sys.stderr.flush()
        if conn is not None:
            try:
                conn.send(struct.pack("i", 0))
            except OSError:
                pass
            conn.close()
            _answered()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        serve_lazy_forever()
        os._exit(0)
    detached_serve = serve_here
    sys.stdout = os.fdopen(1, "w", closefd=False)
    sys.stderr = os.fdopen(2, "w", closefd=False)
    try:
        _command[0](args=argv, prog_name="cxlfork", standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reap(*_):
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


# In a request process: restore --detach calls this (cxlfork.cli) to answer the caller and
# serve the clones' userfaultfd here, instead of forking a server.
detached_serve = None
_command: list = [None]               # the `cxlfork` click group, given to serve()


def _prefork(s: socket.socket) -> list:
    """Fork the child for the next request ahead of it ([pid, our end of its control
    socket]): it waits for the accepted connection and its warm pipe (SCM_RIGHTS) and then
    is exactly a request child (handle); it exits when our end closes first. The fork (page
    tables of this whole interpreter) then costs no request any wall time."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:                                    # the child never leaves this block
            s.close()
            a.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _touch()
            try:
                _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(2 * 4))
            except OSError:
                anc = []
            fds = []
            for level, typ, d in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(d) // 4}i", d[:len(d) // 4 * 4]))
            b.close()
            if len(fds) != 2:
                os._exit(0)                     # the service closed our socket: not needed
            handle(socket.socket(fileno=fds[0]), fds[1])
        finally:
            os._exit(1)
    b.close()
    return [pid, a]


def _touch() -> None:
    """In a spare, before its request: parse a restore command line without running it, so
    the copy-on-write faults of click's and the command's code paths are taken now, not on
    the request's time."""
    try:
        cmd = _command[0]
        with cmd.make_context("cxlfork", ["restore", "IMAGE"], resilient_parsing=True) as ctx:
            sub = cmd.get_command(ctx, "restore")
            sub.make_context("restore", ["IMAGE", "--detach"], parent=ctx,
                             resilient_parsing=True).close()
    except Exception:                            # noqa: BLE001 - only a warm-up
        pass


def _dispatch(ctl: socket.socket, conn: socket.socket, hw: int) -> bool:
    """Hand an accepted connection and its warm pipe to the pre-forked child; False if it
    is gone (the caller then forks one as before)."""
    try:
        ctl.sendmsg([b"r"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              struct.pack("2i", conn.fileno(), hw))])
    except OSError:
        return False
    finally:
        ctl.close()
    return True


def serve(command, path: str = SOCK, ready=None) -> None:
    """Listen on path until SIGTERM/SIGINT; one forked child per request, which runs
    command (the `cxlfork` click group, cxlfork.cli.main) as `cxlfork restore ...`."""
    from tiermem.errors import TiermemError
    if os.geteuid() != 0:
        raise TiermemError("cxlfork service: needs root (it restores for root callers)")
    _command[0] = command
    import cxlfork.restore  # noqa: F401 - everything the restore command imports, once
    import cxlfork.tree  # noqa: F401
    import cxlfork.state.netns  # noqa: F401
    import cxlfork.state.pidns  # noqa: F401
    import gc
    gc.freeze()          # request children then touch (copy) fewer of our pages
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
        raise TiermemError(f"cxlfork service: another service is listening on {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(64)
    signal.signal(signal.SIGCHLD, _reap)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    if ready:
        ready()
    hints: list[int] = []                       # read ends of the children's warm pipes
    spare: list = []                            # [pid, control socket] of a pre-forked child
    try:
        while not stop:
            if not spare and not hints:         # idle and warm: fork the next request's child
                spare = _prefork(s)             # now, off the next request's path
            try:
                r, _, _ = select.select([s] + hints, [], [], 1.0)
            except InterruptedError:
                continue
            for fd in r:
                if fd is s:
                    continue
                msg = os.read(fd, 4096)
                os.close(fd)
                hints.remove(fd)
                if msg and warm(msg):
                    import gc
                    gc.freeze()
                    if spare:                   # forked before the cache changed: replace it
                        spare[1].close()
                        spare = []
            if s not in r:
                continue
            try:
                conn, _ = s.accept()
            except (BlockingIOError, InterruptedError):
                continue
            hr, hw = os.pipe2(os.O_CLOEXEC)
            if spare and _dispatch(spare[1], conn, hw):
                spare = []                      # it has the request; the next one is forked
            else:                               # when this one's hint is in (above)
                if spare:
                    spare[1].close()
                    spare = []
                if os.fork() == 0:
                    try:                        # the child never leaves this block
                        s.close()
                        os.close(hr)
                        for fd in hints:
                            os.close(fd)
                        handle(conn, hw)
                    finally:
                        os._exit(1)
            os.close(hw)
            hints.append(hr)
            conn.close()
    finally:
        s.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
