"""The UDP loop on its own: batches, the reply rate limit, replies the kernel
has no room for, and errors from the socket.

Most tests run the loop over FakeDatagramSocket (tests/helpers.py), in memory
under the autojump clock, which fails the socket calls on demand; the rest
use real sockets on loopback, with errors injected by a wrapper around the
real socket.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_upper.ratelimit import ReplyRateLimiter
from trio_upper.udp import BATCH, RECEIVE_RETRY, SEND_PATIENCE, UdpCounts, UdpSocket, serve_udp

from .helpers import (
    LOOPBACK_HANG,
    UDP_REPLY_WAIT,
    VIRTUAL_HANG,
    FakeDatagramSocket,
    until,
    warnings_logged,
)

# The errors the loop must ride out: the kernel short of memory or buffers,
# and "try again" where it should not come.
TRANSIENT = [errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN]

# Errors one sender causes: an ICMP error for an earlier reply.
FROM_A_PEER = [errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH]


@pytest.fixture
async def fake(nursery: trio.Nursery) -> tuple[FakeDatagramSocket, UdpCounts]:
    """serve_udp running over a fake socket, and its counts."""
    sock = FakeDatagramSocket()
    counts = UdpCounts()
    nursery.start_soon(partial(serve_udp, sock, counts=counts))
    return sock, counts


# --- Batches ------------------------------------------------------------------------------


async def test_a_backlog_is_answered_in_order_one_wait_per_batch(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    count = 3 * BATCH + 5
    sock = FakeDatagramSocket()
    for n in range(count):
        sock.deliver(b"datagram %d" % n)
    counts = UdpCounts()
    nursery.start_soon(partial(serve_udp, sock, counts=counts))
    with trio.fail_after(VIRTUAL_HANG):
        replies = await sock.replies(count)
    assert replies == [b"DATAGRAM %d" % n for n in range(count)]
    assert counts == UdpCounts(datagrams=count)
    # One scheduler pass per batch, not per datagram: four batches, and the
    # wait for more that follows them.
    await trio.testing.wait_all_tasks_blocked()
    assert sock.receive_waits == 4 + 1


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
    """Read ``count`` datagrams; a lost one fails the test at the hang guard."""
    tsock = trio.socket.from_stdlib_socket(sock)
    with trio.fail_after(LOOPBACK_HANG):
        return [await tsock.recv(70000) for _ in range(count)]


def _room_for(sock: socket.socket, count: int) -> None:
    """Make ``sock``'s receive buffer hold ``count`` small datagrams, or skip.

    The kernel charges each datagram a whole buffer (about 1 KiB for a few
    bytes of payload) and caps SO_RCVBUF at net.core.rmem_max: ask for what
    is needed and check what was granted (Linux reports twice the request)."""
    needed = count * 2048
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, needed)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < needed:
        pytest.skip(f"a receive buffer for {count} datagrams needs {needed} bytes: {granted}")


async def test_a_backlog_larger_than_a_batch_is_answered_in_full_on_loopback(
    server_socket: socket.socket, nursery: trio.Nursery
) -> None:
    count = 2 * BATCH + 5
    counts = UdpCounts()
    _room_for(server_socket, count)
    with _client() as client:
        _room_for(client, count)
        # All queued before the loop first runs: it must drain them in batches.
        for n in range(count):
            client.sendto(b"datagram %d" % n, server_socket.getsockname())
        nursery.start_soon(partial(serve_udp, UdpSocket(server_socket), counts=counts))
        replies = await _replies(client, count)
    assert replies == [b"DATAGRAM %d" % n for n in range(count)]
    assert counts == UdpCounts(datagrams=count)


# --- The rate limit -----------------------------------------------------------------------


async def test_rate_limit_answers_the_burst_then_refuses_and_logs_once(
    server_socket: socket.socket,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = UdpCounts()
    limiter = ReplyRateLimiter(rate=1, burst=5)
    nursery.start_soon(
        partial(serve_udp, UdpSocket(server_socket), limiter=limiter, counts=counts)
    )
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
    # One line for the whole run of refusals, not one per datagram: the
    # bucket has not been full since the first.
    [warning] = warnings_logged(caplog)
    assert "127.0.0.0/24" in warning
    assert "--udp-rate-limit" in warning


# --- A full send buffer -------------------------------------------------------------------


async def test_a_reply_with_no_room_waits_then_is_dropped_and_counted(
    fake: tuple[FakeDatagramSocket, UdpCounts],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        sock.room = False
        sock.deliver(b"first")
        sock.deliver(b"second")
        await trio.sleep(SEND_PATIENCE / 2)
        # The first reply waits for room; the second request waits behind it.
        assert counts == UdpCounts(datagrams=1)
        await trio.sleep(SEND_PATIENCE)
        # The first was dropped; the second now waits in its turn.
        assert counts == UdpCounts(datagrams=2, dropped=1)
        sock.make_room()
        assert await sock.replies(1) == [b"SECOND"]
    assert counts == UdpCounts(datagrams=2, dropped=1)
    [warning] = warnings_logged(caplog)
    assert f"dropped: no room to send it for {SEND_PATIENCE:g} s" in warning


async def test_room_within_the_patience_sends_the_waiting_reply(
    fake: tuple[FakeDatagramSocket, UdpCounts], autojump_clock: trio.testing.MockClock
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        sock.room = False
        sock.deliver(b"patient")
        await trio.sleep(SEND_PATIENCE / 2)
        sock.make_room()
        assert await sock.replies(1) == [b"PATIENT"]
    assert counts == UdpCounts(datagrams=1)


# --- Errors from the socket -----------------------------------------------------------------


@pytest.mark.parametrize("error", TRANSIENT, ids=errno.errorcode.get)
async def test_receive_errors_are_waited_out_logged_once_and_cost_no_datagram(
    error: int,
    fake: tuple[FakeDatagramSocket, UdpCounts],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        sock.deliver(b"before")
        assert await sock.replies(1) == [b"BEFORE"]
        failed_at = trio.current_time()
        for _ in range(50):
            sock.fail_receive(error)
        sock.deliver(b"after")
        assert await sock.replies(2) == [b"BEFORE", b"AFTER"]
        # Each failure waited RECEIVE_RETRY before the next try: no spinning.
        assert trio.current_time() - failed_at == pytest.approx(50 * RECEIVE_RETRY)
    assert counts == UdpCounts(datagrams=2)
    assert warnings_logged(caplog) == [
        f"udp 192.0.2.1:12000: cannot receive: {os.strerror(error)}; "
        f"retrying every {RECEIVE_RETRY:g} s",
        "udp 192.0.2.1:12000: receiving again, after 5.0 s",
    ]


@pytest.mark.parametrize("error", FROM_A_PEER, ids=errno.errorcode.get)
async def test_an_icmp_error_on_receive_is_skipped_quietly(
    error: int,
    fake: tuple[FakeDatagramSocket, UdpCounts],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        sock.deliver(b"one")
        sock.fail_receive(error)  # in the middle of a batch
        sock.deliver(b"two")
        assert await sock.replies(2) == [b"ONE", b"TWO"]
        sock.fail_receive(error)  # while the loop waits
        sock.deliver(b"three")
        assert await sock.replies(3) == [b"ONE", b"TWO", b"THREE"]
    assert counts == UdpCounts(datagrams=3)
    assert warnings_logged(caplog) == []


@pytest.mark.parametrize("error", [errno.ENOBUFS, errno.ENOMEM], ids=errno.errorcode.get)
async def test_send_errors_drop_that_reply_only_and_are_logged_once_per_run(
    error: int,
    fake: tuple[FakeDatagramSocket, UdpCounts],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        for _ in range(3):
            sock.send_errors.append(OSError(error, os.strerror(error)))
        for n in range(5):
            sock.deliver(b"request %d" % n)
        assert await sock.replies(2) == [b"REQUEST 3", b"REQUEST 4"]
    assert counts == UdpCounts(datagrams=5, dropped=3)
    assert warnings_logged(caplog) == [
        f"udp 192.0.2.1:12000: cannot send replies: {os.strerror(error)}; dropping them",
        "udp 192.0.2.1:12000: sending replies again, after 0.0 s",
    ]


async def test_a_send_error_while_waiting_for_room_drops_that_reply_only(
    fake: tuple[FakeDatagramSocket, UdpCounts], autojump_clock: trio.testing.MockClock
) -> None:
    sock, counts = fake
    with trio.fail_after(VIRTUAL_HANG):
        sock.room = False
        sock.deliver(b"unlucky")
        await trio.testing.wait_all_tasks_blocked()
        sock.send_errors.append(OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)))
        sock.make_room()
        sock.deliver(b"lucky")
        assert await sock.replies(1) == [b"LUCKY"]
    assert counts == UdpCounts(datagrams=2, dropped=1)


@pytest.mark.parametrize("error", [errno.EBADF, errno.ENOTSOCK], ids=errno.errorcode.get)
async def test_a_socket_that_is_gone_ends_the_loop(
    error: int, autojump_clock: trio.testing.MockClock
) -> None:
    sock = FakeDatagramSocket()
    sock.fail_receive(error)
    with pytest.raises(OSError, match=os.strerror(error)) as raised:
        await serve_udp(sock)
    assert raised.value.errno == error


async def test_a_closed_trio_socket_ends_the_loop() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.bind(("127.0.0.1", 0))
        sock = UdpSocket(raw)
        ended: list[trio.ClosedResourceError] = []

        async def serve() -> None:
            try:
                await serve_udp(sock)
            except trio.ClosedResourceError as exc:
                ended.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()
    assert len(ended) == 1


# --- Errors injected into a real socket ---------------------------------------------------


class InjectingUdpSocket(UdpSocket):
    """A real UDP socket whose calls fail, in turn, with the errors given,
    then work: a fault before the kernel is asked, so no datagram is lost to
    it (a failed receive leaves the datagram queued)."""

    def __init__(self, sock: socket.socket, receive_errors: list[int], send_errors: list[int]):
        super().__init__(sock)
        self.receive_errors = list(receive_errors)
        self.send_errors = list(send_errors)
        real_recvfrom, real_sendto = self.recvfrom_nowait, self.sendto_nowait

        def recvfrom_nowait() -> tuple[bytes, Any]:
            self._maybe_fail(self.receive_errors)
            return real_recvfrom()

        def sendto_nowait(data: bytes, address: Any, /) -> object:
            self._maybe_fail(self.send_errors)
            return real_sendto(data, address)

        self.recvfrom_nowait = recvfrom_nowait
        self.sendto_nowait = sendto_nowait

    @staticmethod
    def _maybe_fail(errors: list[int]) -> None:
        if errors:
            error = errors.pop(0)
            raise OSError(error, os.strerror(error))

    async def recvfrom(self) -> tuple[bytes, Any]:
        await trio.lowlevel.checkpoint()
        self._maybe_fail(self.receive_errors)
        return await super().recvfrom()


async def _reply_unless_dropped(
    client: trio.socket.SocketType, answers: list[bytes], counts: UdpCounts, dropped: int
) -> bytes:
    """The reply to the request of the last of ``answers`` (late replies to
    the earlier ones are skipped); or b"" once the server has dropped a reply
    (``counts.dropped`` has grown past ``dropped``), so that the client asks
    again at once instead of after a timeout; or after UDP_REPLY_WAIT, for a
    datagram that the kernel lost."""
    reply = b""

    async def receive() -> None:
        nonlocal reply
        got = await client.recv(1000)
        while got != answers[-1]:
            assert got in answers[:-1], got
            got = await client.recv(1000)
        reply = got
        race.cancel_scope.cancel()

    async def watch() -> None:
        await until(lambda: counts.dropped > dropped)
        race.cancel_scope.cancel()

    with trio.move_on_after(UDP_REPLY_WAIT):
        async with trio.open_nursery() as race:
            race.start_soon(receive)
            race.start_soon(watch)
    return reply


async def test_loopback_errors_on_every_call_cost_no_reply_that_a_retry_cannot_get(
    server_socket: socket.socket, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    errors = [errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN, errno.ECONNREFUSED] * 2
    sock = InjectingUdpSocket(server_socket, receive_errors=errors, send_errors=errors)
    counts = UdpCounts()
    nursery.start_soon(partial(serve_udp, sock, counts=counts))
    sends = 0
    expected = [f"REQUEST {n}: STRASSE".encode() for n in range(40)]
    with _client() as raw, trio.socket.from_stdlib_socket(raw) as client:
        await client.connect(server_socket.getsockname())
        with trio.fail_after(LOOPBACK_HANG):
            for n in range(40):
                request = f"request {n}: straße".encode()
                reply = b""
                # As the UDP client does: a lost reply is asked for again,
                # and a late reply to an earlier request is not this one's.
                while reply != expected[n]:
                    dropped = counts.dropped
                    await client.send(request)
                    sends += 1
                    reply = await _reply_unless_dropped(client, expected[: n + 1], counts, dropped)
    assert sock.receive_errors == sock.send_errors == []
    # A send error costs that one reply (but EAGAIN, which waits for room).
    assert counts.dropped == len(errors) - errors.count(errno.EAGAIN)
    # Each request was answered, each lost reply was received: no datagram
    # was lost to a receive error. (A resent request may still be on its way.)
    assert 40 + counts.dropped <= counts.datagrams <= sends
    # One line for each run, and a run within a few seconds of the last is
    # not logged again: the first of each kind.
    lines = warnings_logged(caplog)
    assert any("cannot receive: No buffer space available" in line for line in lines), lines
    assert any("cannot send replies: No buffer space available" in line for line in lines)
