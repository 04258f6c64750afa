"""The automation configuration file (``vmvault.toml``): repositories, sources, jobs, notifications.

Every problem is reported as ``ConfigError(path=, line=)``: syntax errors with the line
``tomllib`` names, semantic ones with the line of the offending key (found by a small
scan of the file's table headers and keys, since ``tomllib`` keeps no positions).
docs/automation.md is the reference for every key; ``EXAMPLE`` below is a complete file.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.automation.cron import CronExpr, parse_cron
from vmvault.errors import ConfigError
from vmvault.hypervisors.base import DEFAULT_OPTIONS, TRACKING_SAMPLE, BackupOptions
from vmvault.hypervisors.registry import check_options, connector_for
from vmvault.repo.retention import RetentionPolicy
from vmvault.repo.secret import given_secret

__all__ = [
    "AutomationConfig",
    "BackupJob",
    "CopyJob",
    "DaemonSettings",
    "Job",
    "NotifierConfig",
    "RepositoryConfig",
    "SourceConfig",
    "TimeWindow",
    "VerifyBootJob",
    "VerifyJob",
    "WebSettings",
    "host_name",
    "load_config",
    "parse_duration",
    "parse_listen",
    "web_settings",
]

JOB_TYPES = ("backup", "verify", "copy", "verify-boot")

#: how old a missed firing may be and still be caught up, unless a job says otherwise
DEFAULT_CATCH_UP_WITHIN = 86400.0


# ---- values ---------------------------------------------------------------------------------


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"5m"``, ``"26h"``, ``"1.5h"``, ``"1d12h"``, ``"2w"`` -> seconds.

    The one duration rule, for the configuration and the command line alike (README,
    "Durations"): numbers each followed by a unit (s, m, h, d, w; any case), summed; spaces
    are ignored. A bare number is refused: whether "26" means hours, minutes or seconds is
    exactly the kind of guess a backup schedule must not make. Raises ``ValueError``."""
    t = text.strip().lower().replace(" ", "")
    if not t:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        raise ValueError(f"{text!r} has no unit: write e.g. {t}h, {t}m or {t}s")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t):
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 5m, 26h, 1d12h, 2w)")
    return total


#: the longest duration a setting may have
_CENTURY = 100 * 366 * 86400.0


@dataclass(frozen=True)
class TimeWindow:
    """Daily wall-clock window ``start``-``end``; ``end`` before ``start`` wraps past midnight."""

    start: dt.time
    end: dt.time
    text: str

    def contains(self, when: dt.datetime) -> bool:
        t = when.time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, when: dt.datetime) -> dt.datetime:
        """``when`` if inside the window, else the next moment the window opens (same tz)."""
        if self.contains(when):
            return when
        opening = when.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opening <= when:
            opening += dt.timedelta(days=1)
        return opening

    def closes_after(self, when: dt.datetime) -> dt.datetime:
        """For ``when`` inside the window: when this opening of the window closes."""
        closing = when.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if closing <= when:
            closing += dt.timedelta(days=1)
        return closing


def parse_window(text: str) -> TimeWindow:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not m:
        raise ValueError(f"window {text!r} must look like 22:00-06:00")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h2 == 24 and m2 == 0:
        h2, m2 = 0, 0
    if not (0 <= h1 < 24 and 0 <= m1 < 60 and 0 <= h2 < 24 and 0 <= m2 < 60):
        raise ValueError(f"window {text!r} has a time out of range")
    if (h1, m1) == (h2, m2):
        raise ValueError(f"window {text!r} is empty (start equals end); leave it out to allow any time")
    return TimeWindow(dt.time(h1, m1), dt.time(h2, m2), text.strip())


# ---- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepositoryConfig:
    name: str
    location: str
    password_file: str | None = None
    password_env: str | None = None
    key_file: str | None = None
    #: at most this many jobs use the repository at once (0 = no limit)
    max_jobs: int = 0

    def secret(self) -> bytes | None:
        """The passphrase or key-file secret; None when none is configured (unencrypted)."""
        given = given_secret(
            key_file=self.key_file,
            password_file=self.password_file,
            env=self.password_env,
            label=f"repository {self.name}: ",
        )
        if given is None and self.password_env:
            raise ConfigError(f"repository {self.name}: environment variable {self.password_env} is not set")
        return given.value if given is not None else None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    location: str  # anything ``vmvault backup`` accepts
    #: how to back it up: the keys named like ``BackupOptions``' fields (``vmvault backup`` flags)
    options: BackupOptions = DEFAULT_OPTIONS


@dataclass(frozen=True)
class Retention:
    policy: RetentionPolicy
    #: never leave fewer than this many good snapshots of the source
    min_good: int = 1
    prune: bool = False


@dataclass(frozen=True)
class Job:
    name: str
    type: str
    schedule: CronExpr | None
    window: TimeWindow | None
    retries: int
    retry_delay: float  # seconds before the first retry; doubles each time
    repositories: tuple[str, ...]  # every repository the job uses (for per-repository limits)
    notify: tuple[str, ...]  # notifier names; empty = all
    #: run a firing missed while no daemon ran, once, when the daemon starts again
    catch_up: bool = False
    #: ... if it was due at most this long ago (seconds)
    catch_up_within: float = DEFAULT_CATCH_UP_WITHIN
    #: an attempt still running after this long (seconds) is stopped (None: no limit)
    time_limit: float | None = None
    #: an attempt the daemon started in the job's window is stopped when the window closes
    stop_at_window_end: bool = False


@dataclass(frozen=True)
class BackupJob(Job):
    source: str = ""
    repository: str = ""
    tags: tuple[str, ...] = ()
    retention: Retention | None = None
    #: alert when the source has had no successful backup for longer than this (seconds)
    max_age: float | None = None
    #: as in ``SourceConfig``; for a named source, added to its options (``BackupOptions.merged``)
    options: BackupOptions = DEFAULT_OPTIONS


@dataclass(frozen=True)
class VerifyJob(Job):
    repository: str = ""
    read_data: bool = False
    subset: float | None = None


@dataclass(frozen=True)
class VerifyBootJob(Job):
    """Boot the latest snapshot of ``source`` from ``repository`` in an isolated VM
    (``vmvault verify-boot``); docs/automation.md, "Boot verification jobs"."""

    repository: str = ""
    source: str = ""
    timeout: float = 600.0
    marker: str | None = None
    #: None: the command's default (the agent, the marker when given, ...)
    heartbeats: tuple[str, ...] | None = None
    network: str = "none"
    accel: str = "auto"
    #: where screenshots are kept (absolute)
    screenshots: str = ""
    #: alert when the last successful boot verification is older than this (seconds)
    max_age: float | None = None


@dataclass(frozen=True)
class CopyJob(Job):
    source_repository: str = ""
    target_repository: str = ""
    sources: tuple[str, ...] = ()  # source names or locations to copy (empty: all)
    tags: tuple[str, ...] = ()
    latest: int = 0


@dataclass(frozen=True)
class NotifierConfig:
    name: str
    type: str  # smtp | webhook
    on: str  # always | failure
    # smtp
    host: str = ""
    port: int = 25
    security: str = "none"  # none | starttls | ssl
    username: str | None = None
    password_file: str | None = None
    sender: str = ""
    recipients: tuple[str, ...] = ()
    # webhook
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class DaemonSettings:
    concurrency: int = 1
    history: str = ""
    timezone: str | None = None  # None = the host's local time
    #: how often the daemon re-checks backup ages for alerts (seconds)
    alert_interval: float = 3600.0
    #: how often the daemon writes its status record into its repositories (seconds; 0: only
    #: at start and after each run)
    status_interval: float = 600.0

    def tz(self) -> dt.tzinfo | None:
        return zoneinfo.ZoneInfo(self.timezone) if self.timezone else None


#: the dashboard's default address: loopback only, so no TLS is needed (docs/web.md)
DEFAULT_LISTEN = "127.0.0.1:8620"


@dataclass(frozen=True)
class WebSettings:
    """The ``[web]`` section: the dashboard served by ``vmvault web`` and ``vmvault daemon``
    (docs/web.md). Paths are absolute (relative ones are taken from the configuration's
    folder)."""

    listen: str = DEFAULT_LISTEN
    tls_cert: str | None = None
    tls_key: str | None = None
    users: str = ""
    #: a session ends after this long without a request, and after ``session_max`` in any case
    session_idle: float = 1800.0
    session_max: float = 43200.0
    #: failed logins (per user name and per client address) before a lockout of ``lockout``
    login_attempts: int = 5
    lockout: float = 900.0
    #: folders operators may restore into, by name (nothing else can be a target)
    restore_targets: tuple[tuple[str, str], ...] = ()
    #: what the Audit page inspects: VM folders, folders of VMs, hyperv://HOST
    audit: tuple[str, ...] = ()
    #: a VM whose repository had no successful verification for this long is amber
    verify_max_age: float = 8 * 86400.0
    #: the RPO of VMs that no job of this host gives a max_age
    max_age: float = 26 * 3600.0
    #: a VM whose repository keeps nothing immutable is amber (else it is only shown)
    require_immutable: bool = False
    #: names browsers may reach the dashboard by, besides localhost, any address, the listen
    #: name and the certificate's names (web/hosts.py): anything else is refused (DNS rebinding)
    hosts: tuple[str, ...] = ()
    #: connections open at once, in all and from one address, and the time a client has to
    #: send a request or to read on in an answer (web/clients.py)
    max_connections: int = 256
    max_connections_per_address: int = 32
    client_timeout: float = 30.0

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass
class AutomationConfig:
    path: str
    daemon: DaemonSettings
    repositories: dict[str, RepositoryConfig] = field(default_factory=dict)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    notifiers: dict[str, NotifierConfig] = field(default_factory=dict)
    #: None when the configuration has no ``[web]`` section
    web: WebSettings | None = None

    def job(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            raise ConfigError(
                f"no job {name!r} in {self.path}; configured jobs: {', '.join(self.jobs) or '(none)'}"
            ) from None

    def source_location(self, name: str) -> str:
        src = self.sources.get(name)
        return src.location if src is not None else name

    def source_options(self, job: BackupJob) -> BackupOptions:
        """The options a backup job backs its source up with: the source's, then the job's."""
        src = self.sources.get(job.source)
        return src.options.merged(job.options) if src is not None else job.options


# ---- locating keys --------------------------------------------------------------------------


_HEADER = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The first line of every table header and key, by dotted path (best effort: enough to
    point a user at the right place; multi-line strings may confuse it)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m and not _KEY.match(line):
            table = _split_dotted(m.group(1))
            lines.setdefault(table, number)
            continue
        k = _KEY.match(line)
        if k:
            lines.setdefault(table + _split_dotted(k.group(1)), number)
    return lines


class _Ctx:
    """Raises ConfigErrors pointing at the file and line of a key."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = _key_lines(text)

    def line(self, keys: tuple[str, ...]) -> int | None:
        while keys:
            if keys in self.lines:
                return self.lines[keys]
            keys = keys[:-1]
        return None

    def error(self, keys: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(message, path=self.path, line=self.line(keys))


class _Table:
    """A TOML table being read: typed getters, and unknown keys refused (typos are errors)."""

    def __init__(self, ctx: _Ctx, keys: tuple[str, ...], data: Any) -> None:
        if not isinstance(data, dict):
            raise ctx.error(keys, f"{'.'.join(keys)} must be a table")
        self.ctx = ctx
        self.keys = keys
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    @property
    def where(self) -> str:
        return ".".join(self.keys)

    def error(self, key: str | None, message: str) -> ConfigError:
        return self.ctx.error(self.keys + ((key,) if key else ()), message)

    def _get(self, key: str, kinds: tuple[type, ...], what: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(None, f"[{self.where}] needs {key} ({what})")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"{self.where}.{key} must be {what}, not {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"{self.where}.{key} must be {what}, not {value!r}")
        return value

    def text(self, key: str, default: str | None = None, *, required: bool = False, blank: bool = False) -> Any:
        """A string; one given empty or blank is an error (as on the command line: an unset
        variable in a generated configuration must not mean "the current folder" or "none")
        unless ``blank``."""
        value = self._get(key, (str,), "a string", default, required)
        if key in self.data and not blank and not value.strip():
            raise self.error(key, f"{self.where}.{key} is empty")
        return value

    def integer(self, key: str, default: int = 0, *, minimum: int | None = 0, maximum: int = 10**9) -> int:
        value: int = self._get(key, (int,), "a whole number", default, False)
        if minimum is not None and value < minimum:
            raise self.error(key, f"{self.where}.{key} must be at least {minimum}, not {value}")
        if value > maximum:
            raise self.error(key, f"{self.where}.{key} must be at most {maximum}, not {value}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value: bool = self._get(key, (bool,), "true or false", default, False)
        return value

    def strs(self, key: str) -> tuple[str, ...]:
        value = self._get(key, (list, str), "a list of strings", [], False)
        if isinstance(value, str):
            value = [value]
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, f"{self.where}.{key} must be a list of strings")
        if not all(v.strip() for v in value):
            raise self.error(key, f"{self.where}.{key} holds an empty string")
        return tuple(value)

    def duration(self, key: str, default: float | None = None, *, minimum: float = 0.0) -> float | None:
        """Seconds, from ``minimum`` to a century."""
        value = self._get(key, (str, int), "a duration such as 26h or 90m (or seconds)", None, False)
        if value is None:
            return default
        if isinstance(value, int):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise self.error(key, f"{self.where}.{key}: {exc}") from None
        if not minimum <= seconds <= _CENTURY:
            raise self.error(key, f"{self.where}.{key} must be from {minimum:g} s to 100 years, not {value!r}")
        return seconds

    def table(self, key: str) -> _Table | None:
        self.used.add(key)
        if key not in self.data:
            return None
        return _Table(self.ctx, (*self.keys, key), self.data[key])

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(key, f"unknown key {key!r} in [{self.where}]")

    def items(self) -> Iterator[tuple[str, _Table]]:
        for key in self.data:
            self.used.add(key)
            yield key, _Table(self.ctx, (*self.keys, key), self.data[key])


# ---- loading --------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> AutomationConfig:
    """Read and validate ``path``; raises ConfigError naming the file and line of any problem."""
    p = str(path)
    try:
        raw = Path(p).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration: {exc.strerror}", path=p) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", path=p, line=line) from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.14 adds lineno/msg; older versions only say "(at line N, column M)"
        at: int | None = getattr(exc, "lineno", None)
        msg = getattr(exc, "msg", None) or str(exc)
        if at is None:
            m = re.search(r"at line (\d+)", str(exc))
            at = int(m.group(1)) if m else None
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(f"TOML syntax error: {msg}", path=p, line=at) from exc
    ctx = _Ctx(p, text)
    root = _Table(ctx, (), doc)
    cfg = AutomationConfig(path=p, daemon=_daemon(root.table("daemon"), p))
    repos = root.table("repositories")
    if repos is not None:
        for name, t in repos.items():
            cfg.repositories[name] = _repository(name, t)
    sources = root.table("sources")
    if sources is not None:
        for name, t in sources.items():
            location = t.text("location", required=True)
            if not location:
                raise t.error("location", f"sources.{name}.location is empty")
            cfg.sources[name] = SourceConfig(name, location, _backup_options(t, location, "location"))
            t.finish()
    notifiers = root.table("notifications")
    if notifiers is not None:
        for name, t in notifiers.items():
            cfg.notifiers[name] = _notifier(name, t)
    jobs = root.table("jobs")
    if jobs is not None:
        for name, t in jobs.items():
            cfg.jobs[name] = _job(name, t, cfg)
    web = root.table("web")
    if web is not None:
        cfg.web = _web(web, p)
    root.finish()
    if not cfg.jobs and cfg.web is None:
        # a configuration with a [web] section and no jobs is a dashboard of its repositories
        raise ConfigError("no jobs are configured (add a [jobs.NAME] table)", path=p)
    return cfg


#: the daemon's keys for ``BackupOptions`` (``full`` is left out: scheduled backups use change tracking)
_OPTION_KEYS = (
    "allow_crash_consistent",
    "exclude",
    "scratch_dir",
    "allow_parent_dirs",
    "follow_links",
    "tracking_sample",
)


def _backup_options(
    t: _Table, location: str, location_key: str, base: BackupOptions = DEFAULT_OPTIONS
) -> BackupOptions:
    """The ``BackupOptions`` keys of a ``[sources.NAME]`` or backup ``[jobs.NAME]`` table.

    Checked added to ``base`` (a job's named source's options), so that a job cannot add what
    the connector of ``location`` refuses; an unknown kind of location is an error here, not
    at the first run.
    """
    try:
        connector = connector_for(location)
    except ConfigError as exc:
        raise t.error(location_key, f"{t.where}.{location_key}: {exc}") from None
    dirs = t.strs("allow_parent_dirs")
    for d in dirs:
        if not os.path.isabs(d):
            raise t.error("allow_parent_dirs", f"{t.where}.allow_parent_dirs: {d!r} is not an absolute path")
    scratch = t.text("scratch_dir")
    if scratch is not None and not os.path.isabs(scratch):
        raise t.error("scratch_dir", f"{t.where}.scratch_dir: {scratch!r} is not an absolute path")
    try:
        own = BackupOptions(
            allow_crash_consistent=t.flag("allow_crash_consistent"),
            exclude=t.strs("exclude"),
            scratch_dir=scratch,
            allow_parent_dirs=dirs,
            follow_links=t.flag("follow_links"),
            tracking_sample=t.integer("tracking_sample", TRACKING_SAMPLE, maximum=1 << 20),
        )
    except ConfigError as exc:
        raise t.error("exclude", f"{t.where}: {exc}") from None
    try:
        check_options(connector, base.merged(own), location)
    except ConfigError as exc:
        wrong = next((k for k in _OPTION_KEYS if k in t.data), None)
        raise t.error(wrong, f"{t.where}: {exc}") from None
    return own


def _daemon(t: _Table | None, path: str) -> DaemonSettings:
    default_history = str(Path(path).resolve().with_name(Path(path).stem + "-history.sqlite"))
    if t is None:
        return DaemonSettings(history=default_history)
    concurrency = t.integer("concurrency", 1, minimum=1, maximum=256)
    history = t.text("history", default_history)
    tz = t.text("timezone")
    if tz is not None:
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise t.error("timezone", f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)") from None
    # at least a minute: an interval of 0 would make the daemon check ages in a busy loop
    alert_interval = t.duration("alert_interval", 3600.0, minimum=60.0)
    status_interval = t.duration("status_interval", 600.0)
    if status_interval and status_interval < 60:
        raise t.error("status_interval", "daemon.status_interval must be 0 (off) or at least 60 s")
    t.finish()
    assert alert_interval is not None and status_interval is not None
    return DaemonSettings(
        concurrency=concurrency, history=history, timezone=tz, alert_interval=alert_interval,
        status_interval=status_interval,
    )  # fmt: skip


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ValueError when malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8620 or [::1]:8620)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return host, port


_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def host_name(text: str) -> str:
    """A DNS name as a browser sends it in ``Host`` (lower case, no trailing dot, no port), or
    ``*.`` and a name for any one label before it; ValueError for anything else."""
    name = text.strip().lower().rstrip(".")
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not a host name (such as backup.example.com or *.example.com)")
    return name


def web_settings(config: AutomationConfig) -> WebSettings:
    """The ``[web]`` section, or its defaults for a configuration without one."""
    if config.web is not None:
        return config.web
    return WebSettings(users=str(Path(config.path).resolve().with_name(Path(config.path).stem + "-users.json")))


def _web(t: _Table, path: str) -> WebSettings:
    base = Path(path).resolve().parent

    def file(key: str) -> str | None:
        value = t.text(key)
        return None if value is None else str(base / value)

    listen = t.text("listen", DEFAULT_LISTEN)
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise t.error("listen", f"web.listen: {exc}") from None
    tls_cert, tls_key = file("tls_cert"), file("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise t.error("tls_cert" if tls_cert else "tls_key", "web: give both tls_cert and tls_key, or neither")
    users = file("users") or str(Path(path).resolve().with_name(Path(path).stem + "-users.json"))
    session_idle = t.duration("session_idle", 1800.0, minimum=60.0)
    session_max = t.duration("session_max", 43200.0, minimum=60.0)
    attempts = t.integer("login_attempts", 5, minimum=1, maximum=1000)
    lockout = t.duration("lockout", 900.0, minimum=1.0)
    targets: list[tuple[str, str]] = []
    targets_t = t.table("restore_targets")
    if targets_t is not None:
        for name in list(targets_t.data):
            folder = targets_t.text(name, required=True)
            if not os.path.isabs(folder):
                raise targets_t.error(name, f"web.restore_targets.{name} must be an absolute folder")
            targets.append((name, os.path.normpath(folder)))
        targets_t.finish()
    audit = t.strs("audit")
    verify_max_age = t.duration("verify_max_age", 8 * 86400.0, minimum=60.0)
    max_age = t.duration("max_age", 26 * 3600.0, minimum=60.0)
    require_immutable = t.flag("require_immutable", False)
    hosts: list[str] = []
    for text in t.strs("hosts"):
        try:
            hosts.append(host_name(text))
        except ValueError as exc:
            raise t.error("hosts", f"web.hosts: {exc}") from None
    connections = t.integer("max_connections", 256, minimum=4, maximum=100_000)
    per_address = t.integer("max_connections_per_address", 32, minimum=1, maximum=100_000)
    client_timeout = t.duration("client_timeout", 30.0, minimum=1.0)
    t.finish()
    assert None not in (session_idle, session_max, lockout, verify_max_age, max_age, client_timeout)
    return WebSettings(
        listen=listen, tls_cert=tls_cert, tls_key=tls_key, users=users,
        session_idle=session_idle or 1800.0, session_max=session_max or 43200.0, login_attempts=attempts,
        lockout=lockout or 900.0, restore_targets=tuple(targets), audit=audit,
        verify_max_age=verify_max_age or 0.0, max_age=max_age or 0.0, require_immutable=require_immutable,
        hosts=tuple(hosts), max_connections=connections, max_connections_per_address=per_address,
        client_timeout=client_timeout or 30.0,
    )  # fmt: skip


def _repository(name: str, t: _Table) -> RepositoryConfig:
    location = t.text("location", required=True)
    password_file = t.text("password_file")
    password_env = t.text("password_env")
    key_file = t.text("key_file")
    given = [
        k for k, v in (("password_file", password_file), ("password_env", password_env), ("key_file", key_file)) if v
    ]
    if len(given) > 1:
        raise t.error(given[1], f"repository {name}: give only one of password_file, password_env, key_file")
    max_jobs = t.integer("max_jobs", 0)
    t.finish()
    return RepositoryConfig(name, location, password_file, password_env, key_file, max_jobs)


def _notifier(name: str, t: _Table) -> NotifierConfig:
    kind = t.text("type", required=True)
    on = t.text("on", "failure")
    if on not in ("always", "failure"):
        raise t.error("on", f'notifications.{name}.on must be "always" or "failure", not {on!r}')
    timeout = t.duration("timeout", 10.0, minimum=1.0)
    assert timeout is not None
    if kind == "smtp":
        host = t.text("host", required=True)
        security = t.text("security", "none")
        if security not in ("none", "starttls", "ssl"):
            raise t.error("security", f"notifications.{name}.security must be none, starttls or ssl")
        default_port = 465 if security == "ssl" else 587 if security == "starttls" else 25
        port = t.integer("port", default_port, minimum=1, maximum=65535)
        sender = t.text("from", required=True)
        recipients = t.strs("to")
        if not recipients:
            raise t.error("to", f"notifications.{name} needs at least one recipient in to")
        username = t.text("username")
        password_file = t.text("password_file")
        if username and not password_file:
            raise t.error("username", f"notifications.{name}: a username needs a password_file")
        t.finish()
        return NotifierConfig(
            name, kind, on, host=host, port=port, security=security, username=username,
            password_file=password_file, sender=sender, recipients=recipients, timeout=timeout,
        )  # fmt: skip
    if kind == "webhook":
        url = t.text("url", required=True)
        if not re.match(r"https?://", url):
            raise t.error("url", f"notifications.{name}.url must start with http:// or https://")
        headers_t = t.table("headers")
        headers: list[tuple[str, str]] = []
        if headers_t is not None:
            for hk in list(headers_t.data):
                headers.append((hk, headers_t.text(hk, required=True, blank=True)))
            headers_t.finish()
        t.finish()
        return NotifierConfig(name, kind, on, url=url, headers=tuple(headers), timeout=timeout)
    raise t.error("type", f'notifications.{name}.type must be "smtp" or "webhook", not {kind!r}')


def _percent(t: _Table, key: str) -> float | None:
    value = t._get(key, (str, int, float), 'a share such as "10%"', None, False)
    if value is None:
        return None
    try:
        share = float(value.strip().rstrip("%")) / 100 if isinstance(value, str) else float(value) / 100
    except ValueError:
        raise t.error(key, f'{t.where}.{key} must be a percentage such as "10%", not {value!r}') from None
    if not 0 < share <= 1:
        raise t.error(key, f"{t.where}.{key} must be more than 0% and at most 100%")
    return share


def _retention(t: _Table) -> Retention:
    counts = {
        unit: t.integer(f"keep_{unit}", 0, minimum=-1)
        for unit in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    }
    keep_tags = t.strs("keep_tags")
    if any(not tag.strip() for spec in keep_tags for tag in spec.split(",")):
        raise t.error("keep_tags", f"{t.where}.keep_tags holds an empty tag (tags are separated by commas)")
    min_good = t.integer("min_good", 1, minimum=1)
    prune = t.flag("prune", False)
    t.finish()
    policy = RetentionPolicy(
        last=counts["last"], hourly=counts["hourly"], daily=counts["daily"], weekly=counts["weekly"],
        monthly=counts["monthly"], yearly=counts["yearly"], keep_tags=keep_tags,
    )  # fmt: skip
    if policy.empty():
        raise t.error(None, f"[{t.where}] gives no keep_* rule; without one nothing would ever be forgotten")
    return Retention(policy=policy, min_good=min_good, prune=prune)


def _job(name: str, t: _Table, cfg: AutomationConfig) -> Job:
    kind = t.text("type", required=True)
    if kind not in JOB_TYPES:
        raise t.error("type", f"jobs.{name}.type must be one of {', '.join(JOB_TYPES)}, not {kind!r}")
    schedule_text = t.text("schedule")
    schedule = None
    if schedule_text is not None:
        try:
            schedule = parse_cron(schedule_text)
        except ConfigError as exc:
            raise t.error("schedule", f"jobs.{name}.schedule: {exc}") from None
    window = None
    window_text = t.text("window")
    if window_text is not None:
        try:
            window = parse_window(window_text)
        except ValueError as exc:
            raise t.error("window", f"jobs.{name}.window: {exc}") from None
    retries = t.integer("retries", 0, maximum=100)
    retry_delay = t.duration("retry_delay", 300.0)
    assert retry_delay is not None
    # a backup missed while the daemon was down is owed (its RPO is running); a verify or a
    # copy can wait for its next firing unless asked
    catch_up = t.flag("catch_up", kind == "backup")
    if "catch_up" in t.data and catch_up and schedule is None:
        raise t.error("catch_up", f"jobs.{name}.catch_up needs a schedule (a job without one misses nothing)")
    catch_up_within = t.duration("catch_up_within", None, minimum=60.0)
    if catch_up_within is not None and not catch_up:
        raise t.error("catch_up_within", f"jobs.{name}: catch_up_within is given but catch_up is false")
    time_limit = t.duration("time_limit", None, minimum=60.0)
    stop_at_window_end = t.flag("stop_at_window_end", False)
    if stop_at_window_end and window is None:
        raise t.error("stop_at_window_end", f"jobs.{name}.stop_at_window_end needs a window")
    notify = t.strs("notify")
    for n in notify:
        if n not in cfg.notifiers:
            raise t.error("notify", f"jobs.{name}.notify names {n!r}, which is not in [notifications]")

    def repo(key: str) -> str:
        ref = t.text(key, required=True)
        if ref not in cfg.repositories:
            raise t.error(key, f"jobs.{name}.{key} names {ref!r}, which is not in [repositories]")
        return str(ref)

    common: dict[str, Any] = dict(
        name=name, type=kind, schedule=schedule, window=window, retries=retries, retry_delay=retry_delay, notify=notify,
        catch_up=catch_up and schedule is not None, catch_up_within=catch_up_within or DEFAULT_CATCH_UP_WITHIN,
        time_limit=time_limit, stop_at_window_end=stop_at_window_end,
    )  # fmt: skip
    job: Job
    if kind == "backup":
        source = t.text("source", required=True)
        if source not in cfg.sources and "://" not in source and not os.path.isabs(source):
            raise t.error(
                "source",
                f"jobs.{name}.source names {source!r}, which is not in [sources] (nor an absolute path or URL)",
            )
        repository = repo("repository")
        tags = t.strs("tags")
        max_age = t.duration("max_age")
        ret_t = t.table("retention")
        retention = _retention(ret_t) if ret_t is not None else None
        named = cfg.sources.get(source)
        base = named.options if named is not None else DEFAULT_OPTIONS
        options = _backup_options(t, cfg.source_location(source), "source", base)
        job = BackupJob(
            **common, repositories=(repository,), source=source, repository=repository, tags=tags,
            retention=retention, max_age=max_age, options=options,
        )  # fmt: skip
    elif kind == "verify":
        repository = repo("repository")
        subset = _percent(t, "subset")
        read_data = t.flag("read_data", subset is not None)
        if subset is not None and not read_data:
            raise t.error("read_data", f"jobs.{name}: subset reads data; read_data = false contradicts it")
        job = VerifyJob(**common, repositories=(repository,), repository=repository, read_data=read_data, subset=subset)
    elif kind == "verify-boot":
        job = _verify_boot_job(name, t, cfg, common, repo("repository"))
    else:
        src = repo("from")
        dst = repo("to")
        if src == dst:
            raise t.error("to", f"jobs.{name}: from and to are the same repository")
        sources = t.strs("sources")
        tags = t.strs("tags")
        latest = t.integer("latest", 0)
        job = CopyJob(
            **common, repositories=(src, dst), source_repository=src, target_repository=dst,
            sources=sources, tags=tags, latest=latest,
        )  # fmt: skip
    t.finish()
    return job


#: the heartbeats a boot verification job may name (engine/verify_boot.py, HEARTBEATS)
_HEARTBEATS = ("agent", "marker", "screen")


def _verify_boot_job(name: str, t: _Table, cfg: AutomationConfig, common: dict[str, Any], repository: str) -> Job:
    source = t.text("source", required=True)
    if source not in cfg.sources and "://" not in source and not os.path.isabs(source):
        raise t.error(
            "source", f"jobs.{name}.source names {source!r}, which is not in [sources] (nor an absolute path or URL)"
        )
    timeout = t.duration("timeout", 600.0, minimum=1.0)
    assert timeout is not None
    marker = t.text("marker")
    heartbeats: tuple[str, ...] | None = None
    if "heartbeats" in t.data:
        heartbeats = t.strs("heartbeats")
        unknown = [h for h in heartbeats if h not in _HEARTBEATS]
        if unknown or not heartbeats:
            raise t.error(
                "heartbeats", f"jobs.{name}.heartbeats takes {', '.join(_HEARTBEATS)}, not {unknown or 'nothing'}"
            )
        if "marker" in heartbeats and marker is None:
            raise t.error("heartbeats", f"jobs.{name}: the marker heartbeat needs marker = TEXT")
    network = t.text("network", "none")
    if network not in ("none", "restricted"):
        raise t.error("network", f"jobs.{name}.network must be none or restricted, not {network!r}")
    accel = t.text("accel", "auto")
    if accel not in ("auto", "tcg", "kvm"):
        raise t.error("accel", f"jobs.{name}.accel must be auto, tcg or kvm, not {accel!r}")
    default_shots = os.path.join(os.path.dirname(cfg.daemon.history) or ".", "screenshots")
    shots = t.text("screenshots", default_shots)
    if not os.path.isabs(shots):
        shots = str(Path(cfg.path).resolve().parent / shots)
    return VerifyBootJob(
        **common, repositories=(repository,), repository=repository, source=source, timeout=timeout, marker=marker,
        heartbeats=heartbeats, network=network, accel=accel, screenshots=shots, max_age=t.duration("max_age"),
    )  # fmt: skip


EXAMPLE = """\
# vmvault automation: see docs/automation.md
[daemon]
concurrency = 2                     # jobs running at once
history = "/var/lib/vmvault/history.sqlite"
# timezone = "Europe/Berlin"        # schedules and windows; default: the host's local time

[repositories.local]
location = "/srv/vmvault"
password_file = "/etc/vmvault/local.pass"
max_jobs = 2

[repositories.offsite]
location = "s3://minio.example.net:9000/vmvault/prod"
password_file = "/etc/vmvault/offsite.pass"

[sources.web01]
location = "hyperv://hv01/web01"

[sources.db01]
location = "qemu+unix:///run/qemu/db01.qmp"

[jobs.web01-nightly]
type = "backup"
source = "web01"
repository = "local"
schedule = "30 1 * * *"
window = "22:00-06:00"
retries = 3
retry_delay = "10m"
time_limit = "6h"                   # an attempt still running after 6 h is stopped
max_age = "26h"
tags = ["nightly"]

[jobs.web01-nightly.retention]
keep_daily = 7
keep_weekly = 4
keep_monthly = 6
min_good = 3
prune = true

[jobs.db01-hourly]
type = "backup"
source = "db01"
repository = "local"
schedule = "0 * * * *"
max_age = "3h"

[jobs.db01-hourly.retention]
keep_hourly = 24
keep_daily = 14
min_good = 2

[jobs.verify-weekly]
type = "verify"
repository = "local"
schedule = "0 3 * * sun"
read_data = true
subset = "10%"

[jobs.offsite]
type = "copy"
from = "local"
to = "offsite"
schedule = "0 5 * * *"
retries = 2

[notifications.admins]
type = "smtp"
host = "mail.example.net"
security = "starttls"
from = "vmvault@example.net"
to = ["ops@example.net"]
on = "failure"

[notifications.chat]
type = "webhook"
url = "https://hooks.example.net/vmvault"
on = "always"
"""
