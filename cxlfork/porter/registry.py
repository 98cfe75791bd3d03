"""The porter's image registry on the memory pool (`[porter] pool = true`): a function's
checkpoint taken by a porter on one host restores on every host of the pool.

The registry is the pool's own log (cxlfork.poolstore): a function F's checkpoint is the pool
image `porter.F` in the region of the host whose porter took it, and its manifest carries
`porter`: the function's identity (name, command, protocol, init), sealed with the rest
under the pool key. A porter looks F up when it adds it and then once a second while F has
no checkpoint; an image whose identity differs from its own config for F is not used (the
same name, another function). Found, it is leased for the porter's process and
materialized as a local image (poolstore.acquire), and F's first instance on this host is a
restore of it: a remote restore when another host took it. With several hosts' images of F
the newest is used.

A porter that checkpoints F publishes into its own region (kill=False, the instance serves
on). At stop it drops its lease and leaves the image published: other hosts may be
restoring from it, and the next porter for F (on any host) starts from it; `cxlfork pool rm
porter.F` on the owner removes it (refused while clones on any host map it). A stale image
of this host (another identity) is removed before publishing anew when no clone maps it.
"""
from __future__ import annotations

import hashlib

from cxlfork.errors import CxlforkError

PREFIX = "porter."


def image_name(function: str) -> str:
    """The pool image name of a function (at most 64 characters, poollog.NAME_RE)."""
    n = PREFIX + function
    if len(n) <= 64:
        return n
    return n[:47] + "." + hashlib.sha256(function.encode()).hexdigest()[:16]


def identity(cfg) -> dict:
    return {"function": cfg.name, "command": list(cfg.command), "protocol": cfg.protocol,
            "init": cfg.init}


class Registry:
    """The porter's view of the pool (one per porter)."""

    def __init__(self, log):
        from cxlfork.poolstore import Pool
        self.pool = Pool()
        self.pool.key                           # no key: one line now, not at first use
        self.log = log
        self.leased: dict[str, dict] = {}       # function -> its record (leased by us)
        self._said: set = set()                 # what was logged once (lookups repeat)

    def _once(self, what, msg: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self.log(msg)

    def lookup(self, cfg) -> tuple[str, dict] | None:
        """(local image, record) of cfg's function from any host, leased; None if none."""
        from cxlfork import poolstore
        from cxlfork.errors import ImageError
        name = image_name(cfg.name)
        recs = [r for h in self.pool.hosts for r in self.pool.records(h) if r["name"] == name]
        for rec in sorted(recs, key=lambda r: r["created"], reverse=True):
            where = f"pool image h{rec['host']}/{name}"
            try:
                m = poolstore.read_manifest(self.pool, rec)
            except ImageError as e:
                self._once((rec["host"], rec["slot"], rec["seq"], "bad"), f"registry: {e}")
                continue
            if m.get("porter") != identity(cfg):
                self._once((rec["host"], rec["slot"], rec["seq"], cfg.name),
                           f"registry: {where} is another function's checkpoint (command, "
                           f"protocol or init differ): not used for {cfg.name}")
                continue
            try:
                _, rec, image = poolstore.acquire(f"h{rec['host']}/{name}", self.pool)
            except CxlforkError as e:
                self.log(f"registry: {e}")
                continue
            self.leased[cfg.name] = rec
            return image, rec
        return None

    def publish(self, pid: int, cfg) -> tuple[str, dict, dict]:
        """Checkpoint pid into this host's region as cfg's function; (image, record,
        checkpoint summary). A stale image of this host under the name is removed first."""
        from cxlfork import poolstore
        name = image_name(cfg.name)
        for rec in self.pool.records(self.pool.host, ("published",)):
            if rec["name"] == name:
                poolstore.remove(f"h{self.pool.host}/{name}")      # mapped: refused, one line
                self.log(f"registry: removed the stale h{self.pool.host}/{name}")
        r = poolstore.checkpoint(pid, name, extra={"porter": identity(cfg)})
        _, rec, image = poolstore.acquire(r["name"], self.pool)
        self.leased[cfg.name] = rec
        return image, rec, r

    def release_all(self) -> None:
        from cxlfork import poolstore
        for fn, rec in list(self.leased.items()):
            try:
                poolstore.release(self.pool, rec)
            except (CxlforkError, OSError) as e:
                self.log(f"registry: dropping the lease of {fn}: {e}")
        self.leased.clear()
