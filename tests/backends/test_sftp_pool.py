"""The SFTP backend's connection pool: connections opened ahead (``warm``) and on demand.

A stand-in factory counts the connections that exist at once, so that the pool's bound holds
whatever order warm-ups and callers meet in; tests/backends/test_sftp.py checks the same
against a real OpenSSH server."""

from __future__ import annotations

import random
import threading
import time

import pytest

from vmvault.backends.sftp import _Pool
from vmvault.errors import BackendUnreachableError


class FakeConnection:
    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with self.factory.lock:
                self.factory.existing -= 1


class Factory:
    """Opens connections after ``delay`` seconds (below 0: a random time up to -``delay``);
    counts the ones that exist and the most at once."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()
        self.existing = 0
        self.most = 0
        self.calls = 0

    def __call__(self) -> FakeConnection:
        with self.lock:
            self.calls += 1
        time.sleep(-self.delay * random.random() if self.delay < 0 else self.delay)
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.existing += 1
            self.most = max(self.most, self.existing)
        return FakeConnection(self)


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_warm_opens_the_missing_connections_in_the_background() -> None:
    factory = Factory(delay=0.2)
    pool = _Pool(factory, 3)  # type: ignore[arg-type]
    started = time.monotonic()
    pool.warm()
    assert time.monotonic() - started < 0.1, "warm must not wait for the connections"
    wait_for(lambda: factory.existing == 3)
    pool.warm()  # nothing is missing: nothing more is opened
    with pool.connection(), pool.connection(), pool.connection():
        pass
    assert factory.calls == 3 and factory.most == 3
    pool.close()
    assert factory.existing == 0


def test_a_caller_waits_for_a_connection_being_opened_instead_of_opening_another() -> None:
    factory = Factory(delay=0.5)
    pool = _Pool(factory, 2)  # type: ignore[arg-type]
    pool.warm()
    started = time.monotonic()
    with pool.connection():
        waited = time.monotonic() - started
    # one opening, not two after each other, and no third connection
    assert 0.4 < waited < 0.9
    wait_for(lambda: factory.existing == 2)
    assert factory.calls == 2
    pool.close()


def test_the_bound_holds_whatever_the_order() -> None:
    """Callers and warm-ups racing, connections opening in random times: never more than the
    pool's size exist, and every caller gets one of its own."""
    for round_ in range(20):
        random.seed(round_)
        factory = Factory(delay=-0.02)
        pool = _Pool(factory, 3)  # type: ignore[arg-type]
        held: set[int] = set()
        errors: list[BaseException] = []
        lock = threading.Lock()

        def use(
            pool: _Pool = pool, held: set[int] = held, lock: threading.Lock = lock, errors: list[BaseException] = errors
        ) -> None:
            try:
                time.sleep(random.random() * 0.02)
                with pool.connection() as conn:
                    with lock:
                        assert id(conn) not in held, "a connection handed to two callers at once"
                        held.add(id(conn))
                    time.sleep(random.random() * 0.01)
                    with lock:
                        held.remove(id(conn))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=use) for _ in range(8)]
        threads.append(threading.Thread(target=pool.warm))
        for t in threads:
            t.start()
        pool.warm()
        for t in threads:
            t.join(timeout=10)
            assert not t.is_alive()
        assert not errors, errors
        assert factory.most <= 3, f"round {round_}: {factory.most} connections at once"
        pool.close()
        wait_for(lambda factory=factory: factory.existing == 0)


def test_a_failed_opening_is_the_failure_of_the_caller_that_waited_for_it() -> None:
    """A server that cannot be reached costs one wait for the timeout, not a second one by the
    caller after the warm-ups gave up."""
    refused = BackendUnreachableError("sftp://host/repo: cannot connect (timed out)")
    factory = Factory(delay=0.5, fail=refused)
    pool = _Pool(factory, 2)  # type: ignore[arg-type]
    pool.warm()
    started = time.monotonic()
    with pytest.raises(BackendUnreachableError) as caught, pool.connection():
        pass
    assert caught.value is refused
    assert time.monotonic() - started < 0.9
    assert factory.calls == 2  # the two warm-ups; the caller opened nothing of its own
    pool.close()


def test_failures_nobody_waited_for_do_not_stand_for_later_attempts() -> None:
    factory = Factory(fail=BackendUnreachableError("down"))
    pool = _Pool(factory, 2)  # type: ignore[arg-type]
    pool.warm()
    wait_for(lambda: factory.calls == 2 and not pool._opening)
    factory.fail = None  # the server came back
    with pool.connection() as conn:
        assert conn.alive()
    assert factory.calls == 3
    pool.close()


def test_connections_opened_after_close_are_closed() -> None:
    factory = Factory(delay=0.2)
    pool = _Pool(factory, 3)  # type: ignore[arg-type]
    pool.warm()
    pool.close()
    wait_for(lambda: factory.calls == 3)
    # each opening ends by closing what it opened (a fixed wait was too short on a busy machine)
    wait_for(lambda: not pool._opening and factory.existing == 0)
    pool.warm()  # a closed pool opens nothing ahead
    time.sleep(0.05)
    assert factory.calls == 3


def test_grow_raises_the_bound_opens_the_new_connections_and_frees_a_waiting_caller() -> None:
    factory = Factory()
    pool = _Pool(factory, 2)  # type: ignore[arg-type]
    entered = threading.Event()
    release = threading.Event()

    def third() -> None:
        with pool.connection():
            entered.set()
            release.wait(5)

    with pool.connection(), pool.connection():
        waiting = threading.Thread(target=third)
        waiting.start()
        assert not entered.wait(0.2), "a third caller must wait while the pool holds two"
        pool.grow(1)  # a pool never shrinks
        assert pool.size == 2 and not entered.wait(0.1)
        pool.grow(4)
        assert pool.size == 4
        assert entered.wait(5), "the waiting caller gets a connection once the pool may hold more"
        # the fourth is opened ahead
        wait_for(lambda: factory.existing == 4)
        release.set()
        waiting.join(5)
    assert factory.calls == 4 and factory.most == 4
    pool.close()
    assert factory.existing == 0


def test_close_closes_the_idle_connections_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each close waits for the server (a round trip): four of 0.2 s each take about 0.2 s."""
    factory = Factory()
    pool = _Pool(factory, 4)  # type: ignore[arg-type]
    pool.warm()
    wait_for(lambda: factory.existing == 4)
    quick_close = FakeConnection.close

    def close(self: FakeConnection) -> None:
        time.sleep(0.2)
        quick_close(self)

    monkeypatch.setattr(FakeConnection, "close", close)
    started = time.monotonic()
    pool.close()
    took = time.monotonic() - started
    assert factory.existing == 0
    assert took < 0.6, f"closing four took {took:.2f} s"


def test_places_grow_adds_that_the_server_refuses_are_given_up_without_failing_anyone() -> None:
    """A server that takes 3 connections (a limit per user): the pool grown from 2 to 6 gives
    up the places it cannot fill, and the callers waiting for them go on with the connections
    there are instead of getting the refusal."""
    refused = BackendUnreachableError("too many connections")
    factory = Factory(delay=0.05)
    limit = 3
    admitted = [0]  # connections the server let in (it never closes one here)

    def limited() -> FakeConnection:
        with factory.lock:
            full = admitted[0] >= limit
            admitted[0] += not full
        if full:
            time.sleep(0.05)
            raise refused
        return factory()

    pool = _Pool(limited, 2)  # type: ignore[arg-type]
    pool.warm()
    wait_for(lambda: factory.existing == 2)
    pool.grow(6)
    results: list[object] = []

    def use() -> None:
        try:
            with pool.connection() as conn:
                time.sleep(0.05)
                results.append(conn)
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and not [r for r in results if isinstance(r, BaseException)], results
    assert factory.most == limit
    assert pool.size == limit
    pool.close()
    assert factory.existing == 0
