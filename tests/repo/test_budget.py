"""MemoryBudget: waits only while another thread will give bytes back, never deadlocks."""

from __future__ import annotations

import threading
import time

import pytest

from vmvault.repo.budget import MemoryBudget


def test_a_budget_must_hold_something() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(0)


def test_take_waits_for_a_release_and_then_holds() -> None:
    budget = MemoryBudget(100)
    budget.take(80)
    budget.begin_release()
    taken = threading.Event()

    def taker() -> None:
        budget.take(40)
        taken.set()

    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.1)
    assert not taken.is_set()  # 80 + 40 > 100, and 80 will be given back
    budget.end_release(80)
    t.join(5)
    assert taken.is_set()
    assert budget.used == 40
    assert budget.peak == 80


def test_take_does_not_wait_when_nothing_will_be_given_back() -> None:
    budget = MemoryBudget(100)
    budget.charge(90)
    budget.take(40)  # over the limit, but waiting would never end
    assert budget.used == 130
    assert budget.peak == 130
    budget.give(130)
    assert budget.used == 0


def test_room_is_kept_free_for_later_charges() -> None:
    budget = MemoryBudget(100)
    budget.take(50)
    budget.begin_release()
    assert budget.fits(50)
    assert not budget.fits(51)
    done = threading.Event()

    def taker() -> None:
        budget.take(30, room=30)  # 50 + 30 + 30 > 100: waits for the release
        done.set()

    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.1)
    assert not done.is_set()
    budget.end_release(50)
    t.join(5)
    assert done.is_set() and budget.used == 30
