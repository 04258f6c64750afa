"""The API's OpenAPI 3.1 description, served at ``/api/v1/openapi.json`` and listed on the
``/api`` page. A test checks it against the application's routes both ways, so an endpoint
cannot be added or removed without this document following."""

from __future__ import annotations

from typing import Any

__all__ = ["spec"]

_ERRORS = {
    "400": {"description": "bad request (a parameter, a target or a name that is not allowed)"},
    "401": {"description": "no valid session or bearer token"},
    "403": {"description": "the role is too low, or (with a session) the CSRF token is missing or wrong"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _get(summary: str, role: str, schema: dict[str, Any], params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "x-role": role, "responses": {"200": _json(schema)} | _ERRORS}
    if params:
        op["parameters"] = params
    return op


def _post(
    summary: str, role: str, schema: dict[str, Any], *, status: str = "202", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        status: _json(schema, "accepted: running in the background" if status == "202" else "OK")
    }
    responses |= _ERRORS | (extra or {})
    return {
        "summary": summary,
        "x-role": role,
        "description": "With a session cookie the request needs the header X-CSRF-Token; with a bearer token it "
        "does not.",
        "responses": responses,
    }


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _p(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_TIME = {"type": ["string", "null"], "format": "date-time"}

_SCHEMAS: dict[str, Any] = {
    "Reason": {
        "type": "object",
        "properties": {"level": {"enum": ["red", "amber", "green"]}, "text": {"type": "string"}},
    },
    "Vm": {
        "type": "object",
        "description": "A VM (a source location on a host) with its state and the reasons for it",
        "properties": {
            "name": {"type": "string"},
            "hostname": {"type": "string"},
            "location": {"type": "string"},
            "state": {"enum": ["red", "amber", "green"]},
            "reasons": {"type": "array", "items": _ref("Reason")},
            "last_good_backup": {
                "type": ["object", "null"],
                "properties": {
                    "snapshot": {"type": "string"},
                    "time": {"type": "string"},
                    "repository": {"type": "string"},
                    "consistency": {"type": "string"},
                    "age_seconds": {"type": "integer"},
                },
            },
            "max_age": {"type": "number", "description": "the RPO in seconds"},
            "jobs": {"type": "array", "items": {"type": "string"}},
            "last_run": {"type": ["object", "null"]},
            "verification": {"type": ["object", "null"]},
            "immutable": {"type": "array", "items": {"type": "object"}},
            "repositories": {"type": "array", "items": {"type": "string"}},
            "snapshots": {"type": "integer"},
        },
    },
    "Run": {
        "type": "object",
        "description": "One attempt of a job, as `vmvault history --json` prints it",
        "properties": {
            "id": {"type": "integer"},
            "job": {"type": "string"},
            "type": {"type": "string"},
            "attempt": {"type": "integer"},
            "start": {"type": "string", "format": "date-time"},
            "end": _TIME,
            "seconds": {"type": ["number", "null"]},
            "status": {"enum": ["running", "success", "warning", "failed", "interrupted"]},
            "snapshot": {"type": ["string", "null"]},
            "bytes": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"]},
            "details": {"type": "object"},
        },
    },
    "Job": {
        "type": "object",
        "description": "A configured job, as `vmvault jobs --json` prints it, with its source, repositories and "
        "max_age",
        "properties": {
            "job": {"type": "string"},
            "type": {"enum": ["backup", "verify", "copy"]},
            "schedule": {"type": ["string", "null"]},
            "window": {"type": ["string", "null"]},
            "time_limit": {"type": ["number", "null"], "description": "seconds an attempt may run, then stopped"},
            "next_run": _TIME,
            "status": {"type": "string"},
            "last_run": {"oneOf": [_ref("Run"), {"type": "null"}]},
            "last_success": _TIME,
            "alert": {"type": ["object", "null"]},
            "repositories": {"type": "array", "items": {"type": "string"}},
            "source": {"type": "string"},
            "max_age": {"type": ["number", "null"]},
        },
    },
    "Progress": {
        "type": "object",
        "properties": {
            "job": {"type": "string"},
            "state": {"enum": ["queued", "running", "finished"]},
            "phase": {"type": "string"},
            "phases": {"type": "integer"},
            "done": {"type": "integer"},
            "total": {"type": "integer"},
            "percent": {"type": ["number", "null"]},
            "status": {"type": ["string", "null"]},
            "started": _TIME,
            "by": {"type": "string"},
        },
    },
    "Snapshot": {
        "type": "object",
        "description": "A snapshot as `vmvault snapshots --json` lists it, with its repository",
        "properties": {
            "id": {"type": "string"},
            "short_id": {"type": "string"},
            "time": {"type": "string"},
            "hostname": {"type": "string"},
            "username": {"type": "string"},
            "source": {"type": "object"},
            "vm": {"type": "object", "description": "name (always), and the identity the connector recorded"},
            "consistency": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "parent": {"type": ["string", "null"]},
            "size": {"type": "integer"},
            "stored": {"type": ["integer", "null"], "description": "bytes its backup added to the repository"},
            "disk_count": {"type": "integer"},
            "file_count": {"type": "integer"},
            "disks": {"type": "array", "items": {"type": "object"}},
            "files": {"type": "array", "items": {"type": "object"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "repository": {"type": "string"},
        },
    },
    "Repository": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "location": {"type": "string"},
            "error": {"type": ["string", "null"]},
            "snapshots": {"type": "integer"},
            "unreadable_snapshots": {"type": "integer"},
            "immutable": {"type": "object"},
            "stats": {
                "type": ["object", "null"],
                "description": "stored: bytes in the storage; unique: plaintext bytes of distinct chunks; logical: "
                "bytes the snapshots hold; dedup_ratio = logical/unique; compression_ratio = unique/stored_data",
            },
            "estimated_full": _TIME,
            "samples": {"type": "array", "items": {"type": "object"}},
            "growth": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Plan": {
        "type": "object",
        "description": "Exactly what an action will do",
        "properties": {
            "action": {"enum": ["restore", "clone", "verify", "forget", "prune"]},
            "repository": {"type": "string"},
            "snapshot": {"type": ["string", "null"]},
            "summary": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}},
            "target": {"type": ["string", "null"]},
            "params": {"type": "object"},
        },
    },
    "Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
}


def arr(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


def spec(version: str) -> dict[str, Any]:
    started = _obj(task={"type": "string"}, plan=_ref("Plan"))
    run_ids = {"type": "array", "items": {"type": "integer"}}
    paths: dict[str, Any] = {
        "/api/v1/whoami": {"get": _get("who this session or token is", "viewer", _obj(user={}, role={}, via={}))},
        "/api/v1/vms": {
            "get": _get("every VM with its state, last good backup and the reasons", "viewer", _obj(vms=arr("Vm")))
        },
        "/api/v1/jobs": {
            "get": _get(
                "configured jobs: schedule, next run, last result, and live progress",
                "viewer",
                _obj(config={"type": "string"}, jobs=arr("Job"), progress=arr("Progress")),
            )
        },
        "/api/v1/jobs/{name}/run": {
            "post": _post(
                "run a job now",
                "operator",
                _obj(job={"type": "string"}, state={"type": "string"}),
                extra={
                    "404": {"description": "no such job"},
                    "409": {"description": "the job is queued or running already (here or elsewhere)"},
                },
            )
            | {"parameters": [_p("name", "the job's name")]}
        },
        "/api/v1/jobs/{name}/cancel": {
            "post": _post(
                "stop the job's running attempt (here or in another process) and its queued retries; it stops at "
                "its next progress report and ends failed, saying who cancelled it. `state`: `cancelling`, or "
                "`not running` (`runs` empty)",
                "operator",
                _obj(job={"type": "string"}, state={"type": "string"}, runs=run_ids),
                extra={"404": {"description": "no such job"}},
            )
            | {"parameters": [_p("name", "the job's name")]}
        },
        "/api/v1/progress": {"get": _get("live progress of jobs and tasks", "viewer", _obj(progress=arr("Progress")))},
        "/api/v1/events": {
            "get": {
                "summary": "server-sent events: `progress` with every job's and task's state when it changes",
                "x-role": "viewer",
                "responses": {"200": {"description": "an event stream", "content": {"text/event-stream": {}}}}
                | _ERRORS,
            }
        },
        "/api/v1/history": {
            "get": _get(
                "past runs, newest first (filterable)",
                "viewer",
                _obj(runs=arr("Run")),
                [
                    _q("job", "only this job"),
                    _q("type", "backup, verify or copy"),
                    _q("status", "ok, warning, failed, running"),
                    _q("since", "24h, 7d, 30d or all"),
                    _q("q", "text in the job name, error or snapshot id"),
                    _q("limit", "at most this many (1-1000, default 100)", {"type": "integer"}),
                    _q("page", "page number (0 = newest)", {"type": "integer"}),
                ],
            )
        },
        "/api/v1/tasks": {
            "get": _get(
                "runs per task and outcome (the overview's grid)",
                "viewer",
                _obj(hours={"type": "integer"}, tasks={"type": "object"}),
                [_q("hours", "the window, 1-8784 (default 24)", {"type": "integer"})],
            )
        },
        "/api/v1/repositories": {
            "get": _get(
                "repositories: size, unique data, ratios, snapshots, growth, estimated full",
                "viewer",
                _obj(repositories=arr("Repository")),
            )
        },
        "/api/v1/repositories/{name}/refresh": {
            "post": _post(
                "recompute a repository's statistics (reads its index)",
                "operator",
                _obj(repository={}, stats={}, error={}),
                status="200",
            )
            | {"parameters": [_p("name", "the repository's name in the configuration")]}
        },
        "/api/v1/repositories/{name}/prune": {
            "post": _post("prune a repository (exclusive lock)", "admin", started)
            | {"parameters": [_p("name", "the repository's name in the configuration")]}
        },
        "/api/v1/snapshots": {
            "get": _get(
                "snapshots, newest first",
                "viewer",
                _obj(snapshots=arr("Snapshot")),
                [_q("vm", "VM name or source location"), _q("hostname", "host"), _q("repository", "repository name")],
            )
        },
        "/api/v1/snapshots/{repository}/{snapshot}": {
            "get": _get("one snapshot in detail (as `vmvault show --json`)", "viewer", {"type": "object"})
            | {"parameters": [_p("repository", "repository name"), _p("snapshot", "id or a prefix of 4+ digits")]}
        },
        "/api/v1/snapshots/{repository}/{snapshot}/files": {
            "get": _get(
                "the files inside a snapshot's disks: its disks (no loc), a disk's volumes (loc=DISK), a folder "
                "(loc=DISK[:PART]:/PATH), as `vmvault files ls --json`",
                "viewer",
                {"type": "object"},
                [_q("loc", "DISK[:PART][:/PATH]")],
            )
            | {
                "parameters": [
                    _p("repository", "repository name"),
                    _p("snapshot", "id or prefix"),
                    _q("loc", "DISK[:PART][:/PATH]"),
                ]
            }
        },
        "/api/v1/snapshots/{repository}/{snapshot}/download": {
            "get": {
                "summary": "download one file from inside a snapshot's disk (loc=DISK[:PART]:/PATH)",
                "x-role": "operator",
                "parameters": [
                    _p("repository", "repository name"),
                    _p("snapshot", "id or prefix"),
                    _q("loc", "DISK[:PART]:/PATH"),
                ],
                "responses": {"200": {"description": "the file's bytes", "content": {"application/octet-stream": {}}}}
                | _ERRORS
                | {"404": {"description": "no such file"}, "422": {"description": "the disk cannot be read"}},
            }
        },
        "/api/v1/snapshots/{repository}/{snapshot}/{action}": {
            "post": _post(
                'restore (body {"target": NAME}), clone ({"target": NAME, "clone": NEW_NAME}), verify, or '
                'forget (admin) a snapshot; {"dry_run": true} returns the plan only',
                "operator",
                started,
                extra={
                    "404": {"description": "no such snapshot, repository or action"},
                    "409": {"description": "refused: locked, or retained"},
                },
            )
            | {
                "parameters": [
                    _p("repository", "repository name"),
                    _p("snapshot", "id or prefix"),
                    _p("action", "restore, clone, verify or forget"),
                ]
            }
        },
        "/api/v1/hosts": {
            "get": _get("every host seen (status records and snapshots)", "viewer", _obj(hosts={"type": "array"}))
        },
        "/api/v1/audit": {
            "get": _get("checkpoint audit of the configured targets", "viewer", _obj(targets={"type": "array"}))
        },
        "/api/v1/actions": {"get": _get("who did what, newest first", "admin", _obj(actions={"type": "array"}))},
        "/api/v1/users": {
            "get": _get("users, roles and token ids (never hashes)", "admin", _obj(users={"type": "array"}))
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "this document",
                "x-role": "public",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vmvault dashboard API",
            "version": version,
            "description": "The data of the vmvault dashboard; field names follow the CLI's --json output. "
            "See docs/web.md.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a token from `vmvault user token NAME`"},
                "session": {"type": "apiKey", "in": "cookie", "name": "vmvault_session"},
            },
            "schemas": _SCHEMAS,
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
    }
