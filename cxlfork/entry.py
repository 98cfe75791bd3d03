"""The `cxlfork` command's entry point. `cxlfork checkpoint PID -o IMAGE [--store DIR]
[--leave-running | --kill] [--json]` is parsed and run here without importing click or the
click CLI (about 45 ms of CPU, a third of the command's interpreter and import time, on a
command meant to be as quick as `criu dump`; the work is cxlfork.ckptcmd). Anything else
(another verb, --help, an option or a value this parser does not take as it is, a malformed
line) goes to the click CLI, cxlfork.cli, which parses it and reports as always.
"""
from __future__ import annotations

import sys

from cxlfork.ckptcmd import checkpoint, echo


def parse_checkpoint(args: list[str]) -> dict | None:
    """The arguments after `checkpoint`, or None when the click CLI should see them."""
    out = {"pid": None, "image": None, "leave_running": True, "store": None, "as_json": False}
    i = 0
    while i < len(args):
        a = args[i]
        key = {"-o": "image", "--output": "image", "--store": "store"}.get(a.split("=")[0])
        if key and "=" in a and a.startswith("--"):
            out[key] = a.split("=", 1)[1]
        elif key and "=" not in a and i + 1 < len(args):
            out[key] = args[i + 1]
            i += 1
        elif a in ("--kill", "--leave-running"):
            out["leave_running"] = a == "--leave-running"
        elif a == "--json":
            out["as_json"] = True
        elif a.isascii() and a.isdigit() and out["pid"] is None:
            out["pid"] = int(a)
        else:
            return None
        i += 1
    if out["pid"] is None or not out["image"] or out["store"] == "":
        return None
    return out


def main() -> None:
    args = sys.argv[1:]
    fast = parse_checkpoint(args[1:]) if args[:1] == ["checkpoint"] else None
    if fast is None:
        from cxlfork.cli import main as click_main
        click_main(prog_name="cxlfork")
        return
    from tiermem.errors import TiermemError
    try:
        checkpoint(**fast)
    except TiermemError as e:               # as cxlfork.cli's group reports them
        echo(f"cxlfork: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        fn = f" ({e.filename})" if getattr(e, "filename", None) else ""
        echo(f"cxlfork: error: {e.strerror or e}{fn}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        echo("Aborted!", err=True)
        sys.exit(1)
