"""FastSocketStream and FastSocketListener keep trio's stream and listener
contracts (trio's own conformance checks run on them), and a busy
connection cannot starve the others."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_upper.fastsocket import FastSocketListener, FastSocketStream
from trio_upper.server import ServerConfig, bind

from .helpers import (
    LOOPBACK_HANG,
    PROCESS_TIMEOUT,
    LoopbackServer,
    fails_if_it_hangs,
    receive_exactly,
    reset_on_close,
    until,
    writable,
)


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def _stream_pair() -> tuple[FastSocketStream, FastSocketStream]:
    with _listening_socket() as listening:
        client = socket.create_connection(listening.getsockname())
        server, _ = listening.accept()
    return FastSocketStream(client), FastSocketStream(server)


async def _fill(stream: FastSocketStream) -> None:
    """Write until the kernel's buffers on both ends are full: the kernel
    takes no more, and the writer waits for room."""
    with trio.fail_after(LOOPBACK_HANG):
        async with trio.open_nursery() as nursery:

            async def write_forever() -> None:
                while True:
                    await stream.send_all(b"x" * 65536)

            nursery.start_soon(write_forever)
            await until(lambda: not writable(stream.socket))
            nursery.cancel_scope.cancel()


async def _clogged_stream_pair() -> tuple[FastSocketStream, FastSocketStream]:
    left, right = await _stream_pair()
    for stream in (left, right):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await _fill(left)
    await _fill(right)
    return left, right


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_fast_socket_stream_passes_trios_stream_checks() -> None:
    await trio.testing.check_half_closeable_stream(_stream_pair, _clogged_stream_pair)


async def test_fast_socket_stream_rejects_a_datagram_socket() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as sock, pytest.raises(ValueError, match="STREAM"):
        FastSocketStream(sock)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_a_reset_is_a_broken_stream_not_an_os_error() -> None:
    client, server = await _stream_pair()
    reset_on_close(client.socket)
    await client.aclose()
    with pytest.raises(trio.BrokenResourceError) as caught:
        await server.receive_some()
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    await server.aclose()


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_listener_accepts_fast_streams_and_closes() -> None:
    listener = FastSocketListener(_listening_socket())
    address = listener.socket.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.open_tcp_stream, *address))
        with trio.testing.assert_checkpoints():
            stream = await listener.accept()
        assert isinstance(stream, FastSocketStream)
        # Replies are not held back for Nagle, whether the option came from
        # the listening socket or was set on the connection.
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.aclose()
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
    # Closed means refused, not queued.
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(*address)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_closing_the_listener_wakes_a_pending_accept() -> None:
    listener = FastSocketListener(_listening_socket())

    async def accept_expecting_closed() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_expecting_closed)
        await trio.testing.wait_all_tasks_blocked()
        await listener.aclose()


async def test_listener_takes_over_a_trio_listener() -> None:
    (trio_listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = trio_listener.socket.getsockname()
    listener = FastSocketListener.from_trio(trio_listener)
    assert listener.socket.getsockname() == address
    await listener.aclose()


def test_listener_rejects_a_socket_that_is_not_listening() -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="listening"):
        FastSocketListener(sock)


class _Flood:
    """A client in two threads that sends as fast as the server takes data
    and reads every reply, so the server's handler for it never has to wait.
    It stops after ``BUDGET`` bytes: were the server unfair, the test would
    then fail on the flood having ended, rather than hang."""

    CHUNK = b"flood " * 10000
    BUDGET = 2000 * len(CHUNK)

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        # A small receive buffer, so that bytes counted as received were
        # sent by the server just now, not long ago.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        self.received = 0
        self.started = threading.Event()
        self.sent_all = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(self.BUDGET // len(self.CHUNK)):
                self.sock.sendall(self.CHUNK)
        self.sent_all.set()

    def _receive(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(1 << 20):
                self.received += len(chunk)
                if self.received > 10 * len(self.CHUNK):
                    self.started.set()


@contextlib.contextmanager
def _flooding(port: int) -> Iterator[_Flood]:
    flood = _Flood(port)
    for thread in flood.threads:
        thread.start()
    try:
        yield flood
    finally:
        flood.sock.shutdown(socket.SHUT_RDWR)
        flood.sock.close()
        for thread in flood.threads:
            thread.join(PROCESS_TIMEOUT)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_a_flooding_client_does_not_starve_another(loopback: LoopbackServer) -> None:
    with _flooding(loopback.port) as flood:
        # Wait in a thread until the flood is being served. (A thread is
        # not cancelled with the test: its wait has a bound of its own.)
        started = await trio.to_thread.run_sync(flood.started.wait, LOOPBACK_HANG)
        assert started, "the flood was never served"
        async with await loopback.connect() as polite:
            for n in range(20):
                before = flood.received
                line = b"line %d\n" % n
                await polite.send_all(line)
                assert await receive_exactly(polite, len(line)) == line.upper()
                # Fairness in bytes, not seconds: while the polite client
                # waited, the flood got a bounded share, not the whole server.
                assert flood.received - before < 32 * len(flood.CHUNK)
        # Still flooding: the server served both at once.
        assert not flood.sent_all.is_set()


# --- trio's tolerance, kept ---------------------------------------------------------------


class NoAcceptConnSocket(socket.socket):
    """A listening socket as on macOS, which has no SO_ACCEPTCONN option."""

    def getsockopt(self, level: int, option: int, *args: int) -> Any:
        if (level, option) == (socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return super().getsockopt(level, option, *args)


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_listener_trusts_a_socket_whose_system_cannot_say_it_listens() -> None:
    # trio.SocketListener does the same: refusing would make the server fail
    # to start on macOS.
    sock = NoAcceptConnSocket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    async with FastSocketListener(sock) as listener:
        with socket.create_connection(sock.getsockname()) as client:
            async with await listener.accept() as stream:
                client.sendall(b"hi")
                assert await receive_exactly(stream, 2) == b"hi"


class NotASocketAnyMore(socket.socket):
    """A socket whose every call fails as on Windows once it was closed under
    us: ENOTSOCK (on Unix it is EBADF)."""

    gone = False

    def _check(self) -> None:
        if self.gone:
            raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))

    def recv(self, *args: Any) -> bytes:
        self._check()
        return super().recv(*args)

    def send(self, *args: Any) -> int:
        self._check()
        return super().send(*args)

    def accept(self) -> tuple[socket.socket, Any]:
        self._check()
        return super().accept()


@fails_if_it_hangs(LOOPBACK_HANG)
async def test_enotsock_means_closed_as_in_trio() -> None:
    with _listening_socket() as listening:
        client = NotASocketAnyMore()
        client.connect(listening.getsockname())
        peer, _ = listening.accept()
    with peer:
        stream = FastSocketStream(client)
        client.gone = True
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")
        await stream.aclose()
    sock = NotASocketAnyMore()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    listener = FastSocketListener(sock)
    sock.gone = True
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
    await listener.aclose()


async def test_binding_leaks_no_listener_when_one_cannot_be_taken_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[trio.SocketListener] = []
    open_tcp_listeners = trio.open_tcp_listeners

    async def two_listeners(port: int, *, host: str | None = None) -> list[trio.SocketListener]:
        # As for a host with an IPv4 and an IPv6 address.
        for _ in range(2):
            made.extend(await open_tcp_listeners(0, host="127.0.0.1"))
        return made

    real_from_trio = FastSocketListener.from_trio

    def second_fails(listener: trio.SocketListener) -> FastSocketListener:
        if listener is made[1]:
            raise ValueError("cannot take this one over")
        return real_from_trio(listener)

    monkeypatch.setattr("trio_upper.server.trio.open_tcp_listeners", two_listeners)
    monkeypatch.setattr(FastSocketListener, "from_trio", second_fails)
    with pytest.raises(ValueError, match="cannot take this one over"):
        await bind(ServerConfig(host="127.0.0.1", port=12000, udp=False))
    assert len(made) == 2
    # Every socket was closed: the one taken over and the one that was not.
    assert [listener.socket.fileno() for listener in made] == [-1, -1]
