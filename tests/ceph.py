"""A single-node Ceph cluster with a RADOS Gateway on loopback: a real S3 store for tests.

moto imitates S3 inside one Python process; a user who outgrows one machine puts the
repository on a distributed object store. :class:`CephCluster` starts one from Debian's
packages, as root, entirely inside its own temporary directory:

* its own fsid, configuration file, keyrings, monitor store, OSD data, run and log
  directories (nothing under /etc/ceph, /var/lib/ceph or /var/run/ceph is read or written;
  every command gets ``-c <workdir>/ceph.conf``);
* one monitor (messenger v2 only, on a free loopback port), one OSD on ``memstore`` (objects
  held in the OSD's memory; pools of size 1, no replication warnings), no manager (the
  gateway does not need one), and one ``radosgw`` with the beast front end serving https
  on another free loopback port, with a self-signed certificate made by ``openssl``;
* an S3 user with random keys made by ``radosgw-admin``.

vmvault reaches it as a user reaches a store behind TLS: the location is ``s3://bucket/prefix``
and the environment names the endpoint (``VMVAULT_S3_ENDPOINT=https://127.0.0.1:PORT``) and
the certificate to trust (``AWS_CA_BUNDLE``); see :meth:`CephCluster.client_env`. https
matters: botocore sends request bodies differently over TLS (aws-chunked with a trailing
checksum, unless the checksum is given in a header), and RGW 16 refuses that form.

Every daemon runs in the foreground as a child of the test process, with a parent-death
signal so that it dies with pytest even if pytest itself is killed; :meth:`CephCluster.stop`
kills every process and removes the directory. The gateway alone can be killed and started
again (:meth:`kill_gateway`, :meth:`start_gateway`): its state lives in RADOS, so unlike moto
it keeps buckets, objects and unfinished multipart uploads across a restart.

Starting takes ~10-15 s (mostly the gateway creating its pools), so the pytest fixture
:func:`rgw_cluster` is session-scoped and is started only when a test asks for it; the
function-scoped :func:`rgw` puts the cluster's credentials into the environment for one test
(other S3 tests use moto's dummy credentials, so they cannot be session-wide).

Debian packages: ``ceph-mon``, ``ceph-osd``, ``radosgw`` (with ``ceph-common``: ``ceph``,
``ceph-authtool``, ``monmaptool``, ``radosgw-admin``), ``openssl``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port, process_tree

__all__ = ["CephCluster", "rgw", "rgw_cluster", "running_ceph"]

log = logging.getLogger(__name__)

#: the tools a cluster needs, and the Debian package that brings each
TOOLS = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "radosgw": "radosgw",
    "radosgw-admin": "radosgw",
    "ceph": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-common",
    "openssl": "openssl",
}
GATEWAY = "client.rgw.vmvault"
GiB = 1 << 30
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies, so no daemon outlives pytest."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _random_key(length: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


class CephCluster:
    """One monitor, one memstore OSD and one RADOS Gateway on 127.0.0.1, in ``workdir``."""

    def __init__(self, workdir: Path, osd_bytes: int = 8 * GiB) -> None:
        missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
        if missing:
            pytest.skip(f"Ceph is not installed (apt-get install {' '.join(missing)}; scripts/setup.sh does)")
        if os.geteuid() != 0:
            pytest.skip("the Ceph test cluster is made and tested as root only (as CI runs)")
        self.workdir = workdir
        self.fsid = str(uuid.uuid4())
        self.host = "127.0.0.1"
        self.mon_port = free_port()
        self.port = free_port()
        self.conf = workdir / "ceph.conf"
        self.logs = workdir / "log"
        #: the gateway's self-signed certificate (for 127.0.0.1): what clients must trust
        self.ca_file = workdir / "rgw.crt"
        self._tls_key = workdir / "rgw.key"
        #: S3 credentials of the gateway's user (random per cluster)
        self.access_key = _random_key(20, string.ascii_uppercase + string.digits)
        self.secret_key = _random_key(40, string.ascii_letters + string.digits)
        self.osd_bytes = osd_bytes
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        #: seconds each start phase took, and the whole start ("total")
        self.timings: dict[str, float] = {}

    # --- configuration ------------------------------------------------------------------

    def _write_config(self) -> None:
        d = self.workdir
        key = f"ssl_private_key={self._tls_key}"
        for sub in ("run", "log", "mon", "osd/0", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # every path a daemon or tool would otherwise take from /etc, /var/lib or /var/run
        # is set here; "$name" is the daemon's name (mon.a, osd.0, client.admin, ...)
        self.conf.write_text(
            f"""[global]
fsid = {self.fsid}
mon host = v2:{self.host}:{self.mon_port}
mon initial members = a
public addr = {self.host}
ms bind msgr1 = false
ms bind ipv6 = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {self.logs}/$name.log
keyring = {d}/$name.keyring
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
# one OSD: one copy of everything, and no warnings about it
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false

[mon]
mon data = {d}/mon/$name
# commit map changes (a new pool, an OSD coming up) at once rather than once a second:
# the gateway's first start creates six pools one after the other
paxos propose interval = 0.05
paxos min wait = 0.01

[osd]
osd data = {d}/osd/$id
osd objectstore = memstore
memstore device bytes = {self.osd_bytes}

[{GATEWAY}]
rgw frontends = beast ssl_endpoint={self.host}:{self.port} ssl_certificate={self.ca_file} {key}
rgw data = {d}/rgw
# deleted objects' data is freed after seconds, not hours (the OSD keeps it in memory)
rgw gc obj min wait = 10
rgw gc processor period = 10
"""
        )

    # --- processes ----------------------------------------------------------------------

    def _tool(self, *args: str, timeout: float = 60.0) -> str:
        """Run a Ceph command-line tool against this cluster; its output, or an error naming it."""
        command = [args[0], "-c", str(self.conf), *args[1:]]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"ceph test cluster: {' '.join(args)} did not finish in {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"ceph test cluster: {' '.join(args)} failed with exit code {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done.stdout

    def _authtool(self, *args: str) -> None:
        subprocess.run(["ceph-authtool", *args], check=True, capture_output=True, timeout=30)

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.stderr", "ab") as err:
            self.processes[name] = subprocess.Popen(
                [*args, "-f", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_die_with_parent,
            )

    def _log_tail(self, name: str) -> str:
        parts = []
        for path in (self.logs / f"{name}.stderr", self.logs / f"{name}.log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def _wait(self, name: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"ceph test cluster: {name} exited with {process.returncode}:\n{self._log_tail(name)}"
                )
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ceph test cluster: {name} not ready after {timeout:.0f} s:\n{self._log_tail(name)}"
                )
            time.sleep(0.1)

    def _timed(self, phase: str, step: Callable[[], None]) -> None:
        started = time.monotonic()
        step()
        self.timings[phase] = time.monotonic() - started

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self._write_config()
        self._make_certificate()
        self._timed("monitor", self._start_monitor)
        self._timed("osd", self._start_osd)
        self._timed("gateway", self.start_gateway)
        self._timed("user", self._create_user)
        self.timings["total"] = time.monotonic() - started
        log.info("ceph test cluster up in %.1f s (%s)", self.timings["total"], self.timings)

    def _make_certificate(self) -> None:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
                *("-keyout", str(self._tls_key), "-out", str(self.ca_file), "-days", "30"),
                *("-subj", f"/CN={self.host}", "-addext", f"subjectAltName=IP:{self.host}"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def _start_monitor(self) -> None:
        d = self.workdir
        mon_keyring = d / "mon.a.keyring"
        # every key the cluster needs goes into the monitor's store at mkfs: no "ceph auth"
        # round trips later
        self._authtool("--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        for entity, caps in (
            ("client.admin", ["mon", "allow *", "osd", "allow *", "mgr", "allow *"]),
            ("osd.0", ["mon", "allow profile osd", "osd", "allow *"]),
            (GATEWAY, ["mon", "allow rw", "osd", "allow rwx"]),
        ):
            keyring = d / f"{entity}.keyring"
            cap_args = [arg for i in range(0, len(caps), 2) for arg in ("--cap", caps[i], caps[i + 1])]
            self._authtool("--create-keyring", str(keyring), "--gen-key", "-n", entity, *cap_args)
            self._authtool(str(mon_keyring), "--import-keyring", str(keyring))
        subprocess.run(
            [
                "monmaptool",
                "--create",
                "--addv",
                "a",
                f"[v2:{self.host}:{self.mon_port}]",
                "--fsid",
                self.fsid,
                str(d / "monmap"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring", str(mon_keyring))
        self._spawn("mon.a", "ceph-mon", "-i", "a")
        self._wait("mon.a", lambda: bool(self._tool("ceph", "--connect-timeout", "5", "mon", "stat", timeout=10)), 60)

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._tool("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph test cluster: the new OSD got id {osd_id!r}, expected 0")
        self._tool("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config")

        def up() -> bool:
            dump = json.loads(self._tool("ceph", "osd", "dump", "--format", "json", timeout=20))
            return any(o["osd"] == 0 and o["up"] == 1 for o in dump["osds"])

        self._spawn("osd.0", "ceph-osd", "-i", "0")
        self._wait("osd.0", up, 90)

    def _answers(self) -> bool:
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=2, context=context) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError as exc:
            return exc.code < 500

    def start_gateway(self) -> None:
        """Start radosgw (first start: it creates its pools, ~10 s); return once it answers."""
        self._spawn("rgw", "radosgw", "-n", GATEWAY)
        self._wait("rgw", self._answers, 180)

    def kill_gateway(self) -> None:
        """SIGKILL radosgw, as a crash would; the monitor and OSD (and so the data) stay."""
        self._kill("rgw")

    def admin(self, *args: str) -> str:
        """Run ``radosgw-admin ARGS`` against this cluster (quotas, users, keys); its output."""
        return self._tool("radosgw-admin", *args)

    def _create_user(self) -> None:
        self.admin(
            "user",
            "create",
            "--uid",
            "vmvault",
            "--display-name",
            "vmvault tests",
            "--access-key",
            self.access_key,
            "--secret-key",
            self.secret_key,
        )

    def _kill(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        # collect the tree first: orphans are re-parented and could no longer be found
        for pid in process_tree(process.pid) if process.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)

    def peak_memory(self) -> dict[str, int]:
        """Each running daemon's peak resident memory (VmHWM) in MiB."""
        peaks = {}
        for name, process in self.processes.items():
            with contextlib.suppress(OSError), open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks[name] = int(line.split()[1]) // 1024
        return peaks

    def summary(self) -> str:
        """One line for the test log: how long the start took, and the daemons' memory."""
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k != "total")
        memory = ", ".join(f"{k} {v} MiB" for k, v in self.peak_memory().items())
        return f"ceph test cluster: started in {self.timings.get('total', 0):.1f} s ({phases}); peak memory: {memory}"

    def stop(self) -> None:
        """Kill every daemon (gateway first: it would log the others going away)."""
        for name in ("rgw", *[n for n in self.processes if n != "rgw"]):
            self._kill(name)

    # --- what tests use -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        """A location in ``bucket``; the endpoint comes from :meth:`client_env`."""
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def client_env(self) -> dict[str, str]:
        """The endpoint, the certificate to trust, the gateway user's credentials and no user
        configuration: what vmvault (and boto3) need in the environment."""
        return {
            "VMVAULT_S3_ENDPOINT": self.endpoint,
            "AWS_CA_BUNDLE": str(self.ca_file),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> object:
        """A plain boto3 client as the gateway's user, for setting up and looking behind vmvault."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            verify=str(self.ca_file),
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 3}),
        )

    def create_bucket(self, name: str, object_lock: bool = False) -> None:
        """Create ``name`` unless it exists (with Object Lock: versioned, lockable)."""
        client: Any = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)


@contextlib.contextmanager
def running_ceph(workdir: Path | None = None) -> Iterator[CephCluster]:
    """A started cluster in ``workdir`` (default: a new temporary directory), removed afterwards."""
    # a short path: the daemons' admin sockets must fit in a Unix socket address (108 bytes)
    own = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="vmvault-ceph-")) if workdir is None else workdir
    try:
        cluster = CephCluster(directory)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def rgw_cluster(pytestconfig: pytest.Config) -> Iterator[CephCluster]:
    """One Ceph cluster with a gateway for the whole session, started on first use; its start
    time and memory are printed at the end of the session."""
    with running_ceph() as cluster:
        yield cluster
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            # session fixtures are torn down inside the last test's (captured) teardown
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\n{cluster.summary()}")


@pytest.fixture
def rgw(rgw_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch) -> CephCluster:
    """The session's cluster, with its user's credentials in the environment for this test."""
    for key, value in rgw_cluster.client_env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "VMVAULT_S3_INSECURE"):
        monkeypatch.delenv(key, raising=False)
    return rgw_cluster
