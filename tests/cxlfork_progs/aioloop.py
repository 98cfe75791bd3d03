"""A real epoll program: an asyncio event loop (selectors.EpollSelector) reading its stdin
pipe, an os.pipe it watches with add_reader, and its self-pipe socketpair; checkpointed while
it waits in epoll_wait for the "go" line. After restore (and in the original) the loop must
read "go", see a later write on its pipe, and fire a timer; it prints "ok"."""
import asyncio
import os
import selectors
import sys


async def main():
    loop = asyncio.get_running_loop()
    assert isinstance(loop._selector, selectors.EpollSelector), loop._selector
    r, w = os.pipe()
    got = []
    loop.add_reader(r, lambda: got.append(os.read(r, 100)))
    os.write(w, b"before")
    await asyncio.sleep(0.05)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    line = await reader.readline()           # the checkpoint happens here, in epoll_wait
    os.write(w, b"after")
    ticks = []
    loop.call_later(0.02, ticks.append, 1)
    await asyncio.sleep(0.2)
    ok = line == b"go\n" and got == [b"before", b"after"] and ticks == [1]
    print("ok" if ok else f"FAIL: {line!r} {got} {ticks}", flush=True)


asyncio.run(main())
