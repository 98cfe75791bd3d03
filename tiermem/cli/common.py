"""Small helpers shared by the CLI verbs: JSON output, unit formatting, progress lines."""
from __future__ import annotations

import json
import sys

import click


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def mib(kb: int) -> str:
    return f"{kb / 1024:,.0f} MiB"


def pages_mib(pages: int, page_size: int = 4096) -> str:
    return f"{pages * page_size / 2**20:,.1f} MiB"


def progress_line(msg: str) -> None:
    """A progress message on stderr (only when stderr is a terminal or -v asked for it)."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{msg}", err=True, nl=False)


def progress_done() -> None:
    if sys.stderr.isatty():
        click.echo("\r\033[K", err=True, nl=False)
