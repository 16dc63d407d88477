"""TLS in process: the server with ``tls`` set, on loopback and over memory
streams under the mock clock; the client's ``connect_tcp`` and its errors;
mutual TLS; the bound on a handshake; and how the pipe-mode client, which
cannot half-close over TLS, knows that every reply has come
(``_ReplyCheck``)."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_upper.errors import UserError
from trio_upper.server import ServerConfig, UpperServer
from trio_upper.tcp import handle_stream
from trio_upper.tcp_client import _ReplyCheck, connect_tcp, tcp_interactive, tcp_stream
from trio_upper.tls import client_context, server_context
from trio_upper.transform import upper_bytes

from .client_io import BytesSource, Collector, collector, line_source
from .helpers import Listener, receive_exactly, receive_until_eof
from .tls_certs import Certs, make_certs

# Bounds that only a hung test reaches; on the mock clock they cost nothing.
HANG_GUARD = 30


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_config(
    certs: Certs, *, certfile: Path | None = None, ca_certs: Path | None = None, **config: Any
) -> ServerConfig:
    """A TLS server's configuration: the test CA's server certificate, or
    ``certfile`` (key included); with ``ca_certs``, mutual TLS."""
    if certfile is None:
        context = server_context(str(certs.cert), str(certs.key), optional(ca_certs))
    else:
        context = server_context(str(certfile), None, optional(ca_certs))
    return ServerConfig(tls=context, **config)


def optional(path: Path | None) -> str | None:
    return None if path is None else str(path)


def trusting(certs: Certs, client_cert: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts the test CA (and presents ``client_cert``)."""
    return client_context(str(certs.ca), optional(client_cert))


Start = Callable[[ServerConfig], Awaitable[tuple[UpperServer, int]]]


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[Start]:
    """Start servers on 127.0.0.1, each on a port of the OS's choosing."""
    started: list[UpperServer] = []

    async def start(config: ServerConfig) -> tuple[UpperServer, int]:
        server = UpperServer(dataclasses.replace(config, host="127.0.0.1", port=0))
        endpoints = await nursery.start(server.run)
        started.append(server)
        return server, endpoints[0].port

    yield start
    for server in started:
        server.shutdown(grace=0)


def tls_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's log lines for failed handshakes; asserts that the server
    said nothing above debug level."""
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud == []
    return [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]


# Text whose uppercase differs in UTF-8 and --ascii mode, grows, and ends in
# an incomplete UTF-8 sequence; and plain ASCII lines.
AWKWARD = "héllo straße ﬁn ΐ\nà\n".encode() + b"\xff\xfe raw\n" + "é".encode()[:1]
LINES = b"one\ntwo\nthree\n"


# --- The server over TLS, and a client that speaks it ------------------------------


async def test_tls_server_answers_over_tls_and_udp_stays_plain(certs: Certs, start: Start) -> None:
    _, port = await start(tls_config(certs))
    stream = await connect_tcp("127.0.0.1", port, timeout=HANG_GUARD, tls=trusting(certs))
    assert isinstance(stream, trio.SSLStream)
    assert stream.version() in ("TLSv1.2", "TLSv1.3")
    request = "héllo straße\n".encode()
    async with stream:
        with trio.fail_after(HANG_GUARD):
            await stream.send_all(request)
            assert await receive_exactly(stream, len(upper_bytes(request))) == upper_bytes(request)
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as udp:
        await udp.connect(("127.0.0.1", port))
        with trio.fail_after(HANG_GUARD):
            await udp.send(b"plain udp")
            assert await udp.recv(100) == b"PLAIN UDP"


async def test_endpoints_name_tls_on_tcp_only(certs: Certs, nursery: trio.Nursery) -> None:
    server = UpperServer(tls_config(certs, host="127.0.0.1", port=0))
    endpoints = await nursery.start(server.run)
    assert sorted({e.protocol for e in endpoints}) == ["tcp+tls", "udp"]
    assert str(endpoints[0]).startswith("tcp+tls 127.0.0.1:")
    server.shutdown(grace=0)


@pytest.mark.parametrize("ascii_only", [False, True], ids=["utf8", "ascii"])
@pytest.mark.parametrize(
    "data",
    [AWKWARD, LINES, LINES.rstrip(b"\n"), b"", b"\xc3", b"x" * 300_000 + "ß".encode()],
    ids=["awkward", "lines", "no-final-newline", "empty", "only-a-split-char", "300k"],
)
async def test_pipe_over_tls_gets_every_byte_and_ends(
    certs: Certs, start: Start, data: bytes, ascii_only: bool
) -> None:
    _, port = await start(tls_config(certs, ascii_only=ascii_only))
    stream = await connect_tcp("localhost", port, timeout=HANG_GUARD, tls=trusting(certs))
    sink = Collector()
    # Cut into pieces that split characters, as stdin may.
    chunks = [data[i : i + 7] for i in range(0, min(len(data), 70), 7)] + [data[70:]]
    with trio.fail_after(HANG_GUARD):
        await tcp_stream(stream, BytesSource(*chunks), sink, timeout=HANG_GUARD)
    assert bytes(sink.data) == upper_bytes(data, ascii_only=ascii_only)


async def test_host_is_the_name_checked_unless_server_name_says_otherwise(
    certs: Certs, start: Start
) -> None:
    _, port = await start(tls_config(certs, certfile=certs.localhost_only))
    with pytest.raises(UserError, match=r"not valid for '127\.0\.0\.1'"):
        await connect_tcp("127.0.0.1", port, timeout=HANG_GUARD, tls=trusting(certs))
    stream = await connect_tcp(
        "127.0.0.1", port, timeout=HANG_GUARD, tls=trusting(certs), server_name="localhost"
    )
    await stream.aclose()


async def test_prompt_mode_over_tls(certs: Certs, start: Start) -> None:
    _, port = await start(tls_config(certs))
    stream = await connect_tcp("localhost", port, timeout=HANG_GUARD, tls=trusting(certs))
    out: list[bytes] = []
    lines = [b"hello stra\xc3\x9fe", b"", b"second"]
    with trio.fail_after(HANG_GUARD):
        answered = await tcp_interactive(
            stream, line_source(lines), collector(out), timeout=HANG_GUARD
        )
    assert answered == 3
    assert b"".join(out) == b"HELLO STRASSE\n\nSECOND\n"


# --- Mutual TLS ------------------------------------------------------------------


async def test_mutual_tls_serves_a_client_with_a_trusted_certificate(
    certs: Certs, start: Start
) -> None:
    server, port = await start(tls_config(certs, ca_certs=certs.ca))
    stream = await connect_tcp(
        "localhost", port, timeout=HANG_GUARD, tls=trusting(certs, certs.client)
    )
    sink = Collector()
    with trio.fail_after(HANG_GUARD):
        await tcp_stream(stream, BytesSource(LINES), sink, timeout=HANG_GUARD)
    assert bytes(sink.data) == LINES.upper()
    assert server.stats.tls_failed == 0


@pytest.mark.parametrize("client_cert", ["none", "untrusted"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    certs: Certs, start: Start, caplog: pytest.LogCaptureFixture, client_cert: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    server, port = await start(tls_config(certs, ca_certs=certs.ca))
    cert = certs.stranger_client if client_cert == "untrusted" else None
    # TLS 1.3 finishes the handshake on the client's side before the server
    # has looked at the client's certificate: the refusal comes as the end of
    # the connection.
    stream = await connect_tcp("localhost", port, timeout=HANG_GUARD, tls=trusting(certs, cert))
    with trio.fail_after(HANG_GUARD), pytest.raises(UserError) as raised:
        await tcp_stream(stream, BytesSource(LINES), Collector(), timeout=HANG_GUARD)
    message = str(raised.value)
    assert "client certificate" in message
    assert "\n" not in message
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.tls_failed == 1
    [failure] = tls_failures(caplog)
    expected = "sent no certificate" if client_cert == "none" else "certificate verify failed"
    assert expected in failure


async def test_mutual_tls_refusal_in_prompt_mode_gives_the_hint(
    certs: Certs, start: Start
) -> None:
    _, port = await start(tls_config(certs, ca_certs=certs.ca))
    stream = await connect_tcp("localhost", port, timeout=HANG_GUARD, tls=trusting(certs))
    with trio.fail_after(HANG_GUARD), pytest.raises(UserError) as raised:
        await tcp_interactive(stream, line_source([b"hi"]), collector([]), timeout=HANG_GUARD)
    assert str(raised.value).endswith(
        "the last line was not (a server that requires a client certificate does this when "
        "it gets none it trusts: see --certfile)"
    )


# --- The client's errors: one line each, and a debug line on the server ----------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("untrusted", "certificate verify failed: unable to get local issuer certificate"),
        ("wrong name", "certificate verify failed: Hostname mismatch"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("plain server", "the other side does not speak TLS"),
    ],
)
async def test_connect_tcp_tls_errors_are_one_line(
    certs: Certs, start: Start, caplog: pytest.LogCaptureFixture, case: str, expected: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    if case == "plain server":
        config = ServerConfig()
    else:
        certfile = {"untrusted": certs.stranger, "expired": certs.expired}.get(case)
        config = tls_config(certs, certfile=certfile)
    server, port = await start(config)
    server_name = "example.com" if case == "wrong name" else None
    with pytest.raises(UserError) as raised:
        await connect_tcp(
            "127.0.0.1", port, timeout=HANG_GUARD, tls=trusting(certs), server_name=server_name
        )
    message = str(raised.value)
    assert message.startswith(f"TLS with 127.0.0.1 port {port} failed: {expected}")
    assert "\n" not in message
    await trio.testing.wait_all_tasks_blocked()
    if case == "plain server":
        # It uppercased our ClientHello, as it would any bytes.
        assert tls_failures(caplog) == []
        assert server.stats.bytes_received > 0
    else:
        assert len(tls_failures(caplog)) == 1
        assert server.stats.tls_failed == 1
    assert server.stats.internal_errors == 0


async def test_connect_tcp_tells_at_once_when_its_hello_comes_back_incomplete(
    certs: Certs, nursery: trio.Nursery
) -> None:
    """A plain trio-upper holds back the end of the echoed ClientHello when it
    is half a UTF-8 character (or its uppercase is shorter): the record never
    completes, and only the first bytes can tell the client what is wrong."""

    async def echo_all_but_the_last_byte(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        await stream.send_all(bytes(data[:-1]).upper())
        await trio.sleep_forever()

    [listener] = await nursery.start(
        partial(trio.serve_tcp, echo_all_but_the_last_byte, 0, host="127.0.0.1")
    )
    port = listener.socket.getsockname()[1]
    with trio.fail_after(HANG_GUARD), pytest.raises(UserError) as raised:
        await connect_tcp("127.0.0.1", port, timeout=HANG_GUARD, tls=trusting(certs))
    assert str(raised.value) == (
        f"TLS with 127.0.0.1 port {port} failed: the other side does not speak TLS "
        "(it sent our TLS hello back)"
    )


async def test_connect_tcp_times_out_on_a_server_that_never_answers_the_hello(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    # A listening socket that nobody accepts from: the TCP handshake
    # completes in the kernel, the TLS one never does.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with listener, pytest.raises(UserError, match=r"^timed out after 5 s connecting to "):
        await connect_tcp("127.0.0.1", port, timeout=5, tls=trusting(certs))


async def test_plain_client_on_the_tls_port_is_one_debug_line(
    certs: Certs, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    server, port = await start(tls_config(certs))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.fail_after(HANG_GUARD):
            await stream.send_all(b"hello\n")
            # Nothing comes back: no uppercase, and no TLS alert either.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await receive_until_eof(stream) == b""
    await trio.testing.wait_all_tasks_blocked()
    [failure] = tls_failures(caplog)
    assert failure.endswith("TLS handshake failed: the other side does not speak TLS")
    assert server.stats.tls_failed == 1


@pytest.mark.parametrize("size", [6, 2_000_000], ids=["a line", "2 MB"])
async def test_plain_pipe_client_on_the_tls_port_is_told_to_use_tls(
    certs: Certs, start: Start, size: int
) -> None:
    _, port = await start(tls_config(certs))
    stream = await connect_tcp("127.0.0.1", port, timeout=HANG_GUARD)
    data = (b"hello\n" * (size // 6 + 1))[:size]
    with trio.fail_after(HANG_GUARD), pytest.raises(UserError) as raised:
        await tcp_stream(stream, BytesSource(data), Collector(), timeout=HANG_GUARD)
    assert str(raised.value).endswith(" answered (if it serves TLS, use --tls)")


async def test_plain_interactive_client_on_the_tls_port_is_told_to_use_tls(
    certs: Certs, start: Start
) -> None:
    _, port = await start(tls_config(certs))
    stream = await connect_tcp("127.0.0.1", port, timeout=HANG_GUARD)
    out: list[bytes] = []
    with trio.fail_after(HANG_GUARD), pytest.raises(UserError) as raised:
        await tcp_interactive(stream, line_source([b"hello"]), collector(out), timeout=HANG_GUARD)
    assert str(raised.value).endswith("the last line was not (if it serves TLS, use --tls)")
    assert out == []


# --- Over memory streams, under the mock clock --------------------------------------


def client_hello(certs: Certs) -> bytes:
    """The first flight of a TLS client: its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = trusting(certs).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


async def test_a_handshake_that_never_finishes_is_closed_at_the_idle_timeout_and_holds_no_one_up(
    certs: Certs, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    idle_timeout = 10.0
    server = UpperServer(tls_config(certs, idle_timeout=idle_timeout))
    listener = Listener()
    await nursery.start(server.serve, [listener], [])
    started = trio.current_time()
    silent = await listener.connect()
    halfway = await listener.connect()
    hello = client_hello(certs)
    await halfway.send_all(hello[: len(hello) // 2])

    # Meanwhile, another client is served in full, handshake and all.
    raw = await listener.connect()
    good = trio.SSLStream(raw, trusting(certs), server_hostname="localhost")
    with trio.fail_after(HANG_GUARD):
        await good.send_all(b"served\n")
        assert await receive_exactly(good, 7) == b"SERVED\n"
        await good.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.active == 2
    # Still held just before the timeout...
    await trio.sleep_until(started + idle_timeout * 0.99)
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.active == 2
    # ... and closed by the server after it, with nothing sent.
    with trio.fail_after(idle_timeout * 2):
        assert await receive_until_eof(silent) == b""
        assert await receive_until_eof(halfway) == b""
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.idle_closed == 2
    assert server.stats.active == 0
    assert server.stats.tls_failed == 0
    assert server.stats.connections == 3
    server.shutdown(grace=0)


def memory_tls_pair(certs: Certs) -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
    """A client and a server TLS stream over memory streams."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    context = server_context(str(certs.cert), str(certs.key), None)
    return (
        trio.SSLStream(client_raw, trusting(certs), server_hostname="localhost"),
        trio.SSLStream(server_raw, context, server_side=True),
    )


async def reply_with(
    stream: trio.SSLStream[Any], transform: Callable[[bytes], bytes], *, then_close: bool = False
) -> None:
    """A wrong server: answers each chunk with ``transform`` of it."""
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(transform(bytes(data)))
            if then_close:
                return


async def test_pipe_over_tls_rejects_a_reply_that_is_not_the_uppercase(
    certs: Certs, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = memory_tls_pair(certs)
    nursery.start_soon(reply_with, server, bytes.lower)
    sink = Collector()
    with pytest.raises(UserError, match=r"^the server's reply is not the uppercase of what"):
        await tcp_stream(client, BytesSource(b"Hello\n"), sink, timeout=5)
    # What came is written before the error, as for any other.
    assert bytes(sink.data) == b"hello\n"


async def test_pipe_over_tls_times_out_on_a_server_that_stops_replying(
    certs: Certs, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = memory_tls_pair(certs)

    async def half_then_silence() -> None:
        await server.receive_some()
        await server.send_all(b"HEL")
        await trio.sleep_forever()

    nursery.start_soon(half_then_silence)
    sink = Collector()
    with pytest.raises(UserError, match=r"did not respond within 5 s"):
        await tcp_stream(client, BytesSource(b"hello\n"), sink, timeout=5)
    assert bytes(sink.data) == b"HEL"


async def test_pipe_over_tls_reports_a_server_that_closes_early(
    certs: Certs, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = memory_tls_pair(certs)
    nursery.start_soon(partial_reply, server)
    sink = Collector()
    with pytest.raises(UserError, match=r"^the server closed the connection early; 1 of 2 lines"):
        await tcp_stream(client, BytesSource(b"one\ntwo\n"), sink, timeout=5)
    assert bytes(sink.data) == b"ONE\n"


async def partial_reply(stream: trio.SSLStream[Any]) -> None:
    """Answers the first line only, then closes (with close_notify)."""
    async with stream:
        data = await receive_exactly(stream, 8)
        await stream.send_all(data[:4].upper())


@pytest.mark.parametrize("ascii_only", [False, True], ids=["utf8", "ascii"])
async def test_pipe_over_tls_in_memory_with_the_real_handler(
    certs: Certs, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, ascii_only: bool
) -> None:
    client, server = memory_tls_pair(certs)
    nursery.start_soon(partial(handle_stream, server, ascii_only=ascii_only))
    sink = Collector()
    await tcp_stream(client, BytesSource(*AWKWARD.split(b" ")), sink, timeout=5)
    # split() dropped the spaces; what was sent is what is compared.
    sent = b"".join(AWKWARD.split(b" "))
    assert bytes(sink.data) == upper_bytes(sent, ascii_only=ascii_only)


# --- _ReplyCheck: when is the reply complete? -----------------------------------


def before_eof(data: bytes, *, ascii_only: bool) -> bytes:
    """What a correct server in this mode has sent once it has read ``data``,
    before the end of the stream: the uppercase of all of it but an incomplete
    UTF-8 sequence at its very end, which it holds until more comes or the
    stream ends (and over TLS it never sees the end before the client has
    gone)."""
    if ascii_only:
        return data.upper()
    _, complete = codecs.utf_8_decode(data, "surrogateescape", False)
    return upper_bytes(data[:complete])


# Characters whose uppercase grows (ß, ﬁ, ΐ), differs by one byte from the
# --ascii reply (à), is a titlecase (ǅ), or is unchanged (nbsp); invalid
# bytes; and the first bytes of characters cut short.
FRAGMENTS = [
    b"a",
    b"z",
    b"A",
    b"\n",
    b" ",
    *(c.encode() for c in "ßàÀﬁΐǅé\u00a0😀"),
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
]
inputs = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4).map(str.encode)), max_size=16
    ).map(b"".join),
)
MODES = (False, True)  # ascii_only


@settings(max_examples=300, deadline=None)
@given(data=inputs, server_ascii=st.booleans(), steps=st.data())
def test_reply_check_is_done_exactly_when_a_mode_has_answered_in_full(
    data: bytes, server_ascii: bool, steps: st.DataObject
) -> None:
    """A correct server in either mode, input and reply cut anywhere and
    interleaved as the network may: the check never objects, is done exactly
    when the reply one of the modes still in the running owes has come in
    full and the input has ended, and then the reply plus what it holds is
    the server's transform of the input."""
    check = _ReplyCheck()
    sent, received = b"", b""
    alive = set(MODES)  # modes that the reply so far has matched all along
    while not check.done:
        can_receive = len(received) < len(before_eof(sent, ascii_only=server_ascii))
        actions = ["send"] if len(sent) < len(data) else ["end"] if not check.input_ended else []
        actions += ["receive"] if can_receive else []
        assert actions, "every reply came and the input has ended, yet not done"
        action = steps.draw(st.sampled_from(actions))
        if action == "send":
            piece = data[len(sent) : len(sent) + steps.draw(st.integers(1, len(data) - len(sent)))]
            check.sent(piece)
            sent += piece
        elif action == "end":
            check.end_of_input()
        else:
            owed = before_eof(sent, ascii_only=server_ascii)[len(received) :]
            piece = owed[: steps.draw(st.integers(1, len(owed)))]
            check.received(piece)
            received += piece
        alive = {m for m in alive if before_eof(sent, ascii_only=m).startswith(received)}
        complete = any(received == before_eof(data, ascii_only=m) for m in alive)
        assert check.done == (check.input_ended and complete)
    assert received + check.held == upper_bytes(data, ascii_only=server_ascii)


@settings(max_examples=300, deadline=None)
@given(
    data=inputs.filter(bool),
    server_ascii=st.booleans(),
    where=st.floats(0, 1),
    change=st.sampled_from(["replace", "insert", "append"]),
    byte=st.integers(0, 255),
    steps=st.data(),
)
def test_reply_check_raises_once_the_reply_is_neither_modes(
    data: bytes,
    server_ascii: bool,
    where: float,
    change: str,
    byte: int,
    steps: st.DataObject,
) -> None:
    """A reply with one byte changed, added, or one too many: the check
    raises as soon as what came is the start of neither mode's reply, and
    not before (a changed byte may turn one mode's reply into the other's:
    à is C3 A0 in --ascii mode and C3 80 in UTF-8)."""
    reply = before_eof(data, ascii_only=server_ascii)
    at = round(where * len(reply))
    if change == "replace" and at < len(reply) and reply[at] != byte:
        reply = reply[:at] + bytes([byte]) + reply[at + 1 :]
    elif change == "insert":
        reply = reply[:at] + bytes([byte]) + reply[at:]
    else:
        reply += bytes([byte])
    check = _ReplyCheck()
    check.sent(data)
    check.end_of_input()
    received = b""
    while len(received) < len(reply) and not check.done:
        piece = reply[len(received) : len(received) + steps.draw(st.integers(1, len(reply)))]
        received += piece
        matches = any(before_eof(data, ascii_only=m).startswith(received) for m in MODES)
        if matches:
            check.received(piece)
        else:
            with pytest.raises(UserError, match="not the uppercase of what was sent"):
                check.received(piece)
            return
    # Never raised: then it ended as one mode's complete reply.
    assert any(received == before_eof(data, ascii_only=m) for m in MODES)


def test_reply_check_writes_the_held_tail_only_for_a_utf8_server() -> None:
    """The input ends in half a character. A UTF-8 server holds it back
    (the client writes it); an --ascii one sends it at once (the client must
    not write it again)."""
    for reply, server in ((b"AB", "utf8"), (b"AB\xc3", "ascii")):
        check = _ReplyCheck()
        check.sent(b"ab\xc3")
        check.end_of_input()
        check.received(reply)
        assert check.done, server
        assert reply + check.held == b"AB\xc3", server


def test_reply_check_is_not_done_until_the_input_has_ended() -> None:
    check = _ReplyCheck()
    check.sent(b"abc")
    check.received(b"ABC")
    assert not check.done
    check.end_of_input()
    assert check.done


# --- Files that cannot be used: one line naming the file --------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad")
    files = {
        "missing": directory / "missing.pem",
        "directory": directory,
        "garbage": directory / "garbage.pem",
        "empty": directory / "empty.pem",
        "encrypted key": directory / "encrypted-key.pem",
    }
    files["garbage"].write_bytes(b"not a PEM file\n")
    files["empty"].write_bytes(b"")
    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    files["encrypted key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return files


NO_CERTIFICATE = "cannot use --certfile {certfile}: no PEM certificate in {certfile}"


@pytest.mark.parametrize(
    ("certfile", "keyfile", "ca_certs", "expected"),
    [
        ("missing", None, None, "cannot read --certfile {certfile}: No such file or directory"),
        ("directory", None, None, "cannot read --certfile {certfile}: Is a directory"),
        ("cert", "missing", None, "cannot read --keyfile {keyfile}: No such file or directory"),
        (
            "garbage",
            None,
            None,
            "cannot use --certfile {certfile}: no PEM certificate in {certfile}",
        ),
        (
            "empty",
            None,
            None,
            "cannot use --certfile {certfile}: no PEM certificate in {certfile}",
        ),
        ("key", None, None, "cannot use --certfile {certfile}: no PEM certificate in {certfile}"),
        (
            "cert",
            None,
            None,
            "cannot use --certfile {certfile}: no PEM private key in {certfile} "
            "(give it with --keyfile)",
        ),
        (
            "cert",
            "garbage",
            None,
            "cannot use --certfile {certfile} --keyfile {keyfile}: "
            "no PEM private key in {keyfile}",
        ),
        (
            "cert",
            "other_key",
            None,
            "cannot use --certfile {certfile} --keyfile {keyfile}: "
            "the key does not match the certificate",
        ),
        ("cert", "encrypted key", None, "the private key is encrypted"),
        ("cert", "key", "missing", "cannot read --ca-certs {ca_certs}: No such file or directory"),
        ("cert", "key", "garbage", "cannot use --ca-certs {ca_certs}: no certificate in the file"),
    ],
)
def test_server_files_that_cannot_be_used_are_one_line(
    certs: Certs,
    bad_files: dict[str, Path],
    certfile: str,
    keyfile: str | None,
    ca_certs: str | None,
    expected: str,
) -> None:
    def path(name: str | None) -> str | None:
        if name is None:
            return None
        return str(bad_files[name] if name in bad_files else getattr(certs, name))

    paths = {"certfile": path(certfile), "keyfile": path(keyfile), "ca_certs": path(ca_certs)}
    with pytest.raises(UserError) as raised:
        server_context(str(paths["certfile"]), paths["keyfile"], paths["ca_certs"])
    message = str(raised.value)
    assert expected.format(**paths) in message
    assert "\n" not in message


def test_client_files_that_cannot_be_used_are_one_line(
    certs: Certs, bad_files: dict[str, Path]
) -> None:
    with pytest.raises(UserError, match=r"^cannot use --cafile .*: no certificate in the file$"):
        client_context(str(bad_files["garbage"]))
    with pytest.raises(UserError, match=r"^cannot read --cafile .*: No such file or directory$"):
        client_context(str(bad_files["missing"]))
    with pytest.raises(UserError, match=r"no PEM private key in .*\(give it with --keyfile\)$"):
        client_context(str(certs.ca), str(certs.cert))
    # The key may be in the certificate's file, or in a file of its own.
    client_context(str(certs.ca), str(certs.client))
    client_context(str(certs.ca), str(certs.cert), str(certs.key))
