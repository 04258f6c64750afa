"""A Hyper-V host whose replies are changed by their structure (tests/conftest.py
``mutate_json``): a field removed, a list entry repeated or dropped, a value of another type,
or the whole result replaced. A backup (full, or incremental from a previous one) reading the
disks and completing, and ``audit`` of the host's inventory, must each end with a
``VmvaultError`` naming the step, never another exception (steps.py reads every reply through
``_Reply``). Seeded; a failure names its seed and round.

Several thousand rounds of a campaign found one: ``audit`` read the inventory's disks,
checkpoints and orphans as the host sent them (a disk's size that was text: ValueError, a
list: TypeError); the inventory is now rebuilt from checked fields.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tests.conftest import CAMPAIGN_SCALE, JSON_VALUES, RANDOM_EXAMPLES, mutate_json
from tests.hypervisors.test_hyperv_scripted import Host, Reply, mnt, previous, source  # noqa: F401  (mnt: the fixture)
from vmvault.errors import VmvaultError
from vmvault.hypervisors.hyperv.connector import audit_inventory
from vmvault.hypervisors.hyperv.session import inventory
from vmvault.hypervisors.hyperv.steps import ParamValue

ROUNDS = 300 * CAMPAIGN_SCALE
SEED = int(os.environ.get("VMVAULT_HYPERV_FUZZ_SEED", "0")) or (
    random.SystemRandom().randrange(1, 1 << 32) if RANDOM_EXAMPLES else 2
)


def _changed(reply: Reply, rng: random.Random) -> Reply:
    def answer(params: dict[str, ParamValue]) -> str:
        text = reply(params) if callable(reply) else reply
        assert isinstance(text, str)
        if rng.random() < 0.1:
            return json.dumps(rng.choice(JSON_VALUES))
        return json.dumps(mutate_json(json.loads(text), rng))

    return answer


def test_changed_replies_end_a_backup_or_an_audit_with_an_error_naming_the_step(mnt: Path) -> None:  # noqa: F811
    rng = random.Random(SEED)
    failed = 0
    for round_ in range(ROUNDS):
        host = Host()
        step = rng.choice(sorted(host.defaults))
        host.defaults[step] = _changed(host.defaults[step], rng)
        try:
            with source(mnt, host).open_session(previous(mnt) if rng.random() < 0.5 else None) as session:
                for disk in session.disks:
                    disk.image.read(0, 4096)
                session.complete(f"snap{round_}")
            audit_inventory(inventory("hyperv://HV01", transport=host))
        except VmvaultError:
            failed += 1
        except Exception as exc:  # the finding: name the round to replay it
            raise AssertionError((SEED, round_, step)) from exc
    assert failed > ROUNDS // 10, failed
