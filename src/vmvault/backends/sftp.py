"""A directory on another machine, reached over SFTP (SSH File Transfer Protocol v3).

Location: ``sftp://[user@]host[:port]/absolute/path`` or ``sftp://host/~/relative/to/home``.
Query parameters: ``key=PATH`` (private key file), ``known-hosts=PATH``, ``connections=N``,
``follow-links=1`` (the top-level folders may be links on the server; see "Links" below),
``transport=openssh|paramiko``.
Environment: ``VMVAULT_SFTP_KEY`` and ``VMVAULT_SFTP_KNOWN_HOSTS`` (the URL wins).

Transport: each connection is an OpenSSH ``ssh -s sftp`` child process where an ``ssh`` client
is installed and the location's names can be handed to it safely (``_openssh``: encryption in
C, outside this process and its GIL), else paramiko's SSH transport in Python. vmvault's own
SFTP client (``_sftp_wire``: every length from the server bounded, replies received in place)
speaks SFTP over either. ``transport=`` forces one.

Security: only key authentication (an explicit key file, the SSH agent, ``~/.ssh/id_*``), the
same on both transports. The server's host key must already be in known_hosts; an unknown or
changed key is refused with a message that tells the user how to check and add it. Nothing is
ever trusted silently.

Links: SFTP has no ``O_NOFOLLOW`` (the server resolves every path it is given), so names are
looked at before they are used: each folder on an object's path is lstat'ed once per backend,
the object itself before each read (a pack before its first ranged read, then for
``_PACK_STAT_SECONDS``), and a link, FIFO, device or socket where an object or a folder belongs
is refused (``UnsafeStorageError``); listings skip such entries and record them
(``Backend.skipped``). ``follow-links=1`` follows links that replace the top-level folders,
nothing deeper. A process on the server that swaps a checked name for a link can still win
that race (docs/design/repository-format.md 10.3).

Atomic put (draft-ietf-secsh-filexfer-02 section 6.5 gives no atomic overwrite, so):
write ``NAME.tmp-RANDOM``, ``fsync@openssh.com`` it, then ``posix-rename@openssh.com`` it
over ``NAME`` (OpenSSH PROTOCOL section 4.3: rename(2) semantics). Servers without that
extension get remove + rename, which leaves a short window with no object at all but never
a partial one. ``list`` ignores temporary names; an attempt that lost its connection removes
its temporary file when it retries.

Transfers: up to 64 write requests in flight per upload, every status checked (a short
object must never be renamed into place); requests of 128 KiB where ``limits@openssh.com``
(OpenSSH PROTOCOL section 4.8) allows it, else 32 KiB; a ranged read sends all its requests
at once (up to 64 outstanding).

Concurrency: a small pool of SSH connections, one SFTP session each, so that uploads from
several threads do not queue behind one channel's window. OpenSSH's client gives a session a
2 MiB window, so one connection moves at most 2 MiB per round trip (66 MiB/s at 30 ms). A
restore (``prepare_reads``) reads with as many ranged reads at once as there are connections:
4, or 8 when the server is far (its quickest answer so far took ``base.FAR_ROUND_TRIP`` or more);
``connections=N`` fixes the number. 30 ms away (tests/latency.py) the 1 GiB test image
restored in 2.8-2.9 s with 8 against 4.2 s with 4 (12 or 16 were no faster); on loopback 8 were
slower than 4 (1.5-1.7 s against 1.2-1.5 s: more ssh processes sharing the CPU).

Round trips of a ranged read of a pack: its ``lstat`` (a regular file, not a link: see
"Links") is kept for ``_PACK_STAT_SECONDS`` and serves the pack's further ranges, and the
handle is closed without waiting for the answer (``Session.close_later``): besides its READs,
a range costs the OPEN's round trip, not three. A pack's first range sends the ``lstat`` of
its folder (when not yet known) with the pack's, judged in that order (``_located``). From a
server 30 ms away a 1 GiB restore took 6.2-6.6 s against 7.7 s (docs/benchmarks.md,
remote-backends-far), before reads on 8 connections (below).

Errors: SFTP v3 has few status codes (section 7). NO_SUCH_FILE and PERMISSION_DENIED map
directly; a full disk arrives as the generic SSH_FX_FAILURE, so a failed write is followed by
a ``statvfs@openssh.com`` query (OpenSSH PROTOCOL section 4.4) to tell "disk full" apart.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import getpass
import hashlib
import logging
import math
import os
import posixpath
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from vmvault.backends import _openssh
from vmvault.backends._retry import RetryPolicy, TransientError, call_with_retry, unreachable_reason
from vmvault.backends._sftp_layout import Attrs, OpenFlag
from vmvault.backends._sftp_wire import RecvStream, Session, StatusError, Stream
from vmvault.backends.base import (
    DEFAULT_READS_AT_ONCE,
    FAR_READS_AT_ONCE,
    TOP_LEVEL_FOLDERS,
    Backend,
    ObjectInfo,
    describe_mode,
    is_far,
    note_skipped,
    root_gone,
    shown,
    split_name,
    unsafe_why,
)
from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    BackendPermissionError,
    BackendProtocolError,
    BackendUnreachableError,
    ConfigError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageFullError,
    UnsafeStorageError,
    require,
)

if TYPE_CHECKING:
    import mmap

    # imported where a connection goes through paramiko (``_paramiko``): with the OpenSSH
    # transport only a refused host key's message reads known_hosts with it, and the import
    # alone cost 0.11 s of CPU per command (measured: a third of opening an SFTP repository)
    import paramiko

__all__ = ["SftpBackend", "open_sftp"]


T = TypeVar("T")

_log = logging.getLogger(__name__)

#: values of ``transport=``; "auto" takes OpenSSH where it can
TRANSPORTS = ("auto", "openssh", "paramiko")
#: the key files paramiko's ``look_for_keys`` tries, in its order (under ``~/.ssh``)
_DEFAULT_KEYS = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")

_TMP_MARK = ".tmp-"
#: the temporary names ``put`` makes: the object's name, the mark, 6 random bytes in hex
_TMP_NAME = re.compile(r".+\.tmp-[0-9a-f]{12}")
#: vmvault writes three levels (data/xx/id); a planted deeper tree is not walked past this
_MAX_DEPTH = 32

#: the request size every SFTP server accepts (filexfer-02 section 3: servers should take
#: packets of at least 34000 bytes, i.e. 32 KiB of data plus headers)
_BASE_REQUEST = 32768
#: the largest request we send where the server allows it (OpenSSH answers up to 255 KiB)
_LARGE_REQUEST = 128 * 1024

#: write requests in flight per upload: enough to cover loopback and LAN round trips
#: (64 x 128 KiB = 8 MiB), few enough to notice an error soon
_WINDOW = 64

#: how long a pack's lstat serves its further ranged reads (packs never change; a pack replaced
#: since by a link or a special file is the lstat-then-open race that docs/design/
#: repository-format.md 10.3 leaves uncovered, its window this long), and how many are kept
_PACK_STAT_SECONDS = 60.0
_PACK_STATS = 4096

#: how ``put`` opens its temporary file: a new file only, never one (or a link) already there
_CREATE_NEW = OpenFlag.WRITE | OpenFlag.CREAT | OpenFlag.EXCL

#: statvfs@openssh.com f_flag bit for a read-only mount (OpenSSH PROTOCOL section 4.4)
_ST_RDONLY = 0x1

#: a write that fails with SSH_FX_FAILURE is "disk full" when less than the object's size plus
#: this remains free
_FULL_MARGIN = 1 << 20


def _paramiko() -> None:
    """Import paramiko (a declared dependency), or say clearly that it is missing."""
    require("paramiko", purpose="sftp:// repositories")


def _fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint in OpenSSH's notation, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _refuse_unknown_host(backend: SftpBackend) -> paramiko.MissingHostKeyPolicy:
    """A policy that refuses a host whose key is not in known_hosts, saying how to add it."""
    import paramiko

    class RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            raise backend.unknown_host_error(hostname, (key.get_name(), _fingerprint(key)))

    return RefuseUnknownHost()


def _transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A transport that offers AES-GCM first (then paramiko's own order, for servers without it):
    one pass that encrypts and authenticates took half the client CPU of AES-CTR with a separate
    HMAC, and 0.6 against 1.0 s, for 64 MiB of ranged reads from OpenSSH on loopback."""
    import paramiko

    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    ciphers = tuple(options.ciphers)
    gcm = tuple(c for c in ciphers if c.endswith("-gcm@openssh.com"))
    options.ciphers = gcm + tuple(c for c in ciphers if c not in gcm)
    return transport


class _Connection:
    """One SSH connection with one SFTP session on it: paramiko's transport (``client``) or an
    ssh child process (``child``)."""

    def __init__(
        self,
        sftp: Session,
        *,
        client: paramiko.SSHClient | None = None,
        child: _openssh.ChildChannel | None = None,
    ) -> None:
        self.sftp = sftp
        self.client = client
        self.child = child

    def alive(self) -> bool:
        if self.sftp.closed:
            return False
        if self.child is not None:
            return self.child.alive()
        transport = self.client.get_transport() if self.client is not None else None
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.sftp.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.child is not None:
            self.child.close()  # reaps the ssh process


class _Pool:
    """At most ``size`` connections; idle ones are reused, broken ones are dropped.

    ``warm`` opens the connections not yet open in background threads, one each, into the idle
    list. A caller that finds no idle connection while some are being opened waits for one of
    them rather than opening its own, so that there are never more than ``size``: every
    connection is in use (or being opened by its user), idle, or being opened by ``warm``, and
    ``warm`` opens only what is missing. When an opening it waited for fails, the caller gets
    that failure, as if it had tried itself: a server that cannot be reached costs one wait
    for the connection timeout, not two.
    """

    def __init__(self, factory: Callable[[], _Connection], size: int) -> None:
        self._factory = factory
        self._size = size
        #: the size asked for at first; places ``grow`` adds beyond it are given up again when
        #: their connection cannot be opened
        self._first_size = size
        self._cond = threading.Condition()
        self._idle: list[_Connection] = []
        self._busy = 0
        #: connections ``warm`` is opening, and why those that failed did
        self._opening = 0
        self._failures: list[Exception] = []
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def grow(self, size: int) -> None:
        """Allow ``size`` connections from now on, and open the new ones ahead (``warm``). A new
        place whose connection cannot be opened (a server that takes only so many connections
        per user, say) is given up again, its failure kept from the callers waiting: they go
        on with the connections there are."""
        with self._cond:
            if size <= self._size:
                return
            self._size = size
            self._cond.notify_all()
        self.warm(extra=True)

    @contextlib.contextmanager
    def connection(self) -> Iterator[_Connection]:
        conn = self._take_idle()  # counted as busy from here, even while it is opened
        try:
            if conn is None:
                conn = self._factory()
            yield conn
        finally:
            keep = conn is not None and conn.alive()
            with self._cond:
                self._busy -= 1
                if keep:
                    assert conn is not None
                    self._idle.append(conn)
                # (some wait for a free place, some for a connection being opened)
                self._cond.notify_all()
            if conn is not None and not keep:
                conn.close()

    def _take_idle(self) -> _Connection | None:
        """A live idle connection, waiting for one being opened by ``warm``; None when the
        caller is to open its own. Either way the caller is counted busy: at most ``size``
        callers are, the others wait for one of them to finish."""
        dead: list[_Connection] = []
        waited = False
        try:
            with self._cond:
                while True:
                    if self._busy >= self._size:
                        self._cond.wait()
                        continue
                    while self._idle:
                        candidate = self._idle.pop()
                        if candidate.alive():
                            self._busy += 1
                            return candidate
                        dead.append(candidate)
                    if waited and self._failures:
                        raise self._failures.pop()
                    if not self._opening:
                        self._failures.clear()  # nobody waited for them: the caller tries afresh
                        self._busy += 1
                        return None
                    waited = True
                    self._cond.wait()
        finally:
            for conn in dead:
                conn.close()

    def warm(self, *, extra: bool = False) -> None:
        """Open, each in a thread of its own, the connections that would make ``size``
        (``extra``: for places ``grow`` added)."""
        with self._cond:
            missing = 0 if self._closed else self._size - self._busy - len(self._idle) - self._opening
            self._opening += max(0, missing)
        for _ in range(missing):
            threading.Thread(target=self._open_one, args=(extra,), name="vmvault-sftp-warm", daemon=True).start()

    def _open_one(self, extra: bool = False) -> None:
        conn: _Connection | None = None
        failure: Exception | None = None
        try:
            conn = self._factory()
        except Exception as exc:  # a caller waiting for it gets it; else it is tried again
            _log.debug("a connection opened ahead failed: %s", exc)
            failure = exc
        with self._cond:
            self._opening -= 1
            keep = conn is not None and not self._closed
            if keep:
                assert conn is not None
                self._idle.append(conn)
            elif failure is not None and extra and self._size > self._first_size:
                self._size -= 1  # a place ``grow`` added: given up, the callers go on without it
            elif failure is not None:
                self._failures.append(failure)
            self._cond.notify_all()
        if conn is not None and not keep:
            conn.close()

    def close(self) -> None:
        """Close the idle connections, all at once: each ends with an exchange with the server
        (a round trip), which one after the other cost a restore 30 ms away 0.25 s with four
        connections and 0.48 s with eight."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        closing = [threading.Thread(target=conn.close, name="vmvault-sftp-close") for conn in idle[1:]]
        for thread in closing:
            thread.start()
        if idle:
            idle[0].close()
        for thread in closing:
            thread.join()


def _is_connection_failure(exc: BaseException) -> bool:
    """True for errors of the transport, not of the file operation."""
    if isinstance(exc, StatusError):
        return False
    # paramiko's errors, where it was imported (else none of them can have been raised)
    paramiko_module: Any = sys.modules.get("paramiko")
    if paramiko_module is not None:
        if isinstance(exc, paramiko_module.AuthenticationException | paramiko_module.BadHostKeyException):
            return False
        if isinstance(exc, paramiko_module.SSHException):
            return True
    if isinstance(exc, EOFError | ConnectionError | socket.timeout):
        return True
    # paramiko reports a closed channel as a bare socket.error
    return isinstance(exc, OSError) and exc.errno is None and "closed" in str(exc).lower()


def _not_offered(exc: OSError) -> bool:
    """An extension the server lacks (OP_UNSUPPORTED) or its administrator banned
    (``sftp-server -P``, answered with PERMISSION_DENIED)."""
    return exc.errno in (errno.EACCES, errno.EOPNOTSUPP)


class SftpBackend(Backend):
    """A repository directory on an SFTP server. See the module docstring for the guarantees."""

    #: OpenSSH's sftp-server answers a READDIR with at most 100 names, each with its size
    #: (Debian 12's OpenSSH 9.2 here: a folder of 250 packs came as 100, 100 and 52 with "."
    #: and "..")
    names_per_read = 100

    def __init__(
        self,
        host: str,
        root: str,
        *,
        user: str | None = None,
        port: int = 22,
        key_filename: str | None = None,
        known_hosts: str | None = None,
        use_agent: bool = True,
        look_for_keys: bool = True,
        connections: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        follow_links: bool = False,
        transport: str = "auto",
    ) -> None:
        if not root or root == "/":
            raise ConfigError(f"sftp://{host}: give a directory for the repository, not the server's root")
        if key_filename is not None and not os.path.isfile(key_filename):
            raise ConfigError(f"SSH key file {key_filename} does not exist")
        if connections is not None and connections < 1:
            raise ConfigError("sftp: connections must be at least 1")
        self.host = host
        self.port = port
        self.user = user or getpass.getuser()
        self.root = root.rstrip("/")
        self.key_filename = key_filename
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.use_agent = use_agent
        self.look_for_keys = look_for_keys
        # about 30 s of patience in all: a restarted server or a dropped link comes back
        self.retry = retry or RetryPolicy(attempts=8, initial_delay=0.25, max_delay=15.0)
        self.timeout = timeout
        shown_path = self.root if self.root.startswith("/") else "/~/" + self.root
        self.url = f"sftp://{self.user}@{host}{'' if port == 22 else f':{port}'}{shown_path}"
        self._pool = _Pool(self._connect, connections or DEFAULT_READS_AT_ONCE)
        #: the number of connections was given (``connections=N``): never more
        self._fixed_connections = connections is not None
        #: the quickest answer of any session so far (seconds): about the round trip
        self._quickest_reply = math.inf
        self._posix_rename = True
        #: bytes per SFTP read/write request, settled on the first connection
        self._request_size: int | None = None
        self._fsync = True
        #: follow links on the server that replace the top-level folders (nothing deeper, ever)
        self.follow_links = follow_links
        #: folders (relative to the root) found to be real folders, not links
        self._folders: set[str] = set()
        #: name -> (when, lstat) of packs found to be regular files (``_PACK_STAT_SECONDS``)
        self._pack_stats: collections.OrderedDict[str, tuple[float, Attrs]] = collections.OrderedDict()
        self._pack_stats_lock = threading.Lock()
        self._layout_checked = False
        #: the server's id (``f_fsid``) of the file system holding the root, once listed; None
        #: where the server tells none (no ``statvfs@openssh.com``, or 0)
        self._root_fs: int | None = None
        self._skipped: dict[str, str] = {}
        #: set once a connection succeeded: from then on a failed connect is retried
        self._reached = False
        self._ssh: str | None = None
        #: "openssh" or "paramiko": what carries the connections
        self.transport = self._choose_transport(transport)

    # --- connections -------------------------------------------------------------------

    def keyscan_command(self) -> str:
        port = "" if self.port == 22 else f"-p {self.port} "
        return f"ssh-keyscan {port}{self.host}"

    def _choose_transport(self, wanted: str) -> str:
        if wanted not in TRANSPORTS:
            raise ConfigError(f"{self.url}: transport must be one of {', '.join(TRANSPORTS)}, not {wanted!r}")
        if wanted == "paramiko":
            return wanted
        ssh = _openssh.find_ssh()
        why: str | None
        if ssh is None:
            why = "no ssh client was found (apt-get install openssh-client)"
        else:
            why = _openssh.unsafe_reason(self.host, self.user, [self.known_hosts, *self._identities()])
            why = why or _openssh.refusal(ssh)
        if why is None:
            self._ssh = ssh
            return "openssh"
        if wanted == "openssh":
            raise ConfigError(f"{self.url}: cannot use transport=openssh: {why}; use transport=paramiko")
        _log.debug("%s: SSH through paramiko: %s", self.url, why)
        return "paramiko"

    def _identities(self) -> list[str]:
        """The key files tried, as paramiko's rules have them: the named key, then (with
        ``look_for_keys``) the usual ones in ``~/.ssh`` that exist."""
        found = [self.key_filename] if self.key_filename else []
        if self.look_for_keys:
            home = os.path.expanduser("~/.ssh")
            found += [p for p in (os.path.join(home, name) for name in _DEFAULT_KEYS) if os.path.isfile(p)]
        return found

    def warm_up(self) -> None:
        """Open the pool's connections in the background (``Backend.warm_up``): a restore's or
        a backup's threads would otherwise each wait for an SSH handshake of their own when
        they begin."""
        self._pool.warm()

    def prepare_reads(self) -> int:
        """As many reads at once as the pool has connections; a server found far away gets
        ``FAR_READS_AT_ONCE``, opened now (module docstring)."""
        if not self._fixed_connections and is_far(self._quickest_reply):
            quickest = self._quickest_reply * 1e3
            _log.debug("%s: answers take %.1f ms or more: %d connections", self.url, quickest, FAR_READS_AT_ONCE)
            self._pool.grow(FAR_READS_AT_ONCE)
        return self._pool.size

    def _connect(self) -> _Connection:
        connection = self._connect_openssh() if self.transport == "openssh" else self._connect_paramiko()
        self._reached = True
        return connection

    def _open_sftp(self, stream: Stream, close: Callable[[], None], waited: float) -> Session:
        """The SFTP version handshake on ``stream`` (its timeout, ``waited``, set), and the
        request size."""
        sftp = Session(stream)
        sftp.patience = self.timeout
        try:
            sftp.start()
        except TimeoutError as exc:
            close()
            raise BackendConnectionError(
                f"{self.url}: the SFTP server on {self.host} did not answer within {waited:.0f} s "
                "(is the sftp subsystem enabled, and does the login shell start cleanly?)"
            ) from exc
        except BackendProtocolError as exc:
            close()
            raise BackendProtocolError(f"{self.url}: {exc}") from exc
        if self._request_size is None:
            self._request_size = self._negotiate_request_size(sftp)
        return sftp

    def _connect_openssh(self) -> _Connection:
        assert self._ssh is not None
        argv = _openssh.command(
            self._ssh,
            self.host,
            self.port,
            self.user,
            self._identities(),
            self.known_hosts,
            use_agent=self.use_agent,
            timeout=self.timeout,
        )
        try:
            child = _openssh.spawn(argv, use_agent=self.use_agent)
        except OSError as exc:
            raise BackendConnectionError(f"{self.url}: cannot start {self._ssh}: {exc}") from exc
        # ssh connects (within ConnectTimeout), authenticates and starts the subsystem before
        # the SFTP version answer comes: the whole of it gets twice the timeout
        child.settimeout(2 * self.timeout)
        try:
            sftp = self._open_sftp(child, child.close, 2 * self.timeout)
        except BackendError:
            raise
        except (EOFError, OSError) as exc:
            # ssh ended before SFTP started: its exit status and messages say why
            raise self._ssh_refusal(child.failure(wait=self.timeout)) from exc
        except BaseException:
            child.close()
            raise
        child.settimeout(self.timeout)
        return _Connection(sftp, child=child)

    def _ssh_refusal(self, failure: _openssh.SshFailure) -> Exception:
        """The error for an ssh child that ended before SFTP started, worded as the paramiko
        transport words the same refusal."""
        name = self._known_hosts_name()
        if failure.kind == "changed-host":
            return self.changed_host_error(name, failure.offered, self._known_key(failure.offered))
        if failure.kind == "unknown-host":
            return self.unknown_host_error(name, failure.offered)
        if failure.kind == "refused":
            detail = failure.last
            for path in failure.unprotected:
                detail += f"; ssh ignores {path} because other users can read it (chmod 600 {path})"
            return BackendPermissionError(self._auth_message(detail))
        if failure.kind == "unreachable" and not self._reached:
            return self._unreachable_error(failure.reason)
        return TransientError(BackendConnectionError(f"{self.url}: ssh ended: {failure.last}"))

    def _known_key(self, offered: tuple[str, str] | None) -> tuple[str, str] | None:
        """The key known_hosts holds for this host (of the offered type, if it has one)."""
        try:
            _paramiko()
        except MissingDependencyError:
            return None  # the refusal is still reported, only without the key expected
        import paramiko

        try:
            keys = paramiko.HostKeys(self.known_hosts).lookup(self._known_hosts_name())
        except (OSError, paramiko.SSHException, ValueError):
            return None
        if not keys:
            return None
        key = keys.get(offered[0]) if offered else None
        key = key or next(iter(keys.values()))
        return key.get_name(), _fingerprint(key)

    def unknown_host_error(self, hostname: str, offered: tuple[str, str] | None) -> BackendPermissionError:
        shown_key = f" ({offered[0]} {offered[1]})" if offered else ""
        return BackendPermissionError(
            f"{self.url}: the host key of {hostname} is not in {self.known_hosts}{shown_key}; vmvault never "
            f"trusts an unknown host. Check the fingerprint with the server's administrator, then add it with: "
            f"{self.keyscan_command()} >> {self.known_hosts}"
        )

    def changed_host_error(
        self, hostname: str, offered: tuple[str, str] | None, expected: tuple[str, str] | None
    ) -> BackendPermissionError:
        offers = f"offers {offered[0]} {offered[1]}" if offered else "offers another key"
        holds = f"{expected[0]} {expected[1]}" if expected else "another key"
        return BackendPermissionError(
            f"{self.url}: the host key of {hostname} has CHANGED: the server {offers} but {self.known_hosts} "
            f"holds {holds}. This may be an attack or a reinstalled server. If the administrator confirms the "
            f"new key, replace the old line with: ssh-keygen -R {self._known_hosts_name()} -f {self.known_hosts} "
            f"&& {self.keyscan_command()} >> {self.known_hosts}"
        )

    def _unreachable_error(self, reason: str) -> BackendUnreachableError:
        return BackendUnreachableError(
            f"{self.url}: cannot connect to {self.host} port {self.port} ({reason}); "
            "check the host name and port, and that its SSH server is running"
        )

    def _connect_paramiko(self) -> _Connection:
        _paramiko()
        import paramiko

        client = paramiko.SSHClient()
        try:
            if os.path.isfile(self.known_hosts):
                # "system" host keys are only read, never written back
                client.load_system_host_keys(self.known_hosts)
            client.set_missing_host_key_policy(_refuse_unknown_host(self))
            client.connect(
                self.host,
                self.port,
                username=self.user,
                key_filename=self.key_filename,
                allow_agent=self.use_agent,
                look_for_keys=self.look_for_keys,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                channel_timeout=self.timeout,
                transport_factory=_transport,
            )
            # open the subsystem by hand so the version handshake has a timeout too: a server whose
            # session hangs (a stuck login shell, say) must give an error, not wait forever
            transport = client.get_transport()
            assert transport is not None
            channel = transport.open_session(timeout=self.timeout)
            channel.settimeout(self.timeout)
            channel.invoke_subsystem("sftp")
            sftp = self._open_sftp(RecvStream(channel), client.close, self.timeout)
        except BackendError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise self.changed_host_error(
                exc.hostname,
                (exc.key.get_name(), _fingerprint(exc.key)),
                (exc.expected_key.get_name(), _fingerprint(exc.expected_key)),
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise BackendPermissionError(self._auth_message(exc)) from exc
        except EOFError as exc:
            # the server closed the connection mid-handshake (restarted, say): try again
            client.close()
            raise TransientError(exc) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "no authentication methods" in str(exc).lower():
                raise BackendPermissionError(self._auth_message(exc)) from exc
            raise TransientError(exc) from exc
        except UnicodeError as exc:
            # the resolver's IDNA encoding refuses the name (a label over 63 characters, say)
            client.close()
            raise self._unreachable_error("not a valid host name") from exc
        except OSError as exc:
            client.close()
            reason = unreachable_reason(exc)
            if reason is not None and not self._reached:
                # the first connection: a wrong address or a server that is down, not a
                # passing fault; say so at once instead of retrying for half a minute
                raise self._unreachable_error(reason) from exc
            raise TransientError(exc) from exc
        return _Connection(sftp, client=client)

    @staticmethod
    def _negotiate_request_size(sftp: Session) -> int:
        """Ask ``limits@openssh.com`` (OpenSSH PROTOCOL section 4.8) how large a read or write
        may be; servers without it get the size every server must accept."""
        try:
            answer = sftp.limits()
        except StatusError:
            return _BASE_REQUEST
        if answer is None:
            return _BASE_REQUEST
        # max-packet-length, max-read-length, max-write-length, max-open-handles (0 = no limit)
        _packet, max_read, max_write, _handles = answer
        limits = [limit for limit in (max_read, max_write) if limit > 0]
        return max(_BASE_REQUEST, min([_LARGE_REQUEST, *limits]))

    def _known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _auth_message(self, exc: object) -> str:
        tried = []
        if self.key_filename:
            tried.append(f"key file {self.key_filename}")
        if self.use_agent:
            tried.append("the SSH agent")
        if self.look_for_keys:
            tried.append("~/.ssh/id_*")
        return (
            f"{self.url}: the server refused key authentication for user {self.user} "
            f"(tried {', '.join(tried) or 'no keys'}: {exc}). Add your public key to "
            f"~{self.user}/.ssh/authorized_keys on {self.host}, or name the key with "
            f"VMVAULT_SFTP_KEY or ?key=PATH"
        )

    def _call(self, describe: str, name: str | None, op: Callable[[Session], T], *, needed: int = 0) -> T:
        """Run ``op`` on a pooled connection, reconnecting and retrying when it drops.

        ``needed``: bytes the operation writes, to recognise a full disk behind SSH_FX_FAILURE."""

        def attempt() -> T:
            with self._pool.connection() as conn:
                try:
                    out = op(conn.sftp)
                    self._quickest_reply = min(self._quickest_reply, conn.sftp.quickest_reply)
                    return out
                except BackendProtocolError as exc:
                    # replies may be left unread: this connection is done (the session closed
                    # itself); the server is not asked again
                    conn.close()
                    raise BackendProtocolError(f"{self.url}: cannot {describe}: {exc}", name=name) from exc
                except BackendError:
                    raise
                except Exception as exc:
                    if not conn.alive() or _is_connection_failure(exc):
                        conn.close()
                        raise TransientError(exc) from exc
                    raise self._translate(exc, describe, name, conn.sftp, needed) from exc

        return call_with_retry(
            attempt,
            policy=self.retry,
            is_transient=lambda exc: isinstance(exc, TransientError),
            describe=f"{self.url}: {describe}",
            on_retry=lambda _exc: self.requests.retried(),
            name=name,
        )

    # --- errors ------------------------------------------------------------------------

    def _translate(
        self, exc: BaseException, describe: str, name: str | None, sftp: Session, needed: int
    ) -> BackendError:
        text = f"{self.url}: cannot {describe}: {exc}"
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOENT:
                return ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
            if exc.errno in (errno.EACCES, errno.EPERM):
                return BackendPermissionError(f"{text} (permission denied on the server)", name=name)
            lowered = str(exc).lower()
            room = self._statvfs(sftp)
            if room is not None and room[1] & _ST_RDONLY:
                return BackendPermissionError(f"{text} (the server's file system is read-only)", name=name)
            if "quota" in lowered or "space" in lowered or (room is not None and room[0] < needed + _FULL_MARGIN):
                return StorageFullError(f"{self.url}: the server's disk is full or over quota ({describe})", name=name)
        return BackendError(text, name=name)

    def _statvfs(self, sftp: Session) -> tuple[int, int] | None:
        """Free bytes and mount flags under the repository, from ``statvfs@openssh.com``."""
        try:
            fields = sftp.statvfs(self.root or ".")
        except Exception:
            return None
        # f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_fsid f_flag
        # f_namemax (OpenSSH PROTOCOL section 4.4)
        return fields[1] * fields[4], fields[9]

    # --- paths -------------------------------------------------------------------------
    #
    # Links (repository-format.md, section 10.3). SFTP v3 cannot open or remove a path without
    # following the links in it (filexfer-02 has no O_NOFOLLOW, and the server resolves every
    # path), so this backend looks before it acts: each folder on an object's path is checked
    # with lstat (once per backend: ``_folders`` remembers the real folders found), and the
    # object itself with lstat before it is read, replaced or removed. Listings take each
    # entry's type from READDIR, which OpenSSH's sftp-server fills in with lstat. A link planted
    # in the repository is thus never followed; a process on the server that swaps a checked
    # folder for a link while this client works can still win that race, which only the local
    # backend (openat with O_NOFOLLOW) closes.

    def _path(self, name: str) -> str:
        split_name(name)
        return f"{self.root}/{name}"

    def skipped(self) -> dict[str, str]:
        return dict(self._skipped)

    def _skip(self, rel: str, why: str) -> None:
        note_skipped(self._skipped, self.url, rel, why)

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _unsafe(self, rel: str, mode: int) -> UnsafeStorageError:
        if rel in TOP_LEVEL_FOLDERS and stat.S_ISLNK(mode):
            return UnsafeStorageError(
                f"{self.url}: the folder {rel} is a symbolic link on the server. vmvault follows no link "
                "inside a repository (one planted there could make it read, overwrite or delete files "
                "elsewhere on the server), so it refuses this repository. If the link was made on purpose, "
                "add ?follow-links=1 to the location",
                name=rel,
                kind=describe_mode(mode),
            )
        return UnsafeStorageError(
            f"{self.url}: {shown(rel)} is {describe_mode(mode)} on the server, where the repository holds "
            "only files and folders; vmvault never follows or opens one (was it planted?)",
            name=rel,
            kind=describe_mode(mode),
        )

    def _listdir(self, sftp: Session, path: str) -> list[tuple[str, Attrs]]:
        """The entries of a folder (name, attributes) with the attributes READDIR gives
        (OpenSSH: lstat's). A name that is not UTF-8 is never one vmvault wrote; it is skipped
        with a warning."""
        out: list[tuple[str, Attrs]] = []
        for raw, attrs in sftp.listdir(path):
            try:
                filename = raw.decode("utf-8")
            except UnicodeDecodeError:
                odd = f"{path}/{raw.decode('utf-8', 'surrogateescape')}".removeprefix(self.root + "/")
                self._skip(odd, "not UTF-8, so no name vmvault writes")
                continue
            if filename not in (".", ".."):
                out.append((filename, attrs))
        return out

    def _check_layout(self, sftp: Session) -> None:
        """Refuse a repository whose top-level folders are links (unless told to follow them)."""
        if self._layout_checked:
            return
        try:
            entries = self._listdir(sftp, self.root)
        except FileNotFoundError:
            return  # no repository yet
        for filename, attrs in entries:
            mode = attrs.mode or 0
            if filename in TOP_LEVEL_FOLDERS:
                if stat.S_ISLNK(mode) and not self.follow_links:
                    raise self._unsafe(filename, mode)
                if stat.S_ISDIR(mode):
                    self._folders.add(filename)
        self._root_fs = self._file_system(sftp)
        self._layout_checked = True

    def _file_system(self, sftp: Session) -> int | None:
        """The server's id of the file system holding the root (``f_fsid``), or None."""
        try:
            return sftp.statvfs(self.root)[8] or None
        except Exception:
            return None

    def _folder_gone(self, sftp: Session) -> None:
        """A folder this backend found is gone: ``root_gone`` when the root is now on another file
        system than when it was listed (its disk unmounted on the server, so that the path leads
        to the empty mount point); the caller makes the folder again otherwise."""
        if self._root_fs is not None and self._file_system(sftp) not in (None, self._root_fs):
            raise root_gone(self.url)

    def _is_folder(self, sftp: Session, rel: str) -> bool:
        """Whether ``rel`` is a real folder (False: absent, or a file); UnsafeStorageError for a
        link (but a top-level folder's with ``follow_links``) or a special file."""
        if rel in self._folders:
            return True
        try:
            mode = sftp.lstat(self._full(rel)).mode or 0
            if self._followed(rel, mode):
                mode = sftp.stat(self._full(rel)).mode or 0
        except FileNotFoundError:
            return False
        return self._folder_mode(rel, mode)

    def _followed(self, rel: str, mode: int) -> bool:
        """Whether ``rel``, of lstat mode ``mode``, is a link this backend follows."""
        return stat.S_ISLNK(mode) and self.follow_links and rel in TOP_LEVEL_FOLDERS

    def _folder_mode(self, rel: str, mode: int) -> bool:
        """``_is_folder`` of ``rel`` whose mode (not a followed link's) is ``mode``."""
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise self._unsafe(rel, mode)
        if stat.S_ISDIR(mode):
            self._folders.add(rel)
            return True
        return False

    def _reach(self, sftp: Session, parts: list[str], *, create: bool = False, again: bool = True) -> bool:
        """Check each folder on the way to ``parts[-1]`` (making missing ones with ``create``);
        False when one does not exist."""
        self._check_layout(sftp)
        for depth in range(1, len(parts)):
            rel = "/".join(parts[:depth])
            if self._is_folder(sftp, rel):
                continue
            if not create:
                return False
            try:
                sftp.mkdir(self._full(rel))
            except FileNotFoundError:
                if again:  # no repository folder yet, or a folder on the way removed since it was checked
                    self._folder_gone(sftp)
                    for above in range(1, depth):
                        self._folders.discard("/".join(parts[:above]))
                    self._make_root(sftp)
                    return self._reach(sftp, parts, create=True, again=False)
            except OSError:
                pass  # lost a race with another writer, or failed: look
            if not self._is_folder(sftp, rel):
                raise BackendError(f"{self.url}: {rel} exists and is not a folder", name=rel)
        return True

    def _located(self, sftp: Session, parts: list[str], name: str) -> Attrs | None:
        """``_object`` of ``name`` when the folders on its way are real (``_reach``), else None.

        The lstats of the folders not yet known and the object's go out together: one round
        trip, not one each (a restore's first read of each pack, 30 ms apiece from a server
        30 ms away). The folders' answers are judged first, in order, and the object's only
        when they all are real folders; a followed link takes the long way."""
        self._check_layout(sftp)
        on_the_way = ("/".join(parts[:depth]) for depth in range(1, len(parts)))
        unknown = [rel for rel in on_the_way if rel not in self._folders]
        if not unknown:
            return self._object(sftp, name)
        *folders, answer = sftp.lstat_many([*(self._full(rel) for rel in unknown), self._path(name)])
        for rel, folder in zip(unknown, folders, strict=True):
            if isinstance(folder, FileNotFoundError):
                return None
            if isinstance(folder, StatusError):
                raise folder
            if self._followed(rel, folder.mode or 0):
                return self._object(sftp, name) if self._reach(sftp, parts) else None
            if not self._folder_mode(rel, folder.mode or 0):
                return None
        if isinstance(answer, FileNotFoundError):
            return None
        if isinstance(answer, StatusError):
            raise answer
        return self._checked_object(name, answer)

    def _object(self, sftp: Session, name: str) -> Attrs | None:
        """The lstat of object ``name``: None when absent or a folder; UnsafeStorageError when a
        link or special file stands in its place."""
        try:
            attrs = sftp.lstat(self._path(name))
        except FileNotFoundError:
            return None
        return self._checked_object(name, attrs)

    def _checked_object(self, name: str, attrs: Attrs) -> Attrs | None:
        """``_object`` of the lstat ``attrs`` of ``name``."""
        mode = attrs.mode or 0
        if stat.S_ISDIR(mode):
            return None  # a directory is no object
        if not stat.S_ISREG(mode):
            raise self._unsafe(name, mode)
        return attrs

    def _open_new(self, sftp: Session, parts: list[str], path: str) -> bytes:
        """A handle on a new file ``path``: O_CREAT | O_EXCL, never through a link at that name."""
        self._reach(sftp, parts, create=True)
        try:
            return sftp.open(path, _CREATE_NEW)
        except FileNotFoundError:
            pass
        # no repository folder yet, or a folder was removed since it was checked: make them
        self._folder_gone(sftp)
        for depth in range(1, len(parts)):
            self._folders.discard("/".join(parts[:depth]))
        self._make_root(sftp)
        self._reach(sftp, parts, create=True)
        return sftp.open(path, _CREATE_NEW)

    def _make_root(self, sftp: Session) -> None:
        """``mkdir -p`` of the root. It is the user's own path, so links in it are theirs and
        are followed, as the server resolves any path. A root this backend found before is
        never made again (``root_gone``: its disk was unmounted on the server, or the folder
        removed, while the command ran)."""
        missing: list[str] = []
        listed = self._layout_checked  # (before looking: another thread may make and list it meanwhile)
        current = self.root
        while current and current not in ("/", "."):
            try:
                if stat.S_ISDIR(sftp.stat(current).mode or 0):
                    break
                raise BackendError(f"{self.url}: {current} exists and is not a directory")
            except FileNotFoundError:
                if current == self.root and listed:
                    raise root_gone(self.url) from None
                missing.append(current)
                current = posixpath.dirname(current)
        for path in reversed(missing):
            try:
                sftp.mkdir(path)
            except OSError:
                # lost a race with another writer, or a real failure: stat tells which
                try:
                    made = stat.S_ISDIR(sftp.stat(path).mode or 0)
                except FileNotFoundError:
                    made = False
                if not made:
                    raise

    def _rename_over(self, sftp: Session, tmp: str, path: str) -> None:
        if self._posix_rename:
            try:
                sftp.posix_rename(tmp, path)
                return
            except OSError as exc:
                if not _not_offered(exc):
                    raise
                self._posix_rename = False
        # SFTP v3 rename refuses to replace (filexfer-02 section 6.5): only when the name is
        # taken, remove it first. Between the two calls the name is briefly absent, never partial.
        try:
            sftp.rename(tmp, path)
            return
        except OSError:
            if not self._is_file(sftp, path):
                raise
        sftp.remove(path)
        sftp.rename(tmp, path)

    @staticmethod
    def _is_file(sftp: Session, path: str) -> bool:
        try:
            return stat.S_ISREG(sftp.lstat(path).mode or 0)
        except FileNotFoundError:
            return False

    def _finish(self, sftp: Session, handle: bytes, name: str) -> None:
        """fsync and close a written temporary file and look at ``name`` (``finish_write``):
        raises the fsync's error, else the close's, else what ``_object`` raises for what
        stands at ``name``. A rename replaces a link itself, not its target; still, a link where
        an object belongs was planted, and is reported rather than silently replaced."""
        synced, closed, looked = sftp.finish_write(handle, self._path(name), fsync=self._fsync)
        if synced is not None:
            if not _not_offered(synced):
                raise synced
            # durability then rests on the server's own flushing; the rename is still atomic
            self._fsync = False
        if closed is not None:
            raise closed
        if isinstance(looked, StatusError):
            if not isinstance(looked, FileNotFoundError):
                raise looked
        else:
            self._checked_object(name, looked)

    # --- the Backend interface -----------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        self.requests.count("put", written=len(data))
        self._forget_pack(name)
        parts = split_name(name)
        path = self._path(name)
        leftovers: list[str] = []

        def op(sftp: Session) -> None:
            # a previous attempt lost its connection mid-upload: remove its temporary file
            for stale in leftovers:
                with contextlib.suppress(OSError):
                    sftp.remove(stale)
            leftovers.clear()
            tmp = f"{path}{_TMP_MARK}{secrets.token_hex(6)}"
            leftovers.append(tmp)
            try:
                handle = self._open_new(sftp, parts, tmp)
                try:
                    # every write's status is checked: a short object must never be renamed
                    # into place as if it were whole
                    sftp.write(handle, data, self._request_size or _BASE_REQUEST, _WINDOW)
                except BaseException:
                    sftp.close_quietly(handle)
                    raise
                # fsync, close and a look at the final name in one round trip (the handle is
                # closed whatever it raises); the rename only once all three are right
                self._finish(sftp, handle, name)
                self._rename_over(sftp, tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(tmp)
                raise
            leftovers.clear()

        # the failed attempt's temporary file is gone before the error is examined, so
        # "full" means: less room than this object needs
        self._call(f"write {name}", name, op, needed=len(data))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return bytes(self._get(name, offset, length, None))

    def get_into(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        """A range read with the DATA replies received straight into ``buffer`` (no copy of
        the range is made); a range longer than ``buffer`` as ``get``."""
        if length < 0 or len(buffer) < length:
            return super().get_into(name, offset, length, buffer)
        return memoryview(self._get(name, offset, length, memoryview(buffer)))

    def _get(self, name: str, offset: int, length: int | None, into: memoryview | None) -> bytes | memoryview:
        self.requests.count("get")
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        parts = split_name(name)
        path = self._path(name)

        def op(sftp: Session) -> bytes | memoryview:
            try:
                return read(sftp)
            except BaseException:
                self._forget_pack(name)  # gone since (pruned), cut short or replaced: look again
                raise

        def read(sftp: Session) -> bytes | memoryview:
            attrs = self._known_pack(name) if length is not None else None
            if attrs is None:
                attrs = self._located(sftp, parts, name)
                if attrs is None:
                    raise ObjectNotFoundError(f"{self.url}: no object {shown(name)}", name=name)
                if length is not None:
                    self._remember_pack(name, attrs)
            with sftp.closing(sftp.open(path, OpenFlag.READ), later=True) as handle:
                if length is None:
                    # a whole object may have been replaced since lstat (a lock is rewritten in
                    # place): the size is that of the file opened. A range is read from an
                    # object that never changes (a pack), so lstat's size serves.
                    attrs = sftp.fstat(handle)
                    if not stat.S_ISREG(attrs.mode or 0):
                        raise ObjectNotFoundError(f"{self.url}: no object {shown(name)}", name=name)
                size = attrs.size or 0
                start = min(offset, size)
                end = size if length is None else min(size, offset + length)
                if end <= start:
                    return b""
                out = sftp.read(handle, start, end - start, self._request_size or _BASE_REQUEST, into)
                if len(out) != end - start:
                    raise BackendError(
                        f"{self.url}: short read of {name}: {len(out)} of {end - start} bytes at {start}", name=name
                    )
                return out

        return self.requests.read(self._call(f"read {name}", name, op))

    def _known_pack(self, name: str) -> Attrs | None:
        """The kept lstat of pack ``name``, if it is recent enough."""
        if not name.startswith("data/"):
            return None
        with self._pack_stats_lock:
            found = self._pack_stats.get(name)
            if found is None:
                return None
            if time.monotonic() - found[0] > _PACK_STAT_SECONDS:
                del self._pack_stats[name]
                return None
            return found[1]

    def _remember_pack(self, name: str, attrs: Attrs) -> None:
        if name.startswith("data/"):
            with self._pack_stats_lock:
                self._pack_stats[name] = (time.monotonic(), attrs)
                self._pack_stats.move_to_end(name)
                while len(self._pack_stats) > _PACK_STATS:
                    self._pack_stats.popitem(last=False)

    def _forget_pack(self, name: str) -> None:
        with self._pack_stats_lock:
            self._pack_stats.pop(name, None)

    def _lstat(self, name: str) -> Attrs | None:
        parts = split_name(name)
        return self._call(f"look up {name}", name, lambda sftp: self._located(sftp, parts, name))

    def exists(self, name: str) -> bool:
        self.requests.count("stat")
        return self._lstat(name) is not None

    def modified(self, name: str) -> float | None:
        self.requests.count("stat")
        attrs = self._lstat(name)
        if attrs is None or attrs.mtime is None:
            return None
        return float(attrs.mtime)

    def _walk(self, sftp: Session, start: str, prefix: str) -> Iterator[tuple[str, Attrs]]:
        """(relative name, READDIR attributes) of every regular file under folder ``start``
        whose name starts with ``prefix``. Links and special files are skipped with a warning,
        never followed (a top-level folder's link is refused, or followed with follow_links)."""
        self._check_layout(sftp)
        parts = start.split("/") if start else []
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            try:
                if not self._is_folder(sftp, rel):
                    return
            except UnsafeStorageError as exc:
                if rel in TOP_LEVEL_FOLDERS:
                    raise
                self._skip(rel, unsafe_why(exc.kind))
                return
        pending = [(start, len(parts))]
        while pending:
            rel_dir, depth = pending.pop()
            try:
                entries = self._listdir(sftp, self._full(rel_dir))
            except FileNotFoundError:
                continue
            for filename, entry in entries:
                rel = f"{rel_dir}/{filename}" if rel_dir else filename
                if not (rel.startswith(prefix) or prefix.startswith(rel + "/")):
                    continue
                mode = entry.mode or 0
                if stat.S_ISLNK(mode) and rel in TOP_LEVEL_FOLDERS:
                    if not self.follow_links:
                        raise self._unsafe(rel, mode)
                    if self._is_folder(sftp, rel):
                        pending.append((rel, depth + 1))
                elif stat.S_ISDIR(mode):
                    if depth + 1 >= _MAX_DEPTH:
                        self._skip(rel, "folders nested deeper than vmvault writes")
                        continue
                    self._folders.add(rel)
                    pending.append((rel, depth + 1))
                elif not stat.S_ISREG(mode):
                    self._skip(rel, unsafe_why(describe_mode(mode)))
                elif rel.startswith(prefix):
                    yield rel, entry

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.requests.count("list")
        if prefix.startswith("/") or "\0" in prefix or ".." in prefix.split("/"):
            raise ValueError(f"bad prefix {prefix!r}")
        start = prefix.rstrip("/") if prefix.endswith("/") else posixpath.dirname(prefix)

        def op(sftp: Session) -> list[ObjectInfo]:
            found = [
                ObjectInfo(rel, attrs.size or 0, "" if attrs.mtime is None else str(attrs.mtime))
                for rel, attrs in self._walk(sftp, start, prefix)
                if _TMP_MARK not in rel.rsplit("/", 1)[-1]
            ]
            return sorted(found, key=lambda o: o.name)

        yield from self._call(f"list {prefix or 'everything'}", None, op)

    def delete(self, name: str) -> None:
        self.requests.count("delete")
        self._forget_pack(name)
        parts = split_name(name)
        path = self._path(name)

        def op(sftp: Session) -> None:
            if not self._reach(sftp, parts) or self._object(sftp, name) is None:
                return  # nothing of that name (a directory is no object)
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(path)

        self._call(f"delete {name}", name, op)

    def cleanup_temporary(self, older_than: float = 24 * 3600) -> int:
        """Remove temporary files that killed writers left behind, if older than
        ``older_than`` seconds (younger ones may belong to an upload still running on another
        host); returns how many were removed. Only names ``put`` makes, only regular files."""

        def op(sftp: Session) -> int:
            cutoff = time.time() - older_than
            removed = 0
            for rel, attrs in list(self._walk(sftp, "", "")):
                if _TMP_NAME.fullmatch(rel.rsplit("/", 1)[-1]) and (attrs.mtime or 0) < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        sftp.remove(self._full(rel))
                        removed += 1
            return removed

        return self._call("remove stale temporary files", None, op)

    def close(self) -> None:
        self._pool.close()


def open_sftp(url: str, **options: Any) -> SftpBackend:
    """Open ``sftp://[user@]host[:port]/path[?key=PATH&known-hosts=PATH&connections=N&follow-links=1&transport=T]``.

    ``options`` go to :class:`SftpBackend` and override what the URL and environment say.
    """
    parts = urlsplit(url)
    if parts.scheme != "sftp" or not parts.hostname:
        raise ConfigError(f"not an SFTP location: {url!r} (expected sftp://user@host[:port]/path)")
    if parts.password:
        raise ConfigError(f"{parts.hostname}: passwords in the URL are not supported; use an SSH key")
    try:
        port = parts.port or 22
    except ValueError as exc:
        raise ConfigError(f"bad port in {url!r}") from exc
    path = unquote(parts.path)
    # sftp://host/~/dir is relative to the login directory, sftp://host/dir is absolute
    root = path[3:] if path.startswith("/~/") else path
    query = parse_qs(parts.query)
    unknown = set(query) - {"key", "known-hosts", "connections", "follow-links", "transport"}
    if unknown:
        raise ConfigError(f"unknown SFTP option(s) {', '.join(sorted(unknown))} in {url!r}")
    settings: dict[str, Any] = {
        "user": unquote(parts.username) if parts.username else None,
        "port": port,
        "key_filename": query.get("key", [os.environ.get("VMVAULT_SFTP_KEY")])[0] or None,
        "known_hosts": query.get("known-hosts", [os.environ.get("VMVAULT_SFTP_KNOWN_HOSTS")])[0] or None,
    }
    if "follow-links" in query:
        if query["follow-links"][-1] not in ("0", "1"):
            raise ConfigError(f"follow-links must be 1 or 0 in {url!r}")
        settings["follow_links"] = query["follow-links"][-1] == "1"
    if "transport" in query:
        settings["transport"] = query["transport"][-1]
    if "connections" in query:
        try:
            settings["connections"] = int(query["connections"][0])
        except ValueError as exc:
            raise ConfigError(f"connections must be a number in {url!r}") from exc
    settings.update(options)
    return SftpBackend(parts.hostname, root, **settings)
