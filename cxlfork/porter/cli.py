"""`cxlfork porter --config F`: run the porter until SIGTERM/SIGINT, then kill every instance
and remove its checkpoints. Prints one line `cxlfork porter: listening on http://H:P` first."""
from __future__ import annotations

import sys

import click


@click.command("porter")
@click.option("--config", "config_path", required=True, type=click.Path(),
              help="TOML config ([porter] and [functions.NAME] tables)")
@click.option("--host", default=None, help="override porter.host (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="override porter.port (0: any free port)")
def command(config_path, host, port):
    """Serverless autoscaler: invoke functions over HTTP, scale out by cxlfork restore."""
    from cxlfork.porter import config as config_mod
    from cxlfork.porter.service import Porter
    cfg = config_mod.load(config_path)
    if host is not None:
        cfg.host = host
    if port is not None:
        cfg.port = port

    def log(msg):
        click.echo(f"cxlfork porter: {msg}", err=True)

    porter = Porter(cfg, log=log)
    try:
        try:
            h, p = porter.start_server()
        except OSError as e:
            raise config_mod.ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: "
                                         f"{e.strerror}") from e
        click.echo(f"cxlfork porter: listening on http://{h}:{p}")
        sys.stdout.flush()
        porter.run()
    finally:
        porter.stop()
    log("stopped; all instances killed")
