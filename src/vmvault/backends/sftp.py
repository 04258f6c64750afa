"""A directory on another machine, reached over SFTP (SSH File Transfer Protocol v3).

Location: ``sftp://[user@]host[:port]/absolute/path`` or ``sftp://host/~/relative/to/home``.
Query parameters: ``key=PATH`` (private key file), ``known-hosts=PATH``, ``connections=N``.
Environment: ``VMVAULT_SFTP_KEY`` and ``VMVAULT_SFTP_KNOWN_HOSTS`` (the URL wins).

Security: only key authentication (an explicit key file, the SSH agent, ``~/.ssh/id_*``).
The server's host key must already be in known_hosts; an unknown or changed key is refused
with a message that tells the user how to check and add it. Nothing is ever trusted silently.

Atomic put (draft-ietf-secsh-filexfer-02 section 6.5 gives no atomic overwrite, so):
write ``NAME.tmp-RANDOM``, ``fsync@openssh.com`` it, then ``posix-rename@openssh.com`` it
over ``NAME`` (OpenSSH PROTOCOL section 4.3: rename(2) semantics). Servers without that
extension get remove + rename, which leaves a short window with no object at all but never
a partial one. ``list`` ignores temporary names; an attempt that lost its connection removes
its temporary file when it retries.

Transfers: up to 64 write requests in flight per upload, every status checked (a short
object must never be renamed into place); requests of 128 KiB where ``limits@openssh.com``
(OpenSSH PROTOCOL section 4.8) allows it, else 32 KiB; reads pipelined the same way.

Concurrency: a small pool of SSH connections, one SFTP session each, so that uploads from
several threads do not queue behind one channel's window.

Errors: SFTP v3 has few status codes (section 7). NO_SUCH_FILE and PERMISSION_DENIED map
directly; a full disk arrives as the generic SSH_FX_FAILURE, so a failed write is followed by
a ``statvfs@openssh.com`` query (OpenSSH PROTOCOL section 4.4) to tell "disk full" apart.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import getpass
import hashlib
import os
import posixpath
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import paramiko
from paramiko.sftp import CMD_STATUS, CMD_WRITE, SFTPError, int64

from vmvault.backends._retry import RetryPolicy, TransientError, call_with_retry
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    BackendPermissionError,
    ConfigError,
    ObjectNotFoundError,
    StorageFullError,
)

__all__ = ["SftpBackend", "open_sftp"]

T = TypeVar("T")

_TMP_MARK = ".tmp-"

# SFTP packet types and the OpenSSH extension replies we read ourselves (filexfer-02 section 3).
_CMD_EXTENDED = 200
_CMD_EXTENDED_REPLY = 201

#: the request size every SFTP server accepts (filexfer-02 section 3: servers should take
#: packets of at least 34000 bytes, i.e. 32 KiB of data plus headers)
_BASE_REQUEST = 32768
#: the largest request we send where the server allows it (OpenSSH answers up to 256 KiB);
#: fewer, larger requests spend less of paramiko's per-packet Python time
_LARGE_REQUEST = 128 * 1024

#: write requests in flight per upload: enough to cover loopback and LAN round trips
#: (64 x 128 KiB = 8 MiB), few enough to notice an error soon
_WINDOW = 64

#: statvfs@openssh.com f_flag bit for a read-only mount (OpenSSH PROTOCOL section 4.4)
_ST_RDONLY = 0x1

#: a write that fails with SSH_FX_FAILURE is "disk full" when less than the object's size plus
#: this remains free
_FULL_MARGIN = 1 << 20


def _fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint in OpenSSH's notation, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse a host whose key is not in known_hosts, saying how to add it."""

    def __init__(self, backend: SftpBackend) -> None:
        self._backend = backend

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        b = self._backend
        raise BackendPermissionError(
            f"{b.url}: the host key of {hostname} is not in {b.known_hosts} "
            f"({key.get_name()} {_fingerprint(key)}); vmvault never trusts an unknown host. "
            f"Check the fingerprint with the server's administrator, then add it with: "
            f"{b.keyscan_command()} >> {b.known_hosts}"
        )


class _Connection:
    """One SSH connection with one SFTP session on it."""

    def __init__(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient) -> None:
        self.client = client
        self.sftp = sftp

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active() and not self.sftp.sock.closed

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()
        with contextlib.suppress(Exception):
            self.client.close()


class _Pool:
    """At most ``size`` connections; idle ones are reused, broken ones are dropped."""

    def __init__(self, factory: Callable[[], _Connection], size: int) -> None:
        self._factory = factory
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []

    @contextlib.contextmanager
    def connection(self) -> Iterator[_Connection]:
        with self._slots:
            conn: _Connection | None = None
            with self._lock:
                while self._idle and conn is None:
                    candidate = self._idle.pop()
                    if candidate.alive():
                        conn = candidate
                    else:
                        candidate.close()
            if conn is None:
                conn = self._factory()
            try:
                yield conn
            finally:
                if conn.alive():
                    with self._lock:
                        self._idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _is_connection_failure(exc: BaseException) -> bool:
    """True for errors of the transport, not of the file operation."""
    if isinstance(exc, paramiko.AuthenticationException | paramiko.BadHostKeyException):
        return False
    if isinstance(exc, EOFError | paramiko.SSHException | ConnectionError | socket.timeout):
        return True
    # paramiko reports a closed channel as a bare socket.error
    return isinstance(exc, OSError) and exc.errno is None and "closed" in str(exc).lower()


class _WriteAcks:
    """Collects the status answers to our write requests (paramiko hands each answer to the
    object given with the request, via ``_async_response``)."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._sftp = sftp
        self.pending: set[int] = set()
        self.error: BaseException | None = None

    def _async_response(self, kind: int, msg: paramiko.Message, num: int) -> None:
        self.pending.discard(num)
        if kind != CMD_STATUS:
            self.error = self.error or SFTPError(f"expected a status for write request {num}, got type {kind}")
            return
        try:
            self._sftp._convert_status(msg)  # type: ignore[attr-defined]
        except (OSError, EOFError) as exc:
            self.error = self.error or exc

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _not_offered(exc: OSError) -> bool:
    """An extension the server lacks (OP_UNSUPPORTED) or its administrator banned
    (``sftp-server -P``, answered with PERMISSION_DENIED)."""
    return exc.errno == errno.EACCES or (exc.errno is None and "unsupported" in str(exc).lower())


class SftpBackend(Backend):
    """A repository directory on an SFTP server. See the module docstring for the guarantees."""

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
        connections: int = 4,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not root or root == "/":
            raise ConfigError(f"sftp://{host}: give a directory for the repository, not the server's root")
        if key_filename is not None and not os.path.isfile(key_filename):
            raise ConfigError(f"SSH key file {key_filename} does not exist")
        if connections < 1:
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
        self._pool = _Pool(self._connect, connections)
        self._posix_rename = True
        #: bytes per SFTP read/write request, settled on the first connection
        self._request_size: int | None = None
        self._fsync = True

    # --- connections -------------------------------------------------------------------

    def keyscan_command(self) -> str:
        port = "" if self.port == 22 else f"-p {self.port} "
        return f"ssh-keyscan {port}{self.host}"

    def _connect(self) -> _Connection:
        client = paramiko.SSHClient()
        try:
            if os.path.isfile(self.known_hosts):
                # "system" host keys are only read, never written back
                client.load_system_host_keys(self.known_hosts)
            client.set_missing_host_key_policy(_RefuseUnknownHost(self))
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
            )
            # open the subsystem by hand so the version handshake has a timeout too: a server whose
            # session hangs (a stuck login shell, say) must give an error, not wait forever
            transport = client.get_transport()
            assert transport is not None
            channel = transport.open_session(timeout=self.timeout)
            channel.settimeout(self.timeout)
            channel.invoke_subsystem("sftp")
            try:
                sftp = paramiko.SFTPClient(channel)
            except TimeoutError as exc:
                raise BackendConnectionError(
                    f"{self.url}: the SFTP server on {self.host} did not answer within {self.timeout:.0f} s "
                    "(is the sftp subsystem enabled, and does the login shell start cleanly?)"
                ) from exc
            if self._request_size is None:
                self._request_size = self._negotiate_request_size(sftp)
        except BackendError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise BackendPermissionError(
                f"{self.url}: the host key of {exc.hostname} has CHANGED: the server offers "
                f"{exc.key.get_name()} {_fingerprint(exc.key)} but {self.known_hosts} holds "
                f"{exc.expected_key.get_name()} {_fingerprint(exc.expected_key)}. This may be an attack "
                f"or a reinstalled server. If the administrator confirms the new key, replace the old "
                f"line with: ssh-keygen -R {self._known_hosts_name()} -f {self.known_hosts} && "
                f"{self.keyscan_command()} >> {self.known_hosts}"
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise BackendPermissionError(self._auth_message(exc)) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "no authentication methods" in str(exc).lower():
                raise BackendPermissionError(self._auth_message(exc)) from exc
            raise TransientError(exc) from exc
        except OSError as exc:
            client.close()
            raise TransientError(exc) from exc
        return _Connection(client, sftp)

    @staticmethod
    def _negotiate_request_size(sftp: paramiko.SFTPClient) -> int:
        """Ask ``limits@openssh.com`` (OpenSSH PROTOCOL section 4.8) how large a read or write
        may be; servers without it get the size every server must accept."""
        try:
            kind, msg = sftp._request(_CMD_EXTENDED, "limits@openssh.com")  # type: ignore[attr-defined]
        except Exception:
            return _BASE_REQUEST
        if kind != _CMD_EXTENDED_REPLY:
            return _BASE_REQUEST
        # max-packet-length, max-read-length, max-write-length, max-open-handles (0 = no limit)
        _packet, max_read, max_write = (int(msg.get_int64()) for _ in range(3))
        limits = [limit for limit in (max_read, max_write) if limit > 0]
        return max(_BASE_REQUEST, min([_LARGE_REQUEST, *limits]))

    def _known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _auth_message(self, exc: BaseException) -> str:
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

    def _call(self, describe: str, name: str | None, op: Callable[[paramiko.SFTPClient], T], *, needed: int = 0) -> T:
        """Run ``op`` on a pooled connection, reconnecting and retrying when it drops.

        ``needed``: bytes the operation writes, to recognise a full disk behind SSH_FX_FAILURE."""

        def attempt() -> T:
            with self._pool.connection() as conn:
                try:
                    return op(conn.sftp)
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
            name=name,
        )

    # --- errors ------------------------------------------------------------------------

    def _translate(
        self, exc: BaseException, describe: str, name: str | None, sftp: paramiko.SFTPClient, needed: int
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

    def _statvfs(self, sftp: paramiko.SFTPClient) -> tuple[int, int] | None:
        """Free bytes and mount flags under the repository, from ``statvfs@openssh.com``."""
        try:
            kind, msg = sftp._request(_CMD_EXTENDED, "statvfs@openssh.com", self.root or ".")  # type: ignore[attr-defined]
        except Exception:
            return None
        if kind != _CMD_EXTENDED_REPLY:
            return None
        # f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_fsid f_flag
        # f_namemax, all uint64 (OpenSSH PROTOCOL section 4.4)
        fields = [msg.get_int64() for _ in range(11)]
        return fields[1] * fields[4], fields[9]

    # --- paths -------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/") or _TMP_MARK in name:
            raise ValueError(f"bad object name {name!r}")
        return f"{self.root}/{name}"

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        """``mkdir -p``, tolerant of another thread or host creating the same directory."""
        missing: list[str] = []
        current = directory
        while current and current not in ("/", "."):
            try:
                if stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                    break
                raise BackendError(f"{self.url}: {current} exists and is not a directory")
            except FileNotFoundError:
                missing.append(current)
                current = posixpath.dirname(current)
        for path in reversed(missing):
            try:
                sftp.mkdir(path)
            except OSError:
                # lost a race with another writer, or a real failure: stat tells which
                if not self._is_directory(sftp, path):
                    raise

    def _open_new(self, sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPFile:
        directory = posixpath.dirname(path)
        try:
            return sftp.open(path, "wxb")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # directories are created lazily, on the first put that needs them
        self._makedirs(sftp, directory)
        return sftp.open(path, "wxb")

    def _rename_over(self, sftp: paramiko.SFTPClient, tmp: str, path: str) -> None:
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
    def _is_directory(sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
        except FileNotFoundError:
            return False

    @staticmethod
    def _is_file(sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            return stat.S_ISREG(sftp.stat(path).st_mode or 0)
        except FileNotFoundError:
            return False

    def _write_all(self, sftp: paramiko.SFTPClient, fh: paramiko.SFTPFile, data: bytes) -> None:
        """Write ``data`` with up to ``_WINDOW`` requests in flight, checking every status.

        Not paramiko's pipelined mode: it drops the status of a write whose answer arrives
        while it waits for something else, so a full disk could go unnoticed and leave a
        short file that is then renamed into place as if it were whole.
        """
        step = self._request_size or _BASE_REQUEST
        acks = _WriteAcks(sftp)
        view = memoryview(data)
        for pos in range(0, len(data), step):
            while len(acks.pending) >= _WINDOW:
                sftp._read_response()  # type: ignore[attr-defined]
            acks.raise_error()
            num = sftp._async_request(  # type: ignore[attr-defined]
                acks, CMD_WRITE, fh.handle, int64(pos), bytes(view[pos : pos + step])
            )
            acks.pending.add(num)
        while acks.pending:
            sftp._read_response()  # type: ignore[attr-defined]
        acks.raise_error()

    def _fsync_file(self, sftp: paramiko.SFTPClient, handle: paramiko.SFTPFile) -> None:
        if not self._fsync:
            return
        try:
            sftp._request(_CMD_EXTENDED, "fsync@openssh.com", handle.handle)  # type: ignore[attr-defined]
        except OSError as exc:
            if not _not_offered(exc):
                raise
            # durability then rests on the server's own flushing; the rename is still atomic
            self._fsync = False

    # --- the Backend interface -----------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        leftovers: list[str] = []

        def op(sftp: paramiko.SFTPClient) -> None:
            # a previous attempt lost its connection mid-upload: remove its temporary file
            for stale in leftovers:
                with contextlib.suppress(OSError):
                    sftp.remove(stale)
            leftovers.clear()
            tmp = f"{path}{_TMP_MARK}{secrets.token_hex(6)}"
            leftovers.append(tmp)
            try:
                with self._open_new(sftp, tmp) as fh:
                    self._write_all(sftp, fh, data)
                    self._fsync_file(sftp, fh)
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
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        path = self._path(name)

        def op(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(path, "rb") as fh:
                attrs = fh.stat()
                if not stat.S_ISREG(attrs.st_mode or 0):
                    # a directory opens for reading but is no object
                    raise ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
                size = attrs.st_size or 0
                start = min(offset, size)
                end = size if length is None else min(size, offset + length)
                if end <= start:
                    return b""
                # readv pipelines the reads instead of waiting for each in turn; asking for
                # request-sized pieces avoids paramiko re-slicing one large buffer (quadratic)
                step = self._request_size or _BASE_REQUEST
                fh.MAX_REQUEST_SIZE = step
                pieces = [(pos, min(step, end - pos)) for pos in range(start, end, step)]
                out = b"".join(fh.readv(pieces))
                if len(out) != end - start:
                    raise BackendError(
                        f"{self.url}: short read of {name}: {len(out)} of {end - start} bytes at {start}", name=name
                    )
                return out

        return self._call(f"read {name}", name, op)

    def exists(self, name: str) -> bool:
        path = self._path(name)

        return self._call(f"look up {name}", name, lambda sftp: self._is_file(sftp, path))

    def modified(self, name: str) -> float | None:
        path = self._path(name)
        try:
            attrs = self._call(f"look up {name}", name, lambda sftp: sftp.stat(path))
        except ObjectNotFoundError:
            return None
        return float(attrs.st_mtime) if attrs.st_mtime is not None else None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"bad prefix {prefix!r}")
        start = prefix.rstrip("/") if prefix.endswith("/") else posixpath.dirname(prefix)

        def op(sftp: paramiko.SFTPClient) -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            pending = [start]
            while pending:
                rel_dir = pending.pop()
                full = f"{self.root}/{rel_dir}" if rel_dir else self.root
                try:
                    entries = sftp.listdir_attr(full)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    rel = f"{rel_dir}/{entry.filename}" if rel_dir else entry.filename
                    mode = entry.st_mode or 0
                    if stat.S_ISDIR(mode):
                        if (rel + "/").startswith(prefix) or prefix.startswith(rel + "/"):
                            pending.append(rel)
                    elif stat.S_ISREG(mode) and _TMP_MARK not in entry.filename and rel.startswith(prefix):
                        found.append(ObjectInfo(rel, entry.st_size or 0))
            return sorted(found, key=lambda o: o.name)

        yield from self._call(f"list {prefix or 'everything'}", None, op)

    def delete(self, name: str) -> None:
        path = self._path(name)

        def op(sftp: paramiko.SFTPClient) -> None:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass
            except OSError:
                # a directory of that name is no object, so there is nothing to delete
                if not self._is_directory(sftp, path):
                    raise

        self._call(f"delete {name}", name, op)

    def cleanup_temporary(self, older_than: float = 24 * 3600) -> int:
        """Remove temporary files that killed writers left behind, if older than
        ``older_than`` seconds (younger ones may belong to an upload still running on another
        host); returns how many were removed."""

        def op(sftp: paramiko.SFTPClient) -> int:
            cutoff = time.time() - older_than
            removed = 0
            pending = [self.root]
            while pending:
                directory = pending.pop()
                try:
                    entries = sftp.listdir_attr(directory)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    path = f"{directory}/{entry.filename}"
                    if stat.S_ISDIR(entry.st_mode or 0):
                        pending.append(path)
                    elif _TMP_MARK in entry.filename and (entry.st_mtime or 0) < cutoff:
                        with contextlib.suppress(FileNotFoundError):
                            sftp.remove(path)
                            removed += 1
            return removed

        return self._call("remove stale temporary files", None, op)

    def close(self) -> None:
        self._pool.close()


def open_sftp(url: str, **options: Any) -> SftpBackend:
    """Open ``sftp://[user@]host[:port]/path[?key=PATH&known-hosts=PATH&connections=N]``.

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
    unknown = set(query) - {"key", "known-hosts", "connections"}
    if unknown:
        raise ConfigError(f"unknown SFTP option(s) {', '.join(sorted(unknown))} in {url!r}")
    settings: dict[str, Any] = {
        "user": unquote(parts.username) if parts.username else None,
        "port": port,
        "key_filename": query.get("key", [os.environ.get("VMVAULT_SFTP_KEY")])[0] or None,
        "known_hosts": query.get("known-hosts", [os.environ.get("VMVAULT_SFTP_KNOWN_HOSTS")])[0] or None,
    }
    if "connections" in query:
        try:
            settings["connections"] = int(query["connections"][0])
        except ValueError as exc:
            raise ConfigError(f"connections must be a number in {url!r}") from exc
    settings.update(options)
    return SftpBackend(parts.hostname, root, **settings)
