"""Fault injection and property tests for the TCP side.

The hardening issue asks that a client reset mid-reply, a connect-and-vanish, a
half-open connection and a peer that half-closes and keeps reading each end that
one connection, quietly; and that what comes back is exactly the transform of
what was sent, however the bytes are cut, with nothing lost or duplicated.

The handler and the server are driven only through their public surface
(``handle_stream``, ``UpperServer.serve``, ``UpperServer.stats``): the handler's
insides are being optimised, and these tests must hold for any version of it.

Faults come from :class:`FaultyStream` (tests/helpers.py), a wrapper around the
server's end of an in-memory stream pair that plays a bad network and a bad
peer: it cuts what the server reads and writes into pieces of our choosing,
resets the connection after k bytes (or whenever the test says), or stalls one
direction for good.

Everything in memory runs under the autojump MockClock: a hang shows up at once
as ``trio.TooSlowError`` rather than as a stuck test, and waiting an hour costs
nothing. The loopback tests at the end use real sockets on 127.0.0.1 and wait
only for a state they can see (a handler count, a full socket buffer), never for
a fixed time.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import itertools
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_upper.fastsocket import FastSocketListener
from trio_upper.server import Endpoint, ServerConfig, UpperServer
from trio_upper.tcp import handle_stream
from trio_upper.transform import upper_bytes

from .helpers import (
    LOOPBACK_HANG,
    VIRTUAL_HANG,
    FaultyStream,
    Listener,
    LoopbackServer,
    fails_if_it_hangs,
    receive_exactly,
    receive_until_eof,
    reset_on_close,
    serve_in_memory,
    until,
    warnings_logged,
    writable,
)

HalfCloseable = trio.abc.HalfCloseableStream
PairFactory = Callable[[], tuple[HalfCloseable, HalfCloseable]]

# The server's end is wrapped; the test drives the other end. Memory streams
# buffer without limit; lockstep streams buffer nothing, so every send waits
# for the peer to read it: back-pressure at its strictest.
PAIRS: dict[str, PairFactory] = {
    "memory": trio.testing.memory_stream_pair,
    "lockstep": trio.testing.lockstep_stream_pair,
}

# Virtual seconds a connection through the server is left silent, at most. A
# server may close a connection that sends or reads nothing for long (an idle
# timeout, the slow-loris defence); these tests are about faults, not that.
A_WHILE = 10.0

# A request that grows on the way back ("ΐ" is 2 bytes and comes back as 6),
# with invalid bytes and ASCII in it: 192 KB, several of the server's reads.
BIG_REQUEST = ("ΐ straße ŉ ".encode() + b"\xff ") * 12_000


# --- What the server must send back ---------------------------------------------------


def held_back(sent: bytes, ascii_only: bool) -> int:
    """How many bytes at the end of ``sent`` start a UTF-8 character that is
    not complete yet: the server may keep those until the next bytes say what
    they are, and nothing else. The standard library's decoder is the oracle."""
    if ascii_only:
        return 0
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    decoder.decode(sent)
    pending: bytes = decoder.getstate()[0]
    return len(pending)


def answered_by_now(sent: bytes, ascii_only: bool) -> bytes:
    """What must have come back once the server has caught up with ``sent``:
    README, "every byte that arrives is uppercased and sent back as soon as it
    arrives", except an incomplete character at the end. Uppercasing maps code
    point by code point, so this is a prefix of the final reply."""
    whole = upper_bytes(sent, ascii_only=ascii_only)
    return whole[: len(whole) - held_back(sent, ascii_only)]


def assert_prefix(reply: bytes, of: bytes) -> None:
    """``reply`` is the start of ``of``: nothing altered, invented or duplicated."""
    if of.startswith(reply):
        return
    at = next((i for i, (a, b) in enumerate(zip(reply, of, strict=False)) if a != b), len(of))
    pytest.fail(
        f"reply ({len(reply)} bytes) is not a prefix of the expected {len(of)} bytes: "
        f"first difference at byte {at}: {reply[at : at + 16]!r} != {of[at : at + 16]!r}"
    )


# --- The fault-injecting stream (FaultyStream, in helpers.py) ---------------------------


async def connect_faulty(
    listener: Listener,
    wrap: Callable[[HalfCloseable], FaultyStream] = FaultyStream,
    *,
    lockstep: bool = False,
) -> tuple[HalfCloseable, FaultyStream]:
    """Open a connection whose server's end is a :class:`FaultyStream` made
    by ``wrap``; returns the client's end and the server's."""
    client, server = PAIRS["lockstep" if lockstep else "memory"]()
    wrapped = wrap(server)
    await listener.hand_over(wrapped)
    return client, wrapped


async def faulty_memory_pair() -> tuple[FaultyStream, FaultyStream]:
    client, server = trio.testing.memory_stream_pair()
    return FaultyStream(client), FaultyStream(server)


async def faulty_lockstep_pair() -> tuple[FaultyStream, FaultyStream]:
    client, server = trio.testing.lockstep_stream_pair()
    return FaultyStream(client), FaultyStream(server)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_the_wrapper_without_faults_keeps_the_stream_contract() -> None:
    # So that a failure elsewhere in this file is the server's, not the
    # wrapper's. With a clogged (lockstep) pair only the two-way checks: the
    # half-close ones fail on a bare lockstep pair too (its send_eof is aclose).
    await trio.testing.check_half_closeable_stream(faulty_memory_pair, None)
    await trio.testing.check_two_way_stream(faulty_memory_pair, faulty_lockstep_pair)


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_the_wrapper_injects_the_faults_it_is_asked_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    wrapped = FaultyStream(server, receive_sizes=[2], reset_on_send_after=4)
    await client.send_all(b"abcdef")
    assert await wrapped.receive_some() == b"ab"
    with pytest.raises(trio.BrokenResourceError) as caught:
        await wrapped.send_all(b"123456")
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert await client.receive_some() == b"1234"  # exactly k bytes got through
    with pytest.raises(trio.BrokenResourceError):
        await wrapped.receive_some()  # a reset breaks both directions

    client, server = trio.testing.memory_stream_pair()
    wrapped = FaultyStream(server, stall_receive_after=1)
    await client.send_all(b"xy")
    assert await wrapped.receive_some() == b"x"
    with trio.move_on_after(3600) as scope:
        await wrapped.receive_some()  # the "y" never comes through
    assert scope.cancelled_caught

    async def reset_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()
        wrapped.reset()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reset_soon)
        with pytest.raises(trio.BrokenResourceError):
            await wrapped.receive_some()  # a reset wakes a stalled call


# --- Driving the client's end ---------------------------------------------------------


async def serve_one(stream: trio.abc.Stream, ascii_only: bool, returned: list[int]) -> None:
    """Run the handler and keep what it returns; an exception fails the test."""
    returned.append(await handle_stream(stream, ascii_only=ascii_only))


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def send_pieces(
    stream: trio.abc.SendStream, pieces: Iterable[bytes], eof: bool = True
) -> bool:
    """Send each piece, then half-close. Returns False if the server hung up
    first, which a client whose connection the server dropped must expect."""
    try:
        for piece in pieces:
            await stream.send_all(piece)
        if eof and isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
    except trio.BrokenResourceError:
        return False
    return True


async def read_slowly(
    stream: trio.abc.ReceiveStream, sizes: Iterable[int], pause: float = 0.0
) -> bytes:
    """Read until end of stream in the given sizes, pausing (virtual time)
    between reads: a slow reader at the end of a long network."""
    data = bytearray()
    next_size = itertools.cycle(sizes)
    while chunk := await stream.receive_some(next(next_size)):
        data += chunk
        if pause:
            await trio.sleep(pause)
    return bytes(data)


async def converse(stream: HalfCloseable, pieces: Sequence[bytes]) -> bytes:
    """Send the pieces and half-close while reading the reply until the end of
    stream, concurrently (over lockstep streams anything else deadlocks)."""
    reply: list[bytes] = []

    async def collect() -> None:
        reply.append(await receive_until_eof(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        nursery.start_soon(send_pieces, stream, pieces)
    return reply[0]


# --- The server over in-memory listeners ----------------------------------------------


@dataclass
class MemoryServer:
    """An UpperServer serving two in-memory listeners, one for well-behaved
    clients and one for the rest (:func:`connect_faulty`), under whatever
    clock the test runs."""

    server: UpperServer
    healthy: Listener
    faulty: Listener
    done: trio.Event

    async def assert_serves(self, text: str = "still serving: straße ΐ") -> None:
        """A fresh, well-behaved connection gets exactly its reply."""
        request = text.encode()
        stream = await self.healthy.connect()
        assert await converse(stream, [request]) == upper_bytes(request)


async def start_memory_server(nursery: trio.Nursery, grace: float = 5.0) -> MemoryServer:
    served = await serve_in_memory(nursery, listeners=2, grace=grace)
    healthy, faulty = served.listeners
    return MemoryServer(served.server, healthy, faulty, served.done)


# --- Payloads for the property tests --------------------------------------------------

# One character in, more (or more bytes) out: the reply outgrows the request.
GROWING = ["ß", "ŉ", "ΐ", "ΰ", "ǰ", "ﬗ", "ᾳ", "ᾀ"]
# Shrinking (dotless i, long s, the fi ligature), case-neutral, four-byte, and
# the line end that must survive.
OTHER = ["é", "\u0131", "\u017f", "ﬁ", "𐐨", "€", "ÿ", "\n", "a", "z", "Z", " "]
# Invalid or incomplete UTF-8: passes through unchanged (or, at a cut, is held).
BROKEN = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
]

valid_utf8 = st.text(
    st.one_of(st.sampled_from(GROWING + OTHER), st.characters(codec="utf-8")), max_size=24
).map(str.encode)
invalid_bytes = st.one_of(st.sampled_from(BROKEN), st.binary(min_size=1, max_size=6))
payloads = st.one_of(
    valid_utf8,
    st.binary(max_size=48),
    st.lists(st.one_of(valid_utf8, invalid_bytes), max_size=8).map(b"".join),
)
# Small sizes cut characters apart; 65536 lets a whole request through at once.
chunk_sizes = st.lists(st.one_of(st.integers(1, 8), st.just(65536)), min_size=1, max_size=5)


@st.composite
def cuts_of(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random points into non-empty pieces."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@dataclass(frozen=True)
class Conversation:
    data: bytes
    pieces: list[bytes]
    settle: list[bool]  # after each piece: wait for the server to catch up?
    receive_sizes: list[int]  # how the server's reads are cut
    send_sizes: list[int]  # how the server's writes are cut
    read_sizes: list[int]  # how the client's reads are cut
    ascii_only: bool


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    data = draw(payloads)
    pieces = draw(cuts_of(data))
    settle = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    return Conversation(
        data,
        pieces,
        settle,
        draw(chunk_sizes),
        draw(chunk_sizes),
        draw(chunk_sizes),
        draw(st.booleans()),
    )


def run_virtual(fn: Callable[[], Awaitable[None]]) -> None:
    """Run one hypothesis example in a fresh trio run under the autojump
    clock, with a deadline that only a deadlock reaches."""

    async def bounded() -> None:
        with trio.fail_after(VIRTUAL_HANG):
            await fn()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


# --- Property: the reply is exactly the transform, however it is cut ---------------


async def check_conversation(pair: PairFactory, case: Conversation) -> None:
    client, server = pair()
    wrapped = FaultyStream(server, receive_sizes=case.receive_sizes, send_sizes=case.send_sizes)
    returned: list[int] = []
    reply = bytearray()

    async def collect() -> None:
        # Into ``reply`` as it arrives: drive() looks at it midway.
        next_size = itertools.cycle(case.read_sizes)
        while chunk := await client.receive_some(next(next_size)):
            reply.extend(chunk)

    async def drive() -> None:
        sent = b""
        for piece, settle in zip(case.pieces, case.settle, strict=True):
            await client.send_all(piece)
            sent += piece
            if settle:
                await trio.testing.wait_all_tasks_blocked()
                # Everything sent so far is answered, but for the start of
                # a character the next bytes will finish.
                assert bytes(reply) == answered_by_now(sent, case.ascii_only)
        await client.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, case.ascii_only, returned)
        nursery.start_soon(collect)
        nursery.start_soon(drive)
    assert bytes(reply) == upper_bytes(case.data, ascii_only=case.ascii_only)
    assert returned == [len(case.data)] == [wrapped.received]
    assert wrapped.closed


@pytest.mark.parametrize("transport", PAIRS)
@settings(max_examples=60, deadline=None)
@given(case=conversations())
def test_reply_is_exactly_the_transform_however_both_sides_cut_it(
    transport: str, case: Conversation
) -> None:
    run_virtual(partial(check_conversation, PAIRS[transport], case))


# --- Property: a reset after any number of bytes ----------------------------------------


@dataclass(frozen=True)
class ResetCase:
    data: bytes
    pieces: list[bytes]
    direction: Literal["receive", "send"]
    at: int
    ascii_only: bool


DIRECTIONS: list[Literal["receive", "send"]] = ["receive", "send"]


@st.composite
def reset_cases(draw: st.DrawFn) -> ResetCase:
    data = draw(payloads.filter(bool))
    ascii_only = draw(st.booleans())
    direction = draw(st.sampled_from(DIRECTIONS))
    # Up to and past the end, so that "the fault never comes" is covered too.
    end = len(data) if direction == "receive" else len(upper_bytes(data, ascii_only=ascii_only))
    return ResetCase(
        data, draw(cuts_of(data)), direction, draw(st.integers(0, end + 1)), ascii_only
    )


async def check_reset(pair: PairFactory, case: ResetCase) -> None:
    client, server = pair()
    if case.direction == "receive":
        wrapped = FaultyStream(server, reset_on_receive_after=case.at, receive_sizes=[3])
    else:
        wrapped = FaultyStream(server, reset_on_send_after=case.at, send_sizes=[3])
    returned: list[int] = []
    reply: list[bytes] = []

    async def collect() -> None:
        reply.append(await receive_until_eof(client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, case.ascii_only, returned)
        nursery.start_soon(collect)
        nursery.start_soon(send_pieces, client, case.pieces)

    # The handler returned normally, counted what it really got, and closed.
    assert returned == [wrapped.received]
    assert wrapped.closed
    full = upper_bytes(case.data, ascii_only=case.ascii_only)
    if case.direction == "send":
        # Exactly the bytes that got through before the reset, in order.
        assert reply[0] == full[: case.at]
        assert wrapped.received <= len(case.data)
    else:
        assert returned == [min(case.at, len(case.data))]
        # Whatever came back is the start of the reply to what got through;
        # if the fault never came (at past the end), it is all of it.
        assert_prefix(reply[0], upper_bytes(case.data[: case.at], ascii_only=case.ascii_only))
        if case.at > len(case.data):
            assert reply[0] == full


@pytest.mark.parametrize("transport", PAIRS)
@settings(max_examples=60, deadline=None)
@given(case=reset_cases())
def test_a_reset_after_any_byte_ends_quietly_and_keeps_what_came_before(
    transport: str, case: ResetCase
) -> None:
    run_virtual(partial(check_reset, PAIRS[transport], case))


# --- The handler alone: each fault ends that connection quietly -----------------------


@pytest.mark.parametrize("phase", ["idle", "mid_reply"])
@fails_if_it_hangs(VIRTUAL_HANG)
async def test_a_reset_wakes_the_handler_wherever_it_waits(
    phase: str, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    wrapped = FaultyStream(server)
    returned: list[int] = []
    head = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, False, returned)
        if phase == "idle":
            # Waiting for the next request when the reset comes.
            assert await converse_once(client, b"hello") == b"HELLO"
        else:
            # A large reply the client stopped reading: the handler is
            # blocked sending when the reset comes.
            nursery.start_soon(send_pieces, client, cut(BIG_REQUEST, 4096))
            head = await receive_exactly(client, 1000)
        await trio.testing.wait_all_tasks_blocked()
        assert returned == []  # still waiting, so the reset is what ends it
        wrapped.reset()
        tail = await receive_until_eof(client)
    assert returned == [wrapped.received]
    assert wrapped.closed
    if phase == "idle":
        assert returned == [5]
        assert tail == b""
    else:
        assert 0 < wrapped.received < len(BIG_REQUEST)
        assert_prefix(head + tail, upper_bytes(BIG_REQUEST))


async def converse_once(stream: HalfCloseable, request: bytes) -> bytes:
    """Send one request and read its whole reply (no half-close)."""
    await stream.send_all(request)
    return await receive_exactly(stream, len(upper_bytes(request)))


# How a client can connect and vanish, and what the handler then received.
async def vanish_at_once(client: HalfCloseable) -> int:
    await client.aclose()
    return 0


async def vanish_mid_character(client: HalfCloseable) -> int:
    # The handler keeps the half character until the end of stream, then
    # must send it to a peer that is gone.
    await client.send_all(b"ab\xe2\x82")
    assert await receive_exactly(client, 2) == b"AB"
    await client.aclose()
    return 4


async def vanish_without_reading(client: HalfCloseable) -> int:
    # The reply goes to a peer that never reads and then closes.
    await client.send_all(b"no one reads this")
    await trio.testing.wait_all_tasks_blocked()
    await trio.aclose_forcefully(client)
    return 17


VANISHINGS: dict[str, Callable[[HalfCloseable], Awaitable[int]]] = {
    "at_once": vanish_at_once,
    "mid_character": vanish_mid_character,
    "without_reading": vanish_without_reading,
}


@pytest.mark.parametrize("transport", PAIRS)
@pytest.mark.parametrize("how", VANISHINGS)
@fails_if_it_hangs(VIRTUAL_HANG)
async def test_connect_and_vanish_ends_quietly(
    transport: str, how: str, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = PAIRS[transport]()
    wrapped = FaultyStream(server)
    returned: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, False, returned)
        expected = await VANISHINGS[how](client)
    assert returned == [expected]
    assert wrapped.closed


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_a_reset_before_the_first_byte_ends_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.memory_stream_pair()
    wrapped = FaultyStream(server, reset_on_receive_after=0)
    assert await handle_stream(wrapped) == 0
    assert wrapped.closed


# What a half-open peer does to the handler, started with the client's end;
# the handler is then stuck until cancelled.
async def silent(client: HalfCloseable) -> None:
    await trio.sleep_forever()  # connected, never sends, never closes


async def sends_and_stops_reading(client: HalfCloseable) -> None:
    await send_pieces(client, cut(BIG_REQUEST, 4096))


async def sends_then_waits(client: HalfCloseable) -> None:
    await send_pieces(client, [b"abcdef"], eof=False)
    assert_prefix(await receive_until_eof(client), b"ABCDEF")


HALF_OPEN: dict[
    str,
    tuple[
        Callable[[HalfCloseable], Awaitable[None]], Callable[[HalfCloseable], FaultyStream], str
    ],
] = {
    # name: (the client, the server's end, transport)
    "never_sends": (silent, FaultyStream, "memory"),
    "stops_reading_mid_reply": (sends_and_stops_reading, FaultyStream, "lockstep"),
    "vanishes_mid_request": (
        sends_then_waits,
        partial(FaultyStream, stall_receive_after=3),
        "memory",
    ),
    "vanishes_mid_reply": (sends_then_waits, partial(FaultyStream, stall_send_after=2), "memory"),
}


@pytest.mark.parametrize("name", HALF_OPEN)
@fails_if_it_hangs(VIRTUAL_HANG)
async def test_a_half_open_connection_can_be_cancelled(
    name: str, autojump_clock: trio.testing.MockClock
) -> None:
    behave, wrap, transport = HALF_OPEN[name]
    client, server = PAIRS[transport]()
    wrapped = wrap(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(behave, client)
        with trio.move_on_after(3600) as scope:
            await handle_stream(wrapped)
            pytest.fail("the handler returned although the peer is still there")
        # Cancellation propagated (README: "Cancellation propagates as usual")
        # and the connection was closed on the way out.
        assert scope.cancelled_caught
        assert wrapped.closed
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", PAIRS)
@pytest.mark.parametrize("ascii_only", [False, True])
@fails_if_it_hangs(VIRTUAL_HANG)
async def test_a_peer_that_half_closes_and_keeps_reading_gets_everything(
    transport: str, ascii_only: bool, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = PAIRS[transport]()
    wrapped = FaultyStream(server)
    returned: list[int] = []
    reply: list[bytes] = []

    async def read_for_an_hour() -> None:
        if transport == "memory":
            # Memory streams buffer everything: send it all, half-close, and
            # only start reading an hour later.
            await trio.sleep(3600)
        reply.append(await read_slowly(client, [1, 7, 512, 4096], pause=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, ascii_only, returned)
        nursery.start_soon(read_for_an_hour)
        assert await send_pieces(client, cut(BIG_REQUEST, 1000))
    assert reply == [upper_bytes(BIG_REQUEST, ascii_only=ascii_only)]
    assert await client.receive_some() == b""  # the end of stream stays
    assert returned == [len(BIG_REQUEST)]
    assert wrapped.closed


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_a_client_that_never_reads_stalls_its_handler_not_its_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    wrapped = FaultyStream(server)
    request = b"abc\xc3\xa9 " * 1_000_000  # 6 MB
    returned: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, wrapped, False, returned)
        nursery.start_soon(send_pieces, client, cut(request, 65536))
        await trio.testing.wait_all_tasks_blocked()
        # Back-pressure reached the sender: the handler took in a bounded
        # amount (a read's worth or so) and waits for us to read. The bound
        # is generous on purpose, to allow for buffering; unbounded would be
        # all 6 MB.
        assert wrapped.received <= 1 << 20
        reply = await receive_until_eof(client)
    assert reply == upper_bytes(request)
    assert returned == [len(request)]


# --- The whole server: a fault ends one connection, the rest carry on -----------------


async def reset_mid_reply(faulty: Listener) -> None:
    client, wrapped = await connect_faulty(faulty, lockstep=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_pieces, client, cut(BIG_REQUEST, 4096))
        head = await receive_exactly(client, 1000)
        await trio.testing.wait_all_tasks_blocked()
        wrapped.reset()
        tail = await receive_until_eof(client)
    assert_prefix(head + tail, upper_bytes(BIG_REQUEST))


async def reset_mid_request(faulty: Listener) -> None:
    client, _ = await connect_faulty(faulty, partial(FaultyStream, reset_on_receive_after=10))
    request = "straße ΐ ŉ and more".encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_pieces, client, [request])
        reply = await receive_until_eof(client)
    assert_prefix(reply, upper_bytes(request[:10]))


async def connect_and_vanish(faulty: Listener) -> None:
    client, _ = await connect_faulty(faulty)
    await client.aclose()


async def vanish_mid_character_on_server(faulty: Listener) -> None:
    client, _ = await connect_faulty(faulty)
    await vanish_mid_character(client)


async def vanish_without_reading_on_server(faulty: Listener) -> None:
    client, _ = await connect_faulty(faulty, lockstep=True)
    await vanish_without_reading(client)


async def stall_mid_reply_then_reset(faulty: Listener) -> None:
    # The peer's machine is gone: nothing is acknowledged for a while, until
    # the network finally reports the connection dead.
    client, wrapped = await connect_faulty(faulty, partial(FaultyStream, stall_send_after=3))
    await client.send_all(b"abcdef")
    assert await receive_exactly(client, 3) == b"ABC"
    await trio.sleep(A_WHILE)
    wrapped.reset()
    assert await receive_until_eof(client) == b""


async def half_close_and_keep_reading(faulty: Listener) -> None:
    client, _ = await connect_faulty(faulty)
    assert await send_pieces(client, cut(BIG_REQUEST, 999))
    await trio.sleep(A_WHILE)  # and only then starts reading, slowly
    reply = await read_slowly(client, [100, 5000], pause=0.01)
    assert reply == upper_bytes(BIG_REQUEST)


SERVER_FAULTS: dict[str, Callable[[Listener], Awaitable[None]]] = {
    "reset_mid_reply": reset_mid_reply,
    "reset_mid_request": reset_mid_request,
    "connect_and_vanish": connect_and_vanish,
    "vanish_mid_character": vanish_mid_character_on_server,
    "vanish_without_reading": vanish_without_reading_on_server,
    "stall_mid_reply_then_reset": stall_mid_reply_then_reset,
    "half_close_and_keep_reading": half_close_and_keep_reading,
}


@pytest.mark.parametrize("fault", SERVER_FAULTS)
@fails_if_it_hangs(VIRTUAL_HANG)
async def test_the_server_contains_a_fault_to_its_connection(
    fault: str,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    served = await start_memory_server(nursery)
    stats = served.server.stats
    # A connection that is open across the fault and must not notice it.
    steady = await served.healthy.connect()
    assert await converse_once(steady, b"before, ") == b"BEFORE, "

    await SERVER_FAULTS[fault](served.faulty)
    await trio.testing.wait_all_tasks_blocked()
    assert (stats.connections, stats.active, stats.cut_off) == (2, 1, 0)

    await steady.send_all("after: straße".encode())
    await steady.send_eof()
    assert await receive_until_eof(steady) == b"AFTER: STRASSE"
    await served.assert_serves()
    await trio.testing.wait_all_tasks_blocked()
    assert (stats.connections, stats.active, stats.cut_off) == (3, 0, 0)
    served.server.shutdown(grace=0)
    await served.done.wait()
    assert warnings_logged(caplog) == []


@fails_if_it_hangs(VIRTUAL_HANG)
async def test_half_open_connections_are_cut_off_at_shutdown_and_only_they(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = await start_memory_server(nursery, grace=10)
    stats = served.server.stats
    steady = await served.healthy.connect()
    assert await converse_once(steady, b"one, ") == b"ONE, "

    # Three half-open connections: silent; blocked sending to a peer that
    # stopped reading; stalled mid-request (the peer's machine is gone).
    silent_client, _ = await connect_faulty(served.faulty)
    not_reading, _ = await connect_faulty(served.faulty, lockstep=True)
    stalled, _ = await connect_faulty(served.faulty, partial(FaultyStream, stall_receive_after=2))
    async with trio.open_nursery() as clients:
        clients.start_soon(send_pieces, not_reading, cut(BIG_REQUEST, 4096))
        clients.start_soon(send_pieces, stalled, [b"abcd"])
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(A_WHILE)  # a while of nothing changes nothing
        await served.assert_serves()
        await trio.testing.wait_all_tasks_blocked()
        assert (stats.connections, stats.active, stats.cut_off) == (5, 4, 0)

        served.server.shutdown()
        await trio.sleep(5)  # within the grace period the steady one finishes
        await steady.send_all(b"two")
        await steady.send_eof()
        assert await receive_until_eof(steady) == b"TWO"
        await trio.testing.wait_all_tasks_blocked()
        assert (stats.active, stats.cut_off) == (3, 0)  # the rest wait for the deadline
        await served.done.wait()

    assert (stats.connections, stats.active, stats.cut_off) == (5, 0, 3)
    # Each cut-off connection was closed: its client sees the end of stream.
    assert await silent_client.receive_some() == b""
    assert_prefix(await receive_until_eof(not_reading), upper_bytes(BIG_REQUEST))
    assert await receive_until_eof(stalled) == b"AB"
    assert warnings_logged(caplog) == []


# --- Property: a storm of faulty connections at once, through the server -------------

PlanKind = Literal[
    "healthy", "reset_receive", "reset_send", "vanish", "stall_receive", "slow_half_close"
]
PLAN_KINDS: list[PlanKind] = [
    "healthy",
    "reset_receive",
    "reset_send",
    "vanish",
    "stall_receive",
    "slow_half_close",
]


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    data: bytes
    pieces: list[bytes]
    at: int
    lockstep: bool
    sizes: list[int]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    kind = draw(st.sampled_from(PLAN_KINDS))
    data = draw(payloads)
    # A stall must come before the end of the request, or the end of stream
    # would get there first and the connection would end normally.
    end = len(upper_bytes(data)) + 1 if kind == "reset_send" else len(data)
    return Plan(
        kind,
        data,
        draw(cuts_of(data)),
        draw(st.integers(0, end)),
        draw(st.booleans()),
        draw(chunk_sizes),
    )


def wrapper_for(plan: Plan) -> Callable[[HalfCloseable], FaultyStream]:
    def at_if(kind: PlanKind) -> int | None:
        return plan.at if plan.kind == kind else None

    return partial(
        FaultyStream,
        receive_sizes=plan.sizes,
        send_sizes=plan.sizes,
        reset_on_receive_after=at_if("reset_receive"),
        reset_on_send_after=at_if("reset_send"),
        stall_receive_after=at_if("stall_receive"),
    )


async def run_plan(faulty: Listener, plan: Plan) -> None:
    client, _ = await connect_faulty(faulty, wrapper_for(plan), lockstep=plan.lockstep)
    full = upper_bytes(plan.data)
    if plan.kind == "vanish":
        # Send some of it, never read, and go once the server is stuck or
        # idle (over lockstep the send itself may still be waiting).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_pieces, client, [plan.data[: plan.at]], False)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(client)
        return
    reply: list[bytes] = []

    async def collect() -> None:
        pause = 0.01 if plan.kind == "slow_half_close" else 0.0
        reply.append(await read_slowly(client, plan.sizes, pause=pause))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        nursery.start_soon(send_pieces, client, plan.pieces)
    if plan.kind in ("healthy", "slow_half_close"):
        assert reply[0] == full
    elif plan.kind == "reset_send":
        assert reply[0] == full[: plan.at]
    elif plan.kind == "reset_receive":
        assert_prefix(reply[0], upper_bytes(plan.data[: plan.at]))
    else:  # stall_receive, cut off at shutdown
        got_through = plan.data[: plan.at]
        assert_prefix(answered_by_now(got_through, False), reply[0])
        assert_prefix(reply[0], upper_bytes(got_through))


async def check_storm(connections: list[Plan]) -> None:
    stalls = sum(plan.kind == "stall_receive" for plan in connections)
    async with trio.open_nursery() as nursery:
        served = await start_memory_server(nursery, grace=1)
        stats = served.server.stats
        async with trio.open_nursery() as stalled:
            async with trio.open_nursery() as ending:
                for plan in connections:
                    group = stalled if plan.kind == "stall_receive" else ending
                    group.start_soon(run_plan, served.faulty, plan)
            # Every connection that ends on its own has ended, its handler
            # too; only the stalled ones are still open.
            await trio.testing.wait_all_tasks_blocked()
            assert (stats.connections, stats.active, stats.cut_off) == (
                len(connections),
                stalls,
                0,
            )
            await served.assert_serves()
            served.server.shutdown()
        await served.done.wait()
    assert (stats.connections, stats.active, stats.cut_off) == (len(connections) + 1, 0, stalls)


@settings(max_examples=30, deadline=None)
@given(connections=st.lists(plans(), min_size=1, max_size=8))
def test_a_storm_of_faulty_connections_harms_none_of_the_others(
    connections: list[Plan],
) -> None:
    run_virtual(partial(check_storm, connections))


# --- Over loopback: real sockets, real resets ------------------------------------------


async def reset_socket(stream: trio.SocketStream) -> None:
    """Close with a TCP RST instead of a FIN."""
    reset_on_close(stream.socket)
    await stream.aclose()


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_loopback_reset_mid_reply_while_another_connection_keeps_working(
    loopback: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    stats = loopback.server.stats
    async with await loopback.connect() as steady:
        await steady.send_all("first: straße ".encode())
        assert await receive_exactly(steady, 15) == b"FIRST: STRASSE "

        flood = await loopback.connect()
        async with trio.open_nursery() as nursery:
            # Sends without end and never reads (but one byte).
            nursery.start_soon(send_pieces, flood, itertools.repeat(BIG_REQUEST))
            assert_prefix(await receive_exactly(flood, 1), upper_bytes(BIG_REQUEST))
            # Once the kernel takes no more from our sender, the buffers are
            # full both ways: the server is stuck sending its reply.
            await until(lambda: not writable(flood.socket))
            # Meanwhile the steady connection is answered as usual.
            assert await converse_once(steady, "ΐ ".encode()) == upper_bytes("ΐ ".encode())
            nursery.cancel_scope.cancel()
        await reset_socket(flood)

        await steady.send_all(b"last")
        await steady.send_eof()
        assert await receive_until_eof(steady) == b"LAST"
    await until(lambda: stats.active == 0)  # both handlers ended
    assert stats.connections == 2
    async with await loopback.connect() as fresh:
        assert await converse(fresh, [b"fresh"]) == b"FRESH"
    assert warnings_logged(caplog) == []


LOOPBACK_PIECES = [b"hello ", "straße ".encode(), "ΐ".encode(), "ŉ".encode(), b"\xff\xfe"]
LOOPBACK_PIECES += [b"\xe2\x82", b"\n", b"x" * 100, "ᾳ".encode(), b"\xc3"]


LoopbackKind = Literal["healthy", "reset_at_once", "reset_mid_request", "reset_mid_reply"]
LOOPBACK_KINDS: list[LoopbackKind] = [
    "healthy",
    "reset_at_once",
    "reset_mid_request",
    "reset_mid_reply",
]


@dataclass(frozen=True)
class LoopbackPlan:
    kind: LoopbackKind
    data: bytes
    pieces: list[bytes]
    at: int

    @classmethod
    def draw(cls, rng: random.Random) -> LoopbackPlan:
        data = b"".join(rng.choices(LOOPBACK_PIECES, k=rng.randrange(1, 200)))
        points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 6)))
        bounds = [0, *points, len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        kind = rng.choices(LOOPBACK_KINDS, weights=[6, 1, 2, 2])[0]
        # Where the reset comes: after this many request bytes sent, or after
        # this many reply bytes read. Without an end of stream, a character
        # left incomplete at the end is never answered: read only up to it.
        if kind == "reset_mid_request":
            end = len(data)
        else:
            end = len(answered_by_now(data, False))
            if kind == "reset_mid_reply" and end == 0:
                kind = "reset_at_once"
        return cls(kind, data, pieces, rng.randint(1, max(end, 1)))


async def run_loopback_plan(loopback: LoopbackServer, plan: LoopbackPlan) -> None:
    stream = await loopback.connect()
    full = upper_bytes(plan.data)
    if plan.kind == "healthy":
        async with stream:
            assert await converse(stream, plan.pieces) == full
        return
    if plan.kind == "reset_mid_request":
        await stream.send_all(plan.data[: plan.at])
    elif plan.kind == "reset_mid_reply":
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_pieces, stream, plan.pieces, False)
            while len(got) < plan.at:
                chunk = await stream.receive_some(plan.at - len(got))
                assert chunk, "the server closed early"
                got += chunk
            nursery.cancel_scope.cancel()
        assert_prefix(bytes(got), full)
    await reset_socket(stream)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_loopback_hundreds_of_connections_some_resetting(
    loopback: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    rng = random.Random(1903)  # fixed: a failure here reproduces
    connections = [LoopbackPlan.draw(rng) for _ in range(300)]
    async with trio.open_nursery() as nursery:
        for plan in connections:
            nursery.start_soon(run_loopback_plan, loopback, plan)
    stats = loopback.server.stats
    # Every handler ends, whether its client closed or reset: none is stuck.
    await until(lambda: stats.active == 0)
    answered = sum(plan.kind in ("healthy", "reset_mid_reply") for plan in connections)
    # A connection reset before the server accepted it may never be counted.
    assert answered <= stats.connections <= len(connections)
    assert stats.cut_off == 0
    async with await loopback.connect() as fresh:
        request = "after the storm: straße ΐ".encode()
        assert await converse(fresh, [request]) == upper_bytes(request)
    assert warnings_logged(caplog) == []


def connect_and_vanish_before_accept(port: int, count: int) -> set[int]:
    """Blocking on purpose: while this runs the server's accept loop cannot, so
    every one of these connections is gone (reset, or closed with its request
    unanswered) before the server takes it from the accept queue. Returns
    their port numbers."""
    ports = set()
    for i in range(count):
        # The timeout only turns a full accept queue into an error, not a hang.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            ports.add(sock.getsockname()[1])
            if i % 3:
                sock.sendall("going, going: straße".encode())
            if i % 3 != 2:
                reset_on_close(sock)
    return ports


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_loopback_connections_gone_before_they_are_accepted(
    loopback: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    stats = loopback.server.stats
    async with await loopback.connect() as steady:
        assert await converse_once(steady, b"before ") == b"BEFORE "
        connect_and_vanish_before_accept(loopback.port, 60)
        # Accepted after all of them (the accept queue is first in, first out).
        async with await loopback.connect() as fresh:
            assert await converse(fresh, [b"fresh"]) == b"FRESH"
        # Every handler of a vanished connection ends; only steady's is left.
        await until(lambda: stats.active == 1)
        await steady.send_eof()
        assert await receive_until_eof(steady) == b""
    await until(lambda: stats.active == 0)
    # Some systems skip such connections at accept; Linux hands them over.
    assert 2 <= stats.connections <= 62
    assert stats.cut_off == 0
    assert warnings_logged(caplog) == []


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_loopback_peer_that_half_closes_and_keeps_reading_gets_everything(
    loopback: LoopbackServer,
) -> None:
    request = BIG_REQUEST * 5  # 1 MB that comes back as 1.3 MB
    async with await loopback.connect() as stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_pieces, stream, cut(request, 10_000))
        # Small reads: the server waits on us for most of the reply,
        # long after we half-closed.
        reply = await read_slowly(stream, [1, 100, 1000])
    assert reply == upper_bytes(request)
    await until(lambda: loopback.server.stats.active == 0)


# --- A bug, reproduced by simulating macOS's sockets on this system ------------------


class XnuSocket(socket.socket):
    """A connected socket that follows the rule of macOS's kernel (xnu
    ``sosetsockopt``, also FreeBSD's and illumos'): once the connection is shut
    down both ways, as after a reset by the peer, ``setsockopt`` fails with
    EINVAL. Linux has no such rule, so this simulates it.

    It also reports TCP_NODELAY off, as a system that does not copy the
    listening socket's options to accepted sockets would: otherwise the
    listener, seeing them inherited as on Linux, would never call
    ``setsockopt`` on an accepted socket, and this test would pass whatever
    the server did with the error."""

    shut_down = False

    def setsockopt(self, *args: Any) -> None:
        if self.shut_down:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        super().setsockopt(*args)

    def getsockopt(self, level: int, option: int, *args: int) -> Any:
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            return 0
        return super().getsockopt(level, option, *args)


class XnuListeningSocket(socket.socket):
    """A listening socket whose connections are :class:`XnuSocket`; those from
    the ports in ``gone`` are shut down. Told rather than detected, so that
    the test does not depend on when the kernel gets round to the reset."""

    gone: frozenset[int] = frozenset()

    def accept(self) -> tuple[socket.socket, Any]:
        sock, address = super().accept()
        accepted = XnuSocket(sock.family, sock.type, sock.proto, sock.detach())
        accepted.shut_down = address[1] in self.gone
        return accepted, address


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_loopback_a_reset_before_accept_on_macos_stops_only_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listening = XnuListeningSocket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port: int = listening.getsockname()[1]
    server = UpperServer(ServerConfig())
    escaped: list[Exception] = []

    async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
        try:
            await server.serve([FastSocketListener(listening)], [], task_status=task_status)
        except Exception as exc:  # the server died: record it, check it below
            escaped.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        # One client, reset at once.
        listening.gone = frozenset(connect_and_vanish_before_accept(port, 1))
        reply: bytes | None = None
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            # A server that died closed its listener: this one is reset.
            async with await trio.open_tcp_stream("127.0.0.1", port) as fresh:
                reply = await converse(fresh, [b"after"])
        # The fresh connection was served and its handler has ended, or the
        # server has died of an exception.
        stats = server.stats
        await until(lambda: bool(escaped) or (stats.connections > 0 and stats.active == 0))
        assert escaped == [], f"the server stopped: {escaped[0]!r}"
        assert reply == b"AFTER"
        server.shutdown(grace=0)
    assert warnings_logged(caplog) == []
