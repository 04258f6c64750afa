"""``vmvault serve``: one disk of a snapshot as a read-only NBD export, straight from the repository."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import ssl
import threading
from types import FrameType

from vmvault.engine.export import export_label, running_disks
from vmvault.engine.nbd import NbdServer, nbd_uri
from vmvault.engine.reader import DEFAULT_CACHE_BYTES, FAR_CACHE_BYTES, DiskReader, find_disk
from vmvault.errors import ConfigError
from vmvault.repo.snapshot import Snapshot

from ._args import size, snapshot_ref
from ._common import EXIT, Output, add_filter_args, open_repository, pick_snapshot

__all__ = ["register"]


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--listen: cannot resolve {host!r}: {exc}") from exc
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen takes HOST:PORT (port 1-65535), not {text!r}")
    return host, int(port)


def tls_context(cert: str | None, key: str | None, client_ca: str | None = None) -> ssl.SSLContext | None:
    """The server's TLS context; with ``client_ca`` every client must present a certificate it signed."""
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not cert or not key:
        if client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from exc
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client CA certificate {client_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def choose_disk(snap: Snapshot, name: str | None) -> str:
    if name is not None:
        return find_disk(snap, name).name
    disks = running_disks(snap)
    if len(disks) != 1:
        names = ", ".join(repr(d.name) for d in disks) or "none"
        raise ConfigError(f"snapshot {snap.short_id} has several disks; choose one with --disk ({names})")
    return disks[0].name


def cmd_serve(args: argparse.Namespace) -> int:
    out = Output(args)
    if (args.socket is None) == (args.listen is None):
        raise ConfigError("give one of --socket PATH or --listen HOST:PORT")
    listen = parse_listen(args.listen) if args.listen else None
    if listen is not None and not args.tls_client_ca and not _is_loopback(listen[0]):
        raise ConfigError(
            f"--listen {args.listen}: NBD authenticates nobody and encrypts nothing; serving beyond this host "
            "needs --tls-cert, --tls-key and --tls-client-ca (clients then need a certificate that CA signed), "
            "or listen on 127.0.0.1 / a unix socket"
        )
    tls = tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    disk = choose_disk(snap, args.disk)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with DiskReader(repo, snap, disk, cache_bytes=args.cache_size) as reader:
            server = NbdServer(reader, label=export_label(snap, disk), tls=tls)
            if listen is not None:
                server.listen_tcp(*listen)
                host, port = server.address if isinstance(server.address, tuple) else listen
                where = f"nbd://{host}:{port}/" if ":" not in host else f"nbd://[{host}]:{port}/"
            else:
                server.listen_unix(args.socket)
                where = nbd_uri(args.socket)
            with server:
                server.start()
                doc = {"snapshot": snap.id, "disk": disk, "size": reader.size, "uri": where, "tls": tls is not None}
                out.result(doc, f"serving disk {disk} of snapshot {snap.short_id} read-only at {where} (Ctrl-C stops)")
                stop.wait()
            out.say(f"stopped; {server.stats.requests} requests served, {server.stats.bytes_read} bytes read")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="export a snapshot's disk read-only over NBD, straight from the repository",
        description=(
            "Serve one disk of a snapshot as a read-only NBD export (qemu-img, qemu, nbdinfo, nbd-client "
            "read it) until Ctrl-C or SIGTERM. Holes are reported as holes; a damaged chunk is an I/O "
            "error for that read only. On a unix socket (mode 0600) or on TCP: on loopback only this user's "
            "(and root's) connections are served; any other address needs TLS with client certificates."
        ),
    )
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (or prefix), or latest")
    p.add_argument("--disk", metavar="NAME", help="the disk as `vmvault show` prints it (when there are several)")
    p.add_argument("--socket", metavar="PATH", help="a new unix socket to serve on")
    p.add_argument("--listen", metavar="HOST:PORT", help="a TCP address to serve on (port 10809 is NBD's own)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) for TLS (NBD STARTTLS)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA certificate(s): only clients presenting a certificate signed by it are served "
        "(required beyond loopback)",
    )
    p.add_argument(
        "--cache-size",
        type=size(0, 1 << 40),
        metavar="SIZE",
        help=f"memory for decrypted chunks (default {DEFAULT_CACHE_BYTES >> 20}M from a local repository, "
        f"{FAR_CACHE_BYTES >> 20}M from SFTP or S3)",
    )
    add_filter_args(p, scope="'latest' is the newest snapshot matching every option given (an id must match them).")
    p.set_defaults(func=cmd_serve)
