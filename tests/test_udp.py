"""The UDP loop on its own: batches, the reply rate limit, and replies the
kernel has no room for. Sockets are real (loopback, or Unix datagram
sockets where a full queue must be forced), the loop runs in the test."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_upper.ratelimit import ReplyRateLimiter
from trio_upper.udp import BATCH, SEND_PATIENCE, UdpCounts, serve_udp


@pytest.fixture
def server_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def _client(source: str = "127.0.0.1") -> socket.socket:
    # Any 127.x.y.z is loopback on Linux: a second source address for free.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    return sock


async def _replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` datagrams (a lost one makes the test hang, never pass)."""
    tsock = trio.socket.from_stdlib_socket(sock)
    return [await tsock.recv(70000) for _ in range(count)]


async def test_a_backlog_larger_than_a_batch_is_answered_in_full(
    server_socket: socket.socket, nursery: trio.Nursery
) -> None:
    count = 3 * BATCH + 5
    counts = UdpCounts()
    with _client() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # All queued before the loop first runs: it must drain them in batches.
        for n in range(count):
            client.sendto(b"datagram %d" % n, server_socket.getsockname())
        nursery.start_soon(partial(serve_udp, server_socket, counts=counts))
        replies = await _replies(client, count)
    assert replies == [b"DATAGRAM %d" % n for n in range(count)]
    assert counts == UdpCounts(datagrams=count)


async def test_rate_limit_answers_the_burst_then_refuses_and_logs_once(
    server_socket: socket.socket,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = UdpCounts()
    limiter = ReplyRateLimiter(rate=1, burst=5)
    nursery.start_soon(partial(serve_udp, server_socket, limiter=limiter, counts=counts))
    # Any 127.x.y.z is loopback on Linux: 127.0.1.1 is another /24, the unit
    # the limit counts in.
    with _client() as flood, _client("127.0.1.1") as other:
        for n in range(20):
            flood.sendto(b"flood %d" % n, server_socket.getsockname())
        other.sendto(b"other", server_socket.getsockname())
        # Another source is served whatever the first one does.
        assert await _replies(other, 1) == [b"OTHER"]
        assert await _replies(flood, 5) == [b"FLOOD %d" % n for n in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        assert counts == UdpCounts(datagrams=21, rate_limited=15)
        # Two seconds later the bucket holds two tokens: two more replies.
        await trio.sleep(2)
        for n in range(3):
            flood.sendto(b"later %d" % n, server_socket.getsockname())
        assert await _replies(flood, 2) == [b"LATER 0", b"LATER 1"]
        await trio.testing.wait_all_tasks_blocked()
    assert counts == UdpCounts(datagrams=24, rate_limited=16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One line for the whole run of refusals, not one per datagram: the
    # bucket has not been full since the first.
    assert len(warnings) == 1
    assert "127.0.0.0/24" in warnings[0].getMessage()
    assert "--udp-rate-limit" in warnings[0].getMessage()


async def test_a_reply_with_no_room_waits_then_is_dropped_and_counted(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Unix datagram sockets report a full queue at the receiver as EAGAIN to
    # the sender, which UDP over loopback never does reliably.
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client,
    ):
        server.bind(str(tmp_path / "server"))
        client.bind(str(tmp_path / "client"))
        client.setblocking(False)
        counts = UdpCounts()
        nursery.start_soon(partial(serve_udp, server, counts=counts))
        # The client never reads: its queue fills (10 datagrams by default)
        # and then the server's reply has no room. It waits, and meanwhile
        # later requests queue up at the server.
        sent = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(15):
                client.sendto(b"x", str(tmp_path / "server"))
                sent += 1
                await trio.testing.wait_all_tasks_blocked()
        # Time passes: each waiting reply is dropped after SEND_PATIENCE.
        await trio.sleep(sent * SEND_PATIENCE)
        queued = []
        with contextlib.suppress(BlockingIOError):
            while True:
                queued.append(client.recv(100))
        assert queued == [b"X"] * len(queued)
        assert counts.datagrams == sent
        assert counts.dropped == sent - len(queued) > 0
        # With room again, the server answers at once.
        client.sendto(b"again", str(tmp_path / "server"))
        await trio.testing.wait_all_tasks_blocked()
        assert client.recv(100) == b"AGAIN"
    assert any("dropped" in r.getMessage() for r in caplog.records)
