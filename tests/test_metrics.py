"""``serve --metrics``: Prometheus metrics over HTTP.

Scraped as Prometheus would, with real HTTP clients (urllib in a worker
thread, and curl where it is installed) against a real server on loopback,
in-process and as the command line runs it, and parsed with
prometheus_client's own parser. Every count is checked against traffic of
known size. The HTTP handler on its own runs over in-memory streams under
the mock clock for everything with a deadline: a client that sends nothing,
one that sends a byte at a time, one that never reads its answer.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from trio_upper import metrics
from trio_upper.errors import UserError
from trio_upper.metrics import LINGER_TIMEOUT, MAX_REQUEST_HEAD, REQUEST_TIMEOUT, handle_http
from trio_upper.server import Endpoint, ServerConfig, ServerStats, UpperServer
from trio_upper.systemd import ListenFd
from trio_upper.udp import UdpCounts

from .helpers import (
    PROCESS_TIMEOUT,
    FakeDatagramSocket,
    ServerProcess,
    cli,
    receive_exactly,
    run_cli,
)

# Bounds on every network wait, so that a broken server fails a test
# rather than hangs it; never what a test checks.
HANG = 30.0

# What the issue asks for by name, and the type Prometheus must see.
TYPES = {
    "trio_upper_tcp_connections_total": "counter",
    "trio_upper_tcp_connections_active": "gauge",
    "trio_upper_tcp_bytes_received_total": "counter",
    "trio_upper_tcp_bytes_sent_total": "counter",
    "trio_upper_tcp_connection_errors_total": "counter",
    "trio_upper_tls_handshake_failures_total": "counter",
    "trio_upper_udp_datagrams_total": "counter",
    "trio_upper_udp_rate_limited_total": "counter",
    "trio_upper_udp_replies_dropped_total": "counter",
}
ERRORS = "trio_upper_tcp_connection_errors_total"
KINDS = ("idle_timeout", "lost", "tls_handshake", "internal")

# Short names for the samples, for expect().
SHORT = {
    "connections": "trio_upper_tcp_connections_total",
    "active": "trio_upper_tcp_connections_active",
    "received": "trio_upper_tcp_bytes_received_total",
    "sent": "trio_upper_tcp_bytes_sent_total",
    "tls_failures": "trio_upper_tls_handshake_failures_total",
    "datagrams": "trio_upper_udp_datagrams_total",
    "rate_limited": "trio_upper_udp_rate_limited_total",
    "dropped": "trio_upper_udp_replies_dropped_total",
} | {kind: f'{ERRORS}{{kind="{kind}"}}' for kind in KINDS}

EXTRA_HINT = "pip install 'trio-upper[metrics]'"


def expect(**counts: int) -> dict[str, float]:
    """Every sample a scrape has, 0 but for ``counts`` (by SHORT name)."""
    unknown = set(counts) - set(SHORT)
    assert not unknown, unknown
    return {full: float(counts.get(short, 0)) for short, full in SHORT.items()}


def parse(text: str) -> dict[str, float]:
    """A scrape's samples by name (``name{kind="..."}`` for labelled ones),
    read by prometheus_client's parser; checks each family's type and help."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        for sample in family.samples:
            assert TYPES.get(sample.name) == family.type, (sample.name, family.type)
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            assert key not in samples, key
            samples[key] = sample.value
    return samples


# --- HTTP clients ------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes


# urllib would send loopback requests to a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, method: str = "GET") -> Response:
    """One HTTP request with urllib, blocking; 4xx and 5xx are answers too."""
    request = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(request, timeout=HANG) as answer:
            return Response(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, exc.headers, exc.read())


async def afetch(url: str, method: str = "GET") -> Response:
    """:func:`fetch` in a worker thread, as a trio program would scrape."""
    with trio.fail_after(HANG):
        return await trio.to_thread.run_sync(fetch, url, method)


def check_exposition(response: Response) -> dict[str, float]:
    assert response.status == 200, response
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    assert int(response.headers["Content-Length"]) == len(response.body)
    return parse(response.body.decode())


async def scrape(url: str) -> dict[str, float]:
    return check_exposition(await afetch(url))


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes to the metrics port, then read until it closes (no
    thread: the thread test needs none of its own)."""
    with trio.fail_after(HANG):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = bytearray()
            while chunk := await stream.receive_some():
                data += chunk
            return bytes(data)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response.split(b" ", 2)[1])


GET = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n"


# --- An in-process server ---------------------------------------------------------


class Metered:
    """An UpperServer on 127.0.0.1 with metrics, both on ports of the OS's
    choosing."""

    def __init__(self, server: UpperServer, endpoints: list[Endpoint]) -> None:
        self.server = server
        self.endpoints = endpoints
        self.port = next(e.port for e in endpoints if e.protocol != "metrics")
        (self.metrics,) = (e for e in endpoints if e.protocol == "metrics")
        self.url = str(self.metrics)

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def scrape(self) -> dict[str, float]:
        return await scrape(self.url)

    async def assert_serving_uppercase(self) -> None:
        with trio.fail_after(HANG):
            async with await self.connect() as stream:
                await stream.send_all(b"still here")
                assert await receive_exactly(stream, 10) == b"STILL HERE"

    async def assert_serving(self) -> None:
        """Still answers uppercase and a scrape."""
        await self.assert_serving_uppercase()
        assert (await self.scrape())[SHORT["connections"]] >= 1


Start = Callable[..., Awaitable[Metered]]


@pytest.fixture
async def metered(nursery: trio.Nursery) -> AsyncIterator[Start]:
    """Start servers with metrics (ServerConfig fields as keywords); each
    is shut down at the end of the test."""
    started: list[UpperServer] = []

    async def start(**config: Any) -> Metered:
        server = UpperServer(
            ServerConfig(host="127.0.0.1", port=0, metrics=("127.0.0.1", 0), **config)
        )
        started.append(server)
        return Metered(server, await nursery.start(server.run))

    yield start
    for server in started:
        server.shutdown(grace=0)


async def settle() -> None:
    """Let the server finish what the traffic so far started (a handler's
    last counts after the client saw the end of stream, a datagram in the
    socket's queue): what is left is waiting for new I/O."""
    await trio.testing.wait_all_tasks_blocked()


# --- What the exposition says --------------------------------------------------------


def test_each_count_is_exported_under_its_own_name() -> None:
    # A distinct value per field, so that two swapped fields cannot pass.
    stats = ServerStats(
        connections=2,
        active=3,
        bytes_received=5,
        bytes_sent=7,
        idle_closed=11,
        lost=13,
        tls_failed=17,
        cut_off=19,
        internal_errors=23,
        udp=UdpCounts(datagrams=29, rate_limited=31, dropped=37),
    )
    render = metrics.renderer(stats)
    assert parse(render().decode()) == expect(
        connections=2,
        active=3,
        received=5,
        sent=7,
        idle_timeout=11,
        lost=13,
        tls_handshake=17,
        tls_failures=17,
        internal=23,
        datagrams=29,
        rate_limited=31,
        dropped=37,
    )
    # Read at each scrape, not once.
    stats.bytes_sent += 100
    assert parse(render().decode())[SHORT["sent"]] == 107


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_lint() -> None:
    # Prometheus' own checker: the format, and its naming and help rules.
    stats = ServerStats(connections=1, bytes_received=5, udp=UdpCounts(datagrams=2))
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=metrics.renderer(stats)(),
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


async def test_endpoints_name_the_port_the_os_chose(metered: Start) -> None:
    m = await metered()
    assert m.metrics.port != 0
    assert m.metrics.port != m.port
    assert m.url == f"http://127.0.0.1:{m.metrics.port}/metrics"
    assert {e.protocol for e in m.endpoints} == {"tcp", "udp", "metrics"}
    # A fresh server: every sample there, every one 0.
    assert await m.scrape() == expect()


async def test_counts_tcp_connections_and_bytes_exactly(metered: Start) -> None:
    m = await metered()
    # One that grows when uppercased, and invalid UTF-8 that passes through,
    # so that bytes sent and received differ and cannot be mixed up.
    requests = [b"hello\n", "straße ΐ\n".encode(), b"\xff\xfeabc"]
    replies = []
    for request in requests:
        with trio.fail_after(HANG):
            async with await m.connect() as stream:
                await stream.send_all(request)
                await stream.send_eof()
                reply = bytearray()
                while chunk := await stream.receive_some():
                    reply += chunk
                replies.append(bytes(reply))
    assert len(replies[1]) > len(requests[1])
    await settle()
    assert await m.scrape() == expect(
        connections=3,
        received=sum(map(len, requests)),
        sent=sum(map(len, replies)),
    )


async def test_active_gauge_counts_open_connections(metered: Start) -> None:
    m = await metered()
    with trio.fail_after(HANG):
        first = await m.connect()
        await first.send_all(b"a")
        assert await receive_exactly(first, 1) == b"A"
        assert (await m.scrape())[SHORT["active"]] == 1
        second = await m.connect()
        await second.send_all(b"b")
        assert await receive_exactly(second, 1) == b"B"
        assert (await m.scrape())[SHORT["active"]] == 2
        await first.aclose()
        await second.aclose()
    await settle()
    assert await m.scrape() == expect(connections=2, received=2, sent=2)


async def test_counts_udp_datagrams(metered: Start) -> None:
    m = await metered()
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", m.port))
        with trio.fail_after(HANG):
            for datagram in (b"one", b"", b"three", b"four"):
                await sock.send(datagram)
                assert await sock.recv(100) == datagram.upper()
    await settle()
    assert await m.scrape() == expect(datagrams=4)


async def test_counts_udp_datagrams_over_the_rate_limit(metered: Start) -> None:
    # One reply a second, a burst of two: most of a quick ten go unanswered.
    m = await metered(udp_rate_limit=1)
    sent = 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)  # in async code: never wait
        sock.connect(("127.0.0.1", m.port))
        for i in range(sent):
            sock.send(b"x%d" % i)
        await settle()
        scraped = await m.scrape()
        # Every reply the server sent is in our socket's queue by now.
        answered = 0
        while True:
            try:
                sock.recv(100)
            except BlockingIOError:
                break
            answered += 1
    assert 1 <= answered < sent
    assert scraped == expect(datagrams=sent, rate_limited=sent - answered)


async def test_counts_udp_replies_dropped(nursery: trio.Nursery) -> None:
    # A failed send is hard to cause on loopback: a socket in memory fails
    # on purpose, and the metrics are served on a real port beside it.
    fake = FakeDatagramSocket()
    fake.send_errors.append(OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS)))
    server = UpperServer(ServerConfig(udp_rate_limit=0))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    endpoints = await nursery.start(partial(server.serve, [], [fake], metrics_listeners=listeners))
    fake.deliver(b"lost")
    fake.deliver(b"kept")
    with trio.fail_after(HANG):
        assert await fake.replies(1) == [b"KEPT"]
    assert await scrape(str(endpoints[-1])) == expect(datagrams=2, dropped=1)
    server.shutdown(grace=0)


async def test_counts_idle_timeouts(metered: Start) -> None:
    m = await metered(idle_timeout=0.05)
    with trio.fail_after(HANG):
        async with await m.connect() as stream:
            # Silent: the server closes it.
            assert await stream.receive_some() == b""
    await settle()
    assert await m.scrape() == expect(connections=1, idle_timeout=1)


async def test_counts_lost_connections(metered: Start) -> None:
    m = await metered()
    with trio.fail_after(HANG):
        stream = await m.connect()
        await stream.send_all(b"abc")
        assert await receive_exactly(stream, 3) == b"ABC"
        # Linger 0: close sends a reset rather than an end of stream.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
    await settle()
    assert await m.scrape() == expect(connections=1, received=3, sent=3, lost=1)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_counts_tls_handshake_failures(metered: Start, ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    m = await metered(tls=server_context)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with trio.fail_after(HANG):
        # A good one: served, its bytes counted, no failure.
        good = trio.SSLStream(await m.connect(), trusting, server_hostname="localhost")
        await good.send_all(b"secret")
        assert await receive_exactly(good, 6) == b"SECRET"
        await good.aclose()
        # A good handshake, then gone before sending anything: lost, not a
        # handshake failure.
        quiet = trio.SSLStream(await m.connect(), trusting, server_hostname="localhost")
        await quiet.do_handshake()
        await trio.aclose_forcefully(quiet)
        # A client that does not trust the certificate: it aborts the
        # handshake with an alert.
        distrusting = trio.SSLStream(
            await m.connect(), ssl.create_default_context(), server_hostname="localhost"
        )
        with pytest.raises(trio.BrokenResourceError):
            await distrusting.do_handshake()
        await trio.aclose_forcefully(distrusting)
        # Plain text on the TLS port.
        async with await m.connect() as plain:
            await plain.send_all(b"hello\n")
            # An end of stream, or a reset: the server closed with our
            # bytes unread.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await plain.receive_some() == b""
    await settle()
    assert await m.scrape() == expect(
        connections=4, received=6, sent=6, lost=1, tls_handshake=2, tls_failures=2
    )


# --- What the metrics port does with bad requests ------------------------------------


async def test_wrong_path_is_404_and_wrong_method_405(metered: Start) -> None:
    m = await metered()
    base = f"http://127.0.0.1:{m.metrics.port}"
    for url in (f"{base}/", f"{base}/metrics/", f"{base}/metricsx", f"{base}/other"):
        assert (await afetch(url)).status == 404, url
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        answer = await afetch(m.url, method)
        assert answer.status == 405, method
        assert answer.headers["Allow"] == "GET, HEAD"
    # A query string is no different path.
    check_exposition(await afetch(f"{m.url}?debug=1"))
    await m.assert_serving()


async def test_head_gets_the_headers_and_no_body(metered: Start) -> None:
    m = await metered()
    answer = await afetch(m.url, "HEAD")
    assert answer.status == 200
    assert answer.body == b""
    assert int(answer.headers["Content-Length"]) == len((await afetch(m.url)).body)
    # On the wire: nothing after the head.
    raw = await exchange(m.metrics.port, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status_of(raw) == 200
    assert raw.endswith(b"\r\n\r\n")


GARBAGE = [
    b"garbage\r\n\r\n",
    b"\x00\xff" * 100 + b"\r\n\r\n",
    b"GET /metrics\r\n\r\n",  # HTTP/0.9
    b"GET /metrics HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
]


async def test_garbage_gets_400(metered: Start) -> None:
    m = await metered()
    for request in GARBAGE:
        response = await exchange(m.metrics.port, request)
        assert status_of(response) == 400, request
    await m.assert_serving()


async def test_request_head_past_the_limit_gets_400(metered: Start) -> None:
    m = await metered()
    long_line = b"GET /" + b"a" * (4 * MAX_REQUEST_HEAD) + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    long_header = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (4 * MAX_REQUEST_HEAD)
    many_headers = b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + b"X: a\r\n" * MAX_REQUEST_HEAD
    for request in (long_line, long_header + b"\r\n\r\n", many_headers + b"\r\n"):
        # The answer must arrive even though the server read only part of
        # the request: a close with unread bytes would be a reset instead.
        assert status_of(await exchange(m.metrics.port, request)) == 400
    # Well within the limit is fine.
    filled = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (MAX_REQUEST_HEAD // 2)
    assert status_of(await exchange(m.metrics.port, filled + b"\r\n\r\n")) == 200
    await m.assert_serving()


async def test_connection_closed_without_a_request_is_quiet(
    metered: Start, caplog: pytest.LogCaptureFixture
) -> None:
    m = await metered()
    with trio.fail_after(HANG):
        for _ in range(3):
            # A port scan or a TCP health check: connect, close.
            stream = await trio.open_tcp_stream("127.0.0.1", m.metrics.port)
            await stream.aclose()
        half = await trio.open_tcp_stream("127.0.0.1", m.metrics.port)
        await half.send_eof()
        assert await half.receive_some() == b""
        await half.aclose()
    await settle()
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    await m.assert_serving()


async def test_slow_client_is_closed(metered: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.05)
    m = await metered()
    with trio.fail_after(HANG):
        async with await trio.open_tcp_stream("127.0.0.1", m.metrics.port) as stream:
            await stream.send_all(b"GET /metr")
            assert await stream.receive_some() == b""
    await m.assert_serving()


async def test_past_eight_connections_the_rest_wait(
    metered: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eight silent clients hold every metrics slot, for as long as they like.
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 1e6)
    m = await metered()
    port = m.metrics.port
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
    waiting = await trio.open_tcp_stream("127.0.0.1", port)
    await waiting.send_all(GET)
    # The ninth is not served while they stay (a server with no cap would
    # answer it at once)...
    with trio.move_on_after(0.3):
        await waiting.receive_some()
        pytest.fail("a ninth metrics connection was served while eight were held")
    # ... and the uppercase port does not care.
    await m.assert_serving_uppercase()
    # One leaves: the ninth is served.
    await silent.pop().aclose()
    with trio.fail_after(HANG):
        answer = bytearray()
        while chunk := await waiting.receive_some():
            answer += chunk
    assert status_of(bytes(answer)) == 200
    await waiting.aclose()
    for stream in silent:
        await stream.aclose()
    # Many at once: all answered, in turn.
    answers: list[int] = []

    async def one() -> None:
        answers.append(status_of(await exchange(port, GET)))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(one)
    assert answers == [200] * 30
    await m.assert_serving()


async def test_metrics_stop_with_the_server_and_leave_no_thread(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that would hold its connection for ever must not hold up
    # the shutdown either.
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 1e6)
    threads = set(threading.enumerate())
    # A grace period longer than any test: the server stops when its last
    # uppercase connection closes.
    config = ServerConfig(host="127.0.0.1", port=0, metrics=("127.0.0.1", 0), grace=1e6)
    server = UpperServer(config)
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
        await server.run(task_status=task_status)
        stopped.set()

    endpoints: list[Endpoint] = await nursery.start(run)
    port = endpoints[-1].port
    assert endpoints[-1].protocol == "metrics"
    parse((await exchange(port, GET)).partition(b"\r\n\r\n")[2].decode())
    holder = await trio.open_tcp_stream("127.0.0.1", port)
    # An uppercase connection keeps the server in its grace period.
    busy = await trio.open_tcp_stream("127.0.0.1", endpoints[0].port)
    await busy.send_all(b"a")
    assert await receive_exactly(busy, 1) == b"A"
    assert set(threading.enumerate()) <= threads
    server.shutdown()
    with trio.fail_after(HANG):
        # The metrics stop with accepting, not at the end of the grace.
        await server.stopped_accepting()
        assert await holder.receive_some() == b""
        with pytest.raises(OSError, match=r"refused|failed"):
            await trio.open_tcp_stream("127.0.0.1", port)
        assert not stopped.is_set()
        await busy.aclose()
        await stopped.wait()
    await holder.aclose()
    assert set(threading.enumerate()) <= threads


async def test_serves_metrics_on_a_socket_from_systemd(nursery: trio.Nursery) -> None:
    uppercase = socket.create_server(("127.0.0.1", 0))
    for_metrics = socket.create_server(("127.0.0.1", 0))
    port = for_metrics.getsockname()[1]
    server = UpperServer(ServerConfig())
    endpoints = await nursery.start(
        partial(
            server.run,
            inherited=[ListenFd(uppercase, "unknown"), ListenFd(for_metrics, "metrics")],
        )
    )
    assert Endpoint("metrics", "127.0.0.1", port) in endpoints
    assert await scrape(f"http://127.0.0.1:{port}/metrics") == expect()
    server.shutdown(grace=0)


async def test_metrics_socket_from_systemd_and_the_flag_conflict() -> None:
    for_metrics = socket.create_server(("127.0.0.1", 0))
    server = UpperServer(ServerConfig(metrics=("127.0.0.1", 0)))
    with pytest.raises(UserError, match="--metrics cannot be used"):
        await server.run(inherited=[ListenFd(for_metrics, "metrics")])
    assert for_metrics.fileno() == -1  # closed


# --- The HTTP handler alone, under the mock clock ----------------------------------------


def render() -> bytes:
    return b"# metrics\n"


class Counting(trio.abc.HalfCloseableStream):
    """The server's end of a memory stream, counting what the handler read
    before it first sent anything."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.received = 0
        self.received_before_answer: int | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.received_before_answer is None:
            self.received_before_answer = self.received
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


async def test_silent_client_is_closed_after_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, server, render)
        assert await client.receive_some() == b""
    assert trio.current_time() - start >= REQUEST_TIMEOUT


async def test_dribbling_client_is_closed_after_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A byte a second keeps no read waiting long, but the timeout is for
    # the whole request.
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()

    async def dribble() -> None:
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: ")
        try:
            for _ in range(1000):
                await trio.sleep(1)
                await client.send_all(b"a")
        except trio.BrokenResourceError:
            return
        pytest.fail("a client sending a byte a second was never closed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, server, render)
        nursery.start_soon(dribble)
        assert await client.receive_some() == b""
        closed_at = trio.current_time() - start
    assert REQUEST_TIMEOUT <= closed_at <= REQUEST_TIMEOUT + 1


async def test_client_that_never_reads_its_answer_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Lockstep: nothing is buffered, so the answer waits for a read that
    # never comes.
    client, server = trio.testing.lockstep_stream_pair()
    with trio.fail_after(10 * REQUEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_http, server, render)
            await client.send_all(GET)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")


async def test_oversized_request_is_refused_before_it_is_all_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    counting = Counting(server)
    huge = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n"

    async def send() -> None:
        try:
            await client.send_all(huge)
            await client.send_eof()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, counting, render)
        nursery.start_soon(send)
        answer = await read_all(client)
    assert status_of(answer) == 400
    assert counting.received_before_answer is not None
    assert counting.received_before_answer <= 2 * MAX_REQUEST_HEAD


async def test_lingering_after_the_answer_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A client that answers with a flood, and one that trickles for ever:
    # the server reads and discards a bounded amount for a bounded time.
    async def flood(client: trio.abc.SendStream, pause: float) -> None:
        await client.send_all(GET)
        try:
            for _ in range(100_000):
                await client.send_all(b"x" * 1000)
                await trio.sleep(pause)
        except trio.BrokenResourceError:
            return
        pytest.fail("the server never stopped reading")

    for pause in (0.0, 0.1):
        client, server = trio.testing.memory_stream_pair()
        counting = Counting(server)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_http, counting, render)
            nursery.start_soon(flood, client, pause)
            assert status_of(await read_all(client)) == 200
        assert trio.current_time() - start <= LINGER_TIMEOUT + 1
        assert counting.received < 10 * 2**20


async def test_render_failure_is_logged_not_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bytes:
        raise RuntimeError("a bug")

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, server, broken)
        await client.send_all(GET)
        assert await read_all(client) == b""
    assert "metrics connection dropped by an internal error" in caplog.text


ANSWERS = {200, 400, 404, 405}


async def answer_to(pieces: list[bytes]) -> bytes:
    client, server = trio.testing.memory_stream_pair()

    async def send() -> None:
        try:
            for piece in pieces:
                await client.send_all(piece)
            await client.send_eof()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, server, render)
        nursery.start_soon(send)
        return await read_all(client)


requests = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, path, rest: method + b" " + path + b" HTTP/1.1\r\n" + rest,
        st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"G\x00T"]),
        st.sampled_from([b"/metrics", b"/", b"/metrics?x", b"*", b"http://h/metrics"]),
        st.binary(max_size=100) | st.just(b"Host: t\r\n\r\n"),
    ),
)


@settings(max_examples=200, deadline=None)
@given(request=requests, cuts=st.lists(st.integers(0, 300), max_size=4))
def test_any_bytes_get_an_answer_or_a_close(request: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(request), *(c for c in cuts if c < len(request))})
    pieces = [request[a:b] for a, b in itertools.pairwise(bounds)]
    answer = trio.run(answer_to, pieces, clock=trio.testing.MockClock(autojump_threshold=0))
    if not answer:
        return  # closed: the request did not end before the stream did
    status = status_of(answer)
    assert status in ANSWERS
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: (\d+)\r\n", head + b"\r\n")
    assert length is not None
    if request.startswith(b"HEAD ") and status != 400:
        assert body == b""  # whatever the status: RFC 9110
    else:
        assert int(length.group(1)) == len(body)


# --- The command line -----------------------------------------------------------------


def metrics_url(server: ServerProcess) -> str:
    found = re.search(r"; metrics at (http://\S+/metrics)", server.first_line)
    assert found, server.first_line
    return found.group(1)


@pytest.fixture
def metrics_process() -> Iterator[ServerProcess]:
    server = ServerProcess(
        cli("serve", "--host", "127.0.0.1", "--port", "0", "--metrics", "127.0.0.1:0")
    )
    yield server
    server.stop(signal.SIGKILL)


def scrape_until(url: str, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Scrape a server process until ``done``: it may still be closing a
    connection whose client has exited."""
    for _ in range(100):
        scraped = check_exposition(fetch(url))
        if done(scraped):
            return scraped
        time.sleep(0.05)
    raise AssertionError(f"never reached: {scraped}")


def test_cli_serves_metrics_that_count_its_traffic(metrics_process: ServerProcess) -> None:
    url = metrics_url(metrics_process)
    assert "Serving uppercase on tcp 127.0.0.1:" in metrics_process.first_line
    port = str(metrics_process.port)
    assert url != f"http://127.0.0.1:{port}/metrics"
    assert run_cli("tcp", "127.0.0.1", "-p", port, input=b"hello\n").stdout == b"HELLO\n"
    assert run_cli("udp", "127.0.0.1", "-p", port, input=b"one\ntwo\n").stdout == b"ONE\nTWO\n"
    scraped = scrape_until(url, lambda s: s[SHORT["active"]] == 0)
    assert scraped == expect(connections=1, received=6, sent=6, datagrams=2)
    status, out, err = metrics_process.stop(signal.SIGTERM)
    assert status == 0, err
    assert err == ""
    assert "Stopped: served 1 TCP connection and 2 datagrams." in out
    host, _, metrics_port = url.removeprefix("http://").removesuffix("/metrics").rpartition(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(metrics_port)), timeout=HANG).close()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--noproxy", "*", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_scrapes_and_gets_each_status(metrics_process: ServerProcess) -> None:
    url = metrics_url(metrics_process)
    got = curl("--fail", url)
    assert got.returncode == 0, got.stderr
    assert parse(got.stdout.decode()) == expect()
    base = url.removesuffix("/metrics")
    for args, status in (
        ((url,), "200"),
        (("--head", url), "200"),
        (("--request", "POST", url), "405"),
        ((f"{base}/",), "404"),
        (("--http1.0", url), "200"),
    ):
        got = curl("--output", os.devnull, "--write-out", "%{http_code}", *args)
        assert got.stdout.decode() == status, (args, got)
    assert metrics_process.stop(signal.SIGTERM)[0] == 0


def test_metrics_on_ipv6_loopback() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = ServerProcess(
        cli("serve", "--host", "127.0.0.1", "--port", "0", "--metrics", "[::1]:0")
    )
    try:
        url = metrics_url(server)
        assert url.startswith("http://[::1]:")
        assert check_exposition(fetch(url)) == expect()
        assert server.stop(signal.SIGTERM)[0] == 0
    finally:
        server.stop(signal.SIGKILL)


# The command line with a module made unimportable, as if not installed.
WITHOUT = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from trio_upper.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.mark.parametrize("module", ["prometheus_client", "h11"])
def test_metrics_without_the_extra_is_one_error_line(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT, module, "serve", "-p", "0", "--metrics", "127.0.0.1:0"],
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == b""  # it said so before serving anything
    assert result.stderr.decode().splitlines() == [
        f"trio-upper: error: --metrics needs {module}, which is not installed: {EXTRA_HINT}"
    ]


def test_server_without_metrics_needs_neither_library() -> None:
    neither = [sys.executable, "-c", WITHOUT, "prometheus_client,h11"]
    server = ServerProcess([*neither, "serve", "--host", "127.0.0.1", "--port", "0"])
    try:
        assert "metrics" not in server.first_line
        got = run_cli("tcp", "127.0.0.1", "-p", str(server.port), input=b"hi\n")
        assert got.stdout == b"HI\n"
        status, _, err = server.stop(signal.SIGTERM)
        assert (status, err) == (0, "")
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9100", "not HOST:PORT: '9100'"),
        ("host:notaport", "not a port number: 'notaport'"),
        ("127.0.0.1:", "not a port number: ''"),
        ("127.0.0.1:70000", "port must be 0-65535, not 70000"),
    ],
)
def test_bad_metrics_value_is_one_usage_error_line(value: str, reason: str) -> None:
    result = run_cli("serve", "--metrics", value)
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("usage: trio-upper serve ")
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert lines[-1] == f"trio-upper serve: error: argument --metrics: {reason}"


def test_metrics_port_in_use_is_one_error_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", "-p", "0", "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"trio-upper: error: cannot serve metrics on 127.0.0.1 port {port}: Address already in use"
    ]


@pytest.mark.parametrize("columns", ["60", "80", "200"])
def test_help_states_the_metrics_flag_and_its_default(columns: str) -> None:
    result = subprocess.run(
        cli("serve", "--help"),
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=True,
        env={**os.environ, "COLUMNS": columns},
    )
    # As one line, but for where argparse wrapped it: a hyphen at the end
    # of a line would show as "trio- upper", and could not be copied whole.
    text = " ".join(result.stdout.decode().split())
    found = re.search(r"--metrics HOST:PORT (.*?\(default: off\))", text)
    assert found, text
    assert "http://HOST:PORT/metrics" in found.group(1)
    assert EXTRA_HINT in found.group(1)
