"""Real servers on loopback for tests: OpenSSH ``sshd`` and moto's S3 server.

Each server runs as a child process on 127.0.0.1 and a free port, in its own temporary
directory, and can be killed (with its session processes) and restarted on the same port
for fault tests. Use the context managers (``running_sshd``, ``running_s3``) or the pytest
fixtures at the end (session-scoped ``sshd_server`` / ``s3_server``; import them into a
``conftest.py``).

Debian packages: ``openssh-server`` (sshd, sftp-server), ``openssh-client`` (ssh-keygen).
Python: ``moto[server]`` (flask), ``boto3``, ``paramiko``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = [
    "FaultyHttpProxy",
    "Mangle",
    "S3Server",
    "SshServer",
    "free_port",
    "process_tree",
    "running_s3",
    "running_sshd",
    "s3_client_environment",
    "s3_server",
    "sshd_server",
]

SSHD = "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop(0)
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    # collect the tree before killing: orphans are re-parented and could no longer be found
    _signal_all(process_tree(proc.pid), signal.SIGKILL)
    proc.wait(timeout=10)


def _wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (last error: {last})")


class SshServer:
    """An OpenSSH server on 127.0.0.1 with its own host key, serving SFTP to one client key."""

    def __init__(self, workdir: Path, port: int | None = None, sftp_options: str = "") -> None:
        """``sftp_options`` are added to the sftp-server command line, e.g. ``-R`` (read-only)
        or ``-P posix-rename`` (refuse that request)."""
        for tool in (SSHD, shutil.which("ssh-keygen")):
            if tool is None or not os.path.exists(tool):
                pytest.skip("OpenSSH is not installed (apt-get install openssh-server openssh-client)")
        sftp_server = next((p for p in SFTP_SERVER_CANDIDATES if os.path.exists(p)), None)
        if sftp_server is None:
            pytest.skip("sftp-server is not installed (apt-get install openssh-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = getpass.getuser()
        self.host_key = workdir / "ssh_host_ed25519_key"
        self.client_key = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.authorized_keys = workdir / "authorized_keys"
        self.config = workdir / "sshd_config"
        self.log = workdir / "sshd.log"
        #: the directory tests put repositories in (absolute, on this machine's file system)
        self.root = workdir / "data"
        self.root.mkdir(exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self._keygen(self.host_key)
        self._keygen(self.client_key)
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        self.write_known_hosts()
        self.config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    # tests run as root in CI containers
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",
                    "UsePAM no",
                    f"PidFile {workdir / 'sshd.pid'}",
                    # internal-sftp runs inside sshd: no login shell, so nothing in the user's
                    # shell start-up files (a slow or stuck ~/.bashrc) can hang a session
                    f"Subsystem sftp internal-sftp {sftp_options}".rstrip(),
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )

    @staticmethod
    def _keygen(path: Path) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmvault-test", "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )

    def write_known_hosts(self, key_file: Path | None = None) -> None:
        """known_hosts naming ``key_file`` (default: the real host key) for this host:port."""
        public = Path(f"{key_file or self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {public[0]} {public[1]}\n")

    def url(self, path: str) -> str:
        """An sftp:// URL for ``path`` under :attr:`root`."""
        return f"sftp://{self.user}@{self.host}:{self.port}{self.root / path}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client process: which key and known_hosts to use."""
        return {"VMVAULT_SFTP_KEY": str(self.client_key), "VMVAULT_SFTP_KNOWN_HOSTS": str(self.known_hosts)}

    def open_backend(self, path: str, **options: object) -> object:
        from vmvault.backends.sftp import open_sftp

        defaults: dict[str, object] = {
            "key_filename": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "use_agent": False,
            "look_for_keys": False,
        }
        defaults.update(options)
        return open_sftp(self.url(path), **defaults)

    def _answers(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            return sock.recv(64).startswith(b"SSH-")

    def start(self) -> None:
        # sshd refuses to start without its privilege separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            return self._answers()

        _wait_for(ready, f"sshd on port {self.port}")

    def kill(self) -> None:
        """Kill sshd and every session process under it (as a crash or power cut would)."""
        if self.process is not None and self.process.poll() is None:
            _kill_tree(self.process)
        self.process = None

    def processes(self) -> list[int]:
        """sshd's process and every session process under it, as they are now."""
        return process_tree(self.process.pid) if self.process is not None else []

    def freeze(self, pids: list[int] | None = None) -> None:
        """Hold sshd and every session process (or ``pids``) still (SIGSTOP): a transfer in
        flight stops where it is, so a test can be sure it is in flight when it kills the server."""
        _signal_all(self.processes() if pids is None else pids, signal.SIGSTOP)

    def thaw(self, pids: list[int] | None = None) -> None:
        """Let what ``freeze`` held go on (SIGCONT)."""
        _signal_all(self.processes() if pids is None else pids, signal.SIGCONT)

    def bytes_read(self, pids: list[int] | None = None) -> int:
        """What the session processes (or ``pids``) have read so far, files and sockets (rchar
        of /proc/PID/io; SFTP runs inside them as internal-sftp): a download's progress on the
        server's side is the growth of this figure."""
        total = 0
        for pid in self.processes()[1:] if pids is None else pids:
            try:
                with open(f"/proc/{pid}/io") as fh:
                    fields = dict(line.split(": ") for line in fh.read().splitlines())
            except OSError:
                continue
            total += int(fields["rchar"])
        return total

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()


_MOTO_LAUNCHER = """
import sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import main

host, port, buckets = sys.argv[1], sys.argv[2], sys.argv[3]
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
for spec in filter(None, buckets.split(",")):
    name, _, flag = spec.partition(":")
    bucket = backend.create_bucket(name, "us-east-1")
    if flag == "locked":
        bucket.object_lock_enabled = True
        bucket.versioning_status = "Enabled"
main(["-H", host, "-p", port])
"""


class S3Server:
    """moto's S3 server in its own process on 127.0.0.1 (state lives in memory only).

    moto forgets everything when killed; the ``buckets`` given here are created again inside
    the server process *before* it listens, so that after a restart it looks like a real
    server that kept its buckets (objects and unfinished uploads are still lost, which a
    client must survive anyway). A bucket spec ``NAME:locked`` has Object Lock enabled.
    ``extra_env`` is passed to the server (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` to make it
    check credentials).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        buckets: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        try:
            import flask  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError:
            pytest.skip("moto's server is not installed (pip install 'moto[server]')")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = workdir / "moto.log"
        self.buckets = buckets
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{self.host}:{self.port}/{bucket}/{prefix}".rstrip("/")

    @staticmethod
    def client_env() -> dict[str, str]:
        """Dummy credentials and no user configuration, for the backend and for boto3."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> object:
        """A plain boto3 client for setting up buckets and checking what the server holds."""
        import boto3

        env = self.client_env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def _answers(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as resp:
            return int(resp.status) == 200

    def start(self) -> None:
        env = {**os.environ, **self.client_env(), **self.extra_env}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _MOTO_LAUNCHER, self.host, str(self.port), ",".join(self.buckets)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"moto exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            return self._answers()

        _wait_for(ready, f"moto S3 server on port {self.port}", timeout=60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _kill_tree(self.process)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()


#: an answer rewritten by FaultyHttpProxy.mangle
Mangle = Callable[[str, str, int, list[tuple[str, str]], bytes], tuple[int, list[tuple[str, str]], bytes]]


class FaultyHttpProxy:
    """An HTTP/1.1 proxy in front of a server (moto) that can answer the next requests with an
    S3 error (503 SlowDown, 500 InternalError ...) instead of forwarding them: the server-side
    throttling and failures that a real store produces and moto does not."""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        port: int | None = None,
        receive_buffer: int | None = None,
    ) -> None:
        """``port``: listen there (e.g. the port of a proxy that was stopped, to bring it back);
        ``receive_buffer``: the kernel's receive buffer of each connection (SO_RCVBUF)."""
        import http.client
        import http.server
        import threading

        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.failed = 0
        self.forwarded = 0
        self.truncated = 0
        self._truncations_left = 0
        self._failures_left = 0
        self._ranges_to_ignore = 0
        self._more_next: list[int] = []
        self._trickles_left = 0
        self._trickle_gap = 0.0
        #: the next request bodies taken in slowly: (bytes per second, how many bytes so)
        self._slow_bodies: list[tuple[float, int]] = []
        self._status = 503
        self._code = "SlowDown"
        self._lock = threading.Lock()
        #: rewrites each forwarded answer: (method, path, status, headers, body) -> (status,
        #: headers, body); a HEAD answer's Content-Length is the one among the headers
        self.mangle: Mangle | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                slow = proxy._take_slow_body() if length else None
                if slow is not None:
                    rate, slow_bytes = slow
                    parts, got, started = [], 0, time.monotonic()
                    while got < length:
                        if got < slow_bytes:
                            time.sleep(max(0.0, started + got / rate - time.monotonic()))
                        part = self.rfile.read1(min(16384, length - got))
                        if not part:
                            break
                        parts.append(part)
                        got += len(part)
                    return b"".join(parts)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                failure = proxy._take_failure()
                if failure is not None:
                    status, code = failure
                    answer = (
                        '<?xml version="1.0" encoding="UTF-8"?>'
                        f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
                        "<RequestId>test</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(answer)
                    return
                drop = {"transfer-encoding"} | ({"range"} if proxy._take(ignore_range=True) else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                with proxy._lock:
                    proxy.forwarded += 1
                gap = proxy._take_trickle() if self.command in ("GET", "HEAD") else 0.0
                cut = self.command == "GET" and len(data) > 1 and proxy._take_truncation()
                more = proxy._take(more=True) if self.command == "GET" else 0
                status, answered = response.status, response.getheaders()
                if proxy.mangle is not None:
                    status, answered, data = proxy.mangle(self.command, self.path, status, answered, data)
                self.send_response(status)
                for key, value in answered:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                lengths = [v for k, v in answered if k.lower() == "content-length"]
                length = lengths[0] if self.command == "HEAD" and lengths else None
                self.send_header("Content-Length", length or str(len(data) + more))
                self.end_headers()
                if gap and self.command == "GET":
                    # the body a byte at a time, each well within the client's timeout
                    with contextlib.suppress(OSError):
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(gap)
                    self.close_connection = True
                elif more:
                    # the answer, then ``more`` bytes nobody asked for, until the client hangs up
                    with contextlib.suppress(OSError):
                        self.wfile.write(data)
                        block = bytes(1 << 20)
                        while more > 0:
                            self.wfile.write(block[:more])
                            more -= len(block)
                    self.close_connection = True
                elif cut:
                    # promise the whole body, send half, hang up: a connection dropped mid-read
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        if receive_buffer is not None:  # (connections accepted from now on inherit it)
            self._server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{self.host}:{self.port}/{bucket}/{prefix}".rstrip("/")

    def fail_next(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        with self._lock:
            self._failures_left, self._status, self._code = count, status, code

    def truncate_next(self, count: int) -> None:
        """Cut the body of the next ``count`` GET answers half-way and drop the connection."""
        with self._lock:
            self._truncations_left = count

    def ignore_range_next(self, count: int) -> None:
        """Forward the next ``count`` requests without their Range header: the server answers
        with the whole object, as one that ignores ranges does."""
        with self._lock:
            self._ranges_to_ignore = count

    def send_more_next(self, *extra: int) -> None:
        """Answer the next GETs (one per value) with that many bytes more than the server sent."""
        with self._lock:
            self._more_next = list(extra)

    def slow_bodies_next(self, count: int, rate: float, slow_bytes: int) -> None:
        """Take in the first ``slow_bytes`` of the next ``count`` request bodies at ``rate``
        bytes a second, the rest at once: a slow link (give the proxy a small
        ``receive_buffer``, or the kernel takes in megabytes for it)."""
        with self._lock:
            self._slow_bodies = [(rate, slow_bytes)] * count

    def _take_slow_body(self) -> tuple[float, int] | None:
        with self._lock:
            return self._slow_bodies.pop(0) if self._slow_bodies else None

    def trickle_next(self, count: int, gap: float) -> None:
        """Send the body of the next ``count`` GET answers a byte every ``gap`` seconds."""
        with self._lock:
            self._trickles_left, self._trickle_gap = count, gap

    def _take_trickle(self) -> float:
        with self._lock:
            if self._trickles_left <= 0:
                return 0.0
            self._trickles_left -= 1
            return self._trickle_gap

    def _take(self, *, ignore_range: bool = False, more: bool = False) -> int:
        with self._lock:
            if ignore_range and self._ranges_to_ignore > 0:
                self._ranges_to_ignore -= 1
                return 1
            if more and self._more_next:
                return self._more_next.pop(0)
            return 0

    def _take_truncation(self) -> bool:
        with self._lock:
            if self._truncations_left <= 0:
                return False
            self._truncations_left -= 1
            self.truncated += 1
            return True

    def _take_failure(self) -> tuple[int, str] | None:
        with self._lock:
            if self._failures_left <= 0:
                return None
            self._failures_left -= 1
            self.failed += 1
            return self._status, self._code

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultyHttpProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_sshd(workdir: Path, sftp_options: str = "") -> Iterator[SshServer]:
    server = SshServer(workdir, sftp_options=sftp_options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_s3(
    workdir: Path, buckets: tuple[str, ...] = (), extra_env: dict[str, str] | None = None
) -> Iterator[S3Server]:
    server = S3Server(workdir, buckets=buckets, extra_env=extra_env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def s3_client_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in S3Server.client_env().items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        yield


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One OpenSSH server for the session; tests use distinct directories under its root."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto S3 server for the session, with dummy credentials in the environment."""
    with s3_client_environment(), running_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server
