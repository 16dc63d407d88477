"""The PROXY protocol on the server's connections and datagrams
(serve --proxy-protocol): the wrappers in memory, the server on loopback,
and the UDP loop over a fake socket."""

from __future__ import annotations

import ipaddress
import logging
import struct
from functools import partial

import pytest
import trio
import trio.testing

from trio_upper.proxy import AllowList, ProxyStream, parse_allow_list, strip_datagram
from trio_upper.proxyproto import V2_SIGNATURE
from trio_upper.ratelimit import ReplyRateLimiter
from trio_upper.server import Endpoint, ServerConfig, UpperServer
from trio_upper.transform import upper_bytes
from trio_upper.udp import UdpCounts, serve_udp

from .helpers import PROCESS_TIMEOUT, FakeDatagramSocket, receive_until_eof, run_cli

V1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 4242 12000\r\n"

# Virtual seconds: only a deadlock gets this far, and then fails at once.
HANG = 24 * 3600.0


def v2_udp(source: str, port: int) -> bytes:
    addresses = (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address("192.0.2.1").packed
        + struct.pack("!HH", port, 12000)
    )
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x12, len(addresses)) + addresses


LOCAL = AllowList(parse_allow_list("127.0.0.1,::1"))


# --- The allow list -------------------------------------------------------------------


def test_the_allow_list_takes_addresses_and_networks() -> None:
    allow = AllowList(parse_allow_list("127.0.0.1, 10.0.0.0/8,2001:db8::/32"))
    assert allow.allows("127.0.0.1")
    assert allow.allows("10.200.3.4")
    assert allow.allows("::ffff:10.1.1.1")  # an IPv4 client of a dual-stack socket
    assert allow.allows("2001:db8::7")
    assert not allow.allows("127.0.0.2")
    assert not allow.allows("192.0.2.1")
    assert not allow.allows("not an address")


@pytest.mark.parametrize("text", ["10.0.0.1/8", "nonsense", "", "1.2.3.4,"])
def test_a_bad_allow_list_names_the_bad_item(text: str) -> None:
    with pytest.raises(ValueError, match="not an address or ADDR/BITS network"):
        parse_allow_list(text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--proxy-allow-from", "10.0.0.1/8"), "not an address or ADDR/BITS network"),
        (("--proxy-allow-from", "10.0.0.0/8"), "--proxy-allow-from goes with --proxy-protocol"),
    ],
)
def test_bad_proxy_flags_are_one_error_line(args: tuple[str, ...], expected: str) -> None:
    result = run_cli("serve", "--port", "0", *args)
    assert result.returncode in (1, 2)
    lines = result.stderr.decode().splitlines()
    assert expected in lines[-1]
    assert "Traceback" not in result.stderr.decode()


# --- ProxyStream, in memory -----------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 20, len(V1) - 1, len(V1), len(V1) + 3])
async def test_the_header_is_read_however_it_is_cut_and_the_data_follows(cut: int) -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = ProxyStream(server)
    sent = V1 + b"hello proxy"
    await client.send_all(sent[:cut])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, sent[cut:])
        got = b""
        while len(got) < len(b"hello proxy"):
            got += await stream.receive_some(4)
    assert got == b"hello proxy"
    assert stream.peer_address == ("203.0.113.9", 4242)


@pytest.mark.parametrize(
    ("sent", "match"),
    [
        (b"hello, no header\r\n", "no PROXY protocol header"),
        (b"PROXY TCP4 nonsense\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113", "ended inside a PROXY protocol header"),
    ],
)
async def test_no_header_or_a_bad_one_breaks_the_stream(sent: bytes, match: str) -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = ProxyStream(server)
    await client.send_all(sent)
    await client.send_eof()
    with pytest.raises(trio.BrokenResourceError, match=match):
        await stream.receive_some()


async def test_a_local_header_leaves_the_peer_to_the_socket() -> None:
    # HAProxy's health checks send LOCAL: no client address in it.
    client, server = trio.testing.memory_stream_pair()
    stream = ProxyStream(server)
    await client.send_all(V2_SIGNATURE + b"\x20\x00\x00\x00" + b"ping")
    assert await stream.receive_some() == b"ping"
    assert stream.peer_address is None


# --- The server on loopback -----------------------------------------------------------


async def start(nursery: trio.Nursery, allow: str) -> tuple[UpperServer, int]:
    config = ServerConfig(host="127.0.0.1", port=0, proxy_allow=AllowList(parse_allow_list(allow)))
    server = UpperServer(config)
    endpoints: list[Endpoint] = await nursery.start(server.run)
    return server, endpoints[0].port


async def converse(port: int, data: bytes) -> bytes:
    with trio.fail_after(PROCESS_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            try:
                return await receive_until_eof(stream)
            except trio.BrokenResourceError:
                return b""


async def test_a_proxied_connection_is_answered_and_logged_as_the_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_upper")
    server, port = await start(nursery, "127.0.0.1")
    assert await converse(port, V1 + "straße".encode()) == b"STRASSE"
    # Without the header, from an address that must send one: closed, unanswered.
    assert await converse(port, b"no header") == b""
    await trio.testing.wait_all_tasks_blocked()
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_upper.tcp"]
    assert any(line.startswith("203.0.113.9:4242: connected") for line in lines), lines
    assert any("no PROXY protocol header" in line for line in lines), lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (server.stats.connections, server.stats.lost) == (2, 1)
    server.shutdown(grace=0)


async def test_from_an_address_not_allowed_the_header_is_data(nursery: trio.Nursery) -> None:
    server, port = await start(nursery, "10.0.0.0/8")
    assert await converse(port, V1 + b"x") == upper_bytes(V1 + b"x")
    server.shutdown(grace=0)


# --- UDP ------------------------------------------------------------------------------


def test_strip_datagram() -> None:
    assert strip_datagram(b"plain") == (None, b"plain")
    header, payload = strip_datagram(V1 + b"data") or (None, b"")
    assert header is not None
    assert header.source == ("203.0.113.9", 4242)
    assert payload == b"data"
    assert strip_datagram(b"PROXY TCP4 junk\r\ndata") is None
    assert strip_datagram(b"PROXY TCP4 203.0.113.9") is None  # cut: never completed


async def test_udp_from_the_balancer_answers_what_follows_the_header(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sock = FakeDatagramSocket()
    counts = UdpCounts()
    nursery.start_soon(partial(serve_udp, sock, counts=counts, proxy_allow=LOCAL))
    balancer = ("127.0.0.1", 40000)
    with trio.fail_after(HANG):
        sock.deliver(V1 + b"via v1", balancer)
        sock.deliver(v2_udp("198.51.100.7", 5353) + b"via v2", balancer)
        sock.deliver(b"no header at all", balancer)
        sock.deliver(b"PROXY TCP4 bad\r\nx", balancer)
        sock.deliver(V1 + b"not from the balancer", ("192.0.2.50", 1))
        replies = await sock.replies(4)
    assert replies == [
        b"VIA V1",
        b"VIA V2",
        b"NO HEADER AT ALL",
        upper_bytes(V1 + b"not from the balancer"),
    ]
    # Every reply went to whoever sent the datagram: the balancer relays it.
    assert [address for _, address in sock.sent[:3]] == [balancer] * 3
    assert counts == UdpCounts(datagrams=5, bad_proxy_header=1)


async def test_the_rate_limit_counts_the_client_the_header_names(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Behind one balancer, a limit per balancer would throttle every client
    # at once: each client's network has its own bucket.
    sock = FakeDatagramSocket()
    counts = UdpCounts()
    limiter = ReplyRateLimiter(rate=1, burst=2)
    nursery.start_soon(partial(serve_udp, sock, limiter=limiter, counts=counts, proxy_allow=LOCAL))
    balancer = ("127.0.0.1", 40000)
    with trio.fail_after(HANG):
        for n in range(5):
            sock.deliver(v2_udp("198.51.100.7", 1000 + n) + b"flood %d" % n, balancer)
        sock.deliver(v2_udp("203.0.113.5", 2000) + b"someone else", balancer)
        replies = await sock.replies(3)
        await trio.testing.wait_all_tasks_blocked()
    assert replies == [b"FLOOD 0", b"FLOOD 1", b"SOMEONE ELSE"]
    assert counts.rate_limited == 3


def test_the_server_help_states_the_proxy_flags_and_their_defaults() -> None:
    result = run_cli("serve", "--help")
    text = " ".join(result.stdout.decode().split())
    assert "--proxy-protocol" in text
    assert "(default: 127.0.0.1,::1)" in text
