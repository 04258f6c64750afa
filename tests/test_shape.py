"""vmvault.shape: checks of JSON values someone else wrote."""

from __future__ import annotations

import pytest

from vmvault import shape


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (shape.count, [0, 5, 2**63 - 1], [-1, 2**63, True, 1.0, "1", None]),
        (shape.positive, [1], [0, -1, False]),
        (shape.integer, [-(2**63), 0], [2**63, 0.5, True]),
        (shape.number, [0, -2, 1.5], [float("nan"), float("inf"), True, "1"]),
        (shape.text, ["", "x"], [None, b"x", 1]),
        (shape.flag, [True, False], [0, 1, None]),
        (shape.obj, [{}, {"a": [1]}], [[], None, "{}"]),
        (shape.time, ["2026-12-07T11:04:03+00:00", "2026-12-07 11:04"], ["x", "", "\0", 1733560000, None]),
        (shape.optional(shape.text), [None, "x"], [1]),
        (shape.list_of(shape.count), [[], [1, 2]], [[1, -1], (1,), {}]),
        (shape.list_of(shape.count, sizes=(2, 3)), [[1, 2], [1, 2, 3]], [[1], [1, 2, 3, 4]]),
        (shape.map_of(shape.text), [{}, {"a": "b"}], [{"a": 1}, []]),
        (
            shape.record({"a": shape.count}, ("b",)),
            [{"b": None}, {"a": 1, "b": 2, "c": []}],
            [{"a": 1}, {"a": -1, "b": 1}, []],
        ),
    ],
)
def test_checks(check: shape.Check, good: list[object], bad: list[object]) -> None:
    assert all(check(v) for v in good), [v for v in good if not check(v)]
    assert not any(check(v) for v in bad), [v for v in bad if check(v)]


def test_problem_names_the_field_and_what_it_holds() -> None:
    fields = {"size": shape.count, "name": shape.text}
    assert shape.problem("disk", {"size": 1, "other": object()}, fields) is None
    assert shape.problem("disk", [], fields) == "a disk record is list [], not an object"
    assert shape.problem("alert", {}, {}, ("message",)) == "an alert record has no 'message'"
    assert shape.problem("disk", {"size": "1" * 100}, fields) == ("the disk field 'size' holds str '" + "1" * 39 + "…")
