"""``vmvault web``: serve the dashboard; ``vmvault web cert``: make a self-signed TLS pair.

The wiring shared with ``vmvault daemon`` (whose ``[web]`` section serves the same
dashboard beside the scheduler) lives here too: :func:`start_dashboard`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import signal
import threading
from typing import Any

from vmvault.automation.config import AutomationConfig, WebSettings, host_name, web_settings
from vmvault.automation.history import History
from vmvault.automation.publish import StatusPublisher
from vmvault.errors import ConfigError

from ._args import whole_number
from ._common import EXIT, Output, output_options
from ._terminal import SafeLogFormatter, StderrHandler

__all__ = ["register", "start_dashboard"]

log = logging.getLogger("vmvault.web")

#: repository statistics are recomputed this often while the dashboard runs
STATS_INTERVAL = 900.0


def _settings(config: AutomationConfig, args: argparse.Namespace) -> WebSettings:
    settings = web_settings(config)
    if getattr(args, "name", None):
        try:
            names = tuple(host_name(name) for name in args.name)
        except ValueError as exc:
            raise ConfigError(f"--name: {exc}") from None
        settings = dataclasses.replace(settings, hosts=settings.hosts + names)
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("give both --tls-cert and --tls-key")
        settings = dataclasses.replace(settings, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return settings


def _logging(verbose: bool) -> None:
    handler = StderrHandler()
    handler.setFormatter(SafeLogFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    for name in ("vmvault", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


def _stats_loop(app: Any, stop: threading.Event) -> None:
    """Recompute every repository's statistics now and every ``STATS_INTERVAL``."""
    wait = 2.0
    while not stop.wait(wait):
        wait = STATS_INTERVAL
        try:
            app.dashboard.refresh_stats()
        except Exception:  # a statistics failure never stops the dashboard
            log.exception("repository statistics not computed")


def start_dashboard(
    config: AutomationConfig, settings: WebSettings, history: History, control: Any, listen: str | None
) -> tuple[Any, Any, threading.Event]:
    """The app, its (unstarted) uvicorn server and the stop event of its statistics thread."""
    from vmvault.web import require_web

    require_web()
    from vmvault.web.app import WebApp
    from vmvault.web.server import make_server, resolve_listen
    from vmvault.web.users import UserStore

    host, port = resolve_listen(settings, listen)
    if listen:  # the names the dashboard answers to include the one it listens on
        settings = dataclasses.replace(settings, listen=listen)
    users = UserStore(settings.users)
    if not users.users():
        raise ConfigError(
            f"no dashboard users in {settings.users}: add one with "
            f"`vmvault user add NAME --role admin --config {config.path}`"
        )
    app = WebApp(config, history, users, control, settings=settings)
    server = make_server(app.build(), settings, host, port)
    stop = threading.Event()
    threading.Thread(target=_stats_loop, args=(app, stop), name="vmvault-web-stats", daemon=True).start()
    scheme = "https" if settings.tls else "http"
    shown = f"[{host}]" if ":" in host else host
    log.info("dashboard on %s://%s:%d/ (users from %s)", scheme, shown, port, settings.users)
    return app, server, stop


def cmd_web(args: argparse.Namespace) -> int:
    from vmvault.web import require_web

    from .automation import _config

    require_web()  # a missing package is named before anything else is looked at
    config = _config(args, runs_jobs="web")
    settings = _settings(config, args)
    _logging(args.verbose)
    history = History(config.daemon.history)
    from vmvault.web.jobs import StandaloneControl

    publisher = StatusPublisher(config, history, started=dt.datetime.now(dt.UTC))
    control = StandaloneControl(config, history, publisher)
    _app, server, stop = start_dashboard(config, settings, history, control, args.listen)
    # uvicorn stops on SIGINT/SIGTERM and then raises the signal again for the handler it
    # found: this one, so a stop is a clean exit (0) after the jobs started here have finished
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: log.info("%s: stopping", signal.Signals(signum).name))
    try:
        server.run()
    finally:
        stop.set()
        log.info("waiting for jobs started from the dashboard to finish")
        control.wait()
        publisher.close()
    return EXIT["ok"]


def cmd_cert(args: argparse.Namespace) -> int:
    from vmvault.web.server import make_certificate

    out = Output(args)
    cert, key = args.cert, args.key
    if (cert is None or key is None) and (args.config or None):
        from .automation import _config

        settings = web_settings(_config(args))
        cert, key = cert or settings.tls_cert, key or settings.tls_key
    if not cert or not key:
        raise ConfigError("give --cert and --key (or a --config whose [web] section names tls_cert and tls_key)")
    fingerprint = make_certificate(cert, key, args.name or [], days=args.days)
    out.result(
        {"certificate": cert, "key": key, "sha256": fingerprint},
        f"wrote the certificate {cert} and the key {key} (mode 0600)\n"
        f"SHA-256 fingerprint (compare it with what the browser shows): {fingerprint}",
    )
    return EXIT["ok"]


def serve_in_daemon(
    config: AutomationConfig, scheduler: Any, board: Any, history: History
) -> tuple[Any, threading.Event]:
    """Start the dashboard beside a daemon's scheduler; returns (background server, stop event)."""
    from vmvault.web.jobs import DaemonControl
    from vmvault.web.server import Background

    assert config.web is not None
    control = DaemonControl(scheduler, board)
    _app, server, stop = start_dashboard(config, config.web, history, control, None)
    background = Background(server)
    background.start()
    return background, stop


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "web",
        parents=[output_options(common)],
        help="serve the web dashboard and HTTP API (docs/web.md)",
        description="Serve the dashboard of a configuration's jobs, history and repositories. Without --listen "
        "it listens where [web] listen says (default 127.0.0.1:8620); an address that is not loopback needs TLS "
        "(tls_cert and tls_key, or --tls-cert/--tls-key). `vmvault web cert` makes a self-signed pair.",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="the automation configuration (or VMVAULT_CONFIG)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default: [web] listen)")
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM, mode 0600)")
    p.add_argument(
        "--name",
        action="append",
        metavar="HOST",
        help="a name browsers reach the dashboard by, besides localhost, addresses, the listen name and the "
        "certificate's names (repeatable; adds to [web] hosts); other names are refused (DNS rebinding)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_web)
    ws = p.add_subparsers(dest="web_command", metavar="cert")
    c = ws.add_parser(
        "cert", parents=[output_options(common)], help="make a self-signed certificate and key for the dashboard"
    )
    c.add_argument("--config", "-c", metavar="FILE", help="take the file names from this configuration's [web]")
    c.add_argument("--cert", metavar="FILE", help="where to write the certificate (must not exist)")
    c.add_argument("--key", metavar="FILE", help="where to write the key, mode 0600 (must not exist)")
    c.add_argument(
        "--name", action="append", metavar="HOST", help="a host name or address the certificate is for (repeatable)"
    )
    c.add_argument(
        "--days", type=whole_number(1, 3650, what="a number of days"), default=825, help="validity (default 825)"
    )
    c.set_defaults(func=cmd_cert)
