"""A QEMU whose QMP answers are changed by their structure on the way to vmvault (replies,
error replies and events; tests/conftest.py ``mutate_json``), as a QEMU taken over by its guest
could answer. Each backup session, opened, read and completed against a real QEMU (TCG), must
end with a ``VmvaultError`` or succeed, never another exception, and let go of the QMP socket
(QEMU serves one client at a time): the next round connects again. Seeded.

A campaign of a few hundred sessions found: replies followed into KeyError and TypeError (one
in the teardown left the connection open, so that every later session was refused); error
replies and events whose inner object was not one. Replies are now read against the QAPI
schema's shapes (``vmvault.hypervisors._qmp.REPLIES``).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CAMPAIGN_SCALE, JSON_VALUES, RANDOM_EXAMPLES, mutate_json
from tests.hypervisors.qemu_vm import DiskSpec, MiB, QemuVM, make_vm
from vmvault.errors import VmvaultError
from vmvault.hypervisors import _qmp
from vmvault.hypervisors.qemu import QemuSource

__all__ = ["make_vm"]

pytestmark = pytest.mark.integration

ROUNDS = 30 * CAMPAIGN_SCALE
SEED = int(os.environ.get("VMVAULT_QMP_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if RANDOM_EXAMPLES else 1
)


def test_changed_qmp_answers_end_a_session_with_an_error_and_free_the_socket(
    make_vm: Callable[..., QemuVM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 8 * MiB)])
    vm.write("vda", 0, MiB, 0xA1)
    rng = random.Random(SEED)
    received = _qmp._JsonLineSocket._recv
    at = {"message": 0, "changed": 0}

    def recv(self: _qmp._JsonLineSocket, deadline: float) -> dict[str, Any]:
        message = received(self, deadline)
        if self.path != vm.vmvault_sock:
            return message
        at["message"] += 1
        if at["message"] != at["changed"]:
            return message
        if rng.random() < 0.1:
            changed: Any = {"return": copy.deepcopy(rng.choice(JSON_VALUES))}
        else:
            changed = mutate_json(copy.deepcopy(message), rng)
        if not isinstance(changed, dict):  # the line itself is always an object (_recv checks)
            return message
        if "id" in message:  # an answer to another id is waited past: not what this test is after
            changed["id"] = message["id"]
        return changed

    monkeypatch.setattr(_qmp._JsonLineSocket, "_recv", recv)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = QemuSource(f"{vm.location}?scratch={scratch}", timeout=5.0)
    outcomes = {"completed": 0, "refused": 0}
    for round_ in range(ROUNDS):
        at.update(message=0, changed=rng.randint(1, 45))
        try:
            with source.open_session(None) as session:
                for disk in session.disks:
                    disk.image.read(0, 65536)
                session.complete(f"snap{round_}")
            outcomes["completed"] += 1
        except VmvaultError as exc:
            held = "no answer from QMP" in str(exc) or "cannot connect to QMP" in str(exc)
            assert not held, (SEED, round_, "the socket was not let go", str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # the finding: name the round to replay it
            raise AssertionError((SEED, round_, at)) from exc
    assert outcomes["refused"] and outcomes["completed"], outcomes
