"""The web dashboard and HTTP API (docs/web.md): every VM's protection status, jobs,
history, repositories, snapshots, audit and the fleet of hosts, with users, roles, sessions
and API tokens.

Modules::

    users.py     the users file: roles, Argon2id password hashes, API tokens (no web framework)
    auth.py      sessions, CSRF tokens, the login rate limit (no web framework)
    model.py     what the pages and the API show: VM states, task grid, repository statistics
    jobs.py      running jobs from the dashboard; live progress
    actions.py   restore, verify, forget and prune from the dashboard, planned then run
    charts.py    server-side SVG charts
    openapi.py   the API's OpenAPI document
    app.py       the ASGI application (Starlette): routes, guards, pages, API
    hosts.py     the names it answers to (DNS rebinding)
    clients.py   limits on clients: connections in all and per address, slow requests and readers
    server.py    serving it (uvicorn): TLS, the loopback rule, self-signed certificates

The web framework is an optional dependency (``pip install 'vmvault[web]'``): only
``app.py``, ``hosts.py``, ``clients.py`` and ``server.py`` import it, and :func:`require_web`
names what is missing.
"""

from __future__ import annotations

from vmvault.errors import require

__all__ = ["require_web"]


def require_web() -> None:
    """A one-line ``MissingDependencyError`` (exit 2) naming the install command when a
    package of the ``web`` extra is missing."""
    require("starlette", purpose="the web dashboard", extra="web")
    require("uvicorn", purpose="the web dashboard", extra="web")
    require("jinja2", purpose="the web dashboard", package="jinja2", extra="web")
    require("python_multipart", purpose="the web dashboard (its forms)", package="python-multipart", extra="web")
