"""Status records another host wrote (repo/status.py) as the dashboard reads them: whoever holds
a key of the repository (any host of the fleet) writes them, so one of any shape must leave
every page working. Before, an alert without a message, a job's last run that was a list or
a run's details that were text made the overview, the fleet page and the API fail (500)."""

from __future__ import annotations

import copy
import datetime as dt
import random
from typing import Any

from tests.conftest import json_paths
from tests.repo.test_status import ALERT, JOB, RUN
from tests.web.conftest import REPO_PASS, Site
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository
from vmvault.repo.status import StatusRecord, StatusStore

VALUES: list[Any] = [-1, 2**70, 1.5, "x", "", None, True, [], {}, [1], {"a": 1}, ["x"], [{}], [None], [[1]]]
PAGES = ("/", "/fleet", "/jobs", "/history", "/api/v1/hosts", "/api/v1/vms", "/api/v1/tasks", "/api/v1/jobs")


def test_status_records_of_any_shape_leave_every_page_working(site: Site) -> None:
    repo = Repository.open(LocalBackend(str(site.root / "repo")), REPO_PASS.encode())
    store = StatusStore(repo)
    client = site.login("ada")
    good = {"jobs": [copy.deepcopy(JOB)], "alerts": [copy.deepcopy(ALERT)], "runs": [copy.deepcopy(RUN)]}
    store.write(StatusRecord(host="hv02", time=dt.datetime.now(dt.UTC), sequence=1, program="vmvault", **good))
    assert "hv02" in client.get("/fleet").text and "no successful backup for 30 h" in client.get("/fleet").text
    rng = random.Random(7)
    for round_ in range(40):
        doc = copy.deepcopy(good)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice([p for p in json_paths(doc) if len(p) > 1])
            parent: Any = doc
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, dict | list) else None
            if isinstance(parent, dict) or (isinstance(parent, list) and path[-1] < len(parent)):
                parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
        record = StatusRecord(host=f"evil{round_}", time=dt.datetime.now(dt.UTC), sequence=round_, **doc)
        StatusStore(repo).write(record)
        for page in PAGES:
            answer = client.get(page)
            assert answer.status_code == 200, (round_, page, doc)
