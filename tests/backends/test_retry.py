"""The bounded retry loop shared by the remote backends."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest

from vmvault.backends._retry import RetryPolicy, TransientError, call_with_retry, unreachable_reason
from vmvault.errors import BackendConnectionError, BackendPermissionError

FAST = RetryPolicy(attempts=4, initial_delay=0.001, max_delay=0.004)


class _Wrapping(Exception):
    """Shaped like paramiko's NoValidConnectionsError (``errors``) and botocore's
    EndpointConnectionError (``kwargs["error"]``), or raised ``from`` a cause."""

    def __init__(
        self,
        *,
        errors: dict[Any, BaseException] | None = None,
        kwargs: dict[str, Any] | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__("wrapped")
        if errors is not None:
            self.errors = errors
        if kwargs is not None:
            self.kwargs = kwargs
        self.__cause__ = cause


def transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError)


def test_delays_grow_are_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=7, initial_delay=0.5, max_delay=3.0, multiplier=2.0)
    for _ in range(50):
        delays = list(policy.delays())
        assert len(delays) == 6
        for k, delay in enumerate(delays):
            base = min(3.0, 0.5 * 2.0**k)
            assert 0.75 * base <= delay <= 1.25 * base


def test_policy_needs_one_attempt() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_succeeds_after_transient_failures() -> None:
    calls: list[int] = []
    dropped: list[BaseException] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError(ConnectionResetError("reset by peer"))
        return "ok"

    assert call_with_retry(flaky, policy=FAST, is_transient=transient, describe="x", on_retry=dropped.append) == "ok"
    assert len(calls) == 3
    assert len(dropped) == 2


def test_permanent_error_is_not_retried() -> None:
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise BackendPermissionError("no")

    with pytest.raises(BackendPermissionError):
        call_with_retry(refused, policy=FAST, is_transient=transient, describe="x")
    assert calls == [1]


def test_gives_up_with_a_connection_error_naming_the_cause() -> None:
    calls: list[int] = []

    def dead() -> None:
        calls.append(1)
        raise TransientError(ConnectionRefusedError(111, "Connection refused"))

    with pytest.raises(BackendConnectionError) as info:
        call_with_retry(dead, policy=FAST, is_transient=transient, describe="sftp://h/r: write data/x", name="data/x")
    assert len(calls) == 4
    message = str(info.value)
    assert message.startswith("gave up on sftp://h/r: write data/x after 4 attempts")
    assert "ConnectionRefusedError" in message and "Connection refused" in message
    assert info.value.name == "data/x"
    assert isinstance(info.value.__cause__, TransientError)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (socket.gaierror(-2, "Name or service not known"), "host name not found"),
        (TimeoutError("timed out"), "timed out"),
        # wrapped as the backends see them
        (TransientError(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), "connection refused"),
        (_Wrapping(errors={("127.0.0.1", 22): ConnectionRefusedError(errno.ECONNREFUSED, "x")}), "connection refused"),
        (_Wrapping(kwargs={"error": socket.gaierror(-2, "unknown")}), "host name not found"),
        (_Wrapping(cause=OSError(errno.EHOSTUNREACH, "x")), "no route to host"),
        # reached, then something else went wrong: not "unreachable"
        (ConnectionResetError(errno.ECONNRESET, "reset"), None),
        (EOFError(), None),
        (PermissionError(errno.EACCES, "denied"), None),
    ],
)
def test_unreachable_reason(exc: BaseException, reason: str | None) -> None:
    assert unreachable_reason(exc) == reason
