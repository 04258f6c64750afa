"""The bounded retry loop shared by the remote backends."""

from __future__ import annotations

import pytest

from vmvault.backends._retry import RetryPolicy, TransientError, call_with_retry
from vmvault.errors import BackendConnectionError, BackendPermissionError

FAST = RetryPolicy(attempts=4, initial_delay=0.001, max_delay=0.004)


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
