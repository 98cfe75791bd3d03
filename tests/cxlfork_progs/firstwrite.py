"""Test subject of the first-request write profile (cxlfork.firstreq): 8 MiB of data written
before the checkpoint (stored pages) and a 2 MiB anonymous mapping it never touched. Prints
its two addresses, then 'ready'; each 'go' line writes one byte into every page of the first
half of the data (copies on write in a clone) and of the whole untouched mapping (new zero
pages), and prints a digest of both."""
import ctypes
import hashlib
import mmap
import sys

PAGE = 4096
buf = bytearray(b"d" * (8 << 20))
zone = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE)
addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
zaddr = ctypes.addressof(ctypes.c_char.from_buffer(zone))
print(f"{addr} {zaddr}", flush=True)
print("ready", flush=True)
n = 0
for line in sys.stdin:
    n += 1
    for i in range(0, len(buf) // 2, PAGE):
        buf[i] = (buf[i] + n) & 0xFF
    for i in range(0, len(zone), PAGE):
        zone[i] = (zone[i] + 1) & 0xFF
    h = hashlib.sha256(buf)            # no copies: only the pages above are written
    h.update(zone)
    print(h.hexdigest()[:16], flush=True)
