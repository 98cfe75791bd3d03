"""`python -m emulation VERB ...` is `tiermem emulate VERB ...` (prepare, start, run, status,
stop, demo)."""
import sys

from tiermem.cli import main

main(args=["emulate", *sys.argv[1:]], prog_name="tiermem")
