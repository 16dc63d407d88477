"""The server: TCP and UDP on one port, under one nursery.

The task tree, from the top::

    UpperServer.serve
    └── handler scope (deadline set at shutdown: the grace period)
        └── handlers nursery: one handle_stream task per TCP connection
            └── accepting scope (cancelled at shutdown: stop accepting at once)
                └── accepting nursery
                    ├── _accept_loop, one per listener: accepts, starts handlers above
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

from .errors import UserError, host_port, plural
from .fastsocket import FastSocketListener
from .ratelimit import DEFAULT_RATE, ReplyRateLimiter
from .tcp import handle_stream
from .udp import UdpCounts, serve_udp

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
# listener: see _accept_loop): back-pressure on clients, and a bound on the
# server's memory and file descriptors.
DEFAULT_MAX_CONNECTIONS = 10_000

# Seconds a connection may send nothing before the server closes it (the
# slow-loris defence). Long enough for a person at the interactive client to
# stop and think; 0 turns it off.
DEFAULT_IDLE_TIMEOUT = 300.0

# accept() errors that mean "out of something" (descriptors, kernel memory),
# not "this listener is broken": wait a little, then accept again, as
# trio.serve_listeners does. The wait is short because a connection ending
# frees a descriptor at once.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY = 0.1

# Under sustained overload accepting pauses and resumes once per connection;
# a new pause is logged (with its resumption) at most this often.
_PAUSE_LOG_INTERVAL = 10.0

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
    if isinstance(listener, (trio.SocketListener, FastSocketListener)):
        return _endpoint("tcp", listener.socket.getsockname())
    # A listener with no socket (the tests' in-memory one).
    return Endpoint("tcp", f"<{type(listener).__name__}>", 0)


def _where(host: str | None, port: int) -> str:
    return f"{host or 'all interfaces'} port {port}"


async def _bind_udp(host: str | None, port: int) -> list[socket.socket]:
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
    return sockets


async def _bind_at(
    config: ServerConfig, port: int
) -> tuple[list[_TcpListener], list[socket.socket]]:
    listeners: list[_TcpListener] = []
    if config.tcp:
        # trio resolves, binds and listens; the sockets then serve as
        # FastSocketListener, whose streams cost less per call.
        bound = await trio.open_tcp_listeners(port, host=config.host)
        listeners.extend(FastSocketListener.from_trio(listener) for listener in bound)
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
) -> tuple[list[_TcpListener], list[socket.socket]]:
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
        # Connection slots in use, shared by every listener (IPv4 and IPv6):
        # taken when a connection is accepted, given back when its handler
        # ends. _slot_freed is set (and replaced) when one frees up while all
        # are taken, which is when accept loops wait on it.
        self._in_use = 0
        self._slot_freed = trio.Event()
        # When accepting is paused (slots or descriptors ran out), for one
        # log line per pause rather than one per attempt (see _pause).
        self._paused_since: float | None = None
        self._pause_logged = False
        self._last_pause_log = -math.inf
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
        udp_sockets: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
    ) -> ServerStats:
        """Serve on already-bound listeners and UDP sockets until shut down.

        This is the second half of :func:`trio.serve_tcp` (its
        :func:`trio.serve_listeners`, here :meth:`_accept_loop`, with a handler
        nursery of our own so that connections outlive the accept loop by the
        grace period) plus one
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
        udp_sockets: Sequence[socket.socket],
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[Endpoint]],
    ) -> None:
        """Accept connections (their handlers go to ``handlers``) and answer
        datagrams until :meth:`shutdown` cancels this; then close every
        listener and UDP socket."""
        served = [_listener_endpoint(listener) for listener in listeners]
        served += [_endpoint("udp", sock.getsockname()) for sock in udp_sockets]
        with self._accepting, contextlib.ExitStack() as udp_closer:
            for sock in udp_sockets:
                udp_closer.enter_context(sock)
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, handlers)
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

    async def _accept_loop(self, listener: _TcpListener, handlers: trio.Nursery) -> None:
        """Accept connections from ``listener`` while a slot is free and start
        a handler in ``handlers`` for each; close ``listener`` when cancelled.

        This is trio.serve_listeners' loop with two additions: it accepts
        only while a connection slot (``--max-connections``) is free, and it
        logs running out of slots or descriptors once per episode, not once
        per attempt.
        """
        async with listener:
            while True:
                while self._full():
                    self._pause(
                        f"{plural(self._in_use, 'connection')} open, "
                        "the most --max-connections allows"
                    )
                    # Wait for a free slot without taking it: the accept
                    # below may wait a long time, and a slot held meanwhile
                    # would be lost to the other listeners (IPv4 and IPv6).
                    # Waking at the log interval lets _pause speak up.
                    with trio.move_on_after(_PAUSE_LOG_INTERVAL):
                        await self._slot_freed.wait()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._pause(
                        f"cannot accept with {plural(self._in_use, 'connection')} open: "
                        f"{exc.strerror or exc}"
                    )
                    await trio.sleep(_ACCEPT_RETRY)
                    continue
                # Another listener may have taken the last slot while this
                # one waited in accept(): then this connection, and no other,
                # waits (unread, unanswered) for the next free slot.
                try:
                    while self._full():
                        await self._slot_freed.wait()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                self._in_use += 1
                self._resume()
                handlers.start_soon(self._handle, stream)

    def _full(self) -> bool:
        return self._in_use >= self.config.max_connections

    def _pause(self, why: str) -> None:
        """Note that accepting waits; called again while the wait goes on."""
        now = trio.current_time()
        if self._paused_since is None:
            self._paused_since = now
            self._pause_logged = False
        # At the limit for good, every connection that ends lets exactly one
        # waiting connection in, and the next finds the server full again:
        # one line for all of that, not two per connection. A pause that
        # began too soon after the last line is logged once it has lasted
        # until the interval is up, so a long one is never left unsaid.
        if not self._pause_logged and now - self._last_pause_log >= _PAUSE_LOG_INTERVAL:
            self._pause_logged = True
            self._last_pause_log = now
            logger.warning("%s; new connections wait until one closes", why)

    def _resume(self) -> None:
        if self._paused_since is None:
            return
        if self._pause_logged:
            logger.warning(
                "accepting connections again, after %.1f s",
                trio.current_time() - self._paused_since,
            )
        self._paused_since = None

    async def _handle(self, stream: trio.abc.Stream) -> None:
        # Everything that can go wrong with one connection stops here: an
        # exception escaping a handler would crash the whole server.
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
            if self._full():
                self._slot_freed.set()
                self._slot_freed = trio.Event()
            self._in_use -= 1
