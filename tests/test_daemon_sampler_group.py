"""tiermemd's sampler groups against real processes and a real sampler (pagemap): a process
that exits under a running sampler is not a sampler failure."""
from __future__ import annotations

import subprocess
import sys
import time

from tiermemd.engine import SamplerGroup

HOLD = "import time; b = bytearray(1 << 22); print('ready', flush=True); time.sleep(600)"


def test_exit_under_a_sampler_restarts_it_at_once():
    """A read that fails because a followed process exited (DAMON: its kdamond stops with its
    target) put the sampler on a 30 s back-off: the processes left went unsampled, and in the
    guest a kill -9 of tiermemd right after a target's exit found no kdamond (issue 18.15).
    Now the next ensure() starts it again on the processes left, and no error is recorded."""
    ps = [subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
          for _ in range(2)]
    try:
        for p in ps:
            assert p.stdout.readline().strip() == "ready"
        g = SamplerGroup("pagemap", {"mode": "present"})
        assert g.ensure(frozenset(p.pid for p in ps)) and g.error == ""
        assert g.read() is not None
        ps[1].kill()
        ps[1].wait()
        assert g.read() is None                      # pagemap of the dead one fails
        assert g.error == "" and g.retry_at <= time.monotonic()
        assert g.ensure(frozenset([ps[0].pid])) and g.sampler is not None
        b = g.read()
        assert b is not None and set(b.pid.tolist()) == {ps[0].pid}
        g.stop()
    finally:
        for p in ps:
            p.kill()
            p.wait()
