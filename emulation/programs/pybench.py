"""A small CPython benchmark traced for bench_policies (run as: python3 -S pybench.py).

Builds 12k records in a dict, then serves skewed lookups and updates (a few hot records
among many cold ones), JSON round trips of hot records and a sort: the interpreter's own
allocator (obmalloc arenas), dicts, the GC and string handling do the memory accesses.
Standard library only; deterministic (fixed seed)."""
import json
import random

rnd = random.Random(11)
N = 12000
db = {f"user:{i:06d}": {"id": i, "name": f"name{i}", "score": i % 101,
                         "tags": [f"t{i % 13}", f"t{i % 7}"]} for i in range(N)}
keys = list(db)
total = 0
for step in range(15000):
    k = keys[(min(N - 1, int(rnd.paretovariate(1.1) * 4)) * 7919) % N]
    rec = db[k]
    if step % 10 == 0:
        rec["score"] += 1
    elif step % 50 == 1:
        rec = json.loads(json.dumps(rec))
    total += rec["score"] + len(rec["tags"])
top = sorted(db.values(), key=lambda r: (-r["score"], r["id"]))[:10]
print(total, [r["id"] for r in top])
