"""The client sessions of trio_upper.client, without a network: TCP over
in-memory streams, UDP over a fake datagram network, all waits on the mock
clock (autojump_clock), never in real time."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from trio_upper.client import (
    FdReceiveStream,
    FdSendStream,
    LineSource,
    connect_tcp,
    tcp_interactive,
    tcp_stream,
    udp_ask,
    udp_session,
)
from trio_upper.errors import UserError
from trio_upper.tcp import handle_stream
from trio_upper.transform import upper_bytes
from trio_upper.udp import MAX_PAYLOAD_IPV4

from .conftest import receive_until_eof

# --- Helpers ------------------------------------------------------------------


def line_source(lines: list[bytes]) -> LineSource:
    """A list-backed read_line: each line in turn, then None."""
    pending = iter(lines)

    async def read_line() -> bytes | None:
        await trio.lowlevel.checkpoint()
        return next(pending, None)

    return read_line


def collector(out: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    async def write(data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        out.append(data)

    return write


class BytesSource(trio.abc.ReceiveStream):
    """A ReceiveStream that returns the given chunks, then end of stream."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Collector(trio.abc.SendStream):
    """A SendStream that keeps everything sent to it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def unresponsive(seconds: str) -> str:
    """The pattern of the client's timeout message (``seconds`` as a regex)."""
    return rf"^the server did not respond within {seconds} s \(see --timeout\)$"


async def assert_closed(stream: trio.abc.Stream) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def mute_server(stream: trio.abc.Stream) -> None:
    """Reads everything, answers nothing, closes only when the client does."""
    async with stream:
        while await stream.receive_some():
            pass


async def lecture_server(stream: trio.abc.Stream, read_size: int = 1024) -> None:
    """The lecture's TCPServer: one recv, send its uppercase, close."""
    async with stream:
        data = await stream.receive_some(read_size)
        await stream.send_all(bytes(data).upper())


# --- tcp_interactive ----------------------------------------------------------


async def test_interactive_each_line_gets_its_reply() -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []
    lines = [b"hello", "straße".encode(), b"", b"\xff\xc3x"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_stream, server)
        answered = await tcp_interactive(client, line_source(lines), collector(out))
    assert answered == 4
    assert out == [b"HELLO\n", b"STRASSE\n", b"\n", b"\xff\xc3X\n"]
    await assert_closed(client)


async def test_interactive_no_lines_sends_nothing() -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []
    received: list[bytes] = []

    async def record(stream: trio.abc.Stream) -> None:
        received.append(await receive_until_eof(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, server)
        answered = await tcp_interactive(client, line_source([]), collector(out))
    assert answered == 0
    assert out == []
    assert received == [b""]


async def test_interactive_server_that_never_replies_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mute_server, server)
        start = trio.current_time()
        with pytest.raises(UserError, match=unresponsive(r"2\.5")):
            await tcp_interactive(client, line_source([b"hello"]), collector(out), timeout=2.5)
        assert trio.current_time() - start == pytest.approx(2.5)
    assert out == []
    await assert_closed(client)


async def test_interactive_server_that_closes_after_first_reply() -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []

    async def one_line_server(stream: trio.abc.Stream) -> None:
        async with stream:
            data = b""
            while b"\n" not in data:
                data += await stream.receive_some()
            await stream.send_all(data.upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_line_server, server)
        with pytest.raises(
            UserError,
            match=r"^the server closed the connection; 1 line answered, the last line was not$",
        ):
            await tcp_interactive(client, line_source([b"first", b"second"]), collector(out))
    assert out == [b"FIRST\n"]


async def test_interactive_partial_reply_is_written_before_the_error() -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []

    async def cut_short(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"SEC")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cut_short, server)
        with pytest.raises(UserError, match=r"0 lines answered, the last line was not"):
            await tcp_interactive(client, line_source([b"second"]), collector(out))
    assert out == [b"SEC"]


# --- tcp_stream ---------------------------------------------------------------


async def test_stream_copies_input_to_server_and_replies_to_sink() -> None:
    client, server = trio.testing.memory_stream_pair()
    chunks = [b"hello\nstra", "ße\n".encode()[:2], "ße\n".encode()[2:], b"\xe2\x82"]
    sink = Collector()
    received: list[int] = []

    async def serve() -> None:
        received.append(await handle_stream(server))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await tcp_stream(client, BytesSource(*chunks), sink)
    whole = b"".join(chunks)
    assert bytes(sink.data) == upper_bytes(whole) == b"HELLO\nSTRASSE\n\xe2\x82"
    # The handler returned: it saw EOF after every byte.
    assert received == [len(whole)]
    assert not sink.closed  # sink and source are left open
    await assert_closed(client)


async def test_stream_empty_input() -> None:
    client, server = trio.testing.memory_stream_pair()
    sink = Collector()
    received: list[int] = []

    async def serve() -> None:
        received.append(await handle_stream(server))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await tcp_stream(client, BytesSource(), sink)
    assert bytes(sink.data) == b""
    assert received == [0]


async def test_stream_replies_arrive_while_input_is_still_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    feed, source = trio.testing.memory_stream_one_way_pair()
    sink, output = trio.testing.memory_stream_one_way_pair()
    done: list[bool] = []

    async def client_session() -> None:
        await tcp_stream(client, source, sink, timeout=5)
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_stream, server)
        nursery.start_soon(client_session)
        await feed.send_all(b"one\n")
        assert await output.receive_some() == b"ONE\n"
        # A user who takes a minute to type is not a server timing out.
        await trio.sleep(60)
        await feed.send_all(b"two\n")
        assert await output.receive_some() == b"TWO\n"
        assert done == []
        await feed.aclose()
    assert done == [True]


async def test_stream_server_silent_after_eof_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    sink = Collector()
    seen: list[bytes] = []

    async def silent(stream: trio.abc.Stream) -> None:
        seen.append(await receive_until_eof(stream))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent, server)
        start = trio.current_time()
        with pytest.raises(UserError, match=unresponsive("3")):
            await tcp_stream(client, BytesSource(b"hello\n"), sink, timeout=3)
        assert trio.current_time() - start == pytest.approx(3)
        nursery.cancel_scope.cancel()
    assert seen == [b"hello\n"]  # the server did get our EOF
    assert bytes(sink.data) == b""


async def test_stream_timeout_raises_a_bare_user_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    caught: list[Exception] = []

    async def silent(stream: trio.abc.Stream) -> None:
        await receive_until_eof(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent, server)
        try:
            await tcp_stream(client, BytesSource(b"hello\n"), Collector(), timeout=3)
        except Exception as exc:
            caught.append(exc)
        nursery.cancel_scope.cancel()
    assert len(caught) == 1
    # What the docstring promises ("Raises: UserError"), and what a caller's
    # "except UserError" needs.
    assert type(caught[0]) is UserError, repr(caught[0])


async def test_stream_server_that_stops_reading_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Over lockstep streams send_all waits for the peer to read.
    client, _server = trio.testing.lockstep_stream_pair()
    sink = Collector()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        with pytest.raises(UserError, match=unresponsive("4")):
            await tcp_stream(client, BytesSource(b"hello\n"), sink, timeout=4)
        nursery.cancel_scope.cancel()
    assert bytes(sink.data) == b""


async def test_stream_lecture_server_answers_only_its_first_read() -> None:
    client, server = trio.testing.memory_stream_pair()
    sink = Collector()

    async def slow_lecture_server(stream: trio.abc.Stream) -> None:
        async with stream:
            data = await stream.receive_some(6)
            # Reply only once the client has sent all of its input.
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(bytes(data).upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_lecture_server, server)
        with pytest.raises(
            UserError, match=r"^the server closed the connection early; 1 of 3 lines answered$"
        ):
            await tcp_stream(client, BytesSource(b"hello\nworld\nagain\n"), sink)
    assert bytes(sink.data) == b"HELLO\n"  # the partial reply comes first


async def test_stream_input_after_the_server_closed_is_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    feed, source = trio.testing.memory_stream_one_way_pair()
    sink = Collector()

    async def type_more_once_answered() -> None:
        await feed.send_all(b"hello\n")
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(sink.data) == b"HELLO\n"  # answered, and the server closed
        await feed.send_all(b"world\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lecture_server, server)
        nursery.start_soon(type_more_once_answered)
        with pytest.raises(
            UserError,
            match=r"^the server closed the connection before all input was sent; 1 line answered$",
        ):
            await tcp_stream(client, source, sink, timeout=5)
    assert bytes(sink.data) == b"HELLO\n"


async def test_stream_server_closing_first_with_input_still_open_is_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The lecture's server answers one read and closes; the input stays open
    # past the timeout, so whether lines went unanswered cannot be known.
    client, server = trio.testing.memory_stream_pair()
    feed, source = trio.testing.memory_stream_one_way_pair()
    sink = Collector()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lecture_server, server)
        await feed.send_all(b"hello\n")
        start = trio.current_time()
        with pytest.raises(
            UserError,
            match=r"^the server closed the connection before all input was sent; 1 line answered$",
        ):
            await tcp_stream(client, source, sink, timeout=5)
    assert bytes(sink.data) == b"HELLO\n"
    assert trio.current_time() - start == pytest.approx(5)


async def test_stream_server_closing_first_then_input_ending_is_fine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    feed, source = trio.testing.memory_stream_one_way_pair()
    sink = Collector()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lecture_server, server)
        nursery.start_soon(tcp_stream, client, source, sink)
        await feed.send_all(b"hello\n")
        await trio.sleep(3)  # answered and closed; the input ends later
        assert bytes(sink.data) == b"HELLO\n"
        await feed.aclose()
    assert bytes(sink.data) == b"HELLO\n"


async def test_stream_server_silent_while_input_is_open_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    feed, source = trio.testing.memory_stream_one_way_pair()
    sink = Collector()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mute_server, server)
        await feed.send_all(b"hello\n")  # and the input stays open
        start = trio.current_time()
        with pytest.raises(UserError, match=unresponsive("5")):
            await tcp_stream(client, source, sink, timeout=5)
        assert trio.current_time() - start == pytest.approx(5)
        nursery.cancel_scope.cancel()


class SlowSink(Collector):
    """Output to a reader who takes a minute over each chunk, like a pager."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(60)
        await super().send_all(data)


async def test_stream_slow_output_reader_is_not_a_server_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # While we wait on our own stdout the server cannot send, so it stops
    # reading; that stall is ours and must not count against the server.
    client, server = trio.testing.lockstep_stream_pair()
    data = b"hello world\n" * 20_000
    sink = SlowSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_stream, server)
        await tcp_stream(client, BytesSource(data), sink, timeout=5)
    assert bytes(sink.data) == data.upper()


@pytest.mark.parametrize(
    ("data", "read_size"),
    [
        (b"hello\nworld\n", 8),  # answered: b"HELLO\nWO", a line and a bit
        (b"x" * 2000 + b"\n", 1024),  # one long line, cut at the lecture's recv(1024)
    ],
)
async def test_stream_reply_cut_inside_a_line_is_an_error(data: bytes, read_size: int) -> None:
    client, server = trio.testing.memory_stream_pair()
    sink = Collector()

    async def slow_lecture_server(stream: trio.abc.Stream) -> None:
        async with stream:
            request = await stream.receive_some(read_size)
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(bytes(request).upper())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_lecture_server, server)
        with pytest.raises(UserError, match=r"the server closed the connection early"):
            await tcp_stream(client, BytesSource(data), sink)
    assert bytes(sink.data) == data[:read_size].upper()


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
    ICMP port unreachable), as Linux does for connected UDP sockets.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        delay: Callable[[int, bytes], float | None] = lambda n, data: 0.0,
        refused: tuple[object, ...] = (),
        connect_error: dict[object, OSError] | None = None,
    ) -> None:
        self.nursery = nursery
        self.delay = delay
        self.refused = refused
        self.connect_error = connect_error or {}
        self.sockets: list[FakeSocket] = []
        self.sends: list[tuple[object, bytes]] = []

    def socket(self, family: int) -> FakeSocket:
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


# --- Connecting -------------------------------------------------------------------


async def test_connect_timeout_is_a_user_error(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_connects(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    # Patched where connect_tcp looks it up: no real traffic happens.
    monkeypatch.setattr("trio_upper.client.trio.open_tcp_stream", never_connects)
    start = trio.current_time()
    with pytest.raises(
        UserError, match=r"^timed out after 5 s connecting to example\.invalid port 12000$"
    ):
        await connect_tcp("example.invalid", 12000, timeout=5.0)  # the CLI passes floats
    assert trio.current_time() - start == pytest.approx(5)


# --- Local input and output -----------------------------------------------------------


async def test_writing_to_a_broken_pipe_is_a_user_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # Python ignores SIGPIPE, so the write fails with EPIPE.
        with pytest.raises(UserError, match=r"^cannot write output: Broken pipe$"):
            await FdSendStream(write_end).send_all(b"lost")
    finally:
        os.close(write_end)


def closed_fd() -> int:
    """A file descriptor number that is closed, and high enough that nothing
    the test process opens meanwhile takes it (the OS hands out the lowest
    free number)."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, min(1000, soft_limit - 1))
    finally:
        os.close(fd)
    os.close(high)
    return high


async def test_reading_a_closed_fd_is_a_user_error() -> None:
    fd = closed_fd()
    with pytest.raises(UserError, match=r"^cannot read input: ") as caught:
        await FdReceiveStream(fd).receive_some()
    assert str(caught.value) == "cannot read input: Bad file descriptor"
