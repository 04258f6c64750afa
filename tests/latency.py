"""A TCP relay that delays every byte by half a round trip each way: a server "far away" on
loopback, for benchmarks (bench/remote_backends.py) and tests (``tc netem`` is not available on
the development machines).

    python tests/latency.py --rtt-ms 30 --to 127.0.0.1:2222 --port 40000

What it models: propagation delay. Whatever a side sends reaches the other side ``rtt / 2``
later, so every exchange that waits for an answer (a TLS or SSH handshake, an HTTP request, an
SFTP read, an SSH window adjustment) costs a round trip, as on a real link. What it does not
model: a bandwidth limit (the relay passes bytes as fast as loopback and its own CPU allow),
loss, or TCP's slow start on the long link (the relay reads each side at once, so the sender's
window never waits for the distance). Its CPU competes with the processes it relays for.

The relay runs in its own process (``relay()`` starts it and stops it) with two threads per
direction of each connection: one reads and stamps, one sends what is due.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

_READ = 1 << 20


def _pipe(source: socket.socket, sink: socket.socket, delay: float, done: threading.Event) -> None:
    """Copy ``source`` to ``sink``, each piece ``delay`` seconds after it was read."""
    pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def send() -> None:
        try:
            while True:
                due, data = pending.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            done.set()  # the other side is gone: the connection ends

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        try:
            data = source.recv(_READ)
        except OSError:
            data = b""
        pending.put((time.monotonic() + delay, data))
        if not data:
            break
    sender.join()


def _serve(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        server = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = threading.Event()
    ways = [
        threading.Thread(target=_pipe, args=(client, server, delay, done), daemon=True),
        threading.Thread(target=_pipe, args=(server, client, delay, done), daemon=True),
    ]
    for way in ways:
        way.start()
    while any(way.is_alive() for way in ways) and not done.is_set():
        time.sleep(0.05)
    for s in (client, server):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


def run_relay(port: int, target: tuple[str, int], rtt: float) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    print("ready", flush=True)
    while True:
        client, _addr = listener.accept()
        threading.Thread(target=_serve, args=(client, target, rtt / 2), daemon=True).start()


@contextlib.contextmanager
def relay(target_port: int, rtt_ms: float, target_host: str = "127.0.0.1") -> Iterator[tuple[int, int]]:
    """A relay process to ``target_host:target_port`` adding ``rtt_ms``: (the port it listens
    on, its process id)."""
    try:
        from tests.servers import free_port
    except ImportError:  # imported from bench/, with tests/ on the path
        from servers import free_port  # type: ignore[import-not-found,no-redef]

    port = free_port()
    argv = [sys.executable, __file__, "--port", str(port), "--to", f"{target_host}:{target_port}"]
    process = subprocess.Popen([*argv, "--rtt-ms", str(rtt_ms)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the latency relay to port {target_port} did not start")
        yield port, process.pid
    finally:
        process.kill()
        process.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--to", required=True, help="HOST:PORT")
    ap.add_argument("--rtt-ms", type=float, required=True)
    args = ap.parse_args()
    host, _, port = args.to.rpartition(":")
    run_relay(args.port, (host, int(port)), args.rtt_ms / 1000)


if __name__ == "__main__":
    main()
