"""The dashboard's ASGI application: pages, the JSON API under ``/api/v1`` and their guards.

Who may do what (docs/web.md, "Users and roles")::

    viewer     every page and GET of the API
    operator   + run jobs now, verify and restore snapshots (into configured targets),
                 refresh repository statistics
    admin      + users, forget snapshots, prune repositories, the activity log

Guards, applied to every route by :meth:`WebApp.route` (never by the handlers themselves):

* no valid session cookie or bearer token: API 401 (``WWW-Authenticate: Bearer``), pages a
  redirect to ``/login``; a bearer token is accepted on ``/api/`` only;
* a role below the route's: 403;
* a state-changing request (POST) made with a session cookie: 403 unless it carries the
  session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``) and, when the
  browser sends an ``Origin``, that origin is the dashboard's own. A bearer token needs no
  CSRF token: no browser sends one by itself;
* bodies over 64 KiB: 413 (counted as they arrive: a chunked body has no length);
* before all of these, a ``Host`` that is not one of the dashboard's names (web/hosts.py: DNS
  rebinding): 421.

Every page is rendered by Jinja2 with autoescaping on, under a Content-Security-Policy that
allows no inline script and nothing from another origin: a name from a VM folder or the
storage that holds HTML renders as text, and could not run if it did not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmvault import __version__, shape
from vmvault.automation.config import AutomationConfig, WebSettings
from vmvault.automation.history import FAILED, SUCCESS, WARNING, History
from vmvault.automation.status import cancel_job
from vmvault.errors import (
    ConfigError,
    GuestError,
    GuestPathError,
    ImmutableError,
    LockedError,
    RepositoryError,
    SnapshotNotFoundError,
    VmvaultError,
)
from vmvault.repo.schema import snapshot_detail
from vmvault.repo.snapshot import Snapshot

from . import browse, charts, openapi
from .actions import Actions, Plan
from .auth import LoginLimiter, Session, SessionStore
from .hosts import KnownHosts, dashboard_names
from .jobs import JobControl
from .model import OUTCOMES, TASKS, Dashboard, human_age, parse_since
from .users import DEVICE_MAX_AGE, ROLES, UserStore, check_name, check_password, check_role, role_allows

__all__ = ["SESSION_COOKIE", "WebApp"]

log = logging.getLogger("vmvault.web")

SESSION_COOKIE = "vmvault_session"
LOGIN_COOKIE = "vmvault_login"
DEVICE_COOKIE = "vmvault_device"
MAX_BODY = 64 * 1024
_HERE = os.path.dirname(os.path.abspath(__file__))

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on a form POST
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


class _SecurityHeaders:
    """Adds the security headers to every response; pages and API answers are never cached."""

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers.extend((k, v) for k, v in _HEADERS if k not in names)
                if not static and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if self.tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, wrapped)


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """Bodies count against ``MAX_BODY`` as they arrive, whatever ``Content-Length`` says (a
    chunked body has none): past it the request gets 413. A client gone mid-body (or cut off by
    web/clients.py) ends its request quietly, not as an application error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await JSONResponse({"error": "the request is too large", "status": 413}, status_code=413)(
                    scope, receive, send
                )
        except ClientDisconnect:
            pass


@dataclass
class Who:
    user: str
    role: str
    session: Session | None  # None: a bearer token

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session is not None else ""


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request, Who], Awaitable[Response]]


def _status_of(exc: VmvaultError) -> int:
    if isinstance(exc, SnapshotNotFoundError | GuestPathError):
        return 404
    if isinstance(exc, GuestError):
        return 422  # what is inside the disk cannot be read
    if isinstance(exc, LockedError):
        return 409
    if isinstance(exc, ImmutableError):
        return 409
    if isinstance(exc, ConfigError):
        return 400
    if isinstance(exc, RepositoryError):
        return 502
    return 500


def _human_bytes(n: Any) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class WebApp:
    """The dashboard for one configuration: pages, API, sessions and actions."""

    def __init__(
        self,
        config: AutomationConfig,
        history: History,
        users: UserStore,
        control: JobControl,
        *,
        settings: WebSettings | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.config = config
        self.history = history
        self.users = users
        self.control = control
        self.settings = settings or config.web or WebSettings()
        self.tls = self.settings.tls
        self.dashboard = Dashboard(config, history, settings=self.settings, clock=clock)
        self.actions = Actions(self.dashboard, control.board, history)
        control.board.on_finished.append(self.dashboard.changed)
        self.sessions = SessionStore(self.settings.session_idle, self.settings.session_max)
        self.limiter = LoginLimiter(self.settings.login_attempts, self.settings.lockout)
        self.tz = config.daemon.tz()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(_HERE, "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=self._when, ago=self._ago, bytes=_human_bytes, ratio=_ratio, dur=_duration, qp=_quote_part,
            pagequery=_page_query,
        )  # fmt: skip
        self.env.globals.update(version=__version__, ROLES=ROLES, role_allows=role_allows)
        #: an event stream ends after this long; the browser's EventSource reconnects by itself
        self.events_seconds = 3600.0

    # ---- formatting --------------------------------------------------------------------------

    def _when(self, value: Any) -> str:
        when = value if isinstance(value, dt.datetime) else _parse_time(value)
        if when is None:
            return "–"
        local = when.astimezone(self.tz) if self.tz is not None else when.astimezone()
        return local.strftime("%Y-%m-%d %H:%M %Z")

    def _ago(self, value: Any) -> str:
        when = value if isinstance(value, dt.datetime) else _parse_time(value)
        if when is None:
            return "never"
        seconds = (self.dashboard.now() - when).total_seconds()
        return f"{human_age(seconds)} ago" if seconds >= 0 else f"in {human_age(-seconds)}"

    # ---- who is asking -------------------------------------------------------------------------

    async def _who(self, request: Request) -> Who | None:
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not request.url.path.startswith("/api/"):
                return None
            user = await run_in_threadpool(self.users.verify_token, token.strip())
            return Who(user.name, user.role, None) if user is not None else None
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        user = await run_in_threadpool(self.users.get, session.user)
        if user is None or user.role != session.role:
            self.sessions.end(session.id)  # removed, or the role changed: log in again
            return None
        return Who(user.name, user.role, session)

    def _origin_ok(self, request: Request) -> bool:
        """A browser's request comes from a page of this dashboard: its ``Sec-Fetch-Site`` (when
        sent) is ``same-origin`` and its ``Origin`` (when sent) is ours."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:  # older browsers and scripts send none; the CSRF token still decides
            return True
        host = request.headers.get("host", "")
        scheme = "https" if self.tls else "http"
        return origin == f"{scheme}://{host}"

    def route(
        self, path: str, role: str, *, methods: tuple[str, ...] = ("GET",), api: bool = False
    ) -> Callable[[Handler], Route]:
        """A route whose handler runs only for a user with at least ``role`` (and, for a POST
        with a session, the right CSRF token)."""

        def decorate(handler: Handler) -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    length = int(request.headers.get("content-length") or 0)
                except ValueError:
                    length = MAX_BODY + 1
                if length > MAX_BODY:
                    return self._deny(request, api, 413, "the request is too large")
                who = await self._who(request)
                if who is None:
                    if api or request.method != "GET":
                        return self._deny(request, api, 401, "log in, or send Authorization: Bearer TOKEN")
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
                if not role_allows(who.role, role):
                    self._record(request, who, "denied", f"{request.method} {request.url.path}", "refused",
                                 needed=role)  # fmt: skip
                    return self._deny(request, api, 403, f"this needs the {role} role; you are {who.role}", who)
                if request.method == "POST":
                    form = None
                    if not api:
                        try:
                            form = await self._form(request)
                        except _Denied as exc:
                            return self._deny(request, api, exc.status, exc.message, who)
                        request.state.form = form
                    if who.session is not None:
                        token = request.headers.get("x-csrf-token") or (
                            str(form.get("csrf_token") or "") if form else None
                        )
                        if not who.session.csrf_ok(token) or not self._origin_ok(request):
                            self._record(request, who, "csrf", f"{request.method} {request.url.path}", "refused")
                            return self._deny(request, api, 403, "missing or wrong CSRF token", who)
                try:
                    return await handler(request, who)
                except _Denied as exc:
                    return self._deny(request, api, exc.status, exc.message, who)
                except VmvaultError as exc:
                    return self._deny(request, api, _status_of(exc), str(exc), who)

            return Route(path, endpoint, methods=list(methods))

        return decorate

    async def _form(self, request: Request) -> FormData:
        try:
            return await request.form(max_files=0, max_fields=50)
        except (_TooLarge, ClientDisconnect):
            raise
        except Exception as exc:  # a malformed body is the client's problem, never a traceback
            raise _Denied(400, f"unreadable form: {type(exc).__name__}") from exc

    def _deny(self, request: Request, api: bool, status: int, message: str, who: Who | None = None) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if api or request.url.path.startswith("/api/"):
            return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)
        return self._page(request, who, "error.html", {"status": status, "message": message}, status=status)

    def _record(self, request: Request, who: Who | None, action: str, target: str, result: str, **details: Any) -> None:
        try:
            self.history.record_action(
                dt.datetime.now(dt.UTC), who.user if who else "-", action, target, result,
                address=request.client.host if request.client else "", details=details,
            )  # fmt: skip
        except VmvaultError as exc:
            log.error("could not record %s by %s: %s", action, who.user if who else "-", exc)

    def _page(
        self, request: Request, who: Who | None, template: str, context: dict[str, Any], *, status: int = 200
    ) -> Response:
        ctx = {
            "who": who,
            "csrf": who.csrf if who else "",
            "path": request.url.path,
            "now": self.dashboard.now(),
            "notice": request.query_params.get("notice", ""),
            "host": self.dashboard.host,
        } | context
        body = self.env.get_template(template).render(ctx)
        return Response(body, status_code=status, media_type="text/html; charset=utf-8")

    # ---- the application ---------------------------------------------------------------------

    def build(self) -> Starlette:
        r = self.route
        routes: list[Any] = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/api/v1/openapi.json", self.openapi_json, methods=["GET"]),
            Mount("/static", StaticFiles(directory=os.path.join(_HERE, "static")), name="static"),
            r("/logout", "viewer", methods=("POST",))(self.logout),
            r("/", "viewer")(self.overview),
            r("/jobs", "viewer")(self.jobs_page),
            r("/jobs/{name}/run", "operator", methods=("POST",))(self.run_job_form),
            r("/jobs/{name}/cancel", "operator", methods=("POST",))(self.cancel_job_form),
            r("/history", "viewer")(self.history_page),
            r("/repositories", "viewer")(self.repositories_page),
            r("/repositories/{name}/refresh", "operator", methods=("POST",))(self.refresh_form),
            r("/repositories/{name}/prune", "admin")(self.confirm_prune),
            r("/repositories/{name}/prune", "admin", methods=("POST",))(self.start_prune_form),
            r("/snapshots", "viewer")(self.snapshots_page),
            r("/snapshots/{repository}/{snapshot}", "viewer")(self.snapshot_page),
            r("/snapshots/{repository}/{snapshot}/files", "viewer")(self.files_page),
            r("/snapshots/{repository}/{snapshot}/download", "operator")(self.download),
            r("/snapshots/{repository}/{snapshot}/{action}", "operator")(self.confirm_action),
            r("/snapshots/{repository}/{snapshot}/{action}", "operator", methods=("POST",))(self.start_action_form),
            r("/audit", "viewer")(self.audit_page),
            r("/fleet", "viewer")(self.fleet_page),
            r("/activity", "admin")(self.activity_page),
            r("/users", "admin")(self.users_page),
            r("/users", "admin", methods=("POST",))(self.users_form),
            r("/api", "viewer")(self.api_page),
            # the API
            r("/api/v1/whoami", "viewer", api=True)(self.api_whoami),
            r("/api/v1/vms", "viewer", api=True)(self.api_vms),
            r("/api/v1/jobs", "viewer", api=True)(self.api_jobs),
            r("/api/v1/jobs/{name}/run", "operator", methods=("POST",), api=True)(self.api_run_job),
            r("/api/v1/jobs/{name}/cancel", "operator", methods=("POST",), api=True)(self.api_cancel_job),
            r("/api/v1/progress", "viewer", api=True)(self.api_progress),
            r("/api/v1/events", "viewer", api=True)(self.api_events),
            r("/api/v1/history", "viewer", api=True)(self.api_history),
            r("/api/v1/tasks", "viewer", api=True)(self.api_tasks),
            r("/api/v1/repositories", "viewer", api=True)(self.api_repositories),
            r("/api/v1/repositories/{name}/refresh", "operator", methods=("POST",), api=True)(self.api_refresh),
            r("/api/v1/repositories/{name}/prune", "admin", methods=("POST",), api=True)(self.api_prune),
            r("/api/v1/snapshots", "viewer", api=True)(self.api_snapshots),
            r("/api/v1/snapshots/{repository}/{snapshot}", "viewer", api=True)(self.api_snapshot),
            r("/api/v1/snapshots/{repository}/{snapshot}/files", "viewer", api=True)(self.api_files),
            r("/api/v1/snapshots/{repository}/{snapshot}/download", "operator", api=True)(self.download),
            r("/api/v1/snapshots/{repository}/{snapshot}/{action}", "operator", methods=("POST",), api=True)(
                self.api_snapshot_action
            ),
            r("/api/v1/hosts", "viewer", api=True)(self.api_hosts),
            r("/api/v1/audit", "viewer", api=True)(self.api_audit),
            r("/api/v1/actions", "admin", api=True)(self.api_actions),
            r("/api/v1/users", "admin", api=True)(self.api_users),
        ]
        app = Starlette(routes=routes)
        app.add_middleware(_BodyLimit)
        app.add_middleware(KnownHosts, names=dashboard_names(self.settings))
        app.add_middleware(_SecurityHeaders, tls=self.tls)  # the outermost: on 421 answers too
        return app

    # ---- login / logout ------------------------------------------------------------------------

    def _cookie(self, response: Response, name: str, value: str, *, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", secure=self.tls, httponly=True, samesite="strict")

    def _login_form(self, request: Request, *, error: str = "", status: int = 200, name: str = "") -> Response:
        token = secrets.token_urlsafe(24)
        nxt = _safe_next(request.query_params.get("next"))
        response = self._page(
            request, None, "login.html", {"login_token": token, "error": error, "next": nxt, "name": name},
            status=status,
        )  # fmt: skip
        self._cookie(response, LOGIN_COOKIE, token, max_age=1800)
        return response

    async def login_page(self, request: Request) -> Response:
        if await self._who(request) is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
        return self._login_form(request)

    async def login(self, request: Request) -> Response:
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY:
                return self._login_form(request, error="the request is too large", status=413)
            form = await self._form(request)
        except ValueError:
            return self._login_form(request, error="the request is malformed", status=400)
        except _Denied as exc:
            return self._login_form(request, error=exc.message, status=exc.status)
        name = str(form.get("username") or "")[:64]
        password = str(form.get("password") or "")
        cookie = request.cookies.get(LOGIN_COOKIE) or ""
        token = str(form.get("login_token") or "")
        address = request.client.host if request.client else ""
        if not cookie or not secrets.compare_digest(cookie.encode(), token.encode()) or not self._origin_ok(request):
            return self._login_form(request, error="the login form expired; please try again", status=403, name=name)
        # a browser that logged in as this user before counts its failures on its own; all
        # others share the name's and their address's counts (web/users.py, docs/web.md)
        device = await run_in_threadpool(self.users.device_of, request.cookies.get(DEVICE_COOKIE), name, time.time())
        keys = (f"device:{device}",) if device else (f"user:{name.lower()}", f"addr:{address}")
        wait = self.limiter.retry_after(*keys)
        if wait > 0:
            self._record(request, None, "login", name, "locked")
            return self._login_form(
                request, error=f"too many failed logins; try again in {human_age(wait)}", status=429, name=name
            )
        user = await run_in_threadpool(self.users.verify_password, name, password)
        if user is None:
            locked = self.limiter.failed(*keys)
            self._record(request, None, "login", name, "failed")
            if locked:
                where = "from a browser it used before" if device else f"or from {address}"
                log.warning("login: too many failures for %r %s; locked for %.0f s", name, where, self.settings.lockout)
            return self._login_form(request, error="wrong user name or password", status=401, name=name)
        self.limiter.succeeded(keys[0])  # not the address's count: one's own account would reset it
        session = self.sessions.create(user.name, user.role)
        self._record(request, Who(user.name, user.role, session), "login", user.name, "done")
        response = RedirectResponse(_safe_next(str(form.get("next") or "")), status_code=303)
        self._cookie(response, SESSION_COOKIE, session.id, max_age=None)
        self._cookie(response, DEVICE_COOKIE, self.users.device_cookie(user, time.time()), max_age=DEVICE_MAX_AGE)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: Request, who: Who) -> Response:
        if who.session is not None:
            self.sessions.end(who.session.id)
        self._record(request, who, "logout", who.user, "done")
        response = RedirectResponse("/login?notice=logged-out", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=self.tls, httponly=True, samesite="strict")
        return response

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(openapi.spec(__version__))

    # ---- pages ---------------------------------------------------------------------------------

    async def overview(self, request: Request, who: Who) -> Response:
        vms, grid24, grid7 = await run_in_threadpool(
            lambda: (self.dashboard.vms(), self.dashboard.task_grid(24), self.dashboard.task_grid(24 * 7))
        )
        counts = {s: sum(1 for v in vms if v["state"] == s) for s in ("red", "amber", "green")}
        return self._page(
            request, who, "overview.html",
            {"vms": vms, "counts": counts, "grids": [("24 h", "24h", grid24), ("7 days", "7d", grid7)],
             "tasks": TASKS, "outcomes": OUTCOMES},
        )  # fmt: skip

    async def jobs_page(self, request: Request, who: Who) -> Response:
        await run_in_threadpool(self.control.sync)
        jobs = await run_in_threadpool(self.dashboard.jobs)
        progress = {p["job"]: p for p in self.control.board.states()}
        return self._page(request, who, "jobs.html", {"jobs": jobs, "progress": progress})

    async def run_job_form(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        self._run_job(request, who, name)
        return RedirectResponse(f"/jobs?{urlencode({'notice': 'queued', 'job': name})}", status_code=303)

    def _run_job(self, request: Request, who: Who, name: str) -> None:
        if name not in self.config.jobs:
            raise _Denied(404, f"no job {name!r}")
        job = self.config.jobs[name]
        try:
            self.control.run_now(job, who.user)
        except LockedError as exc:
            self._record(request, who, "run", name, "refused", error=str(exc))
            raise
        self._record(request, who, "run", name, "queued")

    async def cancel_job_form(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        asked = await run_in_threadpool(self._cancel_job, request, who, name)
        notice = "cancelling" if asked else "not-running"
        return RedirectResponse(f"/jobs?{urlencode({'notice': notice, 'job': name})}", status_code=303)

    def _cancel_job(self, request: Request, who: Who, name: str) -> list[int]:
        """Ask the job's running attempt to stop, whichever process runs it, and the daemon not
        to start what it queued of it; the ids of the running attempts asked."""
        if name not in self.config.jobs:
            raise _Denied(404, f"no job {name!r}")
        runs = cancel_job(
            self.history, name, dt.datetime.now(dt.UTC), who.user,
            address=request.client.host if request.client else "", command="vmvault web",
        )  # fmt: skip
        self.control.cancelled(self.config.jobs[name])
        return [r.id for r in runs]

    async def history_page(self, request: Request, who: Who) -> Response:
        q = request.query_params
        filters = self._history_filters(q)
        runs = await run_in_threadpool(lambda: self.dashboard.runs(**filters))
        return self._page(
            request, who, "history.html",
            {"runs": [r.to_dict() for r in runs], "q": dict(q), "jobs": sorted(self.config.jobs),
             "types": ("backup", "verify", "copy"), "statuses": (SUCCESS, WARNING, FAILED, "interrupted", "running"),
             "page": filters["offset"] // filters["limit"], "limit": filters["limit"]},
        )  # fmt: skip

    def _history_filters(self, q: Any) -> dict[str, Any]:
        try:
            since = parse_since(q.get("since"), self.dashboard.now())
            limit = int(q.get("limit") or 100)
            page = int(q.get("page") or 0)
        except ValueError as exc:
            raise _Denied(400, str(exc)) from None
        if not 1 <= limit <= 1000 or not 0 <= page <= 10**6:
            raise _Denied(400, "limit must be from 1 to 1000 and page at least 0")
        status = q.get("status") or ""
        statuses: tuple[str, ...] = (FAILED, "interrupted") if status == "failed" else (status,) if status else ()
        return {
            "job": q.get("job") or None,
            "types": (q.get("type"),) if q.get("type") else (),
            "statuses": (SUCCESS,) if status == "ok" else statuses,
            "since": since,
            "text": (q.get("q") or "")[:200] or None,
            "limit": limit,
            "offset": page * limit,
        }

    async def repositories_page(self, request: Request, who: Who) -> Response:
        repos = await run_in_threadpool(self.dashboard.repositories)
        for repo in repos:
            repo["chart"] = _growth_chart(repo)
        return self._page(request, who, "repositories.html", {"repos": repos})

    async def refresh_form(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        self.dashboard.repo(name)
        self._record(request, who, "refresh", name, "started")
        await run_in_threadpool(self.dashboard.refresh_stats, [name])
        return RedirectResponse("/repositories?notice=refreshed", status_code=303)

    async def confirm_prune(self, request: Request, who: Who) -> Response:
        plan = await run_in_threadpool(self.actions.plan_prune, request.path_params["name"])
        return self._page(request, who, "confirm.html", {"plan": plan, "post": request.url.path})

    async def start_prune_form(self, request: Request, who: Who) -> Response:
        plan = await run_in_threadpool(self.actions.plan_prune, request.path_params["name"])
        key = self.actions.start(plan, who.user, _address(request))
        return RedirectResponse(f"/jobs?{urlencode({'notice': 'started', 'job': key})}", status_code=303)

    async def snapshots_page(self, request: Request, who: Who) -> Response:
        q = request.query_params
        snaps = await run_in_threadpool(
            lambda: self.dashboard.snapshots(
                vm=q.get("vm") or None, hostname=q.get("hostname") or None, repository=q.get("repository") or None
            )
        )
        return self._page(
            request, who, "snapshots.html", {"snapshots": snaps, "q": dict(q), "repos": sorted(self.dashboard.repos)}
        )

    async def snapshot_page(self, request: Request, who: Who) -> Response:
        repo = request.path_params["repository"]
        snap = await run_in_threadpool(self.dashboard.repo(repo).snapshot, request.path_params["snapshot"])
        targets = [t for t, _ in self.settings.restore_targets]
        return self._page(request, who, "snapshot.html", {"snap": snap, "repository": repo, "targets": targets})

    def _plan(self, repository: str, snapshot: str, action: str, params: Any) -> Plan:
        if action == "restore":
            return self.actions.plan_restore(repository, snapshot, str(params.get("target") or ""))
        if action == "clone":
            return self.actions.plan_restore(
                repository, snapshot, str(params.get("target") or ""), clone=str(params.get("clone") or "")
            )
        if action == "verify":
            return self.actions.plan_verify(repository, snapshot)
        if action == "forget":
            return self.actions.plan_forget(repository, snapshot)
        raise _Denied(404, f"no action {action!r}")

    def _need_admin(self, who: Who, action: str) -> None:
        if action == "forget" and not role_allows(who.role, "admin"):
            raise _Denied(403, f"this needs the admin role; you are {who.role}")

    async def confirm_action(self, request: Request, who: Who) -> Response:
        p = request.path_params
        self._need_admin(who, p["action"])
        plan = await run_in_threadpool(self._plan, p["repository"], p["snapshot"], p["action"], request.query_params)
        return self._page(request, who, "confirm.html", {"plan": plan, "post": request.url.path})

    async def start_action_form(self, request: Request, who: Who) -> Response:
        p = request.path_params
        self._need_admin(who, p["action"])
        plan = await run_in_threadpool(self._plan, p["repository"], p["snapshot"], p["action"], request.state.form)
        key = self.actions.start(plan, who.user, _address(request))
        return RedirectResponse(f"/jobs?{urlencode({'notice': 'started', 'job': key})}", status_code=303)

    def _listing(self, request: Request) -> tuple[Snapshot, dict[str, Any]]:
        p = request.path_params
        view = self.dashboard.repo(p["repository"])
        snap = view.snapshot(p["snapshot"])
        return snap, browse.listing(view.reader(), snap, request.query_params.get("loc") or None)

    async def files_page(self, request: Request, who: Who) -> Response:
        snap, doc = await run_in_threadpool(self._listing, request)
        loc = request.query_params.get("loc") or ""
        return self._page(
            request, who, "files.html",
            {"snap": snap, "repository": request.path_params["repository"], "doc": doc, "loc": loc},
        )  # fmt: skip

    async def api_files(self, request: Request, who: Who) -> Response:
        _snap, doc = await run_in_threadpool(self._listing, request)
        return JSONResponse(doc)

    async def download(self, request: Request, who: Who) -> Response:
        """A file from inside a snapshot's disk, streamed; recorded (who, what, when)."""
        p = request.path_params
        spec = request.query_params.get("loc") or ""
        view = self.dashboard.repo(p["repository"])

        def start() -> browse.Download:
            snap = view.snapshot(p["snapshot"])
            return browse.open_download(view.reader(), snap, spec)

        try:
            got = await run_in_threadpool(start)
        except VmvaultError as exc:
            self._record(request, who, "download", f"{p['repository']}:{p['snapshot'][:8]}:{spec}", "refused",
                         error=str(exc))  # fmt: skip
            raise
        self._record(request, who, "download", f"{p['repository']}:{p['snapshot'][:8]}:{spec}", "done", size=got.size)
        ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in got.name)
        disposition = f"attachment; filename=\"{ascii_name or 'file'}\"; filename*=UTF-8''{quote(got.name, safe='')}"
        return StreamingResponse(
            got.pieces,
            media_type="application/octet-stream",
            headers={"Content-Disposition": disposition, "Content-Length": str(got.size)},
        )

    async def audit_page(self, request: Request, who: Who) -> Response:
        audit = await run_in_threadpool(self.dashboard.audit)
        return self._page(request, who, "audit.html", {"audit": audit, "configured": bool(self.settings.audit)})

    async def fleet_page(self, request: Request, who: Who) -> Response:
        hosts = await run_in_threadpool(self.dashboard.fleet)
        return self._page(request, who, "fleet.html", {"hosts": hosts})

    async def activity_page(self, request: Request, who: Who) -> Response:
        actions = await run_in_threadpool(lambda: self.history.actions(limit=500))
        return self._page(request, who, "activity.html", {"actions": [a.to_dict() for a in actions]})

    async def users_page(self, request: Request, who: Who) -> Response:
        users = await run_in_threadpool(self.users.users)
        return self._page(request, who, "users.html", {"users": [u.public() for u in users], "error": ""})

    async def users_form(self, request: Request, who: Who) -> Response:
        form = request.state.form
        op = str(form.get("op") or "")
        name = str(form.get("name") or "")
        try:
            check_name(name)
            if op == "add":
                password = str(form.get("password") or "")
                check_password(password)
                await run_in_threadpool(self.users.add, name, check_role(str(form.get("role") or "")), password)
            elif op == "role":
                await run_in_threadpool(self.users.set_role, name, check_role(str(form.get("role") or "")))
                self.sessions.end_user(name)
            elif op == "remove":
                if name == who.user:
                    raise ConfigError("you cannot remove yourself")
                await run_in_threadpool(self.users.remove, name)
                self.sessions.end_user(name)
            else:
                raise ConfigError(f"unknown operation {op!r}")
        except ConfigError as exc:
            self._record(request, who, f"user {op}", name, "refused", error=str(exc))
            users = await run_in_threadpool(self.users.users)
            return self._page(
                request, who, "users.html", {"users": [u.public() for u in users], "error": str(exc)}, status=400
            )
        self._record(request, who, f"user {op}", name, "done", role=str(form.get("role") or ""))
        return RedirectResponse("/users?notice=saved", status_code=303)

    async def api_page(self, request: Request, who: Who) -> Response:
        return self._page(request, who, "api.html", {"spec": openapi.spec(__version__)})

    # ---- the API -------------------------------------------------------------------------------

    async def api_whoami(self, request: Request, who: Who) -> Response:
        return JSONResponse({"user": who.user, "role": who.role, "via": "session" if who.session else "token"})

    async def api_vms(self, request: Request, who: Who) -> Response:
        return JSONResponse({"vms": await run_in_threadpool(self.dashboard.vms)})

    async def api_jobs(self, request: Request, who: Who) -> Response:
        await run_in_threadpool(self.control.sync)
        jobs = await run_in_threadpool(self.dashboard.jobs)
        return JSONResponse({"config": self.config.path, "jobs": jobs, "progress": self.control.board.states()})

    async def api_run_job(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        await run_in_threadpool(self._run_job, request, who, name)
        return JSONResponse({"job": name, "state": "queued"}, status_code=202)

    async def api_cancel_job(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        asked = await run_in_threadpool(self._cancel_job, request, who, name)
        state = "cancelling" if asked else "not running"
        return JSONResponse({"job": name, "state": state, "runs": asked}, status_code=202)

    async def api_progress(self, request: Request, who: Who) -> Response:
        await run_in_threadpool(self.control.sync)
        return JSONResponse({"progress": self.control.board.states()})

    async def api_events(self, request: Request, who: Who) -> Response:
        """Server-sent events: ``progress`` with every job's state whenever it changes."""

        async def stream() -> AsyncIterator[str]:
            last = -1
            started = time.monotonic()
            beat = started
            yield "retry: 2000\n\n"
            while time.monotonic() - started < self.events_seconds:
                if await request.is_disconnected():
                    return
                await run_in_threadpool(self.control.sync)
                board = self.control.board
                if board.version != last:
                    last = board.version
                    yield f"event: progress\ndata: {json.dumps(board.states())}\n\n"
                    beat = time.monotonic()
                elif time.monotonic() - beat > 15:
                    yield ": keep-alive\n\n"
                    beat = time.monotonic()
                await asyncio.sleep(0.25)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    async def api_history(self, request: Request, who: Who) -> Response:
        filters = self._history_filters(request.query_params)
        runs = await run_in_threadpool(lambda: self.dashboard.runs(**filters))
        return JSONResponse({"runs": [r.to_dict() for r in runs]})

    async def api_tasks(self, request: Request, who: Who) -> Response:
        try:
            hours = int(request.query_params.get("hours") or 24)
        except ValueError:
            hours = -1
        if not 1 <= hours <= 24 * 366:
            raise _Denied(400, "hours must be from 1 to 8784")
        grid = await run_in_threadpool(self.dashboard.task_grid, hours)
        return JSONResponse({"hours": hours, "tasks": grid})

    async def api_repositories(self, request: Request, who: Who) -> Response:
        return JSONResponse({"repositories": await run_in_threadpool(self.dashboard.repositories)})

    async def api_refresh(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        self.dashboard.repo(name)
        self._record(request, who, "refresh", name, "started")
        await run_in_threadpool(self.dashboard.refresh_stats, [name])
        view = self.dashboard.repo(name)
        return JSONResponse(
            {"repository": name, "stats": view.stats.to_dict() if view.stats else None, "error": view.error}
        )

    async def api_prune(self, request: Request, who: Who) -> Response:
        plan = await run_in_threadpool(self.actions.plan_prune, request.path_params["name"])
        key = self.actions.start(plan, who.user, _address(request))
        return JSONResponse({"task": key, "plan": plan.to_dict()}, status_code=202)

    async def api_snapshots(self, request: Request, who: Who) -> Response:
        q = request.query_params
        snaps = await run_in_threadpool(
            lambda: self.dashboard.snapshots(
                vm=q.get("vm") or None, hostname=q.get("hostname") or None, repository=q.get("repository") or None
            )
        )
        return JSONResponse({"snapshots": snaps})

    async def api_snapshot(self, request: Request, who: Who) -> Response:
        repo = request.path_params["repository"]
        snap = await run_in_threadpool(self.dashboard.repo(repo).snapshot, request.path_params["snapshot"])
        # `vmvault show --json`'s shape (repo/schema.py), with its repository
        return JSONResponse(snapshot_detail(snap) | {"repository": repo})

    async def api_snapshot_action(self, request: Request, who: Who) -> Response:
        p = request.path_params
        self._need_admin(who, p["action"])
        try:
            body = shape.loads(await request.body() or b"{}")
        except ValueError:
            raise _Denied(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise _Denied(400, "the body must be a JSON object")
        plan = await run_in_threadpool(self._plan, p["repository"], p["snapshot"], p["action"], body)
        if body.get("dry_run"):
            return JSONResponse({"plan": plan.to_dict()})
        key = self.actions.start(plan, who.user, _address(request))
        return JSONResponse({"task": key, "plan": plan.to_dict()}, status_code=202)

    async def api_hosts(self, request: Request, who: Who) -> Response:
        return JSONResponse({"hosts": await run_in_threadpool(self.dashboard.fleet)})

    async def api_audit(self, request: Request, who: Who) -> Response:
        return JSONResponse({"targets": await run_in_threadpool(self.dashboard.audit)})

    async def api_actions(self, request: Request, who: Who) -> Response:
        actions = await run_in_threadpool(lambda: self.history.actions(limit=500))
        return JSONResponse({"actions": [a.to_dict() for a in actions]})

    async def api_users(self, request: Request, who: Who) -> Response:
        users = await run_in_threadpool(self.users.users)
        return JSONResponse({"users": [u.public() for u in users]})


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _safe_next(value: str | None) -> str:
    """Only a path of this site (no ``//host`` or scheme): no open redirect after login."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
        return "/"
    return value


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _quote_part(value: Any) -> str:
    """One path segment, every reserved character escaped (a name with ``/`` stays one segment)."""
    return quote(str(value), safe="")


def _page_query(q: dict[str, str], page: int) -> str:
    return urlencode({k: v for k, v in q.items() if k != "page"} | {"page": str(page)})


def _ratio(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}×"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    return human_age(s)


def _growth_chart(repo: dict[str, Any]) -> list[Any]:
    """The size chart (measured samples and the growth the backups caused) and, where the
    storage reports free space, the free-space chart with the estimated "full" date."""
    samples = repo["samples"]
    stored = [(t, float(s["stored"])) for s in samples if (t := _parse_time(s["time"])) is not None]
    free = [(t, float(s["free"])) for s in samples if s["free"] is not None and (t := _parse_time(s["time"]))]
    added = [(t, float(g["added"])) for g in repo["growth"] if (t := _parse_time(g["time"])) is not None]
    out = [
        charts.line_chart(
            [
                charts.Series("stored (measured)", stored, "s1"),
                charts.Series("added by backups", added, "s2", dashed=True),
            ],
            title=f"{repo['name']}: size over time",
            y_format=_human_bytes,
        )
    ]
    if free:
        full = _parse_time(repo.get("estimated_full"))
        marker = (full, f"full ≈ {full.date().isoformat()}") if full is not None else None
        out.append(
            charts.line_chart(
                [charts.Series("free space", free, "s3")],
                title=f"{repo['name']}: free space on the storage",
                y_format=_human_bytes,
                marker=marker,
            )
        )
    return out
