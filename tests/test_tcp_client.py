"""The TCP client's sessions without a network: tcp_interactive and
tcp_stream over in-memory streams, every wait on the mock clock
(autojump_clock), never in real time."""

from __future__ import annotations

import contextlib
import tracemalloc

import pytest
import trio
import trio.testing

from trio_upper.errors import UserError
from trio_upper.tcp import handle_stream
from trio_upper.tcp_client import MAX_PENDING_REPLY, connect_tcp, tcp_interactive, tcp_stream
from trio_upper.transform import upper_bytes

from .client_io import BytesSource, Collector, collector, line_source
from .helpers import receive_until_eof

# --- Helpers ------------------------------------------------------------------


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


async def test_interactive_reply_sent_ahead_is_kept_for_the_next_line() -> None:
    client, server = trio.testing.memory_stream_pair()
    out: list[bytes] = []

    async def eager(stream: trio.abc.Stream) -> None:
        # Both replies at once, in answer to the first line.
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"ONE\nTWO\n")
            await receive_until_eof(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(eager, server)
        answered = await tcp_interactive(client, line_source([b"one", b"two"]), collector(out))
    assert answered == 2
    assert out == [b"ONE\n", b"TWO\n"]


# --- tcp_interactive: reply lines longer than it holds --------------------------

# Printable ASCII without a newline, repeated: the content of an endless line.
PATTERN = bytes(range(ord("!"), ord("~") + 1))

# How much a test server sends at a time: small, and no divisor of the bound,
# so that deliveries straddle it.
SMALL_CHUNK = 1000


def pattern(offset: int, size: int) -> bytes:
    """``size`` bytes of the endless line from ``offset``."""
    start = offset % len(PATTERN)
    return (PATTERN * ((start + size) // len(PATTERN) + 1))[start : start + size]


class CountingStream(trio.abc.Stream):
    """A client's connection that counts the bytes the client took from it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class EndlessLineOutput:
    """A write callback for the endless line that keeps none of it: it checks
    that each write carries on the line exactly, and counts."""

    def __init__(self) -> None:
        self.size = 0
        self.largest = 0

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        assert data == pattern(self.size, len(data))
        self.size += len(data)
        self.largest = max(self.largest, len(data))


async def test_interactive_reply_of_megabytes_is_written_whole_in_bounded_pieces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Lockstep: each of the server's small sends reaches the client as such.
    client, server = trio.testing.lockstep_stream_pair()
    long_reply = pattern(0, 3 * 1024 * 1024 + 123)
    out: list[bytes] = []

    async def long_then_short(stream: trio.abc.Stream) -> None:
        async with stream:
            assert await stream.receive_some() == b"long\n"
            for start in range(0, len(long_reply), SMALL_CHUNK):
                await stream.send_all(long_reply[start : start + SMALL_CHUNK])
            await stream.send_all(b"\n")
            assert await stream.receive_some() == b"short\n"
            await stream.send_all(b"SHORT\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_then_short, server)
        answered = await tcp_interactive(
            client, line_source([b"long", b"short"]), collector(out), timeout=5
        )
    assert answered == 2
    assert b"".join(out) == long_reply + b"\n" + b"SHORT\n"
    # Each full bound written as it came, the rest with the newline; a short
    # reply still in one piece.
    full, rest = divmod(len(long_reply), MAX_PENDING_REPLY)
    assert [len(piece) for piece in out] == [MAX_PENDING_REPLY] * full + [rest + 1, 6]


async def test_interactive_endless_reply_without_newline_times_out_in_bounded_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    counted = CountingStream(client)
    output = EndlessLineOutput()

    async def endless(stream: trio.abc.Stream) -> None:
        # It stops only when the client hangs up.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some()
            sent = 0
            while True:
                await stream.send_all(pattern(sent, SMALL_CHUNK))
                sent += SMALL_CHUNK
                await trio.sleep(0.001)

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endless, server)
            start = trio.current_time()
            with pytest.raises(UserError, match=unresponsive("5")):
                await tcp_interactive(counted, line_source([b"hello"]), output.write, timeout=5)
            # The line's timeout bounds the wait, however much keeps coming.
            assert trio.current_time() - start == pytest.approx(5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counted.received > 50 * MAX_PENDING_REPLY
    # Every byte that came was written, in pieces no larger than the bound...
    assert output.size == counted.received
    assert output.largest <= MAX_PENDING_REPLY
    # ...and memory stayed at a few times the bound (the reply and its copies
    # on the way out, the test's checks), not the 76 times that came.
    assert peak < 16 * MAX_PENDING_REPLY, peak


async def test_interactive_long_partial_reply_then_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    partial = pattern(0, 5 * MAX_PENDING_REPLY + 7)
    out: list[bytes] = []

    async def cut_short(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.receive_some()
            for start in range(0, len(partial), SMALL_CHUNK):
                await stream.send_all(partial[start : start + SMALL_CHUNK])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cut_short, server)
        with pytest.raises(
            UserError,
            match=r"^the server closed the connection; 0 lines answered, the last line was not$",
        ):
            await tcp_interactive(client, line_source([b"hello"]), collector(out), timeout=5)
    assert b"".join(out) == partial
    assert max(len(piece) for piece in out) <= MAX_PENDING_REPLY


async def test_interactive_slow_output_of_a_long_reply_is_not_a_server_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Writing a piece of a long reply takes a minute (a terminal paused with
    # Ctrl-S); the server, done in no time, must not be blamed for it.
    client, server = trio.testing.lockstep_stream_pair()
    long_reply = pattern(0, 3 * MAX_PENDING_REPLY) + b"\n"
    out: list[bytes] = []

    async def slow_write(data: bytes) -> None:
        await trio.sleep(60)
        out.append(data)

    async def long_line(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(long_reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_line, server)
        answered = await tcp_interactive(client, line_source([b"hello"]), slow_write, timeout=5)
    assert answered == 1
    assert b"".join(out) == long_reply
    assert len(out) > 1


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


# --- Connecting -------------------------------------------------------------------


async def test_connect_timeout_is_a_user_error(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_connects(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    # Patched where connect_tcp looks it up: no real traffic happens.
    monkeypatch.setattr("trio_upper.tcp_client.trio.open_tcp_stream", never_connects)
    start = trio.current_time()
    with pytest.raises(
        UserError, match=r"^timed out after 5 s connecting to example\.invalid port 12000$"
    ):
        await connect_tcp("example.invalid", 12000, timeout=5.0)  # the CLI passes floats
    assert trio.current_time() - start == pytest.approx(5)
