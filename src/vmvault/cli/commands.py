"""Repository and backup commands: init, backup, snapshots, show, restore, key."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmvault import times
from vmvault.backends import describe as describe_storage
from vmvault.backends import open_backend
from vmvault.disk import FORMATS
from vmvault.engine.backup import TRACKING_SAMPLE, BackupResult, backup, plan_backup
from vmvault.engine.clone import check_clone_name, restore_vm
from vmvault.errors import (
    BackendError,
    CleanupError,
    ConfigError,
    MissingDependencyError,
    RepositoryError,
    RepositoryExistsError,
    VmvaultError,
)
from vmvault.hypervisors import BackupOptions, Registration, expand_sources, open_source
from vmvault.hypervisors.base import Source
from vmvault.hypervisors.registry import describe
from vmvault.repo import keys, secret
from vmvault.repo.crypto import BLAKE3, CHUNK_ID_FUNCTIONS, require_id_function
from vmvault.repo.filters import vm_name
from vmvault.repo.immutability import require_full_access
from vmvault.repo.repository import DEFAULT_CHUNK_SIZE, Repository
from vmvault.repo.schema import key_summary, snapshot_detail, snapshot_summary, stored_bytes, vm_record
from vmvault.repo.secret import Secret
from vmvault.repo.snapshot import Snapshot

from ._args import hex_prefix, new_tag, size, snapshot_ref, whole_number
from ._common import (
    EXIT,
    Output,
    add_filter_args,
    chosen_credentials,
    given_credentials,
    open_repository,
    pick_snapshot,
    plural,
    report_warnings,
    repository_location,
    snapshot_filter,
    table,
    terminal_safe,
)
from .progress import human_bytes

__all__ = ["register"]


# ---- init -------------------------------------------------------------------------------


def _init_secrets(args: argparse.Namespace) -> list[Secret]:
    """The first keys' secrets: a key file (created when nothing is at its name) and/or a new
    passphrase from a password file, a password command, VMVAULT_PASSWORD or the prompt
    (asked twice). Given both on the command line, both become keys."""
    chosen = chosen_credentials(args, kinds_allowed=2)
    out: list[Secret] = []
    for kind, where, value in chosen:
        if kind == "key_file":
            out.append(secret.key_file_secret(value))
            continue
        if kind == "password":
            new = Secret(value.encode(), secret.PASSPHRASE, where)
        else:
            given = secret.given_secret(**{kind: value})
            assert given is not None
            new = given
        secret.check_new_passphrase(new.value, source=new.source)
        out.append(new)
    if not out:
        out.append(Secret(secret.prompt_new_passphrase("repository passphrase"), secret.PASSPHRASE, "the prompt"))
    return out


def _describe_key(key_id: str, new: Secret) -> str:
    if new.kind == secret.KEYFILE:
        return f"key {key_id[:8]} for {new.source}" + (" (created key file, mode 0600)" if new.created else "")
    return f"key {key_id[:8]} for the passphrase from {new.source}"


def cmd_init(args: argparse.Namespace) -> int:
    out = Output(args)
    backend = open_backend(repository_location(args))
    if backend.exists("config"):
        # before a key file is made for nothing
        raise RepositoryExistsError(f"{backend.url} already holds a repository")
    require_id_function(args.chunk_id)  # likewise: its package may be missing
    news: list[Secret] = []
    if args.insecure_no_encryption:
        given = [where for _kind, where, _value in given_credentials(args)]
        if given:
            raise ConfigError(
                f"--insecure-no-encryption, but a passphrase or key file is given ({', '.join(given)}): every "
                "command given one refuses an unencrypted repository. Give none, or leave encryption on."
            )
    else:
        news = _init_secrets(args)
    first = news[0] if news else None
    repo = Repository.init(
        backend,
        first.value if first is not None else None,
        key_kind=first.kind if first is not None else secret.PASSPHRASE,
        chunk_size=args.chunk_size,
        immutable_days=args.immutable_days,
        chunk_id=args.chunk_id,
    )
    report_warnings(repo)
    key_ids = [repo.key_id] if first is not None else []
    for extra in news[1:]:
        try:
            key_ids.append(keys.add_key(repo.backend, repo.key, extra.value, kind=extra.kind))
        except VmvaultError:
            # the repository exists and opens with the first key: say so before the error
            print(
                terminal_safe(
                    f"vmvault: created repository {repo.config.id[:8]} at {backend.url} with "
                    f"{_describe_key(repo.key_id, news[0])}, but the key for {extra.source} was not stored; "
                    "add it with `vmvault key add` once the error below is fixed"
                ),
                file=sys.stderr,
            )
            raise
    doc: dict[str, Any] = {
        "repository": backend.url,
        "id": repo.config.id,
        "encrypted": repo.config.encrypted,
        "version": repo.config.version,
        "chunk_size": repo.config.chunk_size,
        "chunk_id": repo.config.chunk_id,
        "keys": [
            {"id": key_id, "kind": new.kind, "source": new.source, "created_file": new.created}
            for key_id, new in zip(key_ids, news, strict=True)
        ],
    }
    if args.immutable_days is not None:
        how = (
            "enforced by the storage (S3 Object Lock)"
            if repo.retention_enforced
            else "advisory: vmvault declines deletes, the storage does not refuse them (docs/storage.md)"
        )
        doc["immutable_days"] = args.immutable_days
        doc["retention_enforced"] = repo.retention_enforced
        warning_immutable = f"\nobjects are kept at least {args.immutable_days} days: {how}"
    else:
        warning_immutable = ""
    lines = [
        f"created vmvault repository {repo.config.id[:8]} at {backend.url} (format version {repo.config.version}, "
        f"{human_bytes(repo.config.chunk_size)} chunks, chunk ids {repo.config.chunk_id_label})"
    ]
    if not news:
        lines.append("WARNING: this repository is NOT encrypted.")
    else:
        lines += [f"  {_describe_key(key_id, new)}" for key_id, new in zip(key_ids, news, strict=True)]
        if any(n.created for n in news):
            doc["key_file_created"] = True
        lines.append(
            "Keep the passphrase and key files safe, with a copy elsewhere: without them the backups cannot be read "
            "by anyone, including you."
        )
    out.result(doc, "\n".join(lines) + warning_immutable)
    return 0


# ---- backup -----------------------------------------------------------------------------


#: errors that concern the repository or this host, not one source: the next source would
#: meet them too, so a backup of several sources stops at them
_FATAL = (RepositoryError, BackendError, MissingDependencyError)


def _backup_lines(result: BackupResult) -> list[str]:
    snap = result.snapshot
    incremental = [d.name for d in snap.disks if d.stats.get("incremental")]
    lines = [
        f"snapshot {snap.short_id} saved ({snap.consistency}) of {terminal_safe(snap.source.get('location', ''))}",
        f"  read {human_bytes(result.bytes_read)}, added {human_bytes(result.bytes_new)} to the repository "
        f"({plural(result.chunks_new, 'new chunk')}) in {times.duration(result.seconds)}",
    ]
    if incremental:
        lines.append(f"  changed-block tracking used for: {terminal_safe(', '.join(incremental))}")
    if result.excluded:
        lines.append(f"  excluded: {terminal_safe(', '.join(result.excluded))}")
    for w in result.warnings:
        lines.append(f"  warning: {terminal_safe(w)}")
    return lines


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up every source that can be; each failure is reported, and a run where some
    source failed (or a snapshot's cleanup on its source did) exits 3, "incomplete"."""
    out = Output(args)
    options = BackupOptions(
        allow_crash_consistent=args.allow_crash_consistent,
        exclude=tuple(args.exclude or ()),
        full=args.full,
        scratch_dir=args.scratch_dir,
        allow_parent_dirs=tuple(args.allow_parent_dir or ()),
        follow_links=args.follow_links,
        tracking_sample=args.tracking_sample,
    )
    specs = list(args.source or []) + (["libvirt:///"] if args.all else [])
    if not specs:
        raise ConfigError("name a source to back up (or --all for every libvirt domain)")
    docs: list[dict[str, Any]] = []
    failed: list[tuple[str, VmvaultError]] = []
    sources: list[tuple[str, Source | None]] = []
    # every source is parsed (and the options checked against it) before the first is read:
    # an option a connector does not take is a usage error for the whole command; a source
    # that stands for several (libvirt:///: every domain) is one snapshot each
    for spec in specs:
        try:
            sources += [(one, open_source(one, options)) for one in expand_sources(spec)]
        except ConfigError:
            raise
        except VmvaultError as exc:
            sources.append((spec, None))
            failed.append((spec, exc))
    if not sources:
        raise ConfigError(f"{', '.join(specs)}: no domain to back up")
    if args.dry_run:
        return _backup_dry_run(args, out, sources, options, failed)
    repo = open_repository(args, transfer=True)
    progress = out.progress()
    for spec, source in sources:
        if source is None:
            _say_failed(len(sources) == 1, spec, failed)
            docs.append({"source": {"location": spec}, "status": "failed", "error": str(dict(failed)[spec])})
            continue
        out.say(f"backing up {source.location}")
        try:
            result = backup(repo, source, options, tags=args.tag or [], progress=progress, hostname=args.host)
        except CleanupError as exc:
            assert isinstance(exc.result, BackupResult)
            failed.append((spec, exc))
            doc = exc.result.to_dict() | {"status": "cleanup failed", "error": str(exc), "left": exc.left}
            docs.append(doc)
            if not out.json:
                lines = _backup_lines(exc.result)
                lines += [f"  cleanup on the source failed; left there: {terminal_safe(item)}" for item in exc.left]
                out.result(None, "\n".join(lines))
            continue
        except _FATAL as exc:
            not_tried = [s for s, src in sources[sources.index((spec, source)) + 1 :] if src is not None]
            if docs or not_tried:
                print(
                    terminal_safe(
                        f"vmvault: stopped at {spec}"
                        + (f"; not tried: {', '.join(not_tried)}" if not_tried else "")
                        + (
                            f"; saved before: {', '.join(d['snapshot'][:8] for d in docs if 'snapshot' in d)}"
                            if docs
                            else ""
                        )
                    ),
                    file=sys.stderr,
                )
            raise exc
        except VmvaultError as exc:
            failed.append((spec, exc))
            docs.append({"source": {"location": spec}, "status": "failed", "error": str(exc)})
            _say_failed(len(sources) == 1, spec, failed)
            continue
        docs.append(result.to_dict() | {"status": "saved"})
        if not out.json:
            out.result(None, "\n".join(_backup_lines(result)))
    if out.json:
        out.result(docs if len(docs) > 1 else docs[0])
    if not failed:
        return EXIT["ok"]
    if len(sources) == 1 and not isinstance(failed[0][1], CleanupError):
        # one source: its own error and exit code, as before
        raise failed[0][1]
    saved = sum(1 for d in docs if "snapshot" in d)
    if not out.json:
        print(
            terminal_safe(
                f"vmvault: backup incomplete: {saved} of {plural(len(sources), 'source')} saved"
                + "".join(
                    f"; {spec}: {'cleanup failed' if isinstance(e, CleanupError) else 'failed'}" for spec, e in failed
                )
            ),
            file=sys.stderr,
        )
    return EXIT["incomplete"]


def _backup_dry_run(
    args: argparse.Namespace,
    out: Output,
    sources: list[tuple[str, Source | None]],
    options: BackupOptions,
    failed: list[tuple[str, VmvaultError]],
) -> int:
    """``backup --dry-run``: what each source would store; nothing is read or written."""
    repo = open_repository(args)
    docs: list[dict[str, Any]] = []
    lines: list[str] = []
    for spec, source in sources:
        if source is None:
            _say_failed(len(sources) == 1, spec, failed)
            docs.append({"source": {"location": spec}, "status": "failed", "error": str(dict(failed)[spec])})
            continue
        try:
            plan = plan_backup(repo, source, options)
        except _FATAL:
            raise
        except VmvaultError as exc:
            failed.append((spec, exc))
            _say_failed(len(sources) == 1, spec, failed)
            docs.append({"source": {"location": spec}, "status": "failed", "error": str(exc)})
            continue
        docs.append(plan.to_dict() | {"status": "would back up", "host": args.host or None})
        parent = f"incremental against {plan.parent[:8]}" if plan.parent else "no earlier snapshot: a full backup"
        lines.append(f"would back up {terminal_safe(plan.location)} ({terminal_safe(plan.kind)}; {parent})")
        if not plan.listed:
            lines.append(
                "  a live source: its disks are listed only once a checkpoint is taken, which a dry run does not"
            )
        for d in plan.disks:
            what = "layer" if d["layer"] else "disk"
            lines.append(
                f"  {what} {terminal_safe(d['name'])}  {d['format']}  {human_bytes(d['size'])}, "
                f"{human_bytes(d['allocated'])} allocated"
            )
        for f in plan.files:
            lines.append(f"  file {terminal_safe(f['name'])}  {human_bytes(f['size'])}")
        if plan.excluded:
            lines.append(f"  excluded: {terminal_safe(', '.join(plan.excluded))}")
        for w in plan.warnings:
            lines.append(f"  warning: {terminal_safe(w)}")
    lines.append("dry run: nothing was read or stored")
    out.result(docs if len(docs) > 1 else docs[0], "\n".join(lines))
    if not failed:
        return EXIT["ok"]
    return EXIT["incomplete"] if len(sources) > 1 else _raise(failed[0][1])


def _raise(exc: VmvaultError) -> int:
    raise exc


def _say_failed(single: bool, spec: str, failed: list[tuple[str, VmvaultError]]) -> None:
    """The failure of ``spec`` on stderr, as it happens (the error of a single source is
    printed once, by main, with its own exit code)."""
    if single:
        return
    for name, exc in failed:
        if name == spec:
            print(f"vmvault: error: {terminal_safe(spec)}: {terminal_safe(str(exc))}", file=sys.stderr)


# ---- snapshots / show ----------------------------------------------------------------


def _snap_row(s: Snapshot) -> list[object]:
    stored = stored_bytes(s)
    return [
        s.short_id,
        times.local(s.time),
        s.hostname,
        vm_name(s),
        s.consistency,
        human_bytes(s.total_size()),
        human_bytes(stored) if stored is not None else "-",
        ",".join(s.tags),
        s.source.get("location", ""),
    ]


def cmd_snapshots(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    problems: list[str] = []
    snaps = repo.list_snapshots(on_error=lambda sid, exc: problems.append(f"{sid[:8]}: {exc}"), summaries=True)
    snaps = snapshot_filter(args).select(snaps)
    if out.json:
        out.result([snapshot_summary(s) for s in snaps])
    else:
        headers = ["ID", "Time", "Host", "VM", "Consistency", "Size", "Stored", "Tags", "Source"]
        out.result(None, table(headers, [_snap_row(s) for s in snaps]) + f"\n{plural(len(snaps), 'snapshot')}")
    for p in problems:
        out.progress().warn(f"unreadable snapshot {p}")
    return EXIT["problems"] if problems else EXIT["ok"]


def _mode(mode: int) -> str:
    """``0644``, ``0755``, ``4755``: permission bits as people write them."""
    return f"{mode & 0o7777:04o}"


def render_show(snap: Snapshot) -> str:
    """``vmvault show``: every value from the storage escaped whole, columns aligned."""

    def q(value: object) -> str:
        return terminal_safe(str(value))

    vm = vm_record(snap)
    identity = vm.get("id") or vm.get("uuid") or ""
    stored = stored_bytes(snap)
    fields = [
        ("time", times.local(snap.time)),
        ("host", f"{q(snap.hostname)} ({q(snap.username)})"),
        ("source", f"{q(snap.source.get('kind'))}: {q(snap.source.get('location'))}"),
        ("vm", f"{q(vm['name'])} {q(identity)}".rstrip()),
        ("consistency", q(snap.consistency)),
        ("parent", q(snap.parent or "-")),
        ("tags", q(", ".join(snap.tags)) or "-"),
        ("size", human_bytes(snap.total_size())),
        ("added", human_bytes(stored) + " to the repository" if stored is not None else "not recorded"),
        ("program", q(snap.program)),
    ]
    width = max(len(k) for k, _ in fields)
    lines = [f"snapshot {q(snap.id)}"] + [f"  {k.ljust(width)}  {v}" for k, v in fields]
    if snap.disks:
        rows = [
            [
                d.name,
                d.format,
                human_bytes(d.size),
                f"layer of {d.parent}" if d.layer else "disk",
                human_bytes(d.stats.get("bytes_read", 0)),
            ]
            for d in snap.disks
        ]
        lines += [
            "",
            plural(len(snap.disks), "disk") + ":",
            _indent(table(["Name", "Format", "Size", "Kind", "Read"], rows)),
        ]
    if snap.files:
        rows = [[f.name, human_bytes(f.size), _mode(f.mode), times.local(f.mtime_ns / 1e9)] for f in snap.files]
        lines += ["", plural(len(snap.files), "file") + ":", _indent(table(["Name", "Size", "Mode", "Modified"], rows))]
    if snap.warnings:
        lines += ["", plural(len(snap.warnings), "warning") + ":"] + [f"  {q(w)}" for w in snap.warnings]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def cmd_show(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    out.result(snapshot_detail(snap), render_show(snap))
    return EXIT["ok"]


# ---- restore ----------------------------------------------------------------------------


def _registration(args: argparse.Namespace) -> Registration | None:
    if (args.start or args.libvirt_uri or args.domain_type) and not args.define:
        raise ConfigError("--start, --libvirt-uri and --domain-type go with --define")
    if not args.define:
        return None
    return Registration(uri=args.libvirt_uri, start=args.start, domain_type=args.domain_type)


def cmd_restore(args: argparse.Namespace) -> int:
    out = Output(args)
    if args.as_clone is not None:
        check_clone_name(args.as_clone)  # before the passphrase is asked for
    repo = open_repository(args, transfer=True)
    snap = pick_snapshot(repo, args.snapshot, args)
    done = restore_vm(
        repo,
        snap,
        args.target,
        clone_name=args.as_clone,
        format=args.format,
        flatten=args.flatten,
        include=args.include or None,
        progress=out.progress(),
        register=_registration(args),
        numeric_owner=args.numeric_owner,
    )
    result = done.result
    text = [f"restored snapshot {snap.short_id} to {result.target} in {times.duration(result.seconds)}"]
    text += [f"  note: {n}" for n in result.notes]
    for d in result.disks:
        text.append(f"  disk {d['path']} ({d['format']}, {human_bytes(d['size'])})")
    if result.kept:
        text.append(f"  {len(result.kept)} files completed by the interrupted run were kept")
    # the connector's step (a definition to start the VM with, a clone's identity, how to
    # register it); what it says may quote names from the snapshot: escaped
    text += [terminal_safe(line) for line in done.note.lines]
    doc = result.to_dict() | done.note.facts | {"snapshot": snap.id}
    text.append(f"  {plural(len(result.files), 'file')}, {human_bytes(result.bytes_written)} written")
    out.result(doc, "\n".join(text))
    return EXIT["ok"]


# ---- key --------------------------------------------------------------------------------


def _new_secret(args: argparse.Namespace) -> Secret:
    """The new key's secret: --new-key-file (created when nothing is at its name),
    --new-password-file, VMVAULT_NEW_PASSWORD, or a prompt (asked twice)."""
    if args.new_key_file:
        return secret.key_file_secret(args.new_key_file)
    given = secret.given_secret(password_file=args.new_password_file, env="VMVAULT_NEW_PASSWORD")
    if given is None:
        return Secret(secret.prompt_new_passphrase(), secret.PASSPHRASE, "the prompt")
    secret.check_new_passphrase(given.value, source=given.source)
    return given


def cmd_key(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    if args.key_command == "list":
        infos = keys.list_keys(repo.backend)
        rows = [
            [
                ("*" if k.id == repo.key_id else " ") + k.id[:8],
                k.kind,
                k.role,
                k.username,
                k.hostname,
                times.local(k.created),
            ]
            for k in infos
            if not k.problem
        ]
        text = table(["ID", "Kind", "Role", "User", "Host", "Created"], rows)
        for k in infos:
            if k.problem:
                text += f"\nunusable key object {k.id[:16]}: {k.problem}"
        out.result([key_summary(k, current=k.id == repo.key_id) for k in infos], text)
        return 0
    if not repo.config.encrypted:
        raise RepositoryError("this repository is not encrypted; it has no keys")
    require_full_access(repo, "key management")
    if args.key_command in ("add", "passwd"):
        new = _new_secret(args)
        role = getattr(args, "role", None) or keys.FULL
        if args.key_command == "passwd":
            new_id = keys.replace_key(
                repo.backend, repo.key, current=repo.key_id, secret=new.value, kind=new.kind, role=role
            )
            out.result({"added": new_id, "removed": repo.key_id}, f"changed: new key {new_id[:8]}, old key removed")
        else:
            new_id = keys.add_key(repo.backend, repo.key, new.value, kind=new.kind, role=role)
            out.result({"added": new_id}, f"added key {new_id[:8]}")
        if new.created:
            out.say(f"created {new.source} (mode 0600): keep it safe, with a copy elsewhere")
        return 0
    if args.key_command == "remove":
        removed = keys.remove_key(repo.backend, args.key_id, current=repo.key_id)
        out.result({"removed": removed}, f"removed key {removed[:8]}")
        return 0
    raise ConfigError(f"unknown key command {args.key_command}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "init",
        parents=[common],
        help="create a repository",
        description="Create a repository at the location given with -r (or VMVAULT_REPO), one of:\n"
        + describe_storage(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--chunk-size",
        type=size(4 << 10, 64 << 20, power_of_two=True),
        default=DEFAULT_CHUNK_SIZE,
        help="fixed chunk size, a power of two from 4K to 64M (default 256K)",
    )
    p.add_argument(
        "--chunk-id",
        choices=CHUNK_ID_FUNCTIONS,
        default=BLAKE3,
        help="how chunks are named: keyed BLAKE3 (default; 3.5x less CPU per byte hashed) or HMAC-SHA-256 (what "
        "repositories made before used; earlier vmvault versions can read such a repository, not a BLAKE3 one). "
        "Unencrypted repositories use the same hash unkeyed. Fixed for the repository's life; `copy` between "
        "repositories with different ones computes the ids anew",
    )
    p.add_argument("--insecure-no-encryption", action="store_true", help="store data unencrypted (not recommended)")
    p.add_argument(
        "--immutable-days",
        type=whole_number(1, 36500, what="a number of days"),
        metavar="N",
        help="keep data, index and snapshot objects at least N days (S3 Object Lock enforces it; see docs/storage.md)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "backup",
        parents=[common],
        help="back up VMs, VM folders or disk images",
        description="Back up each SOURCE into the repository as one snapshot. A SOURCE is one of:\n"
        + describe()
        + "\n\nEvery source that can be backed up is: when some fail, each failure is reported and the exit "
        "status is 3 (incomplete). A snapshot whose cleanup on its source failed (a checkpoint left behind) "
        "is reported as saved, with what was left, and the exit status is 3 too.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="*", help="what to back up (see above)")
    p.add_argument("--all", action="store_true", help="every domain of the libvirt connection (as libvirt:///)")
    p.add_argument(
        "--tracking-sample",
        type=whole_number(0, 1 << 20, what="a number of chunks"),
        default=TRACKING_SAMPLE,
        metavar="N",
        help=f"on an incremental, re-read N chunks the change tracking calls unchanged and compare them with the "
        f"previous snapshot (default {TRACKING_SAMPLE}; 0: no check)",
    )
    p.add_argument("--tag", action="append", type=new_tag, help="tag the snapshot (repeatable)")
    p.add_argument("--full", action="store_true", help="ignore change tracking; read every allocated byte")
    p.add_argument(
        "--allow-crash-consistent",
        action="store_true",
        help="if an application-consistent checkpoint fails, take a crash-consistent one (reported loudly)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="do not back up disks or files whose name (or its last part) matches this shell pattern (repeatable); "
        "excluding a disk excludes its checkpoint layers",
    )
    p.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="where a live backup keeps its temporary files (QEMU: the overlays that receive blocks the guest "
        "overwrites during the backup; default: the system's temp folder)",
    )
    p.add_argument(
        "--allow-parent-dir",
        action="append",
        metavar="DIR",
        help="disk parents (backing files) may also be in DIR (repeatable); by default only inside the VM folder "
        "or, for one image and a shut-off libvirt domain's disk, its own folder",
    )
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="follow links in a VM folder that lead inside it or into an --allow-parent-dir folder "
        "(by default links are named in a warning and not backed up)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be backed up (disks, layers, files, allocated sizes, the parent snapshot); "
        "read no data, store nothing, take no checkpoint",
    )
    p.add_argument("--host", metavar="NAME", help="record NAME as the host in the snapshot (default: this host's name)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("snapshots", parents=[common], help="list snapshots")
    add_filter_args(p)
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("show", parents=[common], help="show one snapshot in detail")
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (prefix of 4+ digits) or 'latest'")
    add_filter_args(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("restore", parents=[common], help="restore a snapshot into a folder")
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (prefix of 4+ digits) or 'latest'")
    p.add_argument(
        "--target",
        required=True,
        help="folder to restore into (created; may hold other files, never the same names; links inside it "
        "are refused, not followed)",
    )
    p.add_argument("--format", choices=FORMATS, help="convert disks to this format")
    p.add_argument("--flatten", action="store_true", help="current state only: no checkpoint chain")
    p.add_argument(
        "--as-clone",
        metavar="NAME",
        help="restore as a new VM with a new identity beside the original (a VM folder's other files are "
        "not edited: each that still names the original VM or its renamed disks is named in a warning)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only the disks and files whose stored names match this glob, or lie in this folder (repeatable; "
        "a pattern that matches nothing is an error)",
    )
    p.add_argument(
        "--numeric-owner",
        action="store_true",
        help="give files and disks their stored numeric uid/gid (root only); without it they belong to you and "
        "lose setuid/setgid/sticky",
    )
    p.add_argument(
        "--define", action="store_true", help="register the restored VM with libvirt (never over an existing one)"
    )
    p.add_argument("--start", action="store_true", help="start it after --define")
    p.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help="libvirt connection for --define (default: the snapshot's, or qemu:///system)",
    )
    p.add_argument(
        "--domain-type",
        choices=["kvm", "qemu"],
        help="for a domain built from facts (Hyper-V snapshots): KVM or plain emulation (default: kvm when offered)",
    )
    add_filter_args(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("key", parents=[common], help="manage passphrases and key files")
    ks = p.add_subparsers(dest="key_command", required=True)
    ks.add_parser("list", parents=[common], help="list keys")
    for name, text in (("add", "add a passphrase or key file"), ("passwd", "change the passphrase in use")):
        kp = ks.add_parser(name, parents=[common], help=text)
        kp.add_argument("--new-password-file", help="read the new passphrase from this file")
        kp.add_argument("--new-key-file", help="use (or create) this key file as the new key")
        kp.add_argument(
            "--role",
            choices=list(keys.ROLES),
            default=keys.FULL,
            help="backup-only: the key may back up and restore but not forget/prune (advisory; docs/storage.md)",
        )
    kp = ks.add_parser("remove", parents=[common], help="remove a key")
    kp.add_argument("key_id", type=hex_prefix("key id"), help="key id (prefix of 4+ digits)")
    p.set_defaults(func=cmd_key)
