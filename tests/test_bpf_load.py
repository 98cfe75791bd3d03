"""Loading a bcc program raises no DeprecationWarning (bcc's warning for a str argument
carries the whole BPF program text into pytest's summary)."""
from __future__ import annotations

import warnings

import pytest

from tiermem.samplers import bpf

PROG = """
TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }
"""


def test_load_raises_no_deprecation_warning():
    ok, why = bpf.bcc_available()
    if not ok:
        pytest.skip(why)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        b = bpf.load(PROG)
    b.cleanup()
