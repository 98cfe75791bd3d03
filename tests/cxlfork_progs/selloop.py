"""A selectors.EpollSelector loop (what socketserver and many small servers run on) watching
its stdin pipe, an os.pipe and an eventfd; checkpointed while blocked in epoll_wait for the
"go" line. The original and the clone, side by side, must each read "go" on their own
stdin, see a later write on their own pipe and eventfd, with the data each key was
registered with; each prints "ok"."""
import os
import selectors
import sys

sel = selectors.EpollSelector()
r, w = os.pipe()
efd = os.eventfd(0, os.EFD_NONBLOCK)
sel.register(0, selectors.EVENT_READ, "stdin")
sel.register(r, selectors.EVENT_READ, "pipe")
sel.register(efd, selectors.EVENT_READ, "eventfd")
os.write(w, b"x")
first = sorted(k.data for k, _ in sel.select(0))
os.read(r, 1)
print("ready", flush=True)
got = [k.data for k, _ in sel.select()]        # the checkpoint happens here
line = os.read(0, 16)
os.write(w, b"y")
os.eventfd_write(efd, 3)
later = sorted(k.data for k, _ in sel.select(1) if k.data != "stdin")   # EOF may be there
ok = first == ["pipe"] and got == ["stdin"] and line == b"go\n" and \
    later == ["eventfd", "pipe"] and os.eventfd_read(efd) == 3
print("ok" if ok else f"FAIL: {first} {got} {line!r} {later}", flush=True)
