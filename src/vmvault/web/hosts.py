"""The names the dashboard answers to: its defence against DNS rebinding.

A page on another site cannot read the dashboard: the browser's same-origin policy keeps it
out. But a name that page's author controls can be made to resolve to ``127.0.0.1`` (or to the
dashboard's LAN address) once the page has loaded, which is called DNS rebinding. For the browser
the page and the dashboard then share an origin: the page's requests reach the dashboard with
``Host: rebound.example:8620`` and its script reads the answers. No session cookie goes with
them (a cookie belongs to the name the administrator used), but the login form is open to it:
the page could guess passwords, and by failing five times lock the administrator out for the
lockout period, again and again, from the administrator's own browser.

So every request must name the dashboard in its ``Host`` header by one of:

* an IP address (v4 or v6): a browser sends one only when the address itself is what was typed
  or followed, and no name can be rebound into one;
* ``localhost``;
* the name it listens on, when ``listen`` holds a name;
* a DNS name of its TLS certificate (``*.example.com`` covering one label);
* a name in ``[web] hosts`` (a reverse proxy's public name, for instance).

Any other name gets ``421 Misdirected Request`` before any route runs, and is logged (once per
name). A request with no ``Host`` at all (HTTP/1.0) did not come from a browser following a
name, and is let through.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from vmvault.automation.config import WebSettings, host_name, parse_listen

__all__ = ["DashboardNames", "KnownHosts", "certificate_names", "dashboard_names"]

log = logging.getLogger("vmvault.web")

#: a PEM certificate (chain) larger than this is not read for names
_MAX_CERTIFICATE = 1 << 20
#: names refused are logged once each, up to this many
_MAX_LOGGED = 64


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _name_of(header: str) -> str | None:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``),
    lower case without a trailing dot; None when it is none of those forms."""
    text = header.strip().lower()
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())) or ":" not in address:
            return None
        return address
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


class DashboardNames:
    """The names a request's ``Host`` may give: addresses, ``localhost`` and those listed."""

    def __init__(self, names: Iterable[str]) -> None:
        self.exact = {"localhost"}
        self.wildcards: set[str] = set()  # "*.example.com" is kept as "example.com"
        for name in names:
            if name.startswith("*."):
                self.wildcards.add(name[2:])
            else:
                self.exact.add(name)

    def allows(self, header: str) -> bool:
        name = _name_of(header)
        if name is None:
            return False
        if name in self.exact or _is_address(name):
            return True
        _label, dot, parent = name.partition(".")
        return bool(dot) and parent in self.wildcards

    def __repr__(self) -> str:
        shown = sorted(self.exact) + sorted(f"*.{w}" for w in self.wildcards)
        return f"DashboardNames({', '.join(shown)}, and any address)"


def certificate_names(path: str) -> list[str]:
    """The DNS names of the first certificate in the PEM file ``path`` (its subject alternative
    names); none when it cannot be read (the server names that problem when it starts)."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            pem = f.read(_MAX_CERTIFICATE + 1)
        if len(pem) > _MAX_CERTIFICATE:
            return []
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    names = []
    for text in sans.get_values_for_type(x509.DNSName):
        try:
            names.append(host_name(text))
        except ValueError:
            continue  # not a name a browser would send (an internationalised one, say)
    return names


def dashboard_names(settings: WebSettings) -> DashboardNames:
    """The names the dashboard of ``settings`` answers to (see the module's description)."""
    names = list(settings.hosts)
    try:
        listen_host, _port = parse_listen(settings.listen)
        if not _is_address(listen_host):
            names.append(host_name(listen_host))
    except ValueError:
        pass  # resolve_listen refuses such an address before anything is served
    if settings.tls_cert is not None:
        names += certificate_names(settings.tls_cert)
    return DashboardNames(names)


class KnownHosts:
    """ASGI middleware: 421 for a request whose ``Host`` is not one of ``names``."""

    def __init__(self, app: ASGIApp, *, names: DashboardNames) -> None:
        self.app = app
        self.names = names
        self.logged: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            hosts = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"host"]
            refused = next((h for h in hosts if not self.names.allows(h)), None)
            if refused is not None or len(hosts) > 1:
                self._log(refused or " and ".join(hosts), scope)
                if scope["type"] == "http":
                    await _misdirected(send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)

    def _log(self, host: str, scope: Scope) -> None:
        if host in self.logged or len(self.logged) >= _MAX_LOGGED:
            return
        self.logged.add(host)
        client = scope.get("client") or ("?", 0)
        log.warning(
            "refused requests for the name %r (first from %s): not a name of this dashboard. A web page may be "
            "trying to reach it through DNS rebinding; if the name is yours, add it to [web] hosts",
            host[:200], client[0],
        )  # fmt: skip


async def _misdirected(send: Send) -> None:
    body = (
        b"421 Misdirected Request: this dashboard does not answer to the name in the address. Use its address "
        b"or a name it knows (localhost, its certificate's names, [web] hosts in its configuration).\n"
    )
    await send(
        {
            "type": "http.response.start",
            "status": 421,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
