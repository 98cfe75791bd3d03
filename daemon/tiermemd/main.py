"""`tiermemd`: the service shell around the tiering engine.

Start-up: load and validate the config (one 'file:key: reason' line and exit 2 on error),
refuse if another tiermemd owns the state directory, clean what a killed one left behind,
open the control socket (root, 0600) and the metrics endpoint (loopback by default), write
the state file, tell systemd READY=1 (Type=notify), then loop every interval.

Signals: SIGHUP reloads the config (a bad one is refused, the old one keeps running),
SIGTERM/SIGINT stop: samplers stopped (DAMON contexts off, BPF programs detached), socket
and state file removed. Without --foreground the daemon detaches and the parent exits 0
only once the child is serving (or prints the child's error line and exits non-zero).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

import click

from tiermem.errors import TiermemError
from tiermemd import config as config_mod
from tiermemd.control import ControlServer
from tiermemd.engine import Engine
from tiermemd.metrics import MetricsServer
from tiermemd.state import StateFile, StateWriteError, check_and_clean

DEFAULT_CONFIG = "/etc/tiermemd/tiermemd.toml"
log = logging.getLogger("tiermemd")


def sd_notify(msg: str) -> None:
    """Tell systemd (Type=notify) about our state; no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(msg.encode())
        except OSError:
            pass


class Daemon:
    def __init__(self, cfg_path: str, dry_run: bool = False):
        from tiermem.topology import read_topology
        self.cfg_path = cfg_path
        self.cfg = config_mod.load(cfg_path)
        self.topology = read_topology()
        self.engine = Engine(self.cfg, self.topology, dry_run, self_pids={os.getpid()})
        self.state = StateFile(self.cfg.state_dir)
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload_pending = False
        self._state_error = ""
        self.stop_reason = ""

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise TiermemError("tiermemd must run as root (it moves other processes' pages "
                               "and owns a root-only control socket)")
        try:
            os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise TiermemError(f"{self.cfg.path}:daemon.state_dir: cannot create "
                               f"{self.cfg.state_dir}: {e.strerror or e}") from None
        check_and_clean(self.state, self.cfg.socket, log)
        try:
            self.state.write(pid=os.getpid(), socket=self.cfg.socket, config=self.cfg.path,
                             started=time.time(), samplers=[])
        except StateWriteError as e:
            raise TiermemError(f"{self.cfg.path}:daemon.state_dir: cannot write "
                               f"{self.cfg.state_dir}: {e.reason}") from None
        try:
            self.control = ControlServer(self.cfg.socket, self.handle, log)
            self.control.start()
            if self.cfg.metrics:
                self.metrics = MetricsServer(self.engine.stats, *self.cfg.metrics)
                self.metrics.start()
        except BaseException:
            self.stop()
            raise
        log.info("tiermemd %d serving: config %s, control %s, metrics %s, fast nodes %s, "
                 "slow nodes %s%s", os.getpid(), self.cfg.path, self.cfg.socket,
                 "%s:%d" % self.cfg.metrics if self.cfg.metrics else "off",
                 self.engine.fast, self.engine.slow,
                 ", DRY RUN (nothing is moved)" if self.engine.dry_run else "")
        nb = self.topology.numa_balancing
        if nb and self.engine.slow and not self.engine.dry_run:
            log.warning("kernel NUMA balancing is on (kernel.numa_balancing=%d): the kernel "
                        "migrates pages between the tiers as well; set it to 0 to leave "
                        "tiering to tiermemd", nb)

    def install_signals(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self._request_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.request_stop("SIGINT"))

    def _request_reload(self) -> None:
        self._reload_pending = True
        self._wake.set()

    def request_stop(self, why: str) -> None:
        self.stop_reason = why
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        interval = self.cfg.interval_s
        next_t = time.monotonic()
        while not self._stop.is_set():
            if self._reload_pending:
                self._reload_pending = False
                try:
                    self.reload()
                except TiermemError as e:
                    log.error("%s", e)
                interval = self.cfg.interval_s
            lag = max(0.0, time.monotonic() - next_t)
            with self.engine.stats.lock:
                self.engine.stats.loop_lag_s = lag
            try:
                self.engine.step()
            except TiermemError as e:
                log.error("loop: %s", e)
            self._record_samplers()
            next_t += interval
            now = time.monotonic()
            if next_t < now:          # fell behind: do not try to catch up in a burst
                next_t = now
            self._wake.wait(max(0.0, next_t - now))
            self._wake.clear()

    def _record_samplers(self) -> None:
        names = self.engine.sampler_names()
        st = self.state.read() or {}
        if st.get("samplers") != names:
            st["samplers"] = names
            try:
                self.state.write(**st)
            except TiermemError as e:     # e.g. remounted read-only: say it, keep tiering
                if str(e) != self._state_error:
                    log.error("%s", e)
                self._state_error = str(e)

    def reload(self) -> dict:
        """Load the config again; on any error keep the running one and raise."""
        try:
            new = config_mod.load(self.cfg_path, self.topology)
        except TiermemError as e:
            raise TiermemError(f"reload refused, the running config stays: {e}") from None
        for key in ("socket", "state_dir", "metrics"):
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning("reload: daemon.%s changed; it takes effect at the next start",
                            key)
                setattr(new, key, getattr(self.cfg, key))
        with self.engine.lock:
            self.engine.configure(new, self.topology)
        self.cfg = new
        log.info("reloaded %s: %d target(s)", self.cfg.path, len(new.targets))
        return {"targets": [t.name for t in new.targets]}

    def stop(self) -> None:
        errs = self.engine.shutdown()
        for e in errs:
            log.error("%s", e)
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        self.state.remove()
        log.info("tiermemd stopped%s", f" ({self.stop_reason})" if self.stop_reason else "")

    # -- control requests (control thread) -------------------------------------------------
    def handle(self, req: dict) -> dict:
        cmd = req["cmd"]
        if cmd == "status":
            d = self.engine.status()
            d.update(pid=os.getpid(), config=self.cfg.path,
                     uptime_seconds=round(time.monotonic() - self.engine.stats.started, 3))
            return d
        if cmd == "stats":
            return self.engine.stats.to_dict()
        if cmd in ("pause", "resume"):
            with self.engine.lock:
                self.engine.paused = cmd == "pause"
            log.info("%s by control request", "paused" if cmd == "pause" else "resumed")
            return {"paused": self.engine.paused}
        if cmd == "reload":
            r = self.reload()
            self._wake.set()
            return r
        if cmd == "policy":
            t, p = req.get("target"), req.get("policy")
            if not isinstance(t, str) or not isinstance(p, str):
                raise TiermemError("policy: needs a target name and a policy name")
            self.engine.set_policy(t, p)
            return {"target": t, "policy": p}
        raise TiermemError(f"unknown command {cmd!r} (status, pause, resume, reload, "
                           "policy, stats)")


def _setup_logging(verbose: int, to_file: str | None = None) -> None:
    h = logging.FileHandler(to_file) if to_file else logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("tiermemd: %(levelname)s %(message)s" if not to_file
                                     else "%(asctime)s tiermemd: %(levelname)s %(message)s"))
    root = logging.getLogger("tiermemd")
    root.handlers[:] = [h]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose or to_file
                  else logging.WARNING)
    root.propagate = False


def _detach() -> int | None:
    """Classic double fork. Returns the read end of a pipe in the parent (the child writes
    'ok\\n' or its error line), None in the daemon."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        return r
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    os.environ["TIERMEMD_READY_FD"] = str(w)
    return None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "cfg_path", default=DEFAULT_CONFIG, show_default=True,
              help="TOML config file")
@click.option("--foreground", "-f", is_flag=True, help="stay in the foreground, log to stderr")
@click.option("--dry-run", is_flag=True, help="compute and report plans, move nothing")
@click.option("--check", is_flag=True, help="validate the config and exit")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug")
@click.version_option(package_name="tiermem")
def main(cfg_path, foreground, dry_run, check, verbose):
    """tiermemd: moves hot pages to the fast memory tier and cold pages to the slow one."""
    cfg_path = os.path.abspath(cfg_path)      # the detached daemon runs in /
    if check:
        try:
            cfg = config_mod.load(cfg_path)
        except TiermemError as e:
            click.echo(f"tiermemd: error: {e}", err=True)
            sys.exit(e.exit_code)
        click.echo(f"{cfg.path}: ok, {len(cfg.targets)} target(s)")
        return
    ready_r = None
    if not foreground:
        try:          # validate before detaching so a bad config fails in the terminal
            config_mod.load(cfg_path)
        except TiermemError as e:
            click.echo(f"tiermemd: error: {e}", err=True)
            sys.exit(e.exit_code)
        ready_r = _detach()
        if ready_r is not None:
            with os.fdopen(ready_r) as f:
                msg = f.readline().strip()
            if msg == "ok":
                sys.exit(0)
            click.echo(f"tiermemd: error: {msg or 'the daemon died while starting'}", err=True)
            sys.exit(1)
    _setup_logging(verbose, None if foreground else "/var/log/tiermemd.log")
    ready_fd = os.environ.pop("TIERMEMD_READY_FD", None)

    def ready(msg: str) -> None:
        if ready_fd is not None:
            try:
                os.write(int(ready_fd), (msg + "\n").encode())
                os.close(int(ready_fd))
            except OSError:
                pass

    try:
        d = Daemon(cfg_path, dry_run)
        d.install_signals()
        d.start()
    except TiermemError as e:
        log.debug("start failed", exc_info=True)
        click.echo(f"tiermemd: error: {e}", err=True)
        ready(str(e))
        sys.exit(e.exit_code)
    ready("ok")
    sd_notify("READY=1")
    try:
        d.run()
    finally:
        sd_notify("STOPPING=1")
        d.stop()


if __name__ == "__main__":
    main()
