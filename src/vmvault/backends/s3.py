"""An S3 bucket (AWS, MinIO, Ceph RGW, Backblaze B2, any S3-compatible store).

Location: ``s3://bucket/prefix`` (AWS, the usual endpoint resolution) or
``s3://host:port/bucket/prefix`` (a custom endpoint). The first component is taken as an
endpoint when it carries a port, is ``localhost`` or is an IP address; otherwise it is the
bucket (bucket names may contain dots, so a bare dotted host is not guessed: write its port,
e.g. ``s3://s3.example.com:443/bucket``, or set ``VMVAULT_S3_ENDPOINT``). A custom endpoint
speaks http on loopback or when ``VMVAULT_S3_INSECURE=1``, https otherwise.
``VMVAULT_S3_ENDPOINT`` may be a full URL and wins over the location's host.
Query: ``immutable-days=N`` (Object Lock retention), ``multipart-threshold=BYTES``,
``part-size=BYTES``, ``connections=N``. Credentials come from boto3's usual chain.

Atomic put: an object appears only when its PUT or CompleteMultipartUpload succeeds (S3 API
reference, PutObject and CompleteMultipartUpload), so a reader never sees part of one. A
multipart upload that fails for good is aborted so it does not keep costing storage.

Retries: botocore's "standard" mode retries throttling, 5xx and connection errors with
backoff; on top of that a bounded loop of our own retries connection drops (including a body
that stops half-way) and restarts a multipart upload the server forgot (NoSuchUpload, as
after a server restart). What still fails becomes a ``BackendError`` subclass.

Answers: the storage is not trusted, so no answer is read without bound: an object's data
only as far as ``get`` asked, every other answer (listings, errors) to ``MAX_ANSWER``
(``_bound_answers``), a listing to ``MAX_LISTING`` entries. Nor without end: each wait on
the connection is bounded by the timeout, and a body that has begun must arrive whole within
the timeout plus its length at ``MIN_RATE`` (``_Deadline``), else its connection is shut and
the read retried: a server sending a byte now and then no longer holds a read for ever. A
request body likewise goes out a block at a time, each within the timeout and the whole
within the timeout plus its length at ``MIN_RATE`` (``_PacedBody``).

Checksums: every PutObject and UploadPart carries the body's CRC-32 in the
``x-amz-checksum-crc32`` header, computed here (a multipart upload declares CRC32 when it
is created and lists each part's checksum when it is completed). botocore (1.36 and later) would otherwise
compute it itself and, over https, send it as a trailer after an ``aws-chunked`` body
(``STREAMING-UNSIGNED-PAYLOAD-TRAILER``), which older S3-compatible servers do not parse:
Ceph RGW 16 (Debian 12) answers every such upload with ``400 MissingContentLength``. A
header works everywhere: AWS verifies it (and asks for Content-MD5 or such a header on
uploads with Object Lock parameters); servers that do not know it ignore it.

Object Lock: with ``retention_days`` every put sets ``ObjectLockMode=COMPLIANCE`` and
``ObjectLockRetainUntilDate``; the bucket must have Object Lock enabled (checked at open),
and then ``enforces_immutability`` is True. A delete in such a (versioned) bucket only adds a
delete marker; the locked version stays until its retention ends.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import math
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    BackendPermissionError,
    BackendProtocolError,
    BackendUnreachableError,
    ConfigError,
    ObjectNotFoundError,
    StorageFullError,
    require,
)
from vmvault.waits import alarm

require("boto3", purpose="s3:// repositories")  # and botocore, which boto3 imports

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402
import botocore.parsers  # noqa: E402
import urllib3.exceptions  # noqa: E402
from botocore.awsrequest import AWSResponse  # noqa: E402
from botocore.config import Config  # noqa: E402

from vmvault.backends._retry import RetryPolicy, TransientError, call_with_retry, unreachable_reason  # noqa: E402
from vmvault.backends.base import (  # noqa: E402
    DEFAULT_READS_AT_ONCE,
    FAR_READS_AT_ONCE,
    MAX_LISTING,
    MIN_RATE,
    Backend,
    HiddenObject,
    ObjectInfo,
    is_far,
)

__all__ = ["S3Backend", "open_s3", "parse_s3_location"]

#: botocore's modules that take answers apart (_unreadable_answer)
_PARSING = frozenset(["botocore.parsers", "botocore.handlers"])

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 16 * MiB
#: S3's limits on parts (S3 API reference, UploadPart): 5 MiB minimum except the last, 10,000 parts
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: the largest answer read whole: a listing page (1,000 keys: about 300 KB), an error, any
#: answer but an object's data (which ``get`` reads as far as it asked)
MAX_ANSWER = 8 * MiB
#: the body a whole-object read without a stated length is given time for (at ``MIN_RATE``)
_LARGEST_BODY = 4 << 30

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}
_FULL = {"QuotaExceeded", "XMinioStorageFull", "StorageFull", "InsufficientStorage", "StorageQuotaExceeded"}


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_connection_failure(exc: BaseException) -> bool:
    return isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError
        | ConnectionError,
    )


def _check_range(url: str, name: str, answer: dict[str, Any], offset: int, asked: str) -> None:
    """Refuse the answer to a ranged read that does not start where asked: a server that
    ignores the Range header sends the object from its start (more than asked is never read:
    the caller reads at most ``length`` bytes of the body)."""
    found = str(answer.get("ContentRange") or "")
    start = found[len("bytes ") :].split("-", 1)[0] if found.startswith("bytes ") else ""
    if (found and start != str(offset)) or (not found and offset):
        raise BackendError(
            f"{url}: the server answered a read of {name} ({asked}) with {found or 'the whole object'}: "
            "not the range asked for",
            name=name,
        )


def _check_length(url: str, name: str, answer: dict[str, Any], offset: int, length: int, got: int) -> None:
    """Refuse a ranged read answered with fewer bytes than asked before the object's end: the
    end is where the answer's ``Content-Range`` puts the object's size (or, for a server that
    answered a read from the start with the whole object, its length). A server that sends
    less with a Content-Length to match is otherwise indistinguishable from the end."""
    if got >= length:
        return
    found = str(answer.get("ContentRange") or "")
    stated = found.rpartition("/")[2] if found else str(answer.get("ContentLength", "") if offset == 0 else "")
    if not (stated.isdigit() and offset + got == int(stated)):
        raise BackendProtocolError(
            f"{url}: the server answered a read of {length} bytes of {name} at {offset} with {got} "
            f"({found or 'no Content-Range'}): short before the object's end",
            name=name,
        )


def _unreadable_answer(exc: BaseException) -> bool:
    """Whether ``exc`` says botocore could not take the server's answer apart: XML nested
    deeper than its parser goes (``RecursionError``), a number that is none (``ValueError``; nothing
    of ours raises either inside a call), no XML at all (``ResponseParserError``), or whatever
    Python raises where botocore's parsers and handlers meet a shape they did not expect (a
    listed entry that is text where an object was expected: ``TypeError``; a date no date
    parser reads: ``RuntimeError``), when raised from botocore's code and not from ours."""
    if isinstance(exc, RecursionError | ValueError | botocore.parsers.ResponseParserError):
        return True
    if isinstance(exc, MemoryError):
        return False
    modules = []
    tb = exc.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    return bool(modules) and not modules[-1].startswith("vmvault.") and not _PARSING.isdisjoint(modules)


class _ReadAlready:
    """An answer's body read already, where botocore reads one (``raw.stream()``)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, *_args: Any, **_kwargs: Any) -> Iterator[bytes]:
        yield self.body


def _socket_of(raw: Any) -> Any:
    """The socket under a urllib3 response (where botocore's ``set_socket_timeout`` finds it),
    or None."""
    return getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)


class _Deadline:
    """Shuts the connection of a response down when its body has not been read within
    ``seconds``: each wait on the socket is bounded by the timeout, the whole body here. The read
    then ends (as a dropped connection) and leaving the block says why."""

    def __init__(self, raw: Any, seconds: float, url: str, what: str) -> None:
        self.message = f"{url}: the S3 server sent {what} too slowly (not whole within {seconds:.0f} s); given up"
        sock = _socket_of(raw)
        self._alarm = None if sock is None else alarm(seconds, lambda: _shut(sock))

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
            if self._alarm.fired:
                raise TransientError(BackendConnectionError(self.message)) from exc


def _shut(sock: Any) -> None:
    # the plain socket's shutdown, also under TLS: ``SSLSocket.shutdown`` would drop the TLS
    # state that the reading thread is using
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _PacedBody:
    """A request body (the file-like object botocore makes of an upload's bytes), which
    http.client and urllib3 read and send a block (8 or 16 KiB) at a time, each within the
    timeout (each wait on the socket is): here also the whole within the timeout plus its
    length at ``MIN_RATE``. Past that the next block is refused (``late``) and the request
    fails, so a server that takes a body in a little now and then does not hold an upload for
    ever (it held it as long as each block went within the timeout)."""

    def __init__(self, source: Any, length: int, timeout: float) -> None:
        self._source = source
        self.length = length
        self.seconds = timeout + length / MIN_RATE
        self._deadline: float | None = None
        self.late = False

    def read(self, size: int = -1) -> bytes:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.seconds
        elif now > self._deadline:
            self.late = True
            raise TimeoutError(f"the request body was not taken in within {self.seconds:.0f} s")
        piece: bytes = self._source.read(size)
        return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        self._deadline = None
        position: int = self._source.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._source.tell()
        return position


def _paced(request: Any, timeout: float) -> _PacedBody | None:
    """``request``'s body as a :class:`_PacedBody`, when it is a file-like one of a stated length."""
    body, stated = request.body, request.headers.get("Content-Length", "")
    if body is None or not hasattr(body, "read") or isinstance(body, _PacedBody) or not str(stated).isdigit():
        return None
    return _PacedBody(body, int(stated), timeout)


def _patience(timeout: float, length: int | None, bound: int) -> float:
    """Seconds a body of ``length`` bytes (None: unknown, at most ``bound``) may take."""
    return timeout + (bound if length is None else min(length, bound)) / MIN_RATE


def _bound_answers(client: Any, url: str, timeout: float) -> Any:
    """``client``, made to read no answer body beyond ``MAX_ANSWER`` bytes, except an object's
    data (a successful GetObject), which ``get`` reads only as far as it asked.

    botocore reads every other answer whole into memory before it parses it, however long
    the server makes it: a listing page that never ends would take the host's memory. This
    sends each request itself (through the client's own connection pool, so retries,
    timeouts and TLS stay botocore's) and reads the answer up to the bound."""
    http = client._endpoint.http_session

    def send(request: Any, **_: Any) -> Any:
        streamed = request.stream_output
        request.stream_output = True
        body = request.body
        paced = _paced(request, timeout)
        if paced is not None:
            request.body = paced
        try:
            response = http.send(request)
        except Exception as exc:
            if paced is not None and paced.late:
                raise TransientError(
                    BackendConnectionError(
                        f"{url}: the S3 server took a {paced.length}-byte {request.method} body in too slowly "
                        f"(not whole within {paced.seconds:.0f} s); given up"
                    )
                ) from exc
            raise
        finally:
            request.body = body  # (botocore's own retries rewind it and send it again)
        if streamed and response.status_code < 300:
            return response
        raw, body = response.raw, bytearray()
        stated = response.headers.get("content-length", "")
        seconds = _patience(timeout, int(stated) if stated.isdigit() else None, MAX_ANSWER)
        try:
            with _Deadline(raw, seconds, url, f"its answer to a {request.method} request"):
                for piece in raw.stream(1 << 16):
                    body += piece
                    if len(body) > MAX_ANSWER:
                        raw.close()  # the rest is not read: this connection is not used again
                        raise BackendProtocolError(
                            f"{url}: the S3 server's answer to a {request.method} request is longer than "
                            f"{MAX_ANSWER // MiB} MiB; not read further"
                        )
        except urllib3.exceptions.ReadTimeoutError as exc:  # as botocore's own reading maps them
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=request.url, error=exc) from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise botocore.exceptions.ConnectionClosedError(
                error=exc, request=request, endpoint_url=request.url
            ) from exc
        return AWSResponse(response.url, response.status_code, response.headers, _ReadAlready(bytes(body)))

    client.meta.events.register("before-send.s3", send)
    return client


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_at_most(body: Any, length: int) -> bytes:
    """Up to ``length`` bytes of a response body. botocore checks the body against its
    Content-Length only when a read comes back empty, so a short read is followed by another
    until ``length`` or the end: a connection dropped half-way then raises (and the read is
    retried) instead of passing a truncated answer on as the data."""
    parts: list[bytes] = []
    got = 0
    while got < length:
        piece = body.read(length - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _crc32(data: bytes) -> str:
    """The ``x-amz-checksum-crc32`` value: base64 of the big-endian CRC-32 (S3 API reference,
    "Checking object integrity")."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class S3Backend(Backend):
    """Objects under ``prefix`` in one bucket. See the module docstring for the guarantees."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        retention_days: int | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        connections: int = 16,
        list_page_size: int = 1000,
        retry: RetryPolicy | None = None,
        botocore_attempts: int = 5,
        timeout: float = 60.0,
        session: boto3.session.Session | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("s3: no bucket given (expected s3://[host:port/]bucket/prefix)")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"s3: part size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        if multipart_threshold < part_size:
            raise ConfigError("s3: the multipart threshold must not be smaller than the part size")
        if retention_days is not None and retention_days < 1:
            raise ConfigError("s3: immutable-days must be at least 1")
        if connections < 1:
            raise ConfigError("s3: connections must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.retention_days = retention_days
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.list_page_size = list_page_size
        #: a page of a listing costs what one small read does
        self.names_per_read = list_page_size
        self.connections = connections
        #: whether these credentials may read Object Lock retention (``retention_of``); None:
        #: not asked yet
        self._retention_readable: bool | None = None
        #: the quickest request so far, in seconds, answer read (``prepare_reads``)
        self._quickest_reply = math.inf
        #: found far away by ``prepare_reads``
        self._far = False
        # botocore already retries each request (with its own backoff); this outer loop only
        # adds a few rounds for connections that drop, so the product stays around a minute
        self.retry = retry or RetryPolicy(attempts=4, initial_delay=0.5, max_delay=8.0)
        where = endpoint_url.split("://", 1)[-1] + "/" if endpoint_url else ""
        self.timeout = timeout
        self.url = f"s3://{where}{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        session = session or boto3.session.Session()
        config = Config(
            # botocore's own backoff for throttling (SlowDown, 503) and 5xx answers
            retries={"mode": "standard", "total_max_attempts": botocore_attempts},
            # one pooled HTTP connection per concurrent request: uploads + a few reads
            max_pool_connections=connections,
            connect_timeout=timeout,
            read_timeout=timeout,
            # custom endpoints (MinIO, RGW, moto) rarely have wildcard DNS for virtual hosts
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        region_name = region or session.region_name or ("us-east-1" if endpoint_url else None)
        self._client: Any = _bound_answers(
            session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config), self.url, timeout
        )
        #: a client whose requests go out once, without botocore's retries
        self._single_attempt: Callable[[], Any] = lambda: _bound_answers(
            session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region_name,
                config=config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1})),
            ),
            self.url,
            timeout,
        )
        # the first request goes out once: a server that cannot be reached at all (refused, no
        # route, unknown name) is reported at once, not after a minute
        self._check_bucket(present=self._probe(self._single_attempt()))
        self.enforces_immutability = retention_days is not None

    # --- calls and errors --------------------------------------------------------------

    def _call(self, describe: str, name: str | None, op: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                sent = time.monotonic()
                out = op()
                self._quickest_reply = min(self._quickest_reply, time.monotonic() - sent)
                return out
            except botocore.exceptions.ClientError as exc:
                raise self._translate(exc, describe, name) from exc
            except (
                botocore.exceptions.NoCredentialsError,
                botocore.exceptions.PartialCredentialsError,
                botocore.exceptions.CredentialRetrievalError,
            ) as exc:
                raise BackendPermissionError(
                    f"{self.url}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the host an instance role",
                    name=name,
                ) from exc
            except botocore.exceptions.FlexibleChecksumError as exc:
                # the body does not match the checksum S3 stored with it: changed on the way
                # (read again) or by the server (refused after the retries)
                raise TransientError(exc) from exc
            except Exception as exc:
                if _is_connection_failure(exc):
                    raise TransientError(exc) from exc
                if not _unreadable_answer(exc):
                    raise
                raise BackendProtocolError(
                    f"{self.url}: the S3 server's answer to {describe} cannot be read ({type(exc).__name__}: "
                    f"{str(exc)[:120]})",
                    name=name,
                ) from None

        return call_with_retry(
            attempt,
            policy=self.retry,
            is_transient=lambda exc: isinstance(exc, TransientError),
            describe=f"{self.url}: {describe}",
            on_retry=lambda _exc: self.requests.retried(),
            name=name,
        )

    def _translate(self, exc: botocore.exceptions.ClientError, describe: str, name: str | None) -> BackendError:
        code, status = _code(exc), _status(exc)
        message = exc.response.get("Error", {}).get("Message") or code
        if code in _NOT_FOUND:
            return ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
        if code == "NoSuchBucket":
            return BackendError(f"{self.url}: the bucket {self.bucket} does not exist", name=name)
        # before the 403 test: Ceph RGW answers a full quota with 403 QuotaExceeded
        if code in _FULL or status == 507:
            return StorageFullError(f"{self.url}: the storage is full or over quota ({describe})", name=name)
        if code in _DENIED or status == 403:
            return BackendPermissionError(
                f"{self.url}: access denied to {describe} ({code}: {message}); check the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy",
                name=name,
            )
        if status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
            return BackendConnectionError(
                f"{self.url}: the server kept failing to {describe} after retries ({code}: {message})", name=name
            )
        return BackendError(f"{self.url}: cannot {describe} ({code}: {message})", name=name)

    def _probe(self, client: Any) -> bool:
        """True when the bucket answered; raise ``BackendUnreachableError`` when the endpoint
        cannot be connected to; any other outcome is left to ``_check_bucket`` and its retries."""
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except botocore.exceptions.EndpointConnectionError as exc:
            reason = unreachable_reason(exc) or "no connection"
            where = self.endpoint_url or "the S3 endpoint"
            raise BackendUnreachableError(
                f"{self.url}: cannot connect to {where} ({reason}); check the endpoint's host name "
                "and port, and that the server is running"
            ) from exc
        except Exception:
            return False
        finally:
            client.close()

    def _check_bucket(self, *, present: bool = False) -> None:
        """That the bucket exists (unless ``present``: the probe saw it, one round trip less to
        a store far away) and, with ``retention_days``, has Object Lock."""
        try:
            if not present:
                self._call("open the bucket", None, lambda: self._client.head_bucket(Bucket=self.bucket))
        except ObjectNotFoundError as exc:
            # HeadBucket answers a bare 404 for a missing bucket
            raise BackendError(
                f"{self.url}: the bucket {self.bucket} does not exist"
                + (f" at {self.endpoint_url}" if self.endpoint_url else "")
                + f"; create it first (for example: aws s3 mb s3://{self.bucket})"
            ) from exc
        if self.retention_days is None:
            return
        try:
            lock = self._call(
                "read the bucket's Object Lock configuration",
                None,
                lambda: self._client.get_object_lock_configuration(Bucket=self.bucket),
            )
            enabled = lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except BackendPermissionError:
            raise
        except BackendError:
            enabled = False
        if not enabled:
            raise ConfigError(
                f"{self.url}: immutable-days={self.retention_days} needs a bucket with Object Lock enabled, "
                f"and {self.bucket} has none (Object Lock can only be chosen when a bucket is created)"
            )

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def use_retention(self, days: int) -> bool:
        """Give every later data, index and snapshot object ``days`` of COMPLIANCE retention
        (the repository's ``immutable_days``); False, and nothing changes, when the bucket
        has no Object Lock (then retention is only advisory: the client declines deletes)."""
        if self.retention_days is not None:
            return True
        try:
            self.retention_days = days
            self._check_bucket()
        except ConfigError:
            self.retention_days = None
            return False
        self.enforces_immutability = True
        return True

    def _lock_args(self, name: str) -> dict[str, Any]:
        # locks must be deletable (and are rewritten every few minutes), keys must be
        # removable when a passphrase leaks, and hosts' status records are replaced as they
        # report: none of them gets retention
        if self.retention_days is None or name.startswith(("locks/", "keys/", "status/")):
            return {}
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.retention_days)
        return {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}

    # --- the Backend interface -----------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        self.requests.count("put", written=len(data))
        key = self._key(name)
        if len(data) <= self.multipart_threshold:
            body = bytes(data)
            checksum = _crc32(body)
            self._call(
                f"write {name}",
                name,
                lambda: self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ChecksumAlgorithm="CRC32",
                    ChecksumCRC32=checksum,
                    **self._lock_args(name),
                ),
            )
            return
        self._put_multipart(name, key, data)

    def _part_size_for(self, size: int) -> int:
        part = self.part_size
        while -(-size // part) > MAX_PARTS:
            part *= 2
        return part

    def _put_multipart(self, name: str, key: str, data: bytes) -> None:
        view = memoryview(data)
        part_size = self._part_size_for(len(data))
        # A server that restarts may forget unfinished uploads: it answers NoSuchUpload (AWS)
        # or an internal error (others). After a connection failure or such an answer the
        # upload is started again from the first part, a bounded number of times.
        last: BackendError | None = None
        for _round in range(3):
            created = self._call(
                f"start the upload of {name}",
                name,
                lambda: self._client.create_multipart_upload(
                    Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32", **self._lock_args(name)
                ),
            )
            upload_id: str = created["UploadId"]
            try:
                self._upload_parts(name, key, upload_id, view, part_size)
                return
            except BackendError as exc:
                self._abort(key, upload_id)
                lost = isinstance(exc.__cause__, botocore.exceptions.ClientError) and (
                    _code(exc.__cause__) == "NoSuchUpload"
                )
                if not (lost or isinstance(exc, BackendConnectionError)):
                    raise
                last = exc
            except BaseException:
                self._abort(key, upload_id)
                raise
        assert last is not None
        raise last

    def _upload_parts(self, name: str, key: str, upload_id: str, view: memoryview, part_size: int) -> None:
        parts = []
        for number, start in enumerate(range(0, len(view), part_size), start=1):
            body = bytes(view[start : start + part_size])
            checksum = _crc32(body)

            def send(number: int = number, body: bytes = body, checksum: str = checksum) -> Any:
                return self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumAlgorithm="CRC32",
                    ChecksumCRC32=checksum,
                )

            answer = self._call(f"upload part {number} of {name}", name, send)
            # an upload created with a checksum algorithm must name each part's checksum
            parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": checksum})
        done = self._call(
            f"complete the upload of {name}",
            name,
            lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
        if self.retention_days is not None:
            self._ensure_retention(name, key, done.get("VersionId"))

    def _ensure_retention(self, name: str, key: str, version: str | None) -> None:
        """Some S3-compatible servers ignore the lock headers of CreateMultipartUpload; check the
        finished object and set its retention explicitly (PutObjectRetention) when missing."""
        version_args = {"VersionId": version} if version else {}
        head = self._call(
            f"check the retention of {name}",
            name,
            lambda: self._client.head_object(Bucket=self.bucket, Key=key, **version_args),
        )
        if head.get("ObjectLockMode") == "COMPLIANCE":
            return
        self._put_retention(name, key, self._lock_args(name)["ObjectLockRetainUntilDate"], version_args)

    def _put_retention(self, name: str, key: str, until: datetime.datetime, version_args: dict[str, str]) -> None:
        self._call(
            f"set the retention of {name}",
            name,
            lambda: self._client.put_object_retention(
                Bucket=self.bucket,
                Key=key,
                Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until},
                **version_args,
            ),
        )

    def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: the parts of a failed upload cost storage until aborted (or a lifecycle
        rule removes them); a dead server cannot be asked, so errors here are swallowed."""
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.requests.count("get")
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        key = self._key(name)
        if length == 0:
            if not self.exists(name):
                raise ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{last}"

        def op() -> bytes:
            try:
                answer = self._client.get_object(**args)
            except botocore.exceptions.ClientError as exc:
                # a range that starts at or past the end (also of an empty object) is a 416
                if _code(exc) == "InvalidRange" or _status(exc) == 416:
                    self._past_the_end(name, key, offset, exc)
                    return b""
                raise
            # read inside the retried call: a body that stops half-way is retried whole
            body = answer["Body"]
            stated = answer.get("ContentLength")
            seconds = _patience(self.timeout, length if length is not None else stated, _LARGEST_BODY)
            try:
                with _Deadline(getattr(body, "_raw_stream", None), seconds, self.url, f"{name}"):
                    if "Range" in args:
                        _check_range(self.url, name, answer, offset, args["Range"])
                    # never more than asked, whatever the server sends: the storage does not
                    # decide how much memory a read takes
                    if length is None:
                        return bytes(body.read())
                    data = _read_at_most(body, length)
                    _check_length(self.url, name, answer, offset, length, len(data))
                    return data
            finally:
                body.close()

        return self.requests.read(self._call(f"read {name}", name, op))

    def _past_the_end(self, name: str, key: str, offset: int, exc: botocore.exceptions.ClientError) -> None:
        """That a read refused as out of range (416) starts at or past the object's end: the
        size the refusal states (S3's ``ActualObjectSize``), else the object's own (HeadObject).
        A server refusing a range inside the object would pass "no bytes here" on as the end."""
        stated = str(exc.response.get("Error", {}).get("ActualObjectSize") or "")
        if stated.isdigit():
            size = int(stated)
        else:
            self.requests.count("stat")
            head = self._client.head_object(Bucket=self.bucket, Key=key)
            size = head.get("ContentLength")
            if not isinstance(size, int):
                raise BackendProtocolError(f"{self.url}: the S3 server states no size of {name}", name=name)
        if offset < size:
            raise BackendProtocolError(
                f"{self.url}: the server refused a read of {name} at {offset} as out of range, "
                f"yet the object holds {size} bytes",
                name=name,
            )

    def exists(self, name: str) -> bool:
        self.requests.count("stat")
        key = self._key(name)
        try:
            self._call(f"look up {name}", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFoundError:
            return False
        return True

    def _listing(self, prefix: str) -> tuple[str, int]:
        """The key prefix a listing of ``prefix`` asks for, and how much of each key to strip."""
        self.requests.count("list")
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"bad prefix {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        return full, len(self.prefix) + 1 if self.prefix else 0

    def _check_listed(self, item: Any, full: str, needed: str, fits: Callable[[Any], bool]) -> None:
        """That a listing's ``item`` is an object under ``full`` whose ``needed`` field ``fits``,
        as S3 lists them; a server that lists anything else is refused, not followed into a
        KeyError."""
        key = item.get("Key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key.startswith(full) or not fits(item.get(needed)):
            raise BackendProtocolError(
                f"{self.url}: the S3 server listed an entry that is no object under {full!r}: {str(item)[:200]}"
            )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full, strip = self._listing(prefix)

        def op() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    if len(found) >= MAX_LISTING:
                        raise BackendProtocolError(
                            f"{self.url}: the S3 server listed more than {MAX_LISTING} objects under {full!r}"
                        )
                    self._check_listed(item, full, "Size", _is_size)
                    written = item.get("LastModified")
                    found.append(
                        ObjectInfo(
                            item["Key"][strip:],
                            int(item["Size"]),
                            str(item.get("ETag", "")),
                            written.timestamp() if isinstance(written, datetime.datetime) else None,
                        )
                    )
            return sorted(found, key=lambda o: o.name)

        yield from self._call(f"list {prefix or 'everything'}", None, op)

    def modified(self, name: str) -> float | None:
        self.requests.count("stat")
        key = self._key(name)
        try:
            head = self._call(f"look up {name}", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFoundError:
            return None
        stamp = head.get("LastModified")
        return stamp.timestamp() if isinstance(stamp, datetime.datetime) else None

    def retention_of(self, name: str, version: str | None = None) -> float | None:
        """The end of ``name``'s COMPLIANCE retention, from HeadObject's ``ObjectLockMode`` and
        ``ObjectLockRetainUntilDate``. GOVERNANCE retention counts as none: whoever may bypass
        it can delete the object, and vmvault never sets it.

        S3 leaves those headers out for a caller without ``s3:GetObjectRetention`` (HeadObject,
        Amazon S3 API Reference), which would read as "unlocked": the first object that looks
        unlocked is asked about once more with GetObjectRetention, and a refusal there is a
        BackendPermissionError saying so (then and for every later object). Any other answer
        (none found, a retention, a server that cannot answer it) vouches for the headers."""
        self.requests.count("stat")
        key = self._key(name)
        which = {"VersionId": version} if version else {}
        head = self._call(
            f"look up {name}", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key, **which)
        )
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") == "COMPLIANCE" and isinstance(until, datetime.datetime):
            return until.timestamp()
        if self._retention_readable is None:
            self._retention_readable = self._may_read_retention(key)
        if not self._retention_readable:
            raise BackendPermissionError(
                f"{self.url}: these credentials may not read the objects' Object Lock retention "
                "(s3:GetObjectRetention), so whether the storage holds them locked cannot be told",
                name=name,
            )
        return None

    def _may_read_retention(self, key: str) -> bool:
        """Whether GetObjectRetention on ``key`` is allowed: asked once, never retried."""
        client = self._single_attempt()
        try:
            client.get_object_retention(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            return not (_code(exc) in _DENIED or _status(exc) == 403)
        except Exception:  # only a refusal says no: after anything else the headers are taken as read
            return True
        finally:
            client.close()
        return True

    def hidden(self, prefix: str) -> Iterator[HiddenObject]:
        """ListObjectVersions: each key whose latest entry (``IsLatest``) is a delete marker and
        that still has a version; its newest version, and the markers written since."""
        full, strip = self._listing(prefix)

        def op() -> list[HiddenObject]:
            # per key: whether its latest entry is a delete marker, its versions newest first
            # (the order S3 lists them in), its delete markers; a key's entries may span pages
            latest_is_marker: dict[str, bool] = {}
            versions: dict[str, list[tuple[float, str]]] = {}
            markers: dict[str, list[tuple[float, str]]] = {}
            entries = 0
            for page in self._client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size}
            ):
                for is_marker, items in ((True, page.get("DeleteMarkers", [])), (False, page.get("Versions", []))):
                    for item in items:
                        entries += 1
                        if entries > MAX_LISTING:
                            raise BackendProtocolError(
                                f"{self.url}: the S3 server listed more than {MAX_LISTING} versions under {full!r}"
                            )
                        self._check_listed(item, full, "VersionId", lambda v: isinstance(v, str))
                        key = str(item["Key"])
                        when = item.get("LastModified")
                        entry = (
                            when.timestamp() if isinstance(when, datetime.datetime) else 0.0,
                            str(item["VersionId"]),
                        )
                        (markers if is_marker else versions).setdefault(key, []).append(entry)
                        if item.get("IsLatest"):
                            latest_is_marker[key] = is_marker
            found = []
            for key, is_marker in latest_is_marker.items():
                kept = versions.get(key)
                if not is_marker or not kept:
                    continue
                written, version = kept[0]
                # the markers above it (a marker of the same second counts: deletes follow writes);
                # never an id the listing also gives as a version: only markers are ever removed
                ids = {v for _, v in kept}
                above = sorted((m for m in markers[key] if m[0] >= written and m[1] not in ids), reverse=True)
                found.append(HiddenObject(key[strip:], version, written, tuple(v for _, v in above)))
            return sorted(found, key=lambda h: h.name)

        yield from self._call(f"list the versions of {prefix or 'everything'}", None, op)

    def unhide(self, hidden: HiddenObject) -> bool:
        """DeleteObject of each delete marker above the kept version (needs
        ``s3:DeleteObjectVersion``): the kept version is the current one again."""
        key = self._key(hidden.name)
        for marker in hidden.markers:
            self.requests.count("delete")

            def remove(marker: str = marker) -> Any:
                return self._client.delete_object(Bucket=self.bucket, Key=key, VersionId=marker)

            self._call(f"remove a delete marker of {hidden.name}", hidden.name, remove)
        return True

    def retain(self, name: str, until: float) -> bool:
        """PutObjectRetention (COMPLIANCE) on the current version of ``name``; False, and
        nothing asked, where the bucket has no Object Lock."""
        if not self.enforces_immutability:
            return False
        when = datetime.datetime.fromtimestamp(math.ceil(until), datetime.UTC)
        self._put_retention(name, self._key(name), when, {})
        return True

    def delete(self, name: str) -> None:
        self.requests.count("delete")
        key = self._key(name)
        # DeleteObject of a missing key succeeds (204), as the contract wants
        self._call(f"delete {name}", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def prepare_reads(self) -> int:
        """``FAR_READS_AT_ONCE`` ranged GETs at once from a store whose quickest answer so far
        took ``base.FAR_ROUND_TRIP`` or more (a cloud store; Ceph RGW's answers took 44 ms even
        over loopback), else 4 (moto over loopback: 2 ms); never more than ``connections``.
        30 ms away 8 restored the 1 GiB test image in 1.6 s against 2.0 s with 4 (16 were no
        faster); over loopback 8 were no faster than 4. Once far, always far: a store's answers
        vary (RGW's now and then came quicker), and a count asked again never goes down."""
        self._far = self._far or is_far(self._quickest_reply)
        return min(FAR_READS_AT_ONCE if self._far else DEFAULT_READS_AT_ONCE, self.connections)

    def close(self) -> None:
        self._client.close()


def _int_option(query: dict[str, list[str]], key: str, url: str) -> int | None:
    if key not in query:
        return None
    try:
        return int(query[key][0])
    except ValueError as exc:
        raise ConfigError(f"{key} must be a whole number in {url!r}") from exc


def parse_s3_location(url: str) -> tuple[str, str, dict[str, Any]]:
    """``(bucket, prefix, settings)`` for an s3:// location and the environment, without
    contacting anything; ``settings`` are keyword arguments for :class:`S3Backend`."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"not an S3 location: {url!r} (expected s3://[host:port/]bucket/prefix)")
    if parts.username or parts.password:
        raise ConfigError("s3: credentials do not belong in the URL; use AWS_ACCESS_KEY_ID or AWS_PROFILE")
    first = parts.netloc
    path = [p for p in unquote(parts.path).split("/") if p]
    host = first.rsplit(":", 1)[0] if ":" in first and not first.endswith("]") else first
    env_endpoint = os.environ.get("VMVAULT_S3_ENDPOINT")
    endpoint: str | None = None
    if ":" in first or host == "localhost" or _is_ip(host):
        if not path:
            raise ConfigError(f"no bucket in {url!r} (expected s3://{first}/bucket/prefix)")
        insecure = _is_loopback(host) or os.environ.get("VMVAULT_S3_INSECURE") == "1"
        endpoint = f"{'http' if insecure else 'https'}://{first}"
        bucket, rest = path[0], path[1:]
    else:
        bucket, rest = first, path
    if env_endpoint:
        endpoint = env_endpoint if "://" in env_endpoint else f"https://{env_endpoint}"
    query = parse_qs(parts.query)
    known = {"immutable-days", "multipart-threshold", "part-size", "connections"}
    unknown = set(query) - known
    if unknown:
        raise ConfigError(f"unknown S3 option(s) {', '.join(sorted(unknown))} in {url!r}")
    settings: dict[str, Any] = {"endpoint_url": endpoint}
    for key, arg in (
        ("immutable-days", "retention_days"),
        ("multipart-threshold", "multipart_threshold"),
        ("part-size", "part_size"),
        ("connections", "connections"),
    ):
        value = _int_option(query, key, url)
        if value is not None:
            settings[arg] = value
    return bucket, "/".join(rest), settings


def open_s3(url: str, **options: Any) -> S3Backend:
    """Open ``s3://[host:port/]bucket/prefix[?immutable-days=N&multipart-threshold=B&part-size=B]``.

    ``options`` go to :class:`S3Backend` and override what the URL and environment say.
    """
    bucket, prefix, settings = parse_s3_location(url)
    settings.update(options)
    return S3Backend(bucket, prefix, **settings)
