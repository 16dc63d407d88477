"""A lean TCP stream and listener: trio's contract, a fraction of the cost.

:class:`trio.SocketStream` and :class:`trio.SocketListener` are general: each
call goes through a trio socket wrapper, a generator-based error-translating
context manager and a conflict detector before it reaches the system call. A
small-message server spends most of its CPU there (see the benchmark notes in
``benchmarks/RESULTS.md``). :class:`FastSocketStream` and
:class:`FastSocketListener` implement the same abstract classes,
:class:`trio.abc.HalfCloseableStream` and :class:`trio.abc.Listener`, directly
on a non-blocking standard-library socket and trio's public low-level API
(:func:`trio.lowlevel.wait_readable`, :func:`~trio.lowlevel.wait_writable`,
:func:`~trio.lowlevel.notify_closing` and the checkpoint functions).

They keep every promise of the abstract classes: each call is a checkpoint
(a cancel point and a schedule point), two tasks using the same direction at
once get :exc:`trio.BusyResourceError`, a closed stream raises
:exc:`trio.ClosedResourceError` and a broken one :exc:`trio.BrokenResourceError`.
The test suite runs :func:`trio.testing.check_half_closeable_stream` on them.
Because every call is a schedule point, one busy connection cannot starve
the others.

What they save is where the schedule point goes. :meth:`receive_some` takes
its schedule point *before* it reads: by the time the task runs again the
peer's next request has usually arrived, so the read succeeds at once and the
task never has to register with the I/O manager and park. :meth:`send_all`
takes it after writing, for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
from typing import NoReturn

import trio
from trio import current_effective_deadline
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

__all__ = ["DEFAULT_RECEIVE_SIZE", "FastSocketListener", "FastSocketStream"]

# As in trio.SocketStream: one read takes whatever the kernel has, up to this.
DEFAULT_RECEIVE_SIZE = 65536

# Bytes the kernel may hold unsent for one connection before a write waits;
# trio.SocketStream uses the same value. It bounds the memory a client that
# never reads can pin in the kernel, and keeps send_all's back-pressure prompt.
_NOTSENT_LOWAT = 16384

# The errors a listening socket reports for a connection that went away
# before we accepted it: skip to the next one (trio.SocketListener does too).
_IGNORABLE_ACCEPT_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT}
    | {errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)


def _set_tcp_options(sock: socket.socket) -> None:
    """TCP_NODELAY and TCP_NOTSENT_LOWAT on a TCP socket, as trio.SocketStream
    sets them; other sockets (Unix) are left alone.

    Failures are ignored, as trio.SocketStream ignores them: macOS and the
    BSDs refuse options on a connection already reset before it was accepted
    (EINVAL), and an old kernel may lack TCP_NOTSENT_LOWAT. A stream works
    without either; a reset connection then reports itself on first use.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)


def _has_tcp_options(sock: socket.socket) -> bool:
    """Whether ``sock`` already has what _set_tcp_options would set."""
    try:
        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            return False
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            return bool(lowat == _NOTSENT_LOWAT)
    except OSError:
        return False
    return True


# The errors that mean the socket itself is gone (closed under us): EBADF on
# Unix, ENOTSOCK on Windows. trio.SocketStream and trio.SocketListener treat
# them as ClosedResourceError; so do we.
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def _stream_error(exc: OSError) -> Exception:
    """The stream exception for a socket error, as trio.SocketStream maps them."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` over a connected TCP socket.

    Args:
      sock: A connected ``SOCK_STREAM`` standard-library socket. The stream
          makes it non-blocking and owns it from then on.
      set_options: Set ``TCP_NODELAY`` (replies go out as soon as they are
          written) and ``TCP_NOTSENT_LOWAT`` where the system has them.
          :class:`FastSocketListener` passes False when its connections
          inherit both from the listening socket, saving two system calls
          per connection.

    Attributes:
      socket: The underlying standard-library socket, for ``getpeername`` and
          socket options. Do not read from it or write to it directly.
    """

    __slots__ = ("_can_send", "_closed", "_receiving", "_sending", "_shut_wr", "socket")

    def __init__(self, sock: socket.socket, *, set_options: bool = True) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("FastSocketStream requires a SOCK_STREAM socket")
        sock.setblocking(False)
        if set_options:
            _set_tcp_options(sock)
        self.socket = sock
        self._closed = False
        self._shut_wr = False
        # Neither closed nor shut down for writing: one check on the hot path.
        self._can_send = True
        self._sending = False
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Wait for data and return up to ``max_bytes`` of it (default 64 KiB);
        ``b""`` means the peer sent EOF. A checkpoint."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            # The schedule point first: see the module docstring.
            await checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                try:
                    return self.socket.recv(max_bytes)
                except BlockingIOError:
                    await wait_readable(self.socket)
                except OSError as exc:
                    raise _stream_error(exc) from exc
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the kernel's buffer is full.
        A checkpoint. If cancelled, some of ``data`` may have been sent."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint_if_cancelled()
            if not self._can_send:
                self._raise_cannot_send()
            # The common case, a reply that fits in the kernel's buffer, costs
            # one system call and no memoryview.
            try:
                sent = self.socket.send(data) if data else 0
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _stream_error(exc) from exc
            if sent == len(data):
                await cancel_shielded_checkpoint()
            else:
                await self._send_rest(data, sent)
        finally:
            self._sending = False

    async def _send_rest(self, data: bytes | bytearray | memoryview, sent: int) -> None:
        # The kernel buffer is full: wait for room (each wait is a schedule
        # point), then send more.
        with memoryview(data) as view:
            while sent < len(view):
                await wait_writable(self.socket)
                if not self._can_send:
                    self._raise_cannot_send()
                try:
                    with view[sent:] as rest:
                        sent += self.socket.send(rest)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _stream_error(exc) from exc

    def _raise_cannot_send(self) -> NoReturn:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        raise trio.ClosedResourceError("can't send data after sending EOF")

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the kernel has room for more data. A checkpoint."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await wait_writable(self.socket)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Close the sending direction (TCP FIN); receiving goes on. A
        checkpoint; calling it again does nothing."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if self._shut_wr:
                return
            self._shut_wr = True
            self._can_send = False
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _stream_error(exc) from exc
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Close the socket at once. A checkpoint; calling it again does nothing.

        Tasks blocked in another call on this stream get
        :exc:`trio.ClosedResourceError`. Called in a cancelled scope, it
        closes and returns: see below.
        """
        if not self._closed:
            self._closed = True
            self._can_send = False
            # Wake any task parked on this socket before the fd goes away.
            # Only a task inside one of our calls can be parked on it, and
            # notify_closing costs a system call: skip it when there is none.
            if self._receiving or self._sending:
                notify_closing(self.socket)
            self.socket.close()
        if current_effective_deadline() == -math.inf:
            # Cancelled already: trio.serve_listeners closes every
            # connection with trio.aclose_forcefully once its handler ends.
            # The close is done, which is all a cancelled aclose owes, as
            # when any operation completes; a cancel point here would only
            # raise Cancelled, and delivering that costs trio about 20 us, a
            # quarter of a whole connect-send-receive-close (measured:
            # benchmarks/RESULTS.md, "connect per request").
            await cancel_shielded_checkpoint()
            return
        await checkpoint()


class FastSocketListener(trio.abc.Listener[FastSocketStream]):
    """A :class:`trio.abc.Listener` over a listening TCP socket, whose
    connections are :class:`FastSocketStream`.

    Args:
      sock: A bound, listening ``SOCK_STREAM`` standard-library socket. The
          listener makes it non-blocking and owns it from then on.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("FastSocketListener requires a SOCK_STREAM socket")
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            # macOS has no SO_ACCEPTCONN: trust the caller, as trio does.
            pass
        else:
            if not listening:
                raise ValueError("FastSocketListener requires a listening socket")
        sock.setblocking(False)
        # Set here, the options reach every connection for free where the
        # system copies them to accepted sockets (Linux and the BSDs do).
        _set_tcp_options(sock)
        self.socket = sock
        self._closed = False
        # Learned from the first connection: do accepted sockets inherit them?
        self._options_inherited: bool | None = None
        # Set when the server stops: accept() then takes only connections
        # already queued, and raises trio.WouldBlock rather than wait.
        self.draining = False

    @classmethod
    def from_trio(cls, listener: trio.SocketListener) -> FastSocketListener:
        """Take over the socket of a :class:`trio.SocketListener`, such as one
        :func:`trio.open_tcp_listeners` returned. ``listener`` must not be
        used afterwards."""
        trio_sock = listener.socket
        sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, trio_sock.detach())
        try:
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    async def accept(self) -> FastSocketStream:
        """Wait for a connection and return it. A checkpoint.

        Raises:
          trio.ClosedResourceError: the listener was closed.
          trio.WouldBlock: :attr:`draining` is set and no connection waits.
          OSError: a resource error such as ``EMFILE`` (out of file
              descriptors), which the caller decides how to handle.
              Connections that were reset before we took them are skipped.
        """
        await checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this listener was closed")
            try:
                sock, _ = self.socket.accept()
            except BlockingIOError:
                if self.draining:
                    raise trio.WouldBlock from None
                await wait_readable(self.socket)
            except OSError as exc:
                if exc.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError("this listener was closed") from None
                if exc.errno not in _IGNORABLE_ACCEPT_ERRNOS:
                    raise
            else:
                if self._options_inherited is None:
                    self._options_inherited = _has_tcp_options(sock)
                return FastSocketStream(sock, set_options=not self._options_inherited)

    async def aclose(self) -> None:
        """Close the listening socket: new connections are refused from now
        on. A checkpoint; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            notify_closing(self.socket)
            self.socket.close()
        await checkpoint()
