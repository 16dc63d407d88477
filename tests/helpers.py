"""Helpers shared by the tests (the fixtures are in conftest.py): bounds for
every wait, reading and writing over streams and sockets, the server over
in-memory listeners and streams with faults to inject, the server on loopback,
and the command line run as a user runs it (a subprocess)."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import pytest
import trio
import trio.testing

from trio_upper.server import Endpoint, ServerConfig, UpperServer

T = TypeVar("T")
P = ParamSpec("P")

HalfCloseable = trio.abc.HalfCloseableStream

LECTURE = Path(__file__).parent / "lecture"

# --- Bounds for every wait -----------------------------------------------------------
#
# A test never checks how long anything took: these only turn a hang into a
# failure of that one test, with a message. They are generous so that a loaded
# 2-core machine that pauses for seconds does not trip them, and shorter than
# pytest's per-test timeout (pyproject.toml), which is the last resort.

# Real seconds: each wait for a subprocess, and each socket operation of a
# blocking test client.
PROCESS_TIMEOUT = 60

# Real seconds for an in-process test on the real clock (over loopback, mostly).
LOOPBACK_HANG = 60.0

# Virtual seconds under the autojump MockClock: only a deadlock gets this far,
# and then fails at once with TooSlowError.
VIRTUAL_HANG = 24 * 3600.0


def fails_if_it_hangs(
    seconds: float,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Coroutine[Any, Any, None]]]:
    """Make a test that waits for something that never comes (a lost byte,
    a handler that never returns) fail with TooSlowError instead of hanging
    the run. Under the autojump clock, ``seconds`` are virtual and a deadlock
    fails at once; over loopback they are real and only stop a hang."""

    def decorate(test: Callable[P, Awaitable[None]]) -> Callable[P, Coroutine[Any, Any, None]]:
        @functools.wraps(test)
        async def bounded(*args: P.args, **kwargs: P.kwargs) -> None:
            with trio.fail_after(seconds):
                await test(*args, **kwargs)

        return bounded

    return decorate


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks, and the kernel, run until ``condition`` holds.
    Each wait is for every task to be blocked and then a millisecond's look at
    the kernel's events (it may still be delivering a FIN or a reset), never a
    fixed time; the caller's hang guard stops a condition that never comes."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """:func:`until` for a test outside trio (a blocking client of a server
    process): polls, and fails saying ``what`` never came after PROCESS_TIMEOUT."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"hang guard: {what} never came"
        time.sleep(0.005)


# --- Reading and writing ----------------------------------------------------------------


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read until ``size`` bytes have come; fail on an early end of stream."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Read everything until the other side closes."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    """:func:`receive_exactly` for a blocking socket (give it a timeout)."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def recv_until_eof(conn: socket.socket) -> bytes:
    """:func:`receive_until_eof` for a blocking socket (give it a timeout)."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


# UDP may lose a datagram, even on loopback. The server counts every datagram
# it answers and the tests check those counts, so sending again would change
# what they check: a lost datagram fails the test, with this bound and a
# message saying so, rather than hanging it.
UDP_REPLY_WAIT = 10.0


async def udp_exchange(
    sock: trio.socket.SocketType, request: bytes, max_size: int = 70_000
) -> bytes:
    """Send ``request`` on the connected UDP ``sock``; return the reply."""
    await sock.send(request)
    with trio.move_on_after(UDP_REPLY_WAIT):
        return await sock.recv(max_size)
    raise AssertionError(
        f"no reply to a {len(request)}-byte datagram in {UDP_REPLY_WAIT:g} s: one was lost"
    )


def readable(sock: trio.socket.SocketType | socket.socket) -> bool:
    """Whether bytes (or the end of stream) wait in ``sock``'s receive buffer."""
    ready, _, _ = select.select([sock.fileno()], [], [], 0)
    return bool(ready)


def writable(sock: trio.socket.SocketType | socket.socket) -> bool:
    """Whether the kernel would take more from ``sock`` now: False once flow
    control holds it back (its send buffer full, the peer's window shut)."""
    _, ready, _ = select.select([], [sock.fileno()], [], 0)
    return bool(ready)


def reset_on_close(sock: trio.socket.SocketType | socket.socket) -> None:
    """Make closing ``sock`` send a TCP reset instead of a FIN: SO_LINGER on,
    with a zero timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def accept_queue(port: int) -> int:
    """How many connections the kernel has completed for the listening TCP
    socket on 127.0.0.1 ``port`` that no one has accepted yet (Linux: for a
    listening socket, /proc/net/tcp's rx_queue is its accept queue)."""
    # The table prints the address as the host's integer of its 4 bytes.
    (address,) = struct.unpack("=I", socket.inet_aton("127.0.0.1"))
    local = f"{address:08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in itertools.islice(table, 1, None):
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def can_see_accept_queues() -> bool:
    return os.path.exists("/proc/net/tcp")


# --- What the server logs ---------------------------------------------------------------

# The server's lines when new connections start to wait (out of connection
# slots or descriptors), and when accepting resumes.
PAUSED = "new connections wait until one closes"
RESUMED = "accepting connections again"


def warnings_logged(caplog: pytest.LogCaptureFixture, logger: str | None = None) -> list[str]:
    """Every record at warning level or above (of ``logger`` alone, if
    given). The server logs a fault that escapes a handler as an error, and
    keeps serving: in a test of faults this is the only trace of one."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and logger in (None, record.name)
    ]


# --- Streams with faults to inject ---------------------------------------------------


def reset_error() -> trio.BrokenResourceError:
    """What trio's SocketStream raises for a connection reset by the peer."""
    error = trio.BrokenResourceError("injected fault: connection reset by peer")
    error.__cause__ = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    return error


class FaultyStream(HalfCloseable):
    """The server's end of a connection over a bad network to a bad peer.

    Passes everything through to ``inner`` except for the faults asked for:

    * ``receive_sizes``, ``send_sizes``: cycled; each ``receive_some`` returns
      at most the next size, and each ``send_all`` reaches ``inner`` in pieces
      of the next sizes, so the server's reads and writes are cut at any point.
    * ``reset_on_receive_after``, ``reset_on_send_after``: once that many bytes
      have passed in that direction, the connection resets.
    * ``stall_receive_after``, ``stall_send_after``: once that many bytes have
      passed in that direction, it hangs until cancelled or reset: a peer that
      vanished without a reset, or stopped acknowledging.
    * :meth:`reset`, at any moment, from the test.

    A reset breaks both directions, as a TCP RST does: every operation, and one
    blocked at that moment, raises :class:`trio.BrokenResourceError` caused by
    ``ConnectionResetError``, exactly as :class:`trio.SocketStream` does.

    Records what went through (``received``, ``sent``: bytes the server took
    in and handed over) and whether the server closed it (``closed``).
    """

    def __init__(
        self,
        inner: HalfCloseable,
        *,
        receive_sizes: Iterable[int] = (),
        send_sizes: Iterable[int] = (),
        reset_on_receive_after: int | None = None,
        reset_on_send_after: int | None = None,
        stall_receive_after: int | None = None,
        stall_send_after: int | None = None,
    ) -> None:
        self.inner = inner
        receive_list, send_list = list(receive_sizes), list(send_sizes)
        self._receive_sizes = itertools.cycle(receive_list) if receive_list else None
        self._send_sizes = itertools.cycle(send_list) if send_list else None
        self.reset_on_receive_after = reset_on_receive_after
        self.reset_on_send_after = reset_on_send_after
        self.stall_receive_after = stall_receive_after
        self.stall_send_after = stall_send_after
        self.received = 0
        self.sent = 0
        self.was_reset = False
        self.closed = False
        self.eof_sent = False
        # One scope per operation in progress, so that reset() and aclose()
        # can wake an operation blocked in the inner stream or in a stall.
        self._in_flight: set[trio.CancelScope] = set()

    def reset(self) -> None:
        """The peer's RST arrives now."""
        self.was_reset = True
        for scope in self._in_flight:
            scope.cancel()

    async def _fail_if_broken(self, passed: int, reset_after: int | None) -> None:
        if not self.closed and reset_after is not None and passed >= reset_after:
            self.reset()
        if self.closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("FaultyStream was closed")
        if self.was_reset:
            await trio.lowlevel.checkpoint()
            raise reset_error()

    async def _interruptible(self, operation: Callable[[], Awaitable[T]]) -> T:
        with trio.CancelScope() as scope:
            self._in_flight.add(scope)
            try:
                return await operation()
            finally:
                self._in_flight.discard(scope)
        # Only reached when our own scope was cancelled, which only reset()
        # and aclose() do; a cancellation from outside propagates untouched.
        if self.closed:
            raise trio.ClosedResourceError("FaultyStream was closed while in use")
        raise reset_error()

    @staticmethod
    def _allowance(
        wanted: int | None,
        sizes: Iterator[int] | None,
        passed: int,
        *limits: int | None,
    ) -> int | None:
        bounds = [wanted, next(sizes) if sizes else None]
        bounds += [limit - passed for limit in limits if limit is not None]
        present = [bound for bound in bounds if bound is not None]
        return min(present) if present else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._fail_if_broken(self.received, self.reset_on_receive_after)
        stall = self.stall_receive_after
        if stall is not None and self.received >= stall:
            await self._interruptible(trio.sleep_forever)
        size = self._allowance(
            max_bytes, self._receive_sizes, self.received, self.reset_on_receive_after, stall
        )
        data = await self._interruptible(partial(self.inner.receive_some, size))
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        while True:
            await self._fail_if_broken(self.sent, self.reset_on_send_after)
            stall = self.stall_send_after
            if stall is not None and self.sent >= stall and view:
                await self._interruptible(trio.sleep_forever)
            size = self._allowance(
                len(view), self._send_sizes, self.sent, self.reset_on_send_after, stall
            )
            piece = bytes(view[:size])
            await self._interruptible(partial(self.inner.send_all, piece))
            self.sent += len(piece)
            view = view[len(piece) :]
            if not view:
                return

    async def wait_send_all_might_not_block(self) -> None:
        await self._fail_if_broken(self.sent, self.reset_on_send_after)
        await self._interruptible(self.inner.wait_send_all_might_not_block)

    async def send_eof(self) -> None:
        await self._fail_if_broken(self.sent, self.reset_on_send_after)
        await self._interruptible(self.inner.send_eof)
        self.eof_sent = True

    async def aclose(self) -> None:
        self.closed = True
        for scope in self._in_flight:
            scope.cancel()
        await self.inner.aclose()


# --- An in-memory listener ---------------------------------------------------------------

# An accept loop that retries without waiting never lets the virtual clock
# move: past this many accept() calls the test listener fails the test rather
# than spin with it.
MAX_ACCEPT_CALLS = 100_000


class Descriptor(HalfCloseable):
    """The server's end of a connection, holding one of its listener's
    descriptors until the server closes it. (Bookkeeping only: faults are
    :class:`FaultyStream`'s.)"""

    def __init__(self, inner: HalfCloseable, listener: Listener) -> None:
        self.inner = inner
        self.listener = listener
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            assert self.listener.descriptors is not None
            self.listener.descriptors += 1
        await self.inner.aclose()


@dataclass(eq=False)
class Queued:
    """A connection in a listener's accept queue."""

    stream: HalfCloseable
    taken: trio.Event = field(default_factory=trio.Event)
    refused: bool = False


class Listener(trio.abc.Listener[HalfCloseable]):
    """A listener whose connections are in-memory stream pairs, so that the
    whole server (accept loop, handlers, shutdown) runs under the mock clock.

    It counts accept() calls (a spinning accept loop fails the test) and keeps
    an accept queue, as the kernel does, so that errors come when a listening
    socket gives them: ``fail_with`` (an errno; None for none) makes accept()
    fail whenever a connection waits, for as long as it is set.
    ``descriptors`` (None for no limit) is a descriptor table: each accepted
    connection takes one until the server closes it, and with none left
    accept() fails with EMFILE whether or not a connection waits."""

    def __init__(self, descriptors: int | None = None) -> None:
        self._queue: collections.deque[Queued] = collections.deque()
        self._arrival = trio.lowlevel.ParkingLot()
        self._closed = False
        self.accept_calls = 0
        self.fail_with: int | None = None
        self.descriptors = descriptors

    async def accept(self) -> HalfCloseable:
        self.accept_calls += 1
        if self.accept_calls > MAX_ACCEPT_CALLS:
            raise AssertionError(f"accept() called {self.accept_calls} times: the loop spins")
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the listener was closed")
            # Linux looks for a free descriptor before it looks at the queue.
            if self.descriptors == 0:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            if self._queue:
                if self.fail_with is not None:
                    raise OSError(self.fail_with, os.strerror(self.fail_with))
                break
            await self._arrival.park()
        queued = self._queue.popleft()
        queued.taken.set()
        if self.descriptors is None:
            return queued.stream
        self.descriptors -= 1
        return Descriptor(queued.stream, self)

    async def aclose(self) -> None:
        # As closing a listening socket does: what waits in the queue is refused.
        self._closed = True
        for queued in self._queue:
            queued.refused = True
            queued.taken.set()
        self._queue.clear()
        self._arrival.unpark_all()
        await trio.lowlevel.checkpoint()

    async def connect(self, *, lockstep: bool = False) -> HalfCloseable:
        """Open a connection over a memory (or lockstep) stream pair; returns
        the client's end once the server has accepted it, raises
        BrokenResourceError if the server stopped accepting first."""
        client: HalfCloseable
        server: HalfCloseable
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        await self.hand_over(server)
        return client

    async def hand_over(self, server_end: HalfCloseable) -> None:
        """Queue a connection whose server's end is ``server_end``; returns
        once the server has accepted it, as :meth:`connect`."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection refused")
        queued = Queued(server_end)
        self._queue.append(queued)
        self._arrival.unpark_all()
        try:
            await queued.taken.wait()
        finally:
            if not queued.taken.is_set():  # cancelled: give up the place
                self._queue.remove(queued)
        if queued.refused:
            raise trio.BrokenResourceError("connection refused")


class Dialing:
    """A connection attempt left running: ``accepted`` is set once the server
    accepts it, at virtual time ``at``."""

    def __init__(self) -> None:
        self.accepted = trio.Event()
        self.stream: HalfCloseable | None = None
        self.at = math.nan

    async def run(self, listener: Listener) -> None:
        self.stream = await listener.connect()
        self.at = trio.current_time()
        self.accepted.set()

    async def wait(self) -> HalfCloseable:
        await self.accepted.wait()
        assert self.stream is not None
        return self.stream


async def dial(nursery: trio.Nursery, listener: Listener) -> Dialing:
    """Start a connection attempt; returns once it waits to be accepted (so
    that attempts dialled one after another queue in that order)."""
    dialing = Dialing()
    nursery.start_soon(dialing.run, listener)
    await trio.testing.wait_all_tasks_blocked()
    return dialing


@dataclass
class InMemoryServer:
    """An UpperServer on in-memory listeners; ``done`` is set once it stopped."""

    server: UpperServer
    listeners: list[Listener]
    done: trio.Event

    @property
    def listener(self) -> Listener:
        return self.listeners[0]


async def serve_in_memory(
    nursery: trio.Nursery, *, listeners: int = 1, descriptors: int | None = None, **options: Any
) -> InMemoryServer:
    """An UpperServer with ``ServerConfig(**options)`` on in-memory listeners,
    under whatever clock the test runs."""
    server = UpperServer(ServerConfig(**options))
    made = [Listener(descriptors) for _ in range(listeners)]
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
        await server.serve(made, [], task_status=task_status)
        done.set()

    await nursery.start(run)
    return InMemoryServer(server, made, done)


# --- A fake UDP socket -------------------------------------------------------------------


class FakeDatagramSocket:
    """A UDP socket in memory, for :func:`trio_upper.udp.serve_udp`: the
    test delivers datagrams and errors to it, and reads what it sent.

    It keeps the contract of :class:`trio_upper.udp.DatagramSocket`: the
    ``async`` calls are checkpoints and wait; the ``_nowait`` ones never wait
    and raise BlockingIOError when they would have to.

    Attributes:
      sent: (reply, address) for every datagram sent, in order.
      receive_waits: How many times the loop waited to receive (each wait
          is a pass through the scheduler).
      send_errors: Raised, one each, by the next sends.
      room: False makes every send find the kernel's buffer full.
    """

    family = socket.AF_INET

    def __init__(self) -> None:
        self._inbox: collections.deque[tuple[bytes, Any] | OSError] = collections.deque()
        self._arrived = trio.lowlevel.ParkingLot()
        self._room_made = trio.lowlevel.ParkingLot()
        self._sent_more = trio.lowlevel.ParkingLot()
        self.sent: list[tuple[bytes, Any]] = []
        self.send_errors: collections.deque[OSError] = collections.deque()
        self.room = True
        self.receive_waits = 0
        self.closed = False

    def getsockname(self) -> tuple[str, int]:
        return ("192.0.2.1", 12000)

    def deliver(self, data: bytes, sender: Any = ("198.51.100.7", 5000)) -> None:
        """A datagram arrives."""
        self._inbox.append((data, sender))
        self._arrived.unpark_all()

    def fail_receive(self, error: int) -> None:
        """The next receive in line fails with ``error``."""
        self._inbox.append(OSError(error, os.strerror(error)))
        self._arrived.unpark_all()

    def make_room(self) -> None:
        self.room = True
        self._room_made.unpark_all()

    async def replies(self, count: int) -> list[bytes]:
        """Wait until ``count`` datagrams have been sent in all; return them."""
        while len(self.sent) < count:
            await self._sent_more.park()
        return [data for data, _ in self.sent]

    def _take(self) -> tuple[bytes, Any]:
        item = self._inbox.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    async def recvfrom(self) -> tuple[bytes, Any]:
        self.receive_waits += 1
        await trio.lowlevel.checkpoint()
        while not self._inbox:
            await self._arrived.park()
        return self._take()

    def recvfrom_nowait(self) -> tuple[bytes, Any]:
        if not self._inbox:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return self._take()

    def _send(self, data: bytes, address: Any) -> int:
        if self.send_errors:
            raise self.send_errors.popleft()
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        self.sent.append((data, address))
        self._sent_more.unpark_all()
        return len(data)

    async def sendto(self, data: bytes, address: Any) -> int:
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self._send(data, address)
            except BlockingIOError:
                await self._room_made.park()

    def sendto_nowait(self, data: bytes, address: Any, /) -> int:
        return self._send(data, address)

    def close(self) -> None:
        self.closed = True


# --- The server on loopback ---------------------------------------------------------------


class LoopbackServer:
    """An UpperServer running in the test's nursery on 127.0.0.1, a port of
    the OS's choosing; ``done`` is set once it has stopped."""

    def __init__(
        self, server: UpperServer, endpoints: Sequence[Endpoint], done: trio.Event
    ) -> None:
        self.server = server
        self.endpoints = list(endpoints)
        self.port = self.endpoints[0].port
        self.done = done

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    def udp_socket(self) -> trio.socket.SocketType:
        return trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)


async def serve_loopback(nursery: trio.Nursery, **options: Any) -> LoopbackServer:
    """An UpperServer with ``ServerConfig(**options)`` on 127.0.0.1."""
    server = UpperServer(ServerConfig(host="127.0.0.1", port=0, **options))
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
        await server.run(task_status=task_status)
        done.set()

    endpoints: list[Endpoint] = await nursery.start(run)
    return LoopbackServer(server, endpoints, done)


# --- Subprocesses ------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    """The command line a user types: python -m trio_upper ARGS."""
    return [sys.executable, "-m", "trio_upper", *args]


def lecture_program(name: str, *args: str) -> list[str]:
    return [sys.executable, str(LECTURE / f"{name}.py"), *args]


def run_cli(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli(*args), input=input, capture_output=True, timeout=PROCESS_TIMEOUT, check=False
    )


class PipedProcess:
    """A command with its stdin, stdout and stderr on pipes, which a watchdog
    kills after PROCESS_TIMEOUT, so that no read of its output can hang the
    test. At the end of its ``with`` it is killed if still running, and its
    pipes are closed."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self._watchdog = threading.Timer(PROCESS_TIMEOUT, self.proc.kill)

    def __enter__(self) -> PipedProcess:
        self._watchdog.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._watchdog.cancel()
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait(timeout=PROCESS_TIMEOUT)
        with contextlib.suppress(BrokenPipeError):
            self.stdin.close()
        self.stdout.close()
        self.stderr.close()


class OutputReader:
    """A child's output (a pipe, or a pseudo-terminal's master side), read as
    it comes with the file descriptor's own reads, so that nothing is held in
    a buffer that ``Popen.communicate`` (which reads the descriptor too)
    would not see. Every wait is bounded by PROCESS_TIMEOUT."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.seen = b""

    def _read(self, deadline: float) -> bool:
        """Read what has come so far; False at the end."""
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"hang guard: {self.name} shows {self.seen!r}"
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError as exc:
            # A pseudo-terminal's master reads EIO once every copy of the
            # slave side is closed: the end, as EOF is for a pipe.
            if exc.errno != errno.EIO:
                raise
            return False
        self.seen += chunk
        return bool(chunk)

    def read_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` has come; return all that has come."""
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while marker not in self.seen:
            assert self._read(deadline), f"{self.name} ended before {marker!r}: {self.seen!r}"
        return self.seen

    def take_line(self) -> bytes:
        """Read the first line and take it out of what has been seen."""
        self.read_until(b"\n")
        line, _, self.seen = self.seen.partition(b"\n")
        return line + b"\n"

    def read_to_end(self) -> bytes:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while self._read(deadline):
            pass
        return self.seen


class ServerProcess:
    """``python -m trio_upper serve`` (or a lecture server) as a subprocess;
    learns its port from the line it prints when ready. As a context manager
    it kills the process at the end, whatever happened."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=preexec_fn,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        # The first line is not part of stdout as stop() returns it.
        self.stdout = OutputReader(self.proc.stdout.fileno(), "the server's stdout")
        self.stderr = OutputReader(self.proc.stderr.fileno(), "the server's stderr")
        try:
            self.first_line = self.stdout.take_line().decode()
            found = re.search(r"(?::|port )(\d+)\b", self.first_line)
            assert found is not None, self.first_line
        except AssertionError as exc:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=PROCESS_TIMEOUT)
            raise AssertionError(f"server did not start: {exc} {err!r}") from None
        self.port = int(found.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        """Send ``sig``, wait, and return (exit status, all of stdout after
        the first line, all of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=PROCESS_TIMEOUT)
        out, err = self.stdout.seen + out, self.stderr.seen + err
        self.stdout.seen = self.stderr.seen = b""
        return self.proc.returncode, out.decode(), err.decode()

    def wait_for_exit(self) -> tuple[int, str, str]:
        """Wait for the server to exit by itself (no further signal), then
        what :meth:`stop` returns."""
        self.proc.wait(timeout=PROCESS_TIMEOUT)
        return self.stop()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop(signal.SIGKILL)


def serving(*flags: str, preexec_fn: Callable[[], None] | None = None) -> ServerProcess:
    """Our server on 127.0.0.1, a port of the OS's choosing, with extra
    ``serve`` flags; killed at the end whatever happened."""
    argv = cli("serve", "--host", "127.0.0.1", "--port", "0", *flags)
    return ServerProcess(argv, preexec_fn=preexec_fn)


# --- What the command line prints -----------------------------------------------------------


def usage_error_line(result: subprocess.CompletedProcess[bytes], command: str) -> str:
    """argparse's answer to bad usage: status 2, nothing on stdout, the usage
    and then exactly one error line, no traceback."""
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"Traceback" not in result.stderr
    lines = result.stderr.decode().splitlines()
    prog = f"trio-upper {command}" if command else "trio-upper"
    assert lines[0].startswith(f"usage: {prog} ")
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], lines
    assert lines[-1].startswith(f"{prog}: error: ")
    return lines[-1]


def help_entries(text: str) -> dict[str, str]:
    """argparse help as {invocation: help text}: ``"-p PORT, --port PORT"``
    maps to ``"port for both ... (default: 12000)"``, whitespace normalised."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if re.match(r"  \S", line):
            current, _, rest = re.sub(r"^\s+", "", line).partition("  ")
            entries[current] = rest.strip()
        elif current is not None and re.match(r"\s{3,}\S", line):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def entry_for(entries: dict[str, str], option: str) -> str:
    found = [
        help_text
        for invocation, help_text in entries.items()
        if option in re.split(r"[,\s]+", invocation)
    ]
    assert len(found) == 1, f"{option} in {list(entries)}"
    return found[0]
