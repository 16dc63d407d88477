"""The hardening features: --max-connections, --idle-timeout, running out of
file descriptors, the grace period's remaining edge cases, load, and the new
``serve`` flags on the command line.

Anything with a deadline in it (the idle timeout, the retry after EMFILE, a
virtual hour of waiting for a slot) runs the server over in-memory streams
under the autojump MockClock: virtual hours cost nothing, and a deadlock fails
at once with TooSlowError instead of hanging the run. Real sockets are used
where the kernel is the point (its accept backlog, TCP flow control, real
descriptors); their deadlines are hang guards only. No test asserts how long
anything took in real time.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from trio_upper import tcp as tcp_module
from trio_upper.cli import main as cli_main
from trio_upper.ratelimit import DEFAULT_RATE
from trio_upper.server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    Endpoint,
    ServerConfig,
    ServerStats,
    UpperServer,
)
from trio_upper.systemd import ListenFd
from trio_upper.transform import upper_bytes

from . import helpers
from .helpers import (
    LOOPBACK_HANG,
    PAUSED,
    PROCESS_TIMEOUT,
    RESUMED,
    VIRTUAL_HANG,
    InMemoryServer,
    LoopbackServer,
    accept_queue,
    can_see_accept_queues,
    dial,
    entry_for,
    help_entries,
    readable,
    receive_exactly,
    receive_until_eof,
    recv_exactly,
    run_cli,
    serve_loopback,
    serving,
    udp_exchange,
    until,
    usage_error_line,
    wait_until,
    warnings_logged,
    writable,
)

HalfCloseable = trio.abc.HalfCloseableStream

# The idle timeout of the in-memory tests, in virtual seconds, and how much
# later than it the issue allows an idle connection to be closed (an eighth:
# the server moves its deadline at most once per eighth of the timeout).
IDLE = 10.0
IDLE_SLACK = 1 / 8

MAX_CONNECTIONS_PAUSE = " open, the most --max-connections allows; " + PAUSED

# Text that grows, shrinks and breaks: "ΐ" comes back three times longer,
# "ß" twice, invalid bytes unchanged.
MIXED = "ΐ straße ŉ ".encode() + b"\xff plain ascii "


def request_for(n: int) -> bytes:
    """A request unique to client ``n`` that ends on a character boundary, so
    its whole reply comes back without an end of stream."""
    return f"client {n}: straße ΐ ŉ {'x' * (n % 17)}\n".encode()


# --- An in-memory server -----------------------------------------------------------------


async def serve_in_memory(nursery: trio.Nursery, **options: Any) -> InMemoryServer:
    """helpers.serve_in_memory, but with no idle timeout unless asked for:
    these tests let virtual hours pass."""
    options.setdefault("idle_timeout", 0)
    return await helpers.serve_in_memory(nursery, **options)


async def exchange(stream: trio.abc.Stream, request: bytes) -> None:
    """Send ``request`` (whole characters) and check the reply, byte for byte."""
    await stream.send_all(request)
    expected = upper_bytes(request)
    assert await receive_exactly(stream, len(expected)) == expected


def server_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return warnings_logged(caplog, "trio_upper.server")


def lines_with(lines: list[str], marker: str) -> list[str]:
    return [line for line in lines if marker in line]


# --- --max-connections, in memory -------------------------------------------------------


async def test_the_connection_past_the_limit_waits_until_a_slot_frees(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, max_connections=3)
        stats = served.server.stats
        clients = [await served.listener.connect() for _ in range(3)]
        for n, client in enumerate(clients):
            await exchange(client, request_for(n))
        fourth = await dial(nursery, served.listener)
        await trio.sleep(3600)
        # A virtual hour later it is still not accepted (had the accept loop
        # spun meanwhile, the listener would have failed the test).
        assert not fourth.accepted.is_set()
        assert (stats.connections, stats.active) == (3, 3)
        [warning] = server_warnings(caplog)
        assert warning.endswith(MAX_CONNECTIONS_PAUSE)
        # The three being handled are served as usual meanwhile.
        for n, client in enumerate(clients):
            await exchange(client, request_for(n + 10))

        await clients[1].send_eof()
        assert await receive_until_eof(clients[1]) == b""
        stream = await fourth.wait()
        await exchange(stream, b"the fourth, at last")
        assert (stats.connections, stats.active) == (4, 3)

        # Once the load is gone, a new connection is accepted at once, and
        # by then the log says accepting has resumed, after the one warning.
        for client in [clients[0], clients[2], stream]:
            await client.aclose()
        fresh = await served.listener.connect()
        await exchange(fresh, b"fresh")
        warnings = server_warnings(caplog)
        resumed = [i for i, line in enumerate(warnings) if line.startswith(RESUMED)]
        assert resumed, warnings
        assert len(lines_with(warnings[: resumed[0]], PAUSED)) == 1, warnings
        served.server.shutdown(grace=0)
        await served.done.wait()
    assert stats.cut_off == 1  # fresh, still open at the zero grace


async def test_the_warning_states_how_many_connections_are_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, max_connections=3)
        for n in range(3):
            await exchange(await served.listener.connect(), request_for(n))
        assert server_warnings(caplog) == [f"3 connections{MAX_CONNECTIONS_PAUSE}"]
        served.server.shutdown(grace=0)


async def test_the_limit_counts_the_connections_of_every_listener_together(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, listeners=2, max_connections=2)
        stats = served.server.stats
        first, second = served.listeners
        one = await first.connect()
        two = await second.connect()
        await exchange(one, b"one")
        await exchange(two, b"two")
        waiting = [await dial(nursery, first), await dial(nursery, second)]
        await trio.sleep(3600)
        assert stats.active == 2
        # The documented slack: a listener already waiting in accept() when
        # another took the last slot may take one connection, which then
        # waits, unanswered, for a slot. At most one per extra listener.
        assert sum(d.accepted.is_set() for d in waiting) <= 1
        assert stats.connections == 2
        # A slot frees: one of the two waiting is handled, not both.
        await one.aclose()
        await trio.sleep(3600)
        assert sum(d.accepted.is_set() for d in waiting) >= 1
        assert stats.active == 2
        assert stats.connections == 3
        await two.aclose()
        for d in waiting:
            await exchange(await d.wait(), b"in the end")
        assert stats.connections == 4
        served.server.shutdown(grace=0)


async def test_every_slot_is_usable_from_any_one_listener(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        # As with the default host: an IPv4 and an IPv6 listener, and all the
        # clients use one of them.
        served = await serve_in_memory(nursery, listeners=2, max_connections=2)
        one = await served.listener.connect()
        await exchange(one, b"one")
        assert server_warnings(caplog) == []  # 1 open of 2 allowed: nothing to say
        two = await served.listener.connect()
        await exchange(two, b"two")
        served.server.shutdown(grace=0)


@pytest.mark.parametrize("limit", ["slots", "descriptors"])
async def test_sustained_overload_is_one_episode_in_the_log(
    limit: str,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        if limit == "slots":
            served = await serve_in_memory(nursery, max_connections=2)
        else:
            served = await serve_in_memory(nursery, descriptors=2)
        listener = served.listener
        open_ = [await listener.connect() for _ in range(2)]
        waiting = [await dial(nursery, listener) for _ in range(4)]
        # For the next few seconds, each connection that ends lets exactly one
        # waiting connection in: connections wait all along, one episode.
        for dialing in waiting:
            await trio.sleep(1)
            await open_.pop(0).aclose()
            stream = await dialing.wait()
            await exchange(stream, b"got in")
            open_.append(stream)
        await trio.sleep(1)
        for stream in open_:
            await stream.aclose()
        fresh = await listener.connect()
        await exchange(fresh, b"no one waits now")
        warnings = server_warnings(caplog)
        assert len(lines_with(warnings, PAUSED)) == 1, warnings
        assert len(lines_with(warnings, RESUMED)) == 1, warnings
        served.server.shutdown(grace=0)


# --- Out of file descriptors, in memory -------------------------------------------------


@pytest.mark.parametrize(
    "error", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM], ids=errno.errorcode.get
)
async def test_out_of_descriptors_logs_once_keeps_serving_and_recovers(
    error: int,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery)
        listener = served.listener
        steady = await listener.connect()
        await exchange(steady, b"before")
        listener.fail_with = error
        waiting = await dial(nursery, listener)
        burst = 60.0
        await trio.sleep(burst)
        assert not waiting.accepted.is_set()
        # Running: the open connection is served throughout the burst.
        await exchange(steady, "during: straße".encode())
        [warning] = server_warnings(caplog)
        assert os.strerror(error) in warning
        assert warning.endswith(PAUSED)
        # Retried, not spun: at most 100 tries per (virtual) second.
        assert listener.accept_calls <= 100 * burst

        listener.fail_with = None
        freed = trio.current_time()
        stream = await waiting.wait()
        assert waiting.at - freed <= 1.0  # served again as soon as it can be
        await exchange(stream, b"after")
        await exchange(steady, b"steady")
        warnings = server_warnings(caplog)
        assert len(warnings) == 2
        assert warnings[1].startswith(RESUMED)
        served.server.shutdown(grace=0)


# --- --idle-timeout, in memory ----------------------------------------------------------


@pytest.mark.parametrize("first", [b"", b"hello"], ids=["never-sends", "after-an-exchange"])
async def test_a_silent_connection_is_closed_after_the_idle_timeout(
    first: bytes, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, idle_timeout=IDLE)
        client = await served.listener.connect()
        if first:
            await exchange(client, first)
        quiet_since = trio.current_time()
        assert await client.receive_some() == b""  # the server closed it
        silent_for = trio.current_time() - quiet_since
        assert IDLE <= silent_for <= IDLE * (1 + IDLE_SLACK)
        await trio.testing.wait_all_tasks_blocked()
        stats = served.server.stats
        # Closed as idle, which is not being cut off at shutdown.
        assert (stats.connections, stats.active, stats.cut_off) == (1, 0, 0)
        # And the server goes on.
        other = await served.listener.connect()
        await exchange(other, b"next")
        served.server.shutdown(grace=0)


async def test_a_connection_that_keeps_talking_lives_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, idle_timeout=IDLE)
        client = await served.listener.connect()
        # A byte now and then, just under the timeout apart, for 30 timeouts.
        for n in range(30):
            await trio.sleep(IDLE * 0.99)
            await exchange(client, bytes([ord("a") + n % 26]))
        quiet_since = trio.current_time()
        assert await client.receive_some() == b""
        assert IDLE <= trio.current_time() - quiet_since <= IDLE * (1 + IDLE_SLACK)
        served.server.shutdown(grace=0)


async def test_a_client_that_sends_but_never_reads_is_closed_after_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, idle_timeout=IDLE)
        # Lockstep: each send waits for the server to read it, so the time of
        # the last send that went through is the time the server last heard
        # from us; the server's reply waits for a read that never comes.
        client = await served.listener.connect(lockstep=True)
        last_taken = trio.current_time()

        async def flood() -> None:
            nonlocal last_taken
            for piece in itertools.repeat(MIXED * 100):
                await client.send_all(piece)
                last_taken = trio.current_time()

        with pytest.raises(trio.BrokenResourceError):
            await flood()
        assert IDLE <= trio.current_time() - last_taken <= IDLE * (1 + IDLE_SLACK)
        await trio.testing.wait_all_tasks_blocked()
        stats = served.server.stats
        assert (stats.connections, stats.active, stats.cut_off) == (1, 0, 0)
        served.server.shutdown(grace=0)


async def test_idle_timeout_zero_means_never(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, idle_timeout=0)
        client = await served.listener.connect()
        await exchange(client, b"good night")
        await trio.sleep(VIRTUAL_HANG / 2)  # half a virtual day
        await exchange(client, b"good morning")
        assert served.server.stats.active == 1
        served.server.shutdown(grace=0)


async def test_an_idle_close_frees_a_slot_for_a_waiting_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The slow-loris defence: silent connections cannot hold every slot.
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, max_connections=1, idle_timeout=IDLE)
        silent = await served.listener.connect()
        start = trio.current_time()
        waiting = await dial(nursery, served.listener)
        stream = await waiting.wait()
        assert IDLE <= waiting.at - start <= IDLE * (1 + IDLE_SLACK)
        assert await silent.receive_some() == b""
        await exchange(stream, b"my turn")
        served.server.shutdown(grace=0)


# --- Real sockets: the kernel's backlog, flow control, shutdown --------------------------


# Every client socket here sets SO_REUSEADDR before it connects. The load tests
# leave thousands of connections in TIME_WAIT for a minute, each holding an
# ephemeral port; without the flag, bind() of such a port fails for that
# minute even with SO_REUSEADDR, and other tests bind ports the OS picked
# for another purpose (test_server's test_port_in_use_on_udp_only_releases_tcp
# binds TCP on a port chosen for UDP). With it, a bind with SO_REUSEADDR,
# such as trio's listeners do, is not stopped by our leftovers.


def reusable_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


async def open_client(port: int) -> trio.SocketStream:
    """A connection to 127.0.0.1 ``port`` (see reusable_socket)."""
    sock = trio.socket.from_stdlib_socket(reusable_socket())
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def small_buffers(stream: trio.SocketStream) -> None:
    """Shrink the client's kernel buffers, so that flow control pushes back
    after little data rather than after megabytes of autotuned buffer."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)


# The kernel's accept queue is what these tests wait on, where it is seen.
needs_accept_queues = pytest.mark.skipif(
    not can_see_accept_queues(), reason="reads the accept queue in /proc/net/tcp"
)


@needs_accept_queues
async def test_connections_past_the_limit_wait_in_the_kernel_backlog(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery, max_connections=2)
        stats = served.server.stats
        first, second = await open_client(served.port), await open_client(served.port)
        await exchange(first, b"first")
        await exchange(second, b"second")
        # The kernel completes the handshake and takes the request...
        third = await open_client(served.port)
        await third.send_all(b"third")
        await until(lambda: accept_queue(served.port) == 1)
        # ...but the server, every task of it blocked, leaves it there: had it
        # been in accept(), the listening socket, ready now, would have woken it.
        await trio.testing.wait_all_tasks_blocked()
        assert accept_queue(served.port) == 1
        assert (stats.connections, stats.active) == (2, 2)
        await first.aclose()
        assert await receive_exactly(third, 5) == b"THIRD"
        assert stats.connections == 3
        for stream in (second, third):
            await stream.aclose()
        served.server.shutdown(grace=0)


async def test_many_clients_through_few_slots_are_all_served_at_most_n_at_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, clients = 4, 200
    handling = most = 0
    real_handle_stream = tcp_module.handle_stream

    async def counting(stream: trio.abc.Stream, **options: Any) -> int:
        nonlocal handling, most
        handling += 1
        most = max(most, handling)
        try:
            return await real_handle_stream(stream, **options)
        finally:
            handling -= 1

    monkeypatch.setattr("trio_upper.server.handle_stream", counting)
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery, max_connections=limit)

        async def client(n: int) -> None:
            async with await open_client(served.port) as stream:
                await exchange(stream, request_for(n))
                await stream.send_eof()
                assert await receive_until_eof(stream) == b""

        async with trio.open_nursery() as clients_nursery:
            for n in range(clients):
                clients_nursery.start_soon(client, n)
        stats = served.server.stats
        await until(lambda: stats.active == 0)
        assert most == limit
        assert (stats.connections, stats.cut_off) == (clients, 0)
        served.server.shutdown(grace=0)


async def test_a_client_that_never_reads_is_held_back_by_flow_control_alone(
    nursery: trio.Nursery,
) -> None:
    request = MIXED * 400_000  # 11 MB that comes back as 13 MB
    # What may be in flight once the flood stalls: the kernel's buffers both
    # ways and a read or two in the server: under 1 MB here. A server
    # that kept reading would take in all of the request.
    in_flight_bound = 4 * 1024 * 1024
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery)
        flood = await open_client(served.port)
        small_buffers(flood)
        sent = 0
        pushed_all = False

        async def push() -> None:
            nonlocal sent, pushed_all
            for start in range(0, len(request), 65536):
                piece = request[start : start + 65536]
                await flood.send_all(piece)
                sent += len(piece)
            pushed_all = True
            await flood.send_eof()

        def held_back() -> bool:
            # The kernel takes no more from the client (or, were the server
            # to read without end, the flood is all sent and the test fails).
            return pushed_all or not writable(flood.socket)

        async with trio.open_nursery() as pushing:
            pushing.start_soon(push)
            await until(held_back)
            stalled_at = sent
            assert stalled_at < in_flight_bound, f"the server took in {stalled_at} bytes"
            # Other clients are served meanwhile, and the flood stays held back.
            for n in range(3):
                async with await open_client(served.port) as other:
                    await exchange(other, request_for(n))
            await until(held_back)
            assert sent < in_flight_bound, f"the server took in {sent} bytes"
            # Once the client reads, everything comes back, nothing lost.
            reply = await receive_until_eof(flood)
        assert reply == upper_bytes(request)
        await flood.aclose()
        served.server.shutdown(grace=0)


async def test_a_reply_in_flight_at_shutdown_comes_back_whole_after_a_half_close_in_the_grace(
    nursery: trio.Nursery,
) -> None:
    request = MIXED * 80_000  # 2.2 MB: more than the buffers hold
    first, rest = request[: len(request) // 2], request[len(request) // 2 :]
    with trio.fail_after(LOOPBACK_HANG):
        # The grace is the hang guard: the test is over once the exchange is.
        served = await serve_loopback(nursery, grace=LOOPBACK_HANG)
        stream = await open_client(served.port)
        small_buffers(stream)
        shut = trio.Event()
        first_sent = False
        reply: list[bytes] = []

        async def push() -> None:
            nonlocal first_sent
            await stream.send_all(first)
            first_sent = True
            await shut.wait()
            await stream.send_all(rest)
            await stream.send_eof()  # the half-close, within the grace period

        async def collect() -> None:
            reply.append(await receive_until_eof(stream))

        async with trio.open_nursery() as client:
            client.start_soon(push)
            # Stalled: reply bytes wait for us to read them, and the request
            # has gone as far as it can (all of it, or as much as the kernel
            # takes while the server is stuck sending).
            await until(
                lambda: readable(stream.socket) and (first_sent or not writable(stream.socket))
            )
            served.server.shutdown()
            await served.server.stopped_accepting()
            shut.set()
            client.start_soon(collect)
        await served.done.wait()
    assert reply == [upper_bytes(request)]
    stats = served.server.stats
    assert (stats.connections, stats.active, stats.cut_off) == (1, 0, 0)
    await stream.aclose()


@needs_accept_queues
async def test_a_connection_waiting_for_a_slot_at_shutdown_is_refused_not_left_hanging(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery, max_connections=1, grace=LOOPBACK_HANG)
        stats = served.server.stats
        open_ = await open_client(served.port)
        await exchange(open_, b"open")
        waiting = await open_client(served.port)
        await waiting.send_all(b"waiting")
        await until(lambda: accept_queue(served.port) == 1)  # in the kernel's backlog
        await trio.testing.wait_all_tasks_blocked()
        assert accept_queue(served.port) == 1
        assert stats.connections == 1
        served.server.shutdown()
        await served.server.stopped_accepting()
        # Closing the listener drops it: a reset, or on some systems an end
        # of stream; never a reply, never a hang.
        try:
            got = await receive_until_eof(waiting)
        except trio.BrokenResourceError:
            got = b""
        assert got == b""
        # The open connection finishes its exchange in the grace period.
        await open_.send_all("last words: straße".encode())
        await open_.send_eof()
        assert await receive_until_eof(open_) == b"LAST WORDS: STRASSE"
        await served.done.wait()
    assert (stats.connections, stats.active, stats.cut_off) == (1, 0, 0)
    await open_.aclose()
    await waiting.aclose()


async def test_shutdown_closes_the_udp_sockets_at_once(nursery: trio.Nursery) -> None:
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery, grace=LOOPBACK_HANG)
        with served.udp_socket() as sock:
            await sock.connect(("127.0.0.1", served.port))
            assert await udp_exchange(sock, b"before") == b"BEFORE"
            served.server.shutdown()
            await served.server.stopped_accepting()
            await sock.send(b"after")
            # No one is there now: the kernel says so at once (ICMP).
            with pytest.raises(ConnectionRefusedError):
                await sock.recv(100)
        await served.done.wait()  # no TCP connection was open: nothing to wait for


# --- Load ---------------------------------------------------------------------------------

CONCURRENT = 3000  # connections open at once: 6000 descriptors in this process
# Fewer concurrent connections than this would show too little to be worth
# running: below it the test is skipped, saying why.
MIN_CONCURRENT = 300
# Descriptors the test process holds besides the connections' two ends.
SPARE_DESCRIPTORS = 200
CHURN = 3000  # connect, exchange, close cycles
CHURN_WORKERS = 50
STEADY_PACE = 30  # churn cycles between two exchanges of the steady connection
DATAGRAMS = 300


@contextlib.contextmanager
def descriptors_for(connections: int) -> Iterator[int]:
    """Raise the soft RLIMIT_NOFILE towards what ``connections`` with both
    ends in this process need, as far as the hard limit allows (the common
    default soft limit, 1024, is far below); yield how many connections fit
    in the limit then in force. The soft limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * connections + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    try:
        limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if limit == resource.RLIM_INFINITY:
            yield connections
        else:
            yield min(connections, (limit - SPARE_DESCRIPTORS) // 2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def concurrent() -> Iterator[int]:
    """How many connections test_many_concurrent_connections opens: as many
    of CONCURRENT as fit in the descriptors it can have. (A fixture, so that
    a skip keeps its reason, which pytest-trio drops inside a trio test.)"""
    with descriptors_for(CONCURRENT) as fit:
        if fit < MIN_CONCURRENT:
            pytest.skip(f"ulimit -n allows {fit} concurrent connections, not {MIN_CONCURRENT}")
        if fit < CONCURRENT:
            # Said in pytest's summary, so that no one takes this run for one
            # of CONCURRENT connections.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            warnings.warn(
                f"ran {fit} concurrent connections, not {CONCURRENT}: "
                f"the hard ulimit -n is {hard}",
                stacklevel=1,
            )
        yield fit


async def test_many_concurrent_connections_each_get_their_own_bytes_back(
    loopback: LoopbackServer, concurrent: int
) -> None:
    stats = loopback.server.stats
    arrived = 0
    all_open = trio.Event()

    async def client(n: int) -> None:
        nonlocal arrived
        async with await open_client(loopback.port) as stream:
            await exchange(stream, request_for(n))
            arrived += 1
            if arrived == concurrent:
                all_open.set()
            await all_open.wait()
            # Everyone is connected: now each sends again and half-closes.
            tail = f"{n} bye ß".encode() + b"\xe2"  # ends inside a character
            await stream.send_all(tail)
            await stream.send_eof()
            assert await receive_until_eof(stream) == upper_bytes(tail)

    with trio.fail_after(LOOPBACK_HANG):
        async with trio.open_nursery() as nursery:
            for n in range(concurrent):
                nursery.start_soon(client, n)
            await all_open.wait()
            # Every handler is running: none of their clients has closed.
            assert stats.active == concurrent
        await until(lambda: stats.active == 0)
    assert (stats.connections, stats.cut_off) == (concurrent, 0)


async def test_connection_churn_keeps_the_server_responsive_and_the_counts_add_up(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(LOOPBACK_HANG):
        served = await serve_loopback(nursery, udp_rate_limit=0)
        stats = served.server.stats
        cycles = iter(range(CHURN))
        churning = True
        cycles_done = 0
        cycle_done = trio.lowlevel.ParkingLot()
        steady_exchanges = 0

        async def churn() -> None:
            nonlocal cycles_done
            for n in cycles:
                async with await open_client(served.port) as stream:
                    await exchange(stream, request_for(n))
                    if n % 2:
                        # Half the time: half-close and wait for the server's end.
                        await stream.send_eof()
                        assert await receive_until_eof(stream) == b""
                cycles_done += 1
                cycle_done.unpark_all()

        async def steady() -> None:
            # One long connection, answered all through the churn: an
            # exchange every STEADY_PACE cycles, a pace set by the churn and
            # not by the clock, so that it is no third load.
            nonlocal steady_exchanges
            async with await open_client(served.port) as stream:
                while True:
                    await exchange(stream, f"steady {steady_exchanges} ΐ".encode())
                    steady_exchanges += 1
                    if not churning:
                        break
                    next_at = cycles_done + STEADY_PACE
                    while churning and cycles_done < next_at:
                        await cycle_done.park()

        async def datagrams() -> None:
            with served.udp_socket() as sock:
                await sock.connect(("127.0.0.1", served.port))
                for n in range(DATAGRAMS):
                    request = request_for(n)
                    assert await udp_exchange(sock, request) == upper_bytes(request)

        async with trio.open_nursery() as load:
            load.start_soon(steady)
            load.start_soon(datagrams)
            async with trio.open_nursery() as workers:
                for _ in range(CHURN_WORKERS):
                    workers.start_soon(churn)
            churning = False
            cycle_done.unpark_all()
        await until(lambda: stats.active == 0)
    # One exchange before the churn got going, and one at least after
    # STEADY_PACE of its cycles.
    assert steady_exchanges >= 2
    assert (stats.connections, stats.cut_off) == (CHURN + 1, 0)
    assert stats.udp.datagrams == DATAGRAMS
    assert (stats.udp.rate_limited, stats.udp.dropped) == (0, 0)
    served.server.shutdown(grace=0)


# --- The command line ---------------------------------------------------------------------


def test_serve_help_states_each_hardening_flag_and_its_default() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    entries = help_entries(result.stdout.decode())
    expected = {
        "--max-connections": f"(default: {DEFAULT_MAX_CONNECTIONS})",
        "--idle-timeout": f"(default: {DEFAULT_IDLE_TIMEOUT:g})",
        "--udp-rate-limit": f"(default: {DEFAULT_RATE:g}",
        "--grace": "(default: ",
    }
    for option, default in expected.items():
        help_text = entry_for(entries, option)
        assert default in help_text, (option, help_text)
        assert help_text.count("(default:") == 1, (option, help_text)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-connections", "0"),
        ("--max-connections", "2.5"),
        ("--max-connections", "many"),
        ("--idle-timeout", "-1"),
        ("--idle-timeout", "nan"),
        ("--udp-rate-limit", "x"),
        ("--udp-rate-limit", "-1"),
    ],
    ids=str,
)
def test_bad_hardening_flag_value_is_one_usage_error_line(option: str, value: str) -> None:
    line = usage_error_line(run_cli("serve", option, value), "serve")
    assert option in line
    assert value in line


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-1",
    ],
)
def test_max_connections_error_states_the_real_limit(value: str) -> None:
    line = usage_error_line(run_cli("serve", "--max-connections", value), "serve")
    assert "1 or more" in line
    assert "0 or more" not in line


def lower_descriptor_limit(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return set_limit


def connect(port: int) -> socket.socket:
    """A blocking connection to 127.0.0.1 ``port``; each wait is bounded."""
    sock = reusable_socket()
    try:
        sock.settimeout(PROCESS_TIMEOUT)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def test_serve_flags_reach_the_servers_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plumbing alone, in this process: what each flag does with the
    # value is tested above, in memory under the mock clock, where an idle
    # timeout or a grace period costs no real time.
    configs: list[ServerConfig] = []

    class Recording(UpperServer):
        """Keeps its config, binds nothing, and stops at once."""

        def __init__(self, config: ServerConfig) -> None:
            configs.append(config)
            super().__init__(config)

        async def run(
            self,
            *,
            inherited: Sequence[ListenFd] | None = None,
            task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
        ) -> ServerStats:
            task_status.started([])
            await trio.lowlevel.checkpoint()
            return self.stats

    monkeypatch.setattr("trio_upper.cli.UpperServer", Recording)
    flags = ["--max-connections", "7", "--idle-timeout", "2.5", "--udp-rate-limit", "3"]
    assert cli_main(["serve", "-q", *flags, "--grace", "9"]) == 0
    [config] = configs
    assert (config.max_connections, config.idle_timeout) == (7, 2.5)
    assert (config.udp_rate_limit, config.grace) == (3, 9)


@needs_accept_queues
def test_max_connections_keeps_the_next_client_in_a_real_servers_backlog() -> None:
    # One slot, held by a client: the next client waits in the backlog until
    # that one closes. The idle timeout is one that no run reaches, so that
    # the test, not the clock, decides when the slot frees.
    with serving("--max-connections", "1", "--idle-timeout", "3600") as server:
        with connect(server.port) as holding, connect(server.port) as waiting:
            holding.sendall(b"holding")
            assert recv_exactly(holding, 7) == b"HOLDING"
            waiting.sendall(b"waiting")
            server.stderr.read_until(PAUSED.encode())
            wait_until(lambda: accept_queue(server.port) == 1, "a connection in the backlog")
            holding.close()
            assert recv_exactly(waiting, 7) == b"WAITING"
            server.stderr.read_until(RESUMED.encode())
        status, out, log = server.stop()
    assert status == 0
    assert "Traceback" not in log
    assert MAX_CONNECTIONS_PAUSE in log
    assert out.splitlines()[-1].startswith("Stopped: served 2 TCP connections")


DESCRIPTOR_LIMIT = 40  # soft and hard: the server cannot raise it again
WAITING = 5  # connections more than the server has descriptors for


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_out_of_descriptors_in_a_real_server_process() -> None:
    with serving("--tcp-only", preexec_fn=lower_descriptor_limit(DESCRIPTOR_LIMIT)) as server:
        proc, port = server.proc, server.port
        # Every descriptor the server does not use yet is one connection.
        room = DESCRIPTOR_LIMIT - open_descriptors(proc.pid)
        assert room > 10, f"the server uses {DESCRIPTOR_LIMIT - room} descriptors idle"
        clients = [connect(port) for _ in range(room + WAITING)]
        try:
            for n, conn in enumerate(clients):
                conn.sendall(request_for(n))
            server.stderr.read_until(b"Too many open files")
            assert open_descriptors(proc.pid) == DESCRIPTOR_LIMIT
            # The accept queue is first in, first out: the first ones are
            # accepted, and served although the server is out of descriptors.
            for n, conn in enumerate(clients[:room]):
                expected = upper_bytes(request_for(n))
                assert recv_exactly(conn, len(expected)) == expected
            # Descriptors free up: the rest are taken from the queue and served.
            for conn in clients[:room]:
                conn.close()
            for n, conn in enumerate(clients[room:], start=room):
                expected = upper_bytes(request_for(n))
                assert recv_exactly(conn, len(expected)) == expected
            server.stderr.read_until(RESUMED.encode())
            with connect(port) as fresh:
                fresh.sendall(b"fresh")
                assert recv_exactly(fresh, 5) == b"FRESH"
        finally:
            for conn in clients:
                conn.close()
        status, out, log = server.stop()
    assert status == 0
    assert "Traceback" not in log
    # The burst is logged once, up to the moment accepting resumes. (What
    # comes after may repeat it: see test_sustained_overload_is_one_episode.)
    burst = log[: log.index(RESUMED)]
    assert burst.count("Too many open files") == 1, log
    assert burst.count(PAUSED) == 1, log
    served = room + WAITING + 1
    assert out.splitlines()[-1].startswith(f"Stopped: served {served} TCP connections")


async def test_a_pause_soon_after_another_is_still_logged_if_it_lasts(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        served = await serve_in_memory(nursery, max_connections=1)
        listener = served.listener
        one = await listener.connect()
        first = await dial(nursery, listener)
        await trio.sleep(1)
        await one.aclose()
        two = await first.wait()
        await exchange(two, b"in")
        # Full again at once: too soon for a new line...
        second = await dial(nursery, listener)
        await trio.sleep(1)
        assert len(lines_with(server_warnings(caplog), PAUSED)) == 1
        # ...but a pause that goes on is said, so the log never claims the
        # server accepts while it does not.
        await trio.sleep(30)
        assert len(lines_with(server_warnings(caplog), PAUSED)) == 2
        await two.aclose()
        await exchange(await second.wait(), b"in at last")
        served.server.shutdown(grace=0)
