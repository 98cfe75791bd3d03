"""The `tiermem` command: a click group; each verb lives in its own module in this package.

Verbs that drive packages above the library (`tiermem emulate`, from `emulation`) are not
imported here: those packages register them through the `tiermem.commands` entry-point group
(pyproject.toml), so the library never imports upward (docs/layout.md)."""
from __future__ import annotations

import sys

import click

from tiermem.errors import TiermemError


class _Group(click.Group):
    """Turns TiermemError / OSError into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TiermemError as e:
            click.echo(f"tiermem: error: {e}", err=True)
            sys.exit(e.exit_code)
        except PermissionError as e:
            click.echo(f"tiermem: error: {e.strerror or e}"
                       f"{' (' + e.filename + ')' if e.filename else ''}: run as root", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tiermem")
def main():
    """tiermem: memory tiering for hosts with a fast (DRAM) and a slow (CXL) tier."""


ENTRY_POINT_GROUP = "tiermem.commands"


def _register():
    from importlib.metadata import entry_points

    from tiermem.cli import ctl, move, numastat, record, report, sim, topo, trace
    for mod in (topo, numastat, move, ctl, sim, trace, record, report):
        main.add_command(mod.command)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        main.add_command(ep.load(), ep.name)


_register()
