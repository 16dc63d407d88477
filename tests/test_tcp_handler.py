"""trio_upper.tcp.handle_stream over in-memory streams: the handler runs in a
nursery task on the server end, the test drives the client end."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_upper.tcp import describe_peer, handle_stream
from trio_upper.transform import upper_bytes

from .helpers import FaultyStream, receive_until_eof

# --- Helpers ------------------------------------------------------------------


async def run_handler(
    stream: trio.abc.Stream, results: list[int], ascii_only: bool = False
) -> None:
    """Run the handler and keep what it returns."""
    results.append(await handle_stream(stream, ascii_only=ascii_only))


async def assert_nothing_arrives(stream: trio.abc.ReceiveStream) -> None:
    """With the autojump clock: nothing is sent to ``stream`` while every task
    is blocked (the clock jumps past the deadline instead)."""
    with trio.move_on_after(10):
        data = await stream.receive_some()
        pytest.fail(f"unexpected data: {data!r}")


async def assert_closed(stream: trio.abc.Stream) -> None:
    """A stream that was closed (by aclose) refuses further use."""
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


# --- Tests --------------------------------------------------------------------


async def test_replies_to_each_chunk_without_waiting_for_a_newline() -> None:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        await client.send_all(b"hello")
        assert await client.receive_some() == b"HELLO"
        await client.send_all(b" world\nagain")
        assert await client.receive_some() == b" WORLD\nAGAIN"
        await client.send_eof()
        assert await client.receive_some() == b""
    assert results == [len(b"hello world\nagain")]


async def test_split_multibyte_character_comes_back_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        await client.send_all(b"\xc3")
        await trio.testing.wait_all_tasks_blocked()  # the handler has read it
        await assert_nothing_arrives(client)  # held back: half a character
        await client.send_all(b"\xa9")
        await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
        assert await receive_until_eof(client) == "É".encode()
    assert results == [2]


async def test_half_close_flushes_held_bytes_then_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        await client.send_all(b"ab\xe2\x82")
        assert await client.receive_some() == b"AB"
        await assert_nothing_arrives(client)
        await client.send_eof()
        assert await client.receive_some() == b"\xe2\x82"
        assert await client.receive_some() == b""  # EOF: the server closed
    assert results == [4]
    await assert_closed(server)


async def test_immediate_eof_closes_with_zero_bytes() -> None:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        await client.send_eof()
        assert await receive_until_eof(client) == b""
    assert results == [0]
    await assert_closed(server)


async def test_ascii_only_leaves_non_ascii_alone() -> None:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    data = "héllo straße \xff".encode("utf-8", "surrogateescape") + b"\xc3"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results, True)  # ascii_only
        await client.send_all(data)
        await client.send_eof()
        reply = await receive_until_eof(client)
    assert reply == data.upper()
    assert reply == b"H\xc3\xa9LLO STRA\xc3\x9fE \xc3\xbf\xc3"
    assert results == [len(data)]


async def test_peer_that_breaks_while_we_send_ends_the_handler_quietly() -> None:
    client, server = trio.testing.memory_stream_pair()
    breaking = FaultyStream(server, reset_on_send_after=7)
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, breaking, results)
        await client.send_all(b"hello ")
        assert await client.receive_some() == b"HELLO "
        await client.send_all(b"world")
        # The reply is cut after 7 bytes in all, then the connection breaks.
        assert await receive_until_eof(client) == b"W"
    assert results == [11]  # returned normally, with the bytes received
    assert breaking.closed


async def test_peer_that_resets_while_we_receive_ends_the_handler_quietly() -> None:
    client, server = trio.testing.memory_stream_pair()
    # A reset once the first request is in.
    breaking = FaultyStream(server, reset_on_receive_after=3)
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, breaking, results)
        await client.send_all(b"abc")
        assert await client.receive_some() == b"ABC"
    assert results == [3]
    assert breaking.closed


async def test_client_closing_abruptly_during_a_blocked_send() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    results: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        await client.send_all(b"a" * 1000)
        # The handler now waits in send_all for us to read its reply ...
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        # ... and we vanish instead.
        await trio.aclose_forcefully(client)
    assert results == [1000]
    await assert_closed(server)


async def test_full_back_pressure_over_lockstep_streams() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    pieces = [b"hello ", "straße ".encode(), b"\xff", "\u0390".encode(), b"\n"]
    data = b"".join(itertools.islice(itertools.cycle(pieces), 20_000))
    results: list[int] = []
    replies: list[bytes] = []

    async def send_everything() -> None:
        # Odd chunk sizes, so characters are split between sends.
        for start in range(0, len(data), 4099):
            await client.send_all(data[start : start + 4099])
        await client.send_eof()

    async def receive_everything() -> None:
        replies.append(await receive_until_eof(client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results)
        nursery.start_soon(send_everything)
        nursery.start_soon(receive_everything)
    assert replies == [upper_bytes(data)]
    assert results == [len(data)]


def test_describe_peer_of_a_memory_stream() -> None:
    client, _server = trio.testing.memory_stream_pair()
    assert describe_peer(client) == "<StapledStream>"


# --- Property: chunking -------------------------------------------------------

payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(
        st.one_of(
            st.text(st.characters(codec="utf-8"), max_size=8).map(str.encode),
            st.binary(max_size=4),
            st.sampled_from(
                [b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xff"]
                + [c.encode() for c in ("é", "ß", "\u0390", "ﬁ", "ᾳ", "𐐨")]
            ),
        ),
        max_size=10,
    ).map(b"".join),
)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A payload and the same payload cut at random points."""
    data = draw(payloads)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


async def _echo_in_chunks(chunks: list[bytes], ascii_only: bool) -> tuple[bytes, int]:
    client, server = trio.testing.memory_stream_pair()
    results: list[int] = []
    replies: list[bytes] = []

    async def drive() -> None:
        for chunk in chunks:
            await client.send_all(chunk)
            # Let the handler read this chunk on its own, so that every cut
            # point really is a cut between two reads.
            await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()

    async def collect() -> None:
        replies.append(await receive_until_eof(client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler, server, results, ascii_only)
        nursery.start_soon(drive)
        nursery.start_soon(collect)
    return replies[0], results[0]


@settings(max_examples=100, deadline=None)
@given(chunked(), st.booleans())
def test_any_chunking_gives_the_one_shot_uppercase(
    case: tuple[bytes, list[bytes]], ascii_only: bool
) -> None:
    data, chunks = case
    reply, received = trio.run(_echo_in_chunks, chunks, ascii_only)
    assert reply == upper_bytes(data, ascii_only=ascii_only)
    assert received == len(data)
