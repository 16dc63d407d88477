"""Running more than one server: sharing a port (--reuse-port), and stopping
without resetting the connections that wait in the kernel's queue."""

from __future__ import annotations

import socket
import sys

import pytest
import trio
import trio.testing

from trio_upper.errors import UserError
from trio_upper.server import Endpoint, ServerConfig, UpperServer
from trio_upper.transform import upper_bytes

from .conftest import PROCESS_TIMEOUT

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
