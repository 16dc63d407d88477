"""The UDP client's session without a network: udp_ask and udp_session over
a fake datagram network, every wait, retry and backoff on the mock clock
(autojump_clock), never in real time."""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing

from trio_upper.errors import UserError
from trio_upper.transform import upper_bytes
from trio_upper.udp import MAX_PAYLOAD_IPV4
from trio_upper.udp_client import udp_ask, udp_session

from .client_io import collector, line_source

# --- UDP: a fake network --------------------------------------------------------

V6 = (socket.AF_INET6, ("::1", 12000, 0, 0))
V4 = (socket.AF_INET, ("127.0.0.1", 12000))
WHERE = "localhost port 12000"


class FakeNetwork:
    """A UDP server reachable at some addresses, through a lossy, slow network.

    ``delay(n, data)`` decides the fate of the ``n``-th datagram sent (from 0,
    over all sockets): None drops it, a number of seconds delays its reply.
    Replies go back to the socket that sent the request, and are lost if that
    socket was closed meanwhile, as on a real network. Sending to an address in
    ``refused`` makes the socket's next recv raise ConnectionRefusedError (the
    ICMP port unreachable), as Linux does for connected UDP sockets. Making a
    socket of a family in ``unsupported`` fails with EAFNOSUPPORT, as it does
    for IPv6 on a host without it.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        delay: Callable[[int, bytes], float | None] = lambda n, data: 0.0,
        refused: tuple[object, ...] = (),
        connect_error: dict[object, OSError] | None = None,
        unsupported: tuple[int, ...] = (),
    ) -> None:
        self.nursery = nursery
        self.delay = delay
        self.refused = refused
        self.connect_error = connect_error or {}
        self.unsupported = unsupported
        self.families_asked: list[int] = []
        self.sockets: list[FakeSocket] = []
        self.sends: list[tuple[object, bytes]] = []

    def socket(self, family: int) -> FakeSocket:
        self.families_asked.append(family)
        if family in self.unsupported:
            code = errno.EAFNOSUPPORT
            raise OSError(code, os.strerror(code))
        sock = FakeSocket(self, family)
        self.sockets.append(sock)
        return sock

    @property
    def connects(self) -> list[object]:
        return [sock.address for sock in self.sockets]


class FakeSocket:
    """Implements the client's DatagramSocket protocol on a FakeNetwork."""

    def __init__(self, network: FakeNetwork, family: int) -> None:
        self.network = network
        self.family = family
        self.address: object = None
        self.closed = False
        self.refused = False
        self._send, self._receive = trio.open_memory_channel[bytes](100)

    async def connect(self, address: tuple[object, ...], /) -> None:
        await trio.lowlevel.checkpoint()
        self.address = address
        if address in self.network.connect_error:
            raise self.network.connect_error[address]

    async def send(self, data: bytes, /) -> int:
        await trio.lowlevel.checkpoint()
        assert not self.closed
        n = len(self.network.sends)
        self.network.sends.append((self.address, data))
        if self.address in self.network.refused:
            self.refused = True
            return len(data)
        delay = self.network.delay(n, data)
        if delay is not None:
            self.network.nursery.start_soon(self._deliver, upper_bytes(data), delay)
        return len(data)

    async def _deliver(self, reply: bytes, delay: float) -> None:
        await trio.sleep(delay)
        if not self.closed:
            self._send.send_nowait(reply)

    async def recv(self, bufsize: int, /) -> bytes:
        assert not self.closed
        if self.refused:
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        data = await self._receive.receive()
        assert len(data) <= bufsize
        return data

    def close(self) -> None:
        self.closed = True


async def test_udp_ask_retries_after_lost_datagrams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: None if n < 2 else 0.0)
        sock = net.socket(socket.AF_INET)
        await sock.connect(V4[1])
        start = trio.current_time()
        reply = await udp_ask(sock, b"hello", timeout=1.0, retries=2)
        assert trio.current_time() - start == pytest.approx(1.0 + 2.0)  # waits 1 s, then 2 s
    assert reply == b"HELLO"
    assert len(net.sends) == 3


async def test_udp_ask_gives_up_after_every_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: None)
        sock = net.socket(socket.AF_INET)
        await sock.connect(V4[1])
        start = trio.current_time()
        reply = await udp_ask(sock, b"hello", timeout=0.5, retries=3)
        assert trio.current_time() - start == pytest.approx(0.5 + 1 + 2 + 4)
    assert reply is None
    assert len(net.sends) == 4


async def test_udp_ask_raises_connection_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, refused=(V4[1],))
        sock = net.socket(socket.AF_INET)
        await sock.connect(V4[1])
        with pytest.raises(ConnectionRefusedError):
            await udp_ask(sock, b"hello", timeout=1.0, retries=2)
    assert len(net.sends) == 1


async def test_udp_session_lines_and_replies(autojump_clock: trio.testing.MockClock) -> None:
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        answered = await udp_session(
            [V4],
            line_source([b"hello", "straße".encode(), b""]),
            collector(out),
            where=WHERE,
            new_socket=net.socket,
        )
    assert answered == 3
    assert out == [b"HELLO\n", b"STRASSE\n", b"\n"]
    # A fresh socket for every line, each closed afterwards.
    assert len(net.sockets) == 3
    assert all(sock.closed for sock in net.sockets)


async def test_udp_session_reply_arrives_after_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: None if n < 2 else 0.0)
        answered = await udp_session(
            [V4], line_source([b"hello"]), collector(out), where=WHERE, new_socket=net.socket
        )
    assert answered == 1
    assert out == [b"HELLO\n"]
    assert [data for _, data in net.sends] == [b"hello"] * 3


async def test_udp_session_no_reply_after_all_tries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: None)
        start = trio.current_time()
        # The spelling of "tries" is checked in the test below.
        with pytest.raises(
            UserError, match=r"^no reply from localhost port 12000 after 3 tr\w+ over 7 s$"
        ):
            await udp_session(
                [V4], line_source([b"hello"]), collector(out), where=WHERE, new_socket=net.socket
            )
        assert trio.current_time() - start == pytest.approx(7.0)
    assert out == []
    assert len(net.sends) == 3
    assert all(sock.closed for sock in net.sockets)


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        (0, "after 1 try over 1 s"),
        (2, "after 3 tries over 7 s"),
    ],
)
async def test_udp_session_no_reply_message_counts_tries(
    autojump_clock: trio.testing.MockClock, retries: int, expected: str
) -> None:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: None)
        with pytest.raises(UserError) as caught:
            await udp_session(
                [V4],
                line_source([b"hello"]),
                collector([]),
                where=WHERE,
                retries=retries,
                new_socket=net.socket,
            )
    assert str(caught.value) == f"no reply from localhost port 12000 {expected}"
    assert len(net.sends) == retries + 1


async def test_udp_session_falls_back_to_the_address_that_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, refused=(V6[1],))
        answered = await udp_session(
            [V6, V4],
            line_source([b"one", b"two", b"three"]),
            collector(out),
            where=WHERE,
            new_socket=net.socket,
        )
    assert answered == 3
    assert out == [b"ONE\n", b"TWO\n", b"THREE\n"]
    # ::1 refused once; every later line goes straight to 127.0.0.1.
    assert net.connects == [V6[1], V4[1], V4[1], V4[1]]
    assert [sock.family for sock in net.sockets] == [
        socket.AF_INET6,
        socket.AF_INET,
        socket.AF_INET,
        socket.AF_INET,
    ]
    assert all(sock.closed for sock in net.sockets)


async def test_udp_session_every_address_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, refused=(V6[1], V4[1]))
        start = trio.current_time()
        with pytest.raises(
            UserError, match=r"^no UDP server at localhost port 12000: connection refused$"
        ):
            await udp_session(
                [V6, V4],
                line_source([b"hello"]),
                collector(out),
                where=WHERE,
                new_socket=net.socket,
            )
        assert trio.current_time() == start  # no waiting for a refused address
    assert out == []
    assert net.connects == [V6[1], V4[1]]


async def test_udp_session_unreachable_address_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    unreachable = OSError(errno.ENETUNREACH, "Network is unreachable")
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, connect_error={V4[1]: unreachable})
        with pytest.raises(
            UserError, match=r"^cannot reach localhost port 12000: Network is unreachable$"
        ):
            await udp_session(
                [V4], line_source([b"hello"]), collector(out), where=WHERE, new_socket=net.socket
            )
    assert out == []
    assert all(sock.closed for sock in net.sockets)


async def test_udp_session_skips_an_address_family_this_host_lacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A host without IPv6 cannot even make the socket for ::1: that address
    # failed, like a refusing one, and 127.0.0.1 is tried next.
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, unsupported=(socket.AF_INET6,))
        answered = await udp_session(
            [V6, V4],
            line_source([b"one", b"two"]),
            collector(out),
            where=WHERE,
            new_socket=net.socket,
        )
    assert answered == 2
    assert out == [b"ONE\n", b"TWO\n"]
    # IPv6 asked for once; every later line goes straight to 127.0.0.1.
    assert net.families_asked == [socket.AF_INET6, socket.AF_INET, socket.AF_INET]
    assert net.connects == [V4[1], V4[1]]
    assert all(sock.closed for sock in net.sockets)


async def test_udp_session_no_address_family_this_host_has(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    reason = re.escape(os.strerror(errno.EAFNOSUPPORT))
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, unsupported=(socket.AF_INET6,))
        with pytest.raises(UserError, match=rf"^cannot reach localhost port 12000: {reason}$"):
            await udp_session(
                [V6], line_source([b"hello"]), collector(out), where=WHERE, new_socket=net.socket
            )
    assert out == []
    assert net.families_asked == [socket.AF_INET6]
    assert net.sends == []


async def test_udp_session_late_reply_is_never_taken_for_the_next_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Line 1's first datagram is answered after 1.5 s: after its 1 s timeout,
    # so the retry (answered at once) gives line 1 its reply at t=1.1. The
    # late reply then lands at t=1.5, while line 2, whose answer takes 0.5 s,
    # is waiting. On a shared socket line 2 would print "FIRST".
    delays = {0: 1.5, 1: 0.1, 2: 0.5}
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery, delay=lambda n, data: delays.get(n, 0.0))
        answered = await udp_session(
            [V4],
            line_source([b"first", b"second", b"third"]),
            collector(out),
            where=WHERE,
            timeout=1.0,
            new_socket=net.socket,
        )
    assert answered == 3
    assert out == [b"FIRST\n", b"SECOND\n", b"THIRD\n"]
    assert [data for _, data in net.sends] == [b"first", b"first", b"second", b"third"]


async def test_udp_session_line_too_long_for_a_datagram(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out: list[bytes] = []
    longest = b"a" * MAX_PAYLOAD_IPV4
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        with pytest.raises(
            UserError,
            match=r"^line 2 is longer than one datagram can carry \(65507 bytes\)$",
        ):
            await udp_session(
                [V4],
                line_source([longest, longest + b"a"]),
                collector(out),
                where=WHERE,
                new_socket=net.socket,
            )
    # The longest line that fits went out and came back; the next never left.
    assert out == [longest.upper() + b"\n"]
    assert [len(data) for _, data in net.sends] == [MAX_PAYLOAD_IPV4]


async def test_udp_session_without_addresses(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        with pytest.raises(
            UserError, match=r"^cannot reach localhost port 12000: no address to try$"
        ):
            await udp_session(
                [], line_source([b"x"]), collector([]), where=WHERE, new_socket=net.socket
            )
    assert net.sends == []
