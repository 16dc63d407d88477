"""The server in-process: on loopback sockets, and over an in-memory listener
under the mock clock for everything with a deadline (the grace period)."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio
import trio.testing

from trio_upper.errors import UserError
from trio_upper.server import Endpoint, ServerConfig, UpperServer
from trio_upper.tcp import handle_stream
from trio_upper.transform import upper_ascii, upper_bytes
from trio_upper.udp import MAX_PAYLOAD_IPV4, MAX_PAYLOAD_IPV6
from trio_upper.udp_client import udp_session

from .helpers import (
    LOOPBACK_HANG,
    VIRTUAL_HANG,
    LoopbackServer,
    fails_if_it_hangs,
    receive_exactly,
    receive_until_eof,
    reset_on_close,
    serve_in_memory,
    udp_exchange,
)

# --- loopback ---------------------------------------------------------------


async def test_serves_tcp_and_udp_on_one_port(loopback: LoopbackServer) -> None:
    protocols = {e.protocol for e in loopback.endpoints}
    ports = {e.port for e in loopback.endpoints}
    assert protocols == {"tcp", "udp"}
    assert len(ports) == 1
    assert loopback.port != 0


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_tcp_replies_without_waiting_for_newline(loopback: LoopbackServer) -> None:
    async with await loopback.connect() as stream:
        await stream.send_all(b"hello")
        assert await receive_exactly(stream, 5) == b"HELLO"
        await stream.send_all("straße\n".encode())
        assert await receive_exactly(stream, 8) == b"STRASSE\n"


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_half_close_flushes_then_closes(loopback: LoopbackServer) -> None:
    async with await loopback.connect() as stream:
        await stream.send_all(b"abc\xe2\x82")  # ends inside a 3-byte character
        await stream.send_eof()
        assert await receive_until_eof(stream) == b"ABC\xe2\x82"


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_idle_client_does_not_hold_up_another(loopback: LoopbackServer) -> None:
    # The lecture's server is sequential; ours must not be.
    async with await loopback.connect() as idle, await loopback.connect() as busy:
        await busy.send_all(b"second")
        assert await receive_exactly(busy, 6) == b"SECOND"
        await idle.send_all(b"first")
        assert await receive_exactly(idle, 5) == b"FIRST"


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_client_reset_mid_stream_leaves_server_serving(loopback: LoopbackServer) -> None:
    stream = await loopback.connect()

    async def flood() -> None:
        # Never reads replies, so this blocks once the buffers are full.
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x" * 10_000_000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        assert await stream.receive_some(1) == b"X"  # the server is mid-reply
        reset_on_close(stream.socket)
        stream.socket.close()
    async with await loopback.connect() as other:
        await other.send_all(b"still here")
        assert await receive_exactly(other, 10) == b"STILL HERE"
    assert loopback.server.stats.connections == 2


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_udp_datagram_of_maximum_size_comes_back_whole(loopback: LoopbackServer) -> None:
    request = b"abc \xc3\xa9" * 10_917 + b"abcde"
    assert len(request) == MAX_PAYLOAD_IPV4
    with loopback.udp_socket() as sock:
        await sock.connect(("127.0.0.1", loopback.port))
        reply = await udp_exchange(sock, request)
    assert reply == upper_bytes(request)
    assert len(reply) == MAX_PAYLOAD_IPV4


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_udp_reply_that_would_grow_too_big_falls_back_to_ascii(
    loopback: LoopbackServer,
) -> None:
    # "ŉ" (U+0149) is 2 bytes and uppercases to U+02BC U+004E, 3 bytes: the UTF-8 reply would
    # exceed the largest datagram, so the reply is the --ascii transform.
    request = ("ŉa" * 25_000).encode()[:60_000]
    assert len(upper_bytes(request)) > MAX_PAYLOAD_IPV4
    with loopback.udp_socket() as sock:
        await sock.connect(("127.0.0.1", loopback.port))
        reply = await udp_exchange(sock, request)
    assert reply == upper_ascii(request)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_udp_serves_many_senders(loopback: LoopbackServer) -> None:
    for i in range(5):
        with loopback.udp_socket() as sock:
            await sock.connect(("127.0.0.1", loopback.port))
            assert await udp_exchange(sock, f"sender {i}".encode()) == f"SENDER {i}".encode()
    assert loopback.server.stats.udp.datagrams == 5


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_empty_datagram_gets_empty_reply(loopback: LoopbackServer) -> None:
    with loopback.udp_socket() as sock:
        await sock.connect(("127.0.0.1", loopback.port))
        assert await udp_exchange(sock, b"") == b""


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
@fails_if_it_hangs(LOOPBACK_HANG)
async def test_udp_client_falls_back_from_refusing_ipv6_to_ipv4(
    loopback: LoopbackServer,
) -> None:
    # The loopback server is IPv4 only, like the lecture's UDPServer; the
    # client tries ::1 first, as it would for "localhost" on many systems, and
    # the real ICMP port unreachable sends it on to 127.0.0.1.
    lines = [b"first", b"second", None]
    out: list[bytes] = []

    async def read_line() -> bytes | None:
        return lines.pop(0)

    async def write(data: bytes) -> None:
        out.append(data)

    addresses = [
        (socket.AF_INET6, ("::1", loopback.port, 0, 0)),
        (socket.AF_INET, ("127.0.0.1", loopback.port)),
    ]
    answered = await udp_session(addresses, read_line, write, where="localhost", timeout=5)
    assert answered == 2
    assert out == [b"FIRST\n", b"SECOND\n"]


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_default_host_serves_every_family(nursery: trio.Nursery) -> None:
    server = UpperServer(ServerConfig(port=0))
    endpoints: list[Endpoint] = await nursery.start(server.run)
    hosts = {e.host for e in endpoints}
    assert "0.0.0.0" in hosts
    if socket.has_ipv6:
        assert "::" in hosts
    assert len({e.port for e in endpoints}) == 1
    server.shutdown(grace=0)


@pytest.mark.parametrize(
    ("config", "protocols"),
    [
        (ServerConfig(host="127.0.0.1", port=0, udp=False), {"tcp"}),
        (ServerConfig(host="127.0.0.1", port=0, tcp=False), {"udp"}),
    ],
)
@fails_if_it_hangs(LOOPBACK_HANG)
async def test_serve_one_protocol_only(
    nursery: trio.Nursery, config: ServerConfig, protocols: set[str]
) -> None:
    server = UpperServer(config)
    endpoints: list[Endpoint] = await nursery.start(server.run)
    assert {e.protocol for e in endpoints} == protocols
    server.shutdown(grace=0)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_port_in_use_is_a_user_error(loopback: LoopbackServer) -> None:
    with pytest.raises(UserError, match="Address already in use"):
        await UpperServer(ServerConfig(host="127.0.0.1", port=loopback.port)).run()


async def _squat_udp_on_a_free_tcp_port(squatter: trio.socket.SocketType) -> int:
    """Bind ``squatter`` to a port that TCP can bind too. A port the OS picks
    for UDP may be one a recent TCP connection still holds in TIME_WAIT, and
    then TCP would fail for that reason rather than the one under test."""
    for _ in range(20):
        (probe,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = probe.socket.getsockname()[1]
        await probe.aclose()
        try:
            await squatter.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no port was free on both TCP and UDP")


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_port_in_use_on_udp_only_releases_tcp(nursery: trio.Nursery) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        port = await _squat_udp_on_a_free_tcp_port(squatter)
        with pytest.raises(UserError, match="Address already in use"):
            await UpperServer(ServerConfig(host="127.0.0.1", port=port)).run()
    # Nothing stayed bound: the same port now works for both.
    server = UpperServer(ServerConfig(host="127.0.0.1", port=port))
    endpoints: list[Endpoint] = await nursery.start(server.run)
    assert {e.port for e in endpoints} == {port}
    server.shutdown(grace=0)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_unresolvable_host_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"cannot resolve host 'no-such-host\.invalid'"):
        await UpperServer(ServerConfig(host="no-such-host.invalid", port=0)).run()


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_shutdown_refuses_new_connections(loopback: LoopbackServer) -> None:
    loopback.server.shutdown(grace=0)
    await loopback.server.stopped_accepting()
    with pytest.raises(OSError, match="all attempts to connect"):
        await loopback.connect()


# --- in memory, under the mock clock ---------------------------------------


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_grace_lets_open_connections_finish(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    served = await serve_in_memory(nursery, grace=5)
    server, listener, done = served.server, served.listener, served.done
    client = await listener.connect()
    await client.send_all(b"before")
    server.shutdown()
    with pytest.raises(trio.BrokenResourceError):
        await listener.connect()  # no longer accepting
    await trio.sleep(3)  # inside the grace period, the connection still works
    assert await receive_exactly(client, 6) == b"BEFORE"
    await client.send_all(b" and after")
    await client.send_eof()
    assert await receive_until_eof(client) == b" AND AFTER"
    await done.wait()
    assert trio.current_time() < 5
    assert server.stats.cut_off == 0
    assert server.stats.connections == 1


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_grace_period_end_cancels_what_is_left(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    served = await serve_in_memory(nursery, grace=5)
    server, done = served.server, served.done
    idle = await served.listener.connect()
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    server.shutdown()
    await done.wait()
    assert trio.current_time() - start == pytest.approx(5)
    assert server.stats.cut_off == 1
    assert await idle.receive_some() == b""  # the server's side was closed


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_second_shutdown_with_zero_grace_stops_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    served = await serve_in_memory(nursery, grace=60)
    server, done = served.server, served.done
    await served.listener.connect()
    await trio.testing.wait_all_tasks_blocked()
    server.shutdown()
    await trio.sleep(1)
    assert not done.is_set()
    server.shutdown(grace=0)
    await done.wait()
    assert trio.current_time() == pytest.approx(1)
    assert server.stats.cut_off == 1


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_address_not_on_this_machine_is_a_user_error() -> None:
    # 192.0.2.1 is TEST-NET-1: never a local address. Binding sends nothing.
    with pytest.raises(UserError, match="Cannot assign requested address"):
        await UpperServer(ServerConfig(host="192.0.2.1", port=0)).run()


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_a_bug_in_one_handler_does_not_stop_the_server(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_handle_stream = handle_stream
    calls = 0

    async def first_one_crashes(stream: trio.abc.Stream, **options: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stream.aclose()
            raise RuntimeError("a bug")
        return await real_handle_stream(stream, **options)

    monkeypatch.setattr("trio_upper.server.handle_stream", first_one_crashes)
    served = await serve_in_memory(nursery)
    server, listener = served.server, served.listener
    crashed = await listener.connect()
    assert await crashed.receive_some() == b""
    survivor = await listener.connect()
    await survivor.send_all(b"ok")
    assert await receive_exactly(survivor, 2) == b"OK"
    assert server.stats.connections == 2
    server.shutdown(grace=0)


async def test_permission_denied_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def denied(port: int, *, host: str | None = None) -> list[trio.SocketListener]:
        await trio.lowlevel.checkpoint()
        raise PermissionError(errno.EACCES, "Permission denied")

    # As an unprivileged user binding port 80 would; patched so nothing binds.
    monkeypatch.setattr("trio_upper.server.trio.open_tcp_listeners", denied)
    with pytest.raises(
        UserError, match=r"^cannot serve on all interfaces port 80: Permission denied$"
    ):
        await UpperServer(ServerConfig(port=80)).run()


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
@fails_if_it_hangs(LOOPBACK_HANG)
async def test_udp_datagram_of_maximum_ipv6_size_comes_back_whole(
    nursery: trio.Nursery,
) -> None:
    server = UpperServer(ServerConfig(host="::1", port=0))
    endpoints: list[Endpoint] = await nursery.start(server.run)
    request = b"abc \xc3\xa9" * 10_921 + b"z"  # mixed ASCII and "é"
    assert len(request) == MAX_PAYLOAD_IPV6
    with trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        await sock.connect(("::1", endpoints[0].port))
        reply = await udp_exchange(sock, request)
    assert reply == upper_bytes(request)
    assert len(reply) == MAX_PAYLOAD_IPV6
    server.shutdown(grace=0)
