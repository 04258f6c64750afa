"""``vmvault user``: the dashboard's users, roles and API tokens (docs/web.md).

The users file is the configuration's ``[web] users`` (default: ``<config name>-users.json``
beside the configuration), or ``--users FILE``. Passwords come from ``--new-password-file`` or a
prompt (twice) on a terminal; never from the command line, where other users could see them.
Every change is recorded in the job history's activity log as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys

from vmvault.automation.config import web_settings
from vmvault.automation.history import History
from vmvault.errors import ConfigError

from ._common import EXIT, Output, cli_user, output_options, table

__all__ = ["register"]


def _store_and_history(args: argparse.Namespace) -> tuple[object, History | None]:
    from vmvault.web.users import UserStore

    if args.users:
        return UserStore(args.users), None
    from .automation import _config

    config = _config(args)
    return UserStore(web_settings(config).users), History(config.daemon.history)


def _password(args: argparse.Namespace) -> str:
    if args.password_file_new:
        try:
            with open(args.password_file_new, "rb") as f:
                raw = f.read(4096)
        except OSError as exc:
            raise ConfigError(f"cannot read the password file {args.password_file_new}: {exc.strerror}") from exc
        try:
            password = raw.decode().rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"the password file {args.password_file_new} is not UTF-8 text") from None
        if not password:
            raise ConfigError(f"the password file {args.password_file_new} is empty")
        return password
    if not sys.stdin.isatty():
        raise ConfigError("give the password with --new-password-file FILE (no terminal to ask on)")
    first = getpass.getpass("password: ")
    if getpass.getpass("repeat password: ") != first:
        raise ConfigError("the passwords differ; nothing was changed")
    return first


def _record(history: History | None, action: str, target: str, **details: str) -> None:
    if history is not None:
        history.record_action(dt.datetime.now(dt.UTC), cli_user(), action, target, "done", details=details)


def cmd_user(args: argparse.Namespace) -> int:
    from vmvault.web.users import UserStore

    out = Output(args)
    store, history = _store_and_history(args)
    assert isinstance(store, UserStore)
    command = args.user_command
    if command == "list":
        users = store.users()
        rows = [[u.name, u.role, u.created, ", ".join(t.id for t in u.tokens) or "-"] for u in users]
        out.result(
            {"users": [u.public() for u in users], "file": store.path},
            table(["User", "Role", "Created", "Tokens"], rows) + f"\n{len(users)} user(s) in {store.path}",
        )
        return EXIT["ok"]
    if command == "add":
        user = store.add(args.name, args.role, _password(args))
        _record(history, "user add", user.name, role=user.role)
        out.result({"added": user.public()}, f"added {user.name} ({user.role}) to {store.path}")
    elif command == "passwd":
        store.set_password(args.name, _password(args))
        _record(history, "user passwd", args.name)
        out.result({"changed": args.name}, f"changed the password of {args.name}; their sessions end at next use")
    elif command == "role":
        user = store.set_role(args.name, args.role)
        _record(history, "user role", user.name, role=user.role)
        out.result({"changed": user.public()}, f"{user.name} is now {user.role}")
    elif command == "remove":
        store.remove(args.name)
        _record(history, "user remove", args.name)
        out.result({"removed": args.name}, f"removed {args.name}")
    elif command == "token":
        record, secret = store.add_token(args.name, args.label or "")
        _record(history, "user token", args.name, token=record.id)
        # the token itself goes to stdout once (for a script to capture); never logged or recorded
        out.result(
            {"user": args.name, "id": record.id, "label": record.label, "token": secret},
            f"{secret}\n(token {record.id} for {args.name}: shown only now; send it as Authorization: Bearer TOKEN)",
        )
    elif command == "revoke":
        store.revoke_token(args.name, args.token_id)
        _record(history, "user revoke", args.name, token=args.token_id)
        out.result({"user": args.name, "revoked": args.token_id}, f"revoked token {args.token_id} of {args.name}")
    else:  # pragma: no cover - argparse allows only the commands above
        raise ConfigError(f"unknown user command {command}")
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from vmvault.web.users import ROLES

    p = sub.add_parser(
        "user",
        parents=[output_options(common)],
        help="manage the dashboard's users, roles and API tokens",
        description="Users of the web dashboard: roles viewer (reads), operator (also runs jobs, verifies and "
        "restores into configured targets) and admin (also manages users, forgets and prunes).",
    )
    us = p.add_subparsers(dest="user_command", required=True, metavar="COMMAND")

    def base(name: str, text: str, *, named: bool = True) -> argparse.ArgumentParser:
        q = us.add_parser(name, parents=[output_options(common)], help=text)
        if named:
            q.add_argument("name", help="user name")
        q.add_argument("--config", "-c", metavar="FILE", help="the configuration (or VMVAULT_CONFIG)")
        q.add_argument("--users", metavar="FILE", help="the users file (default: from the configuration)")
        q.set_defaults(func=cmd_user)
        return q

    q = base("add", "add a user")
    q.add_argument("--role", required=True, choices=ROLES, help="viewer, operator or admin")
    q.add_argument("--new-password-file", dest="password_file_new", metavar="FILE", help="read the password from FILE")
    q = base("passwd", "set a user's password")
    q.add_argument("--new-password-file", dest="password_file_new", metavar="FILE", help="read the password from FILE")
    q = base("role", "change a user's role")
    q.add_argument("role", choices=ROLES, help="viewer, operator or admin")
    base("remove", "remove a user")
    base("list", "list users", named=False)
    q = base("token", "make an API token for a user (printed once)")
    q.add_argument("--label", help="what the token is for (e.g. nagios)")
    q = base("revoke", "revoke one of a user's API tokens")
    q.add_argument("token_id", help="the token's id (8 hex digits, from `vmvault user list`)")
