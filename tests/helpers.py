"""Helpers shared by the tests: in-memory listeners and sockets that the
server runs over under the mock clock, with faults to inject."""

from __future__ import annotations

import collections
import errno
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

HalfCloseable = trio.abc.HalfCloseableStream

# An accept loop that retries without waiting never lets the virtual clock
# move: past this many accept() calls the test listener fails the test rather
# than spin with it.
MAX_ACCEPT_CALLS = 100_000


class Descriptor(HalfCloseable):
    """The server's end of a connection, holding one of its listener's
    descriptors until the server closes it."""

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
    """Like conftest's MemoryListener, plus what these tests need: lockstep
    connections, a count of accept() calls (a spinning accept loop fails the
    test), and the errors of a listening socket out of resources.

    It keeps an accept queue, as the kernel does, so that errors come when a
    listening socket gives them: ``fail_with`` (an errno; None for none) makes
    accept() fail whenever a connection waits, for as long as it is set.
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
        """Open a connection; returns once the server has accepted it, raises
        BrokenResourceError if the server stopped accepting first."""
        client: HalfCloseable
        server: HalfCloseable
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection refused")
        queued = Queued(server)
        self._queue.append(queued)
        self._arrival.unpark_all()
        try:
            await queued.taken.wait()
        finally:
            if not queued.taken.is_set():  # cancelled: give up the place
                self._queue.remove(queued)
        if queued.refused:
            raise trio.BrokenResourceError("connection refused")
        return client


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
