"""Running more than one server: sharing a port (--reuse-port), and stopping
without resetting the connections that wait in the kernel's queue."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from trio_upper.cli import _worker_args, build_parser
from trio_upper.errors import UserError
from trio_upper.server import Endpoint, ServerConfig, UpperServer
from trio_upper.transform import upper_bytes

from .helpers import PROCESS_TIMEOUT, ServerProcess, cli

needs_reuse_port = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT") or not sys.platform.startswith("linux"),
    reason="SO_REUSEPORT spreads connections over sockets on Linux",
)


async def start(nursery: trio.Nursery, **options: object) -> tuple[UpperServer, list[Endpoint]]:
    server = UpperServer(ServerConfig(host="127.0.0.1", **options))  # type: ignore[arg-type]
    endpoints: list[Endpoint] = await nursery.start(server.run)
    return server, endpoints


def blocking_client(port: int) -> socket.socket:
    """A connection the kernel completes at once, without the server's accept."""
    return socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT)


async def test_stopping_serves_the_connections_waiting_in_the_queue(nursery: trio.Nursery) -> None:
    server, endpoints = await start(nursery, port=0, grace=PROCESS_TIMEOUT)
    port = endpoints[0].port
    # Connected, and so in the kernel's accept queue; no checkpoint since, so
    # the server's accept loop has not run: none of them is accepted yet.
    clients = [blocking_client(port) for _ in range(20)]
    server.shutdown()
    await server.stopped_accepting()
    # The listener is closed: new connections are refused...
    with pytest.raises(ConnectionRefusedError):
        blocking_client(port)
    # ...but each that waited in the queue is served, every byte.
    for n, client in enumerate(clients):
        request = f"queued {n}: straße".encode()
        with client:
            await trio.to_thread.run_sync(client.sendall, request)
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := await trio.to_thread.run_sync(client.recv, 65536):
                reply += chunk
        assert reply == upper_bytes(request)
    assert server.stats.connections == 20


@needs_reuse_port
async def test_reuse_port_lets_two_servers_share_a_port(nursery: trio.Nursery) -> None:
    first, endpoints = await start(nursery, port=0, reuse_port=True)
    port = endpoints[0].port
    second, _ = await start(nursery, port=port, reuse_port=True)
    # Connections are spread between the two by the kernel; both answer.
    for n in range(40):
        with trio.fail_after(PROCESS_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"shared %d" % n)
                await stream.send_eof()
                reply = b""
                while chunk := await stream.receive_some():
                    reply += chunk
        assert reply == b"SHARED %d" % n
    await trio.testing.wait_all_tasks_blocked()
    assert first.stats.connections + second.stats.connections == 40
    assert first.stats.connections > 0
    assert second.stats.connections > 0
    first.shutdown(grace=0)
    second.shutdown(grace=0)


async def test_without_reuse_port_a_port_in_use_is_one_error(nursery: trio.Nursery) -> None:
    _, endpoints = await start(nursery, port=0, reuse_port=True)
    with pytest.raises(UserError, match="Address already in use"):
        await UpperServer(ServerConfig(host="127.0.0.1", port=endpoints[0].port)).run()


# --- --workers ----------------------------------------------------------------------------

needs_linux_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="finds the workers in /proc"
)


def children_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after the hang guard."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def exchange_tcp(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as conn:
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


def exchange_udp(port: int, request: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for _ in range(10):
            sock.sendto(request, ("127.0.0.1", port))
            try:
                return sock.recv(70000)
            except TimeoutError:
                continue
    pytest.fail(f"no UDP reply to {request!r}")


@pytest.fixture
def two_workers() -> Iterator[ServerProcess]:
    server = ServerProcess(cli("serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2"))
    yield server
    server.stop(signal.SIGKILL)
    for pid in children_of(server.proc.pid):
        os.kill(pid, signal.SIGKILL)


@needs_linux_proc
def test_workers_serve_together_and_stop_together(two_workers: ServerProcess) -> None:
    server = two_workers
    assert "; 2 workers (Ctrl-C to stop)" in server.first_line
    workers = children_of(server.proc.pid)
    assert len(workers) == 2
    for n in range(30):
        request = f"tcp {n}: straße".encode()
        assert exchange_tcp(server.port, request) == upper_bytes(request)
        request = f"udp {n}: ΐ".encode()
        assert exchange_udp(server.port, request) == upper_bytes(request)
    status, out, err = server.stop(signal.SIGTERM)
    assert status == 0, err
    assert "Traceback" not in err
    # One ready line, one summary, the workers' counts added up.
    assert out.count("Serving uppercase") == 0  # the first line was read already
    assert out.splitlines()[-1] == (
        "Stopped: served 30 TCP connections and 30 datagrams with 2 workers."
    )
    assert not any(alive(pid) for pid in workers)


@needs_linux_proc
def test_a_worker_that_dies_is_replaced(two_workers: ServerProcess) -> None:
    server = two_workers
    first, _ = sorted(children_of(server.proc.pid))
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(children_of(server.proc.pid) - {first}) == 2, "a new worker")
    # The sockets stayed open in the parent: nothing was refused meanwhile,
    # and every connection is answered, by whichever worker.
    for n in range(20):
        request = f"after {n}".encode()
        assert exchange_tcp(server.port, request) == upper_bytes(request)
    status, _, err = server.stop(signal.SIGTERM)
    assert status == 0
    assert "was killed by SIGKILL; starting another" in err


@needs_linux_proc
def test_workers_stop_when_their_parent_is_killed(two_workers: ServerProcess) -> None:
    server = two_workers
    workers = children_of(server.proc.pid)
    assert len(workers) == 2
    server.proc.kill()
    server.proc.wait(timeout=PROCESS_TIMEOUT)
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers gone")


def test_every_serve_option_reaches_the_workers_or_is_the_parents() -> None:
    serve = next(
        action
        for action in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        if action.prog.endswith(" serve")
    )
    options = {action.dest for action in serve._actions if action.option_strings} - {"help"}
    parents = {"host", "port", "workers", "reuse_port", "metrics"}
    args = serve.parse_args(
        [
            "--tcp-only",
            "--ascii",
            "--grace", "7",
            "--max-connections", "3",
            "--idle-timeout", "9",
            "--udp-rate-limit", "11",
            "--certfile", "c.pem",
            "--keyfile", "k.pem",
            "--ca-certs", "ca.pem",
            "--proxy-protocol",
            "--proxy-allow-from", "10.0.0.0/8",
            "--verbose",
        ]
    )  # fmt: skip
    forwarded = serve.parse_args(_worker_args(args))
    for dest in options - parents - {"quiet"}:  # -q and -v exclude each other
        assert getattr(forwarded, dest) == getattr(args, dest) or (
            dest in ("certfile", "keyfile", "ca_certs")
            and getattr(forwarded, dest) == os.path.abspath(getattr(args, dest))
        ), dest
    quiet = serve.parse_args(_worker_args(serve.parse_args(["--quiet"])))
    assert quiet.quiet
