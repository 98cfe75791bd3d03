"""Parsing of the kernel's fdinfo formats for the event and timer fds (unit tests of parsing:
the texts are copied from /proc/self/fdinfo on Linux 6.18; the real files are read by the
conformance programs' checkpoints in test_cxlfork_conformance.py)."""
from __future__ import annotations

from cxlfork.state import epoll, inotify, timerfd

EPOLL = """pos:\t0
flags:\t02
mnt_id:\t17
ino:\t1038
tfd:        5 events: 40000000 data:                7  pos:0 ino:b2f1 sdev:f
tfd:        4 events: 80000019 data: 1122334455667788  pos:0 ino:b2f1 sdev:f
tfd:       12 events:       19 data: ffffffffffffffff  pos:-1 ino:2 sdev:1b
"""

TIMERFD = """pos:\t0
flags:\t04002
mnt_id:\t17
ino:\t1038
clockid: 0
ticks: 0
settime flags: 03
it_value: (99, 81963288)
it_interval: (0, 1000000)
"""

INOTIFY = """pos:\t0
flags:\t04000
mnt_id:\t17
ino:\t1038
inotify wd:3 ino:1 sdev:1b mask:fff ignored_mask:0 fhandle-bytes:c fhandle-type:1 f_handle:c45894d50100000000000000
inotify wd:1 ino:3f7e8 sdev:fe00000 mask:80000100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:e8f7030000000000
inotify wd:2a ino:9 sdev:5 mask:2 ignored_mask:0
"""


def test_epoll_entries():
    e = epoll.parse(EPOLL)
    assert [x["tfd"] for x in e] == [5, 4, 12]
    assert e[0]["events"] == 0x40000000 and e[0]["data"] == 7          # a fired one-shot
    assert e[1]["events"] == 0x80000019 and e[1]["data"] == 0x1122334455667788   # EPOLLET
    assert e[2]["data"] == 2**64 - 1 and e[2]["sdev"] == 0x1b


def test_timerfd_fields():
    t = timerfd.parse(TIMERFD)
    assert t == {"clock": 0, "ticks": 0, "settime": 3, "it_value": 99 * 10**9 + 81963288,
                 "it_interval": 1000000}


def test_inotify_watches():
    w = inotify.parse(INOTIFY)
    assert [x["wd"] for x in w] == [3, 1, 0x2a]
    assert w[1]["mask"] == 0x80000100 and w[1]["sdev"] == 0xfe00000     # IN_ONESHOT kept
    assert w[1]["fh_type"] == 1 and w[1]["fh"] == bytes.fromhex("e8f7030000000000")
    assert w[2]["fh_type"] is None and w[2]["fh"] == b""                # no file handle
