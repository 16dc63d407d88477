"""The server: TCP and UDP on one port, under one nursery.

The task tree, from the top::

    UpperServer.serve
    └── handler scope (deadline set at shutdown: the grace period)
        └── handlers nursery: one _handle task per TCP connection
            └── accepting scope (cancelled at shutdown: stop accepting at once)
                └── accepting nursery
                    ├── trio.serve_listeners(_handle, CapacityListeners,
                    │                        handler_nursery=handlers nursery)
                    └── serve_udp, one per bound UDP socket

Shutdown is nothing but cancellation: :meth:`UpperServer.shutdown` cancels the
accepting scope, which closes the listeners and UDP sockets, and gives the
handler scope a deadline. Open connections finish on their own before it or
are cancelled at it; then :meth:`UpperServer.serve` returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import trio

from .capacity import CapacityListener, ConnectionSlots
from .errors import UserError, host_port
from .fastsocket import FastSocketListener
from .ratelimit import DEFAULT_RATE, ReplyRateLimiter
from .tcp import handle_stream, socket_of
from .udp import DatagramSocket, UdpCounts, UdpSocket, serve_udp

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_PORT",
    "Endpoint",
    "ServerConfig",
    "ServerStats",
    "UpperServer",
    "bind",
]

logger = logging.getLogger("trio_upper.server")

# The lecture's port.
DEFAULT_PORT = 12000

# Long enough for a request in flight to be answered, short enough that a
# stopped service is gone before an impatient person presses Ctrl-C again.
DEFAULT_GRACE = 5.0

# Connections handled at once. Past it, new connections wait, unaccepted,
# in the kernel's listen queue until one ends (but for one per extra
# listener: see capacity.py): back-pressure on clients, and a bound on the
# server's memory and file descriptors.
DEFAULT_MAX_CONNECTIONS = 10_000

# Seconds a connection may send nothing before the server closes it (the
# slow-loris defence). Long enough for a person at the interactive client to
# stop and think; 0 turns it off.
DEFAULT_IDLE_TIMEOUT = 300.0

# With --port 0 the OS picks a free TCP port, and UDP (and the other address
# family) must then bind that same number. Something else may hold it on UDP,
# or grab it in between: try a few fresh ports before giving up.
_PORT_ZERO_ATTEMPTS = 10

_TcpListener = trio.abc.Listener[trio.abc.Stream]


@dataclass(frozen=True)
class ServerConfig:
    """Everything a user can set on the server (see ``serve --help``).

    ``host=None`` means every interface, IPv4 and IPv6 where available.
    """

    host: str | None = None
    port: int = DEFAULT_PORT
    tcp: bool = True
    udp: bool = True
    ascii_only: bool = False
    grace: float = DEFAULT_GRACE
    # UDP replies per second per source network (see ratelimit.source_network);
    # 0 turns the limit off.
    udp_rate_limit: float = DEFAULT_RATE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # 0 means never.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


@dataclass
class ServerStats:
    """What a server did, for its closing summary."""

    connections: int = 0
    active: int = 0
    cut_off: int = 0
    udp: UdpCounts = field(default_factory=UdpCounts)


class Endpoint(NamedTuple):
    """One address the server serves; ``str()`` gives ``tcp [::]:12000``."""

    protocol: str  # "tcp" or "udp"
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol} {host_port(self.host, self.port)}"


def _endpoint(protocol: str, sockaddr: tuple[Any, ...]) -> Endpoint:
    return Endpoint(protocol, sockaddr[0], sockaddr[1])


def _listener_endpoint(listener: _TcpListener) -> Endpoint:
    sock = socket_of(listener)
    if sock is None:
        # A listener with no socket (the tests' in-memory one).
        return Endpoint("tcp", f"<{type(listener).__name__}>", 0)
    return _endpoint("tcp", sock.getsockname())


def _where(host: str | None, port: int) -> str:
    return f"{host or 'all interfaces'} port {port}"


async def _bind_udp(host: str | None, port: int) -> list[UdpSocket]:
    """Bind a UDP socket on every address ``host`` resolves to, as
    :func:`trio.open_tcp_listeners` does for TCP (same families, same rules)."""
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                # As in trio: a family the system lacks is fine as long as
                # some other family works.
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            sockets.append(sock)
            # No SO_REUSEADDR on UDP: on Linux it would let a second server
            # bind the same port silently and steal half the datagrams.
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, "no usable address family")
    return [UdpSocket(sock) for sock in sockets]


async def _take_over(bound: list[trio.SocketListener]) -> list[_TcpListener]:
    """The listeners trio bound, as FastSocketListeners, whose streams cost
    less per call; if one cannot be taken over, every one is closed."""
    taken: list[_TcpListener] = []
    try:
        for listener in bound:
            taken.append(FastSocketListener.from_trio(listener))
    except BaseException:
        for closing in [*taken, *bound[len(taken) :]]:
            await trio.aclose_forcefully(closing)
        raise
    return taken


async def _bind_at(config: ServerConfig, port: int) -> tuple[list[_TcpListener], list[UdpSocket]]:
    listeners: list[_TcpListener] = []
    if config.tcp:
        # trio resolves, binds and listens.
        listeners = await _take_over(await trio.open_tcp_listeners(port, host=config.host))
    try:
        udp_sockets = await _bind_udp(config.host, port) if config.udp else []
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners, udp_sockets


async def _free_port(host: str | None) -> int:
    probe = await trio.open_tcp_listeners(0, host=host)
    port: int = probe[0].socket.getsockname()[1]
    for listener in probe:
        await trio.aclose_forcefully(listener)
    return port


async def bind(
    config: ServerConfig,
) -> tuple[list[_TcpListener], list[UdpSocket]]:
    """Bind everything ``config`` asks for, all on one port number.

    This is the first half of :func:`trio.serve_tcp` (its
    :func:`trio.open_tcp_listeners`) plus the UDP sockets, done as one step so
    that the server is either listening on everything or on nothing.

    Args:
      config: Uses ``host``, ``port``, ``tcp`` and ``udp``. With port 0 the
          OS picks a port free for every protocol and family bound.

    Returns:
      The TCP listeners and the UDP sockets; the caller owns both.

    Raises:
      UserError: the host does not resolve, or a bind failed (port in use,
          permission denied, address not available); nothing stays bound.
    """
    try:
        if config.port != 0:
            return await _bind_at(config, config.port)
        for _ in range(_PORT_ZERO_ATTEMPTS):
            try:
                return await _bind_at(config, await _free_port(config.host))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no port was free on both TCP and UDP")
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError.unresolvable(config.host, exc) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot serve on {_where(config.host, config.port)}: {reason}") from exc


class UpperServer:
    """The uppercase service: TCP and UDP, run under one nursery.

    Use it once: ``await nursery.start(server.run)`` binds, returns the list of
    :class:`Endpoint` served once every socket is ready, and serves until
    :meth:`shutdown`; ``run`` then returns :attr:`stats`.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._accepting = trio.CancelScope()
        self._handlers = trio.CancelScope()
        self._not_accepting = trio.Event()
        # One limiter for every UDP socket: a source is one source whichever
        # of our addresses it writes to.
        self._limiter = (
            ReplyRateLimiter(config.udp_rate_limit) if config.udp_rate_limit > 0 else None
        )

    async def run(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> ServerStats:
        """Bind as :func:`bind` does, then :meth:`serve`.

        Returns:
          The server's counts, once it has shut down.

        Raises:
          UserError: binding failed (see :func:`bind`).
        """
        listeners, udp_sockets = await bind(self.config)
        return await self.serve(listeners, udp_sockets, task_status=task_status)

    async def serve(
        self,
        listeners: Sequence[_TcpListener],
        udp_sockets: Sequence[DatagramSocket],
        *,
        task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
    ) -> ServerStats:
        """Serve on already-bound listeners and UDP sockets until shut down.

        This is the second half of :func:`trio.serve_tcp`:
        :func:`trio.serve_listeners`, with :meth:`_handle` for each
        connection, a handler nursery of our own so that connections outlive
        accepting by the grace period, and each listener wrapped in a
        :class:`~trio_upper.capacity.CapacityListener` for
        ``--max-connections``. Beside it, one
        :func:`~trio_upper.udp.serve_udp` loop per UDP socket. Any
        :class:`trio.abc.Listener` works, which is how the tests drive it over
        in-memory streams.

        Args:
          listeners: TCP listeners. Closed when accepting stops.
          udp_sockets: Bound UDP sockets. Closed when accepting stops.
          task_status: Started with the list of :class:`Endpoint` served.

        Returns:
          The server's counts.
        """
        with self._handlers:
            async with trio.open_nursery() as handlers:
                try:
                    await self._accept(listeners, udp_sockets, handlers, task_status)
                finally:
                    # In a finally: a zero grace cancels the handler scope at
                    # the same moment, and its Cancelled passes through here.
                    self._not_accepting.set()
                logger.debug("stopped accepting; %d connections open", self.stats.active)
        return self.stats

    async def _accept(
        self,
        listeners: Sequence[_TcpListener],
        udp_sockets: Sequence[DatagramSocket],
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[Endpoint]],
    ) -> None:
        """Accept connections (their handlers go to ``handlers``) and answer
        datagrams until :meth:`shutdown` cancels this; then close every
        listener and UDP socket."""
        served = [_listener_endpoint(listener) for listener in listeners]
        served += [_endpoint("udp", sock.getsockname()) for sock in udp_sockets]
        slots = ConnectionSlots(self.config.max_connections)
        capped = [CapacityListener(listener, slots) for listener in listeners]
        with self._accepting, contextlib.ExitStack() as udp_closer:
            for sock in udp_sockets:
                udp_closer.callback(sock.close)
            async with trio.open_nursery() as accepting:
                if capped:
                    # serve_listeners closes the listeners when cancelled.
                    await accepting.start(
                        partial(
                            trio.serve_listeners, self._handle, capped, handler_nursery=handlers
                        )
                    )
                for sock in udp_sockets:
                    accepting.start_soon(
                        partial(
                            serve_udp,
                            sock,
                            ascii_only=self.config.ascii_only,
                            limiter=self._limiter,
                            counts=self.stats.udp,
                        )
                    )
                logger.debug("serving on %s", ", ".join(map(str, served)))
                task_status.started(served)

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting now; cancel connections still open ``grace`` seconds
        from now (default: the configured grace period).

        Calling it again with a shorter grace shortens the wait, so a second
        Ctrl-C can mean "stop now" (``grace=0``). Must be called from trio.
        """
        if grace is None:
            grace = self.config.grace
        self._accepting.cancel()
        deadline = trio.current_time() + grace
        self._handlers.deadline = min(self._handlers.deadline, deadline)

    async def stopped_accepting(self) -> None:
        """Wait until, after :meth:`shutdown`, the listeners and UDP sockets
        are closed: from then on new connections are refused."""
        await self._not_accepting.wait()

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` has been called."""
        return self._accepting.cancel_called

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """The per-connection handler that serve_listeners runs: it contains
        everything that can go wrong with one connection, because an
        exception escaping it would crash the whole server. serve_listeners
        closes ``stream`` (and so frees its slot) when this returns."""
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await handle_stream(
                stream,
                ascii_only=self.config.ascii_only,
                idle_timeout=self.config.idle_timeout or math.inf,
            )
        except trio.Cancelled:
            self.stats.cut_off += 1
            raise
        except Exception as exc:
            # handle_stream contains the failures a peer can cause; reaching
            # this means a bug in trio-upper. Log it and keep serving others.
            logger.error(
                "connection dropped by an internal error: %r",
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        finally:
            self.stats.active -= 1
